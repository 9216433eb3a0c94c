"""Results, metrics, events and status through a real Mosquitto broker; Prometheus on a local port."""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
import urllib.request
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from agent_helpers import (
    read_results,
    run_agent,
    start_agent,
    start_mosquitto,
    stop_agent,
    summary,
    wait_for_result,
    write_config,
)
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families

from agent.control.protocol import PROTOCOL_VERSION
from builder.bundle.batch_mix import read_batch_mix

from conftest import free_port


class Subscriber:
    """A QoS 1 subscriber. ``persistent`` keeps its session on the broker, which then holds
    its messages while it (or the broker) is away."""

    def __init__(self, port: int, topic: str, persistent: bool = False) -> None:
        self.messages: list[tuple[str, dict, bool]] = []
        self._lock = threading.Lock()
        client_id = "collector" if persistent else "test-subscriber"
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=not persistent)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.reconnect_delay_set(0.2, 1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client, userdata, message) -> None:  # noqa: ANN001
        with self._lock:
            self.messages.append((message.topic, json.loads(message.payload), message.retain))

    def on(self, suffix: str) -> list[dict]:
        with self._lock:
            return [payload for topic, payload, _ in self.messages if topic.endswith(suffix)]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_results_metrics_status_over_mqtt(
    mosquitto: int, demo_bundle, signing_key, digits_video: Path, tmp_path: Path
) -> None:
    prometheus = free_port()
    config = write_config(
        tmp_path / "agent.yaml",
        demo_bundle,
        signing_key[1],
        [{"name": "door", "source": str(digits_video), "loop": True, "fps": 25}],
        mqtt={"host": "127.0.0.1", "port": mosquitto, "prefix": "fleet"},
        metrics={"publish_every_s": 1, "prometheus_port": prometheus},
    )
    subscriber = Subscriber(mosquitto, "fleet/test-box/#")
    agent = start_agent(config)
    try:
        deadline = time.monotonic() + 60  # the agent's start-up takes longer on a loaded machine
        while time.monotonic() < deadline and (
            len(subscriber.on("/metrics")) < 4 or len(subscriber.on("/door/result")) <= 50
        ):
            time.sleep(0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{prometheus}/metrics", timeout=5) as response:
            scrape = response.read().decode()
    finally:
        stdout, stderr = stop_agent(agent)
        time.sleep(0.5)
        subscriber.close()
    assert agent.returncode == 0, stderr
    results = subscriber.on("/door/result")
    assert len(results) > 50
    seqs = [r["seq"] for r in results]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert results[0]["engine"].startswith("vit-digits") and results[0]["top"][0]["label"] in [
        str(d) for d in range(10)
    ]
    metrics = subscriber.on("/metrics")
    assert len(metrics) >= 3
    last = metrics[-1]
    assert last["cameras"]["door"]["processed_fps"] > 10 and last["latency"]["p99_ms"] is not None
    assert {"queue_depth", "batch_sizes", "engine_ms_by_batch", "process"} <= last.keys()
    statuses = [s["state"] for s in subscriber.on("/status")]
    assert statuses[0] == "online" and statuses[-1] == "offline"
    reported = [s for s in subscriber.on("/status") if "fps" in s]  # what fleet tools read, refreshed with metrics
    assert reported and reported[-1]["engine"]["active"] == results[0]["engine"] and reported[-1]["fps"] > 10
    assert len(json.dumps(reported[-1])) < 1024, "a status stays far inside managed brokers' payload limits"
    assert any(e["event"] == "camera" and e["state"] == "connected" for e in subscriber.on("/events"))
    assert 'edgevit_frames_total{camera="door",kind="processed"}' in scrape
    assert "edgevit_frame_latency_seconds_bucket" in scrape and "process_resident_memory_bytes" in scrape
    assert "edgevit_class_mix_distance" in scrape and 'edgevit_engine_info{bundle_id="vit-digits' in scrape
    check_grafana_dashboard(scrape)
    check_batch_mix(scrape, last, summary(stdout), tmp_path)


def check_batch_mix(scrape: str, payload: dict, exit_summary: dict, tmp_path: Path) -> None:
    """The builder's --batch-mix reads what this agent wrote: its MQTT metrics payload and its exit summary,
    each to the image shares of the batch sizes it counted, and its Prometheus text (scraped a moment
    before, so its counts differ) to shares of the same sizes."""
    for name, text, counts in [
        ("metrics.json", json.dumps(payload), payload["batch_sizes"]),
        ("summary.json", json.dumps({"summary": exit_summary}), exit_summary["batch_sizes"]),
        ("scrape.txt", scrape, None),
    ]:
        (tmp_path / name).write_text(text)
        mix = read_batch_mix(tmp_path / name, 8)
        assert mix and sum(mix.values()) == pytest.approx(1.0), name
        if counts is None:
            assert set(mix) <= {int(b) for b in exit_summary["batch_sizes"]}
            continue
        images = {int(b): n * int(b) for b, n in counts.items()}
        kept = {b: n for b, n in images.items() if n / sum(images.values()) >= 0.01}
        assert mix == pytest.approx({b: n / sum(kept.values()) for b, n in kept.items()}), name


def check_grafana_dashboard(scrape: str) -> None:
    """configs/grafana-dashboard.json asks only for series this agent exposes, with labels and values it has."""
    samples = [s for family in text_string_to_metric_families(scrape) for s in family.samples]
    names = {s.name for s in samples}
    labels = {(s.name, k) for s in samples for k in s.labels}
    values = {(s.name, k, v) for s in samples for k, v in s.labels.items()}
    dashboard = json.loads((Path(__file__).parents[1] / "configs" / "grafana-dashboard.json").read_text())
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource", "instance"}
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
        for target in panel["targets"]:
            for name, selector in re.findall(r"\b((?:edgevit|process)_[a-z_]+)(?:\{([^}]*)\})?", target["expr"]):
                assert name in names, f"{panel['title']}: {name} is not in a real scrape"
                for key, op, value in re.findall(r'(\w+)\s*(=~|=)\s*"([^"]*)"', selector):
                    if key == "instance":  # added by Prometheus at scrape time
                        continue
                    assert (name, key) in labels, f"{panel['title']}: {name} has no label {key}"
                    wanted = value.split("|") if op == "=~" else [value]
                    assert all((name, key, v) in values for v in wanted), f"{panel['title']}: {name}{{{key}={value}}}"


def test_last_will_marks_a_killed_agent_offline(
    mosquitto: int, demo_bundle, signing_key, digits_video: Path, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path / "agent.yaml",
        demo_bundle,
        signing_key[1],
        [{"name": "door", "source": str(digits_video), "loop": True, "fps": 10}],
        mqtt={"host": "127.0.0.1", "port": mosquitto, "keepalive_s": 5},
        labels={"site": "lab"},
    )
    watcher = Subscriber(mosquitto, "edgevit/test-box/status")
    agent = start_agent(config)
    deadline = time.time() + 60  # the will is the broker's once the agent has connected: its first status says so
    while time.time() < deadline and not any(s["state"] != "offline" for s in watcher.on("/status")):
        time.sleep(0.2)
    watcher.close()
    agent.kill()  # no goodbye: the broker must publish the will
    agent.wait()
    subscriber = Subscriber(mosquitto, "edgevit/test-box/status")
    deadline = time.time() + 20
    while time.time() < deadline and not [s["state"] for s in subscriber.on("/status")[-1:]] == ["offline"]:
        time.sleep(0.2)
    retained = [retain for _, _, retain in subscriber.messages]
    subscriber.close()
    last = subscriber.on("/status")[-1]
    offline = {"state": "offline", "device": "test-box", "labels": {"site": "lab"}, "protocol": PROTOCOL_VERSION}
    assert last == offline and retained[0] is True


def result_seqs(messages: list[dict]) -> set[tuple[str, int]]:
    return {(m["camera"], m["seq"]) for m in messages}


def test_broker_outage_loses_no_result(demo_bundle, signing_key, digits_video: Path, tmp_path: Path) -> None:
    port = free_port()
    broker = start_mosquitto(tmp_path, port)
    collector = Subscriber(port, "edgevit/test-box/+/result", persistent=True)
    config = write_config(
        tmp_path / "agent.yaml",
        demo_bundle,
        signing_key[1],
        [{"name": "door", "source": str(digits_video), "loop": True, "fps": 20}],
        mqtt={"host": "127.0.0.1", "port": port, "keepalive_s": 5},
    )
    agent = start_agent(config)
    try:
        assert wait_for_result(tmp_path / "results.jsonl", lambda _: True, 60), "the agent served no frame in 60 s"
        time.sleep(1)
        down_at = time.time()
        broker.terminate()
        broker.wait()
        time.sleep(12)  # long enough for the agent's reconnect backoff to grow, and 200 results at 20 fps
        up_at = time.time()
        broker = start_mosquitto(tmp_path, port)
        backlog = result_seqs(read_results(tmp_path / "results.jsonl"))
        deadline = time.monotonic() + 60  # the agent's reconnect backoff reaches 30 s
        while time.monotonic() < deadline and backlog - result_seqs(collector.on("/result")):
            time.sleep(0.5)
    finally:
        stdout, stderr = stop_agent(agent)
        time.sleep(2)
        collector.close()
        broker.terminate()
        broker.wait()
    assert agent.returncode == 0, stderr
    produced = read_results(tmp_path / "results.jsonl")
    during = [r for r in produced if down_at + 1 < r["captured"] < up_at - 1]
    assert len(during) > 100, "results kept being produced while the broker was down"
    missing = result_seqs(produced) - result_seqs(collector.on("/result"))
    assert not missing, f"{len(missing)} results never reached the broker, e.g. {sorted(missing)[:5]}"


def test_restart_with_a_full_outbox_loses_nothing(demo_bundle, signing_key, digits_video: Path, tmp_path: Path) -> None:
    port = free_port()  # no broker yet: every result waits in the outbox
    camera = {"name": "door", "source": str(digits_video), "fps": 60}
    mqtt_section = {"host": "127.0.0.1", "port": port, "outbox_max_results": 100_000}
    config = write_config(
        tmp_path / "agent.yaml", demo_bundle, signing_key[1], [camera], mqtt=mqtt_section, exit_when_sources_end=True
    )
    first = run_agent(config)
    assert first.returncode == 0, first.stderr
    produced = read_results(tmp_path / "results.jsonl")
    with sqlite3.connect(tmp_path / "state" / "outbox.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM outbox WHERE kind = 'result'").fetchone()[0] == len(produced) > 100
    broker = start_mosquitto(tmp_path, port)
    collector = Subscriber(port, "edgevit/test-box/+/result", persistent=True)
    write_config(config, demo_bundle, signing_key[1], [{**camera, "paused": True}], mqtt=mqtt_section)
    try:
        second = run_agent(config, "--duration", "6")
    finally:
        time.sleep(1)
        collector.close()
        broker.terminate()
        broker.wait()
    assert second.returncode == 0, second.stderr
    assert result_seqs(produced) <= result_seqs(collector.on("/result"))
    with sqlite3.connect(tmp_path / "state" / "outbox.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM outbox WHERE kind = 'result'").fetchone()[0] == 0


def test_a_dead_network_loop_is_rebuilt(mosquitto: int, tmp_path: Path) -> None:
    """A callback that escapes the guard (here: a raw handler that raises) ends paho's network loop;
    the link's supervisor rebuilds it, reports it, and commands are answered again."""
    from agent.config import MQTTConfig
    from agent.control.mqtt import MqttLink
    from agent.control.outbox import Outbox

    link = MqttLink(MQTTConfig(host="127.0.0.1", port=mosquitto), "loop-box", Outbox(tmp_path / "o.db", 100), {})
    link.start(lambda payload: {"id": "x", "ok": True, "result": {"echo": json.loads(payload)}})
    replies = Subscriber(mosquitto, "edgevit/loop-box/#")
    try:
        deadline = time.monotonic() + 10
        while not link.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        answer = link.client.on_message

        def broken(client, userdata, message) -> None:  # noqa: ANN001
            link.client.on_message = answer
            raise RuntimeError("a bug in a callback")

        link.client.on_message = broken
        publish = mqtt.Client(CallbackAPIVersion.VERSION2)
        publish.connect("127.0.0.1", mosquitto)
        publish.loop_start()
        deadline, sent = time.monotonic() + 15, 0.0
        while not (link.network_restarts and link.connected) and time.monotonic() < deadline:
            if not link.network_restarts and time.monotonic() - sent > 1:  # until one arrives after the SUBACK
                publish.publish("edgevit/loop-box/cmd", b'"first"', qos=1)
                sent = time.monotonic()
            time.sleep(0.05)
        assert (link.network_restarts, link.connected) == (1, True)
        publish.publish("edgevit/loop-box/cmd", b'"second"', qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 10
        while not replies.on("/reply") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert {"echo": "second"} in [r["result"] for r in replies.on("/reply")]
        assert any(e["event"] == "mqtt" and "network loop died" in e["error"] for e in replies.on("/events"))
        publish.loop_stop()
        publish.disconnect()
    finally:
        replies.close()
        link.close(flush_s=1)
