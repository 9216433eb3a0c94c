"""Camera credentials never leave the device (issue 13): a real agent with failing authenticated cameras,
and every byte it wrote, logged, published or served searched for the passwords."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import yaml
from agent_helpers import Operator, start_agent, start_mosquitto, stop_agent, write_config
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import ConfigError, load_config, redact

from conftest import free_port

ENV_SECRET = "Env-S3cret-Pw"
FILE_SECRET = "Literal-Pw-123"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("rtsp://admin:pa@ss@10.0.0.5:554/Streaming/101", "rtsp://admin:***@10.0.0.5:554/Streaming/101"),
        ("http://cam/snap.ts?user=a&password=x9&res=1", "http://cam/snap.ts?user=a&password=***&res=1"),
        (
            "rtspsrc location=rtsp://h/x user-id=admin user-pw=hunter2 ! decodebin",
            "rtspsrc location=rtsp://h/x user-id=admin user-pw=*** ! decodebin",
        ),
        ("/dev/video0", "/dev/video0"),
    ],
)
def test_redaction(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_secrets_come_from_the_environment_or_a_file(tmp_path: Path, monkeypatch) -> None:
    secret = tmp_path / "door.pw"
    secret.write_text("from-a-file\n")
    path = tmp_path / "agent.yaml"
    config = {
        "device": "d",
        "engine": {"bundle": "b", "require_signature": False},
        "cameras": [
            {"name": "a", "source": "rtsp://admin:${CAM_PW}@10.0.0.5/s"},
            {"name": "b", "source": f"rtsp://admin:${{file:{secret}}}@10.0.0.6/s"},
        ],
    }
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("CAM_PW", "from-env")
    loaded = load_config(path)
    assert [c.source for c in loaded.cameras] == [
        "rtsp://admin:from-env@10.0.0.5/s",
        "rtsp://admin:from-a-file@10.0.0.6/s",
    ]
    monkeypatch.delenv("CAM_PW")
    with pytest.raises(ConfigError, match=r"cameras.0.source: the environment variable CAM_PW is not set"):
        load_config(path)


def test_no_password_in_anything_the_agent_writes_or_publishes(
    demo_bundle: Path, signing_key, digits_video: Path, tmp_path: Path
) -> None:
    port, prometheus, closed = free_port(), free_port(), free_port()
    broker = start_mosquitto(tmp_path, port)
    seen: list[bytes] = []
    lock = threading.Lock()
    spy = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="spy")
    spy.on_message = lambda c, u, m: (lock.acquire(), seen.append(m.topic.encode() + b" " + m.payload), lock.release())
    spy.connect("127.0.0.1", port)
    spy.subscribe("#", qos=1)
    spy.loop_start()
    cameras = [
        {"name": "video", "source": str(digits_video), "loop": True, "fps": 10},
        {
            "name": "front",
            "source": f"rtsp://admin:${{CAM_PASSWORD}}@127.0.0.1:{closed}/live",
            "backend": "ffmpeg",
            "stall_timeout_s": 1,
            "reconnect": {"initial_s": 0.2, "max_s": 1},
        },
        {
            "name": "back",
            "source": f"http://viewer:{FILE_SECRET}@127.0.0.1:{closed}/x.ts?password={FILE_SECRET}",
            "stall_timeout_s": 1,
            "reconnect": {"initial_s": 0.2, "max_s": 1},
        },
    ]
    config = write_config(
        tmp_path / "agent.yaml",
        demo_bundle,
        signing_key[1],
        cameras,
        mqtt={"host": "127.0.0.1", "port": port},
        metrics={"publish_every_s": 1, "prometheus_port": prometheus},
    )
    agent = start_agent(config, "--log-level", "DEBUG", env={"CAM_PASSWORD": ENV_SECRET})
    operator = Operator(port)
    try:
        failing = operator.wait_status(lambda s: s["cameras"]["front"]["state"] == "reconnecting")
        replies = [
            {"id": "s1", "ok": True, "result": failing},
            operator.send({"id": "set1", "cmd": "set", "camera": "front", "settings": {"fps": 5}}),
            operator.send({"id": "set2", "cmd": "set", "camera": "back", "settings": {"source": "/etc/passwd"}}),
        ]
        assert replies[1]["ok"] and replies[1]["result"]["camera"]["source"].startswith("rtsp://admin:***@")
        assert not replies[2]["ok"] and "sources come from the config file only" in replies[2]["error"]
        states = replies[0]["result"]["cameras"]
        assert states["front"]["state"] == "reconnecting" and "rtsp://admin:***@" in states["front"]["error"]
        scrape = urllib.request.urlopen(f"http://127.0.0.1:{prometheus}/metrics", timeout=5).read()
        time.sleep(1.5)
    finally:
        out, err = stop_agent(agent)
        operator.close()
        spy.loop_stop()
        spy.disconnect()
        broker.terminate()
        broker.wait()
    with lock:
        published = b"\n".join(seen)
    assert b"reconnecting" in published and b"***" in published  # the failures were published, masked
    written = b"".join(
        p.read_bytes()
        for p in tmp_path.rglob("*")
        if p.is_file() and p.name != "agent.yaml" and "broker" not in p.parts
    )
    broker_files = b"".join(p.read_bytes() for p in (tmp_path / "broker").rglob("*") if p.is_file())
    for secret in (ENV_SECRET, FILE_SECRET):
        for name, blob in [
            ("stdout", out.encode()),
            ("stderr/log", err.encode()),
            ("MQTT", published),
            ("replies", json.dumps(replies).encode()),
            ("Prometheus", scrape),
            ("state and results files", written),
            ("broker's stored messages", broker_files),
        ]:
            assert secret.encode() not in blob, f"{secret} leaked into {name}"
