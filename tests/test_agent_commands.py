"""Fleet commands through a real broker to a real agent: replies, validation, idempotency, fuzzing."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from agent_helpers import Operator, device_over_mqtt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

BASE = "edgevit/test-box"


@pytest.fixture(scope="module")
def agent(tmp_path_factory, demo_bundle, signing_key, digits_video) -> Iterator[Operator]:
    with device_over_mqtt(tmp_path_factory.mktemp("commands"), demo_bundle, signing_key[1], digits_video, 20) as op:
        yield op


def processed(agent: Operator, camera: str) -> int:
    return agent.send({"id": f"status-{time.monotonic_ns()}", "cmd": "status"})["result"]["cameras"][camera]["counts"][
        "processed"
    ]


def test_a_missing_cmd_is_answered_under_the_command_id(agent: Operator) -> None:
    for payload in ({"id": "no-cmd"}, {"id": "num-cmd", "cmd": 5}):
        reply = agent.send(payload)
        assert reply == {"id": payload["id"], "ok": False, "error": "'cmd' must be a string"}


@pytest.mark.parametrize("topic", ["edgevit/other-box/cmd", "edgevit/test-box/cmd", "edgevit/#", "$SYS/x"])
def test_response_topics_cannot_reach_into_the_fleet(agent: Operator, topic: str) -> None:
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = topic
    agent.client.publish(f"{BASE}/cmd", json.dumps({"id": f"rt-{topic}", "cmd": "ping"}), qos=1, properties=props)
    got = agent.replies.get(timeout=10)
    assert got[0] == f"{BASE}/reply" and not got[1]["ok"] and "response topic" in got[1]["error"]
    props.ResponseTopic = f"{BASE}/reply/operator-7"  # this device's own reply namespace is fine
    agent.client.subscribe(f"{BASE}/reply/operator-7", qos=1)
    agent.client.publish(f"{BASE}/cmd", json.dumps({"id": f"ok-{topic}", "cmd": "ping"}), qos=1, properties=props)
    replies = [agent.replies.get(timeout=10) for _ in range(2)]
    assert {r[0] for r in replies} == {f"{BASE}/reply", f"{BASE}/reply/operator-7"} and all(r[1]["ok"] for r in replies)


def test_ping_over_mqtt5_request_response(agent: Operator) -> None:
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = "operator/inbox"
    props.CorrelationData = b"req-42"
    agent.client.publish(f"{BASE}/cmd", json.dumps({"id": "p1", "cmd": "ping"}), qos=1, properties=props)
    got = [agent.replies.get(timeout=10) for _ in range(2)]
    inbox = next(r for r in got if r[0] == "operator/inbox")
    assert inbox[1]["ok"] and "pong" in inbox[1]["result"] and inbox[2] == b"req-42"


def test_status_and_list(agent: Operator) -> None:
    status = agent.send({"id": "s1", "cmd": "status"})["result"]
    assert status["engine"].startswith("vit-digits") and set(status["cameras"]) == {"door", "yard"}
    bundles = agent.send({"id": "l1", "cmd": "list"})["result"]["bundles"]
    assert bundles[0]["active"] and bundles[0]["bundle_id"] == status["engine"]


def test_set_batching_is_validated(agent: Operator) -> None:
    bad = agent.send({"id": "b1", "cmd": "set", "batching": {"latency_budget_ms": -5}})
    assert not bad["ok"] and "batching.latency_budget_ms: Input should be greater than or equal to 1" in bad["error"]
    assert agent.send({"id": "s2", "cmd": "status"})["result"]["batching"]["latency_budget_ms"] == 100
    good = agent.send({"id": "b2", "cmd": "set", "batching": {"latency_budget_ms": 80}})
    assert good["ok"] and good["result"]["batching"]["latency_budget_ms"] == 80
    assert agent.send({"id": "s3", "cmd": "status"})["result"]["batching"]["latency_budget_ms"] == 80


def test_pause_and_resume_a_camera(agent: Operator) -> None:
    assert agent.send({"id": "pause-1", "cmd": "pause", "camera": "yard"})["ok"]
    time.sleep(0.5)
    before, door_before = processed(agent, "yard"), processed(agent, "door")
    time.sleep(1.5)
    assert processed(agent, "yard") == before and processed(agent, "door") > door_before
    assert agent.send({"id": "resume-1", "cmd": "resume", "camera": "yard"})["ok"]
    time.sleep(1.5)
    assert processed(agent, "yard") > before
    bad = agent.send({"id": "pause-2", "cmd": "pause", "camera": "garage"})
    assert not bad["ok"] and "'camera' must name one of door, yard" in bad["error"]


def test_same_id_is_applied_once(agent: Operator) -> None:
    command = {"id": "once", "cmd": "set", "camera": "door", "settings": {"fps": 15}}
    first, second = agent.send(command), agent.send(command)
    assert first["ok"] and second == {**first, "duplicate": True}
    other = agent.send({**command, "settings": {"fps": 5}})
    assert not other["ok"] and other["error"] == "id 'once' was already used by another command"


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"x" * 20000, "bytes, the limit is 16384"),
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"cmd": "ping"}', "'id' must be a string"),
        (b'{"id": "u1", "cmd": "reboot"}', "unknown command 'reboot'"),
        (b'{"id": "u2", "cmd": "set", "camera": "door", "settings": {"fps": "fast"}}', "cameras.door.fps"),
    ],
)
def test_bad_commands_get_precise_errors(agent: Operator, payload: bytes, message: str) -> None:
    reply = agent.send(payload)
    assert reply["ok"] is False and message in reply["error"]


def test_hostile_json_never_takes_the_link_down(agent: Operator) -> None:
    """Each of these once raised inside paho's network thread and took the device offline for good."""
    hostile = [
        b'{"id": "deep", "cmd": "ping", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"id": "big", "cmd": "ping", "n": ' + b"9" * 5000 + b"}",
        b'{"id": "nan", "cmd": "ping", "n": NaN}',
        b'{"id": "huge", "cmd": "ping", "n": 1e999}',
        b'{"id": "bytes", "cmd": "\xff"}' + b"\xff",
    ]
    replies = agent.send_many(hostile)
    assert all(not r["ok"] and r["error"].startswith("command refused") for r in replies), replies
    assert agent.send({"id": "still-alive", "cmd": "ping"})["ok"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
commands = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"id": st.text(min_size=1, max_size=64), "cmd": st.sampled_from(["set", "pause", "resume"])},
        optional={"camera": json_values, "settings": json_values, "batching": json_values},
    ).map(lambda v: json.dumps(v).encode()),
)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(commands, min_size=100, max_size=100))
def test_generated_malformed_commands_are_each_answered(agent: Operator, payloads: list[bytes]) -> None:
    """3,000 generated commands in all, 100 at a time: every one answered, the agent unaffected."""
    replies = agent.send_many(payloads)
    assert len(replies) == len(payloads)
    for payload, reply in zip(payloads, replies, strict=True):
        assert set(reply) >= {"id", "ok"} and (reply["ok"] or reply["error"]), payload
    assert agent.process.poll() is None  # type: ignore[attr-defined]


def test_agent_still_serves_after_the_fuzzing(agent: Operator) -> None:
    agent.send({"id": "fix-door", "cmd": "resume", "camera": "door"})
    agent.send({"id": "fix-yard", "cmd": "resume", "camera": "yard"})
    before = processed(agent, "door")
    time.sleep(1.5)
    assert processed(agent, "door") > before and agent.process.poll() is None  # type: ignore[attr-defined]
