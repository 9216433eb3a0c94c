"""A real agent under hostile MQTT input (issue 12): it keeps answering and publishing, its status tells the
truth, and nothing is lost from the outbox. The long run (10,000+ messages) is bench/hostile_bench.py."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from agent_helpers import Operator, device_over_mqtt, read_results
from hostile import CAMERAS, check_alive_and_truthful, extreme_setting, restore, structural
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

BASE = "edgevit/test-box"
ORIGINAL = {
    "fps": 15,
    "stride": 1,
    "region": None,
    "stall_timeout_s": 5.0,
    "paused": False,
    "loop": True,
    "reconnect": {"initial_s": 0.5, "max_s": 30.0, "jitter": 0.2},
}


class ResultCollector:
    """Every result the broker delivers, by (camera, boot, seq)."""

    def __init__(self, port: int) -> None:
        self.seen: set[tuple[str, str, int]] = set()
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="collector-hostile")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"{BASE}/+/result", qos=1)
        self.client.loop_start()

    def _on_message(self, client, userdata, message) -> None:  # noqa: ANN001
        r = json.loads(message.payload)
        with self._lock:
            self.seen.add((r["camera"], r["boot"], r["seq"]))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture(scope="module")
def device(tmp_path_factory, demo_bundle, signing_key, digits_video) -> Iterator[tuple[Operator, ResultCollector]]:
    folder = tmp_path_factory.mktemp("hostile")
    with device_over_mqtt(folder, demo_bundle, signing_key[1], digits_video, 15) as operator:
        collector = ResultCollector(operator.client.port)  # the broker device_over_mqtt started
        time.sleep(0.5)
        since = time.time()
        yield operator, collector
        time.sleep(1)
    time.sleep(1)
    collector.close()
    written = {
        (r["camera"], r["boot"], r["seq"]) for r in read_results(folder / "results.jsonl") if r["captured"] > since
    }
    missing = written - collector.seen
    assert written and not missing, f"{len(missing)} of {len(written)} results never reached the broker"


def results_in(operator: Operator) -> int:
    assert operator.folder is not None
    return len((operator.folder / "results.jsonl").read_text().splitlines())


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.lists(structural() | extreme_setting().map(lambda c: json.dumps(c).encode()), min_size=20, max_size=40))
def test_hostile_batches_leave_the_agent_answering_and_truthful(device, batch: list[bytes]) -> None:
    operator, _ = device
    replies = operator.send_many(batch)
    assert len(replies) == len(batch)
    for payload, reply in zip(batch, replies, strict=True):
        assert isinstance(reply.get("ok"), bool), (payload[:200], reply)
        if not reply["ok"]:
            assert reply["error"] and len(reply["error"]) < 2000
    restore(operator, dict.fromkeys(CAMERAS, ORIGINAL))
    check_alive_and_truthful(operator, lambda: results_in(operator))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"fps": 1e-300}, "fps must be 0 (every frame) or at least 0.01"),
        ({"fps": 1e-6}, "fps must be 0 (every frame) or at least 0.01"),
        ({"stall_timeout_s": 1e300}, "stall_timeout_s: Input should be less than or equal to 3600"),
        ({"region": [0, 0, 100000, 10]}, "region must lie within 16384 x 16384 pixels"),
        ({"reconnect": {"initial_s": 60, "max_s": 1}}, "initial_s (60) must not exceed max_s (1)"),
    ],
)
def test_settings_the_code_cannot_honour_are_refused(device, settings: dict, message: str) -> None:
    operator, _ = device
    reply = operator.send({"id": f"b-{time.monotonic_ns()}", "cmd": "set", "camera": "door", "settings": settings})
    assert not reply["ok"] and message in reply["error"], reply
    budget = operator.send({"id": f"b-{time.monotonic_ns()}", "cmd": "set", "batching": {"latency_budget_ms": 1e300}})
    assert (
        not budget["ok"]
        and "batching.latency_budget_ms: Input should be less than or equal to 60000" in (budget["error"])
    )


def test_a_region_outside_the_frame_is_reported_and_recovers(device) -> None:
    operator, _ = device
    reply = operator.send(
        {"id": "region-out", "cmd": "set", "camera": "yard", "settings": {"region": [600, 400, 40, 40]}}
    )
    assert reply["ok"]
    deadline = time.monotonic() + 10
    while True:
        yard = operator.send({"id": f"st-{time.monotonic_ns()}", "cmd": "status"})["result"]["cameras"]["yard"]
        if yard["state"] == "failed":
            break
        assert time.monotonic() < deadline, yard
        time.sleep(0.2)
    assert "region 600,400,40,40 does not fit the stream's" in yard["error"]
    event = operator.wait_event("camera", camera="yard", state="failed")
    assert "does not fit" in event["error"]
    assert operator.send({"id": "region-back", "cmd": "set", "camera": "yard", "settings": {"region": None}})["ok"]
    check_alive_and_truthful(operator, lambda: results_in(operator))
    assert (
        operator.send({"id": f"st-{time.monotonic_ns()}", "cmd": "status"})["result"]["cameras"]["yard"]["state"]
        == "connected"
    )


def test_a_repeated_id_is_remembered_across_a_restart(device, tmp_path: Path) -> None:
    """Replies live in SQLite: the same id after a restart is the same command, answered as a duplicate."""
    from agent_helpers import start_agent, stop_agent

    operator, _ = device
    first = operator.send({"id": "survives-restart", "cmd": "pause", "camera": "door"})
    assert first["ok"]
    assert operator.send({"id": "resume-after", "cmd": "resume", "camera": "door"})["ok"]
    assert operator.process is not None and operator.folder is not None
    stop_agent(operator.process)
    operator.process = start_agent(operator.folder / "agent.yaml")
    operator.wait_serving()
    again = operator.send({"id": "survives-restart", "cmd": "pause", "camera": "door"})
    assert again == {**first, "duplicate": True}
    check_alive_and_truthful(operator, lambda: results_in(operator))


@pytest.mark.parametrize("cmd", ["ping", "deploy"])
def test_an_id_with_a_lone_surrogate_is_answered_and_refused(device, cmd: str) -> None:
    """Valid JSON, yet no store can hold it: the reply says so under the same id, and the agent goes on."""
    operator, _ = device
    payload = b'{"id": "\\ud800x", "cmd": "' + cmd.encode() + b'", "bundle": {"path": "/nowhere"}}'
    reply = operator.send(payload)
    assert reply == {"id": "\ud800x", "ok": False, "error": "'id' must be Unicode text: it holds a lone surrogate"}
    check_alive_and_truthful(operator, lambda: results_in(operator))
