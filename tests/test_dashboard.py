"""The fleet dashboard's server side: its JSON at fleet scale and under hostile device messages.

Devices here are protocol-level (retained statuses and metrics published straight to a real
Mosquitto, as ``bench/fleet_bench.py``'s simulators do); the page itself is tested in a real
browser against real agents in ``tests/test_fleet.py``.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from rich.console import Console

from fleet.commands import _table
from fleet.dashboard import Dashboard, MetricsHistory
from fleet.link import Broker, FleetLink


def test_history_keeps_an_hour_of_numbers_and_nothing_else() -> None:
    history = MetricsHistory(horizon_s=60, every_s=5)
    for payload in ({"cameras": "x"}, {"cameras": {"a": {"processed_fps": "fast"}}, "latency": [1]}, 7, {}):
        history.record("d", payload if isinstance(payload, dict) else {"cameras": payload}, now=0.0)
    history.record("d", {"cameras": {"a": {"processed_fps": math.inf}}, "latency": {"p99_ms": math.nan}}, now=1.0)
    assert history.series("d")["fps"] == []  # no number in any of them: nothing recorded
    history.record("d", {"cameras": {"a": {"processed_fps": 1.0}}}, now=2.0)
    history.record("d", {"cameras": {"a": {"processed_fps": 2.0}}}, now=3.0)
    assert history.series("d") == {"t": [2.0], "fps": [1.0], "p99": [None]}  # one point per sampling interval
    for t in range(10, 200, 5):
        history.record(
            "d",
            {"cameras": {"a": {"processed_fps": 10.0}, "b": {"processed_fps": 5}}, "latency": {"p99_ms": 20}},
            now=t,
        )
    series = history.series("d")
    assert series["t"][0] >= 195 - 60 and series["fps"][-1] == 15.0 and series["p99"][-1] == 20


def _publish(port: int, messages: list[tuple[str, object]]) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="simulated-devices")
    client.connect("127.0.0.1", port)
    client.loop_start()
    for topic, payload in messages:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        client.publish(topic, body, qos=1, retain=topic.endswith("/status")).wait_for_publish(5)
    client.loop_stop()
    client.disconnect()


def _get(url: str) -> tuple[int, dict | str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_api_pages_a_large_fleet_and_survives_hostile_devices(mosquitto: int, tmp_path: Path) -> None:
    statuses = [
        (f"edgevit/d{i:04d}/status", {
            "state": "online" if i % 10 else "offline", "labels": {"site": "a" if i < 300 else "b"},
            "engine": {"active": "v1" if i % 3 else "v2"}, "fps": 5.0, "p99_ms": 12.5,
        })
        for i in range(500)
    ]  # fmt: skip
    hostile = [
        ("edgevit/evil-1/status", {"state": "online", "labels": ["not", "a", "dict"], "engine": "v9", "fps": "many"}),
        ("edgevit/evil-2/status", b"\xff\xfe not json"),
        (
            "edgevit/<img src=x onerror=alert(1)>/status",
            {"state": "online", "labels": {"site": {"nested": 1}}, "engine": {"active": 3}},
        ),
        ("edgevit/d0001/metrics", {"cameras": {"cam": {"processed_fps": "NaN"}}, "latency": {"p99_ms": [1]}}),
        ("edgevit/d0001/metrics", b"[" * 100000),
    ]
    metrics = [(f"edgevit/d{i:04d}/metrics", {"cameras": {"cam": {"processed_fps": 5.0}}, "latency": {"p99_ms": 12.5}})
               for i in range(3)]  # fmt: skip
    _publish(mosquitto, statuses + hostile[:3])
    history = MetricsHistory()
    link = FleetLink(Broker("127.0.0.1", mosquitto), on_metrics=history.record).connect(settle_s=0.5)
    _publish(mosquitto, hostile[3:] + metrics)  # metrics are not retained: sent once the dashboard listens
    page = Dashboard(link, history, tmp_path, "127.0.0.1", 0)
    threading.Thread(target=page.serve_forever, daemon=True).start()
    try:
        deadline = time.monotonic() + 20
        while len(link.snapshot()) < 502 and time.monotonic() < deadline:
            time.sleep(0.2)
        code, first = _get(page.url + "api/fleet?per_page=200")
        assert code == 200 and first["pages"] == 3 and len(first["devices"]) == 200 and first["rollout"] is None
        summary = first["summary"]
        assert summary["devices"] == 502 and summary["online"] == 452  # 50 offline, the two hostile ones online
        assert summary["by_engine"]["v1"] == 333 and summary["by_label"]["site=a"] == 300
        code, last = _get(page.url + "api/fleet?per_page=200&page=3")
        assert code == 200 and len(last["devices"]) == 102
        code, site_b = _get(page.url + "api/fleet?select=site=b&per_page=500")
        assert code == 200 and site_b["summary"]["devices"] == 200
        named = {d["device"]: d for d in first["devices"] + last["devices"]}
        assert (
            named["<img src=x onerror=alert(1)>"]["labels"] == {} and named["evil-1"]["fps"] is None
        )  # data, not trusted
        assert named["d0001"]["history"]["fps"] == [5.0]  # the hostile metrics were ignored, the good one kept
        assert _get(page.url + "api/fleet?page=0")[0] == 400 and _get(page.url + "api/fleet?select=nonsense")[0] == 400
        assert _get(page.url + "etc/passwd")[0] == 404
        assert link.client.is_connected(), "hostile devices did not end the dashboard's MQTT link"
    finally:
        page.close()
        link.close()


def test_status_table_reads_at_80_columns() -> None:
    row = {
        "device": "site-a-device-0001", "state": "online", "labels": {"site": "a", "hardware": "orin-nx"},
        "active": "vit-digits-1-cpu-bf16-int8-3b34d1e3", "previous": None, "canary": "vit-digits-2-cpu-int8-aa",
        "bad": [], "fps": 29.97, "p99_ms": 41.2, "agreement": 1.0, "class_mix_distance": 0.031,
        "confidence_drift": 0.01, "last_event": "commit vit-digits-1", "protocol": 2,
    }  # fmt: skip
    console = Console(width=80, record=True, color_system=None, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(_table([row]))
    lines = console.export_text().splitlines()
    assert max(map(len, lines)) <= 80
    header = next(line for line in lines if "device" in line)
    assert all(h in header for h in ("device", "state", "fps", "p99 ms", "agree", "drift"))
    text = "\n".join(lines)
    for whole in ("site-a-device-0001", "engine vit-digits-1-cpu-bf16-int8-3b34d1e3", "hardware=orin-nx, site=a"):
        assert whole in text, whole  # never broken mid-token
    assert "canary vit-digits-2-cpu-int8-aa" in text and "last: commit vit-digits-1" in text
    console = Console(width=80, record=True, color_system=None, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(_table([{**row, "last_event": "commit vit-digits-1-cpu-bf16-int8-3b34d1e3", "canary": None}]))
    shown = [line.strip() for line in console.export_text().splitlines()]
    assert "last: commit" in shown, "an event about the engine named above names it once"


def test_status_at_scale_summaries_pages_and_watched_changes(mosquitto: int, tmp_path: Path) -> None:
    statuses = [
        (f"edgevit/d{i:04d}/status", {"state": "online", "labels": {"site": "a" if i % 2 else "b"},
                                       "engine": {"active": "v1"}, "fps": 5.0})
        for i in range(1200)
    ]  # fmt: skip
    _publish(mosquitto, statuses)
    base = [sys.executable, "-m", "fleet.cli", "status", "--port", str(mosquitto), "--state-dir", str(tmp_path)]
    env = {**os.environ, "COLUMNS": "80"}
    counts = subprocess.run([*base, "--summary"], capture_output=True, text=True, timeout=60, env=env)
    assert counts.returncode == 0 and "1200 devices, 1200 online" in counts.stdout
    assert re.search(r"engine v1\s+1200", counts.stdout) and re.search(r"site=a\s+600", counts.stdout)
    page = subprocess.run([*base, "--page", "12"], capture_output=True, text=True, timeout=60, env=env)
    assert "page 12 of 12 (1200 devices)" in page.stdout and "d1199" in page.stdout and "d0000" not in page.stdout
    watch = subprocess.Popen([*base, "--per-page", "1", "--watch", "0.5"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert watch.stdout is not None
        for line in watch.stdout:
            if line.startswith("page 1 of 1200"):
                break
        _publish(mosquitto, [("edgevit/d0042/status", {"state": "online", "engine": {"active": "v2"}, "fps": 5.0})])
        line = watch.stdout.readline()
        assert re.fullmatch(r"\d\d:\d\d:\d\d d0042: active v1 -> v2\n", line), line  # that device, nothing else
    finally:
        watch.kill()
        watch.wait()


def test_the_page_says_why_each_device_failed(mosquitto: int, tmp_path: Path, chromium) -> None:
    """A halted rollout's failed devices, each with its reason on the page, as text (a real headless Chromium)."""
    from selenium.webdriver.support.ui import WebDriverWait

    from fleet.rollout import Rollout, Target

    from conftest import free_port

    state = tmp_path / "controller"
    rollout = Rollout.new("vit-v3", {"url": "u"}, {}, max_failures_pct=0, timeout_s=60, rollback_on_halt=True)
    reason = "reverted: top-1 agreement 80.00% under 97.00% <img src=x onerror=alert(1)>"
    rollout.targets = [Target("d0", 0, "failed", detail=reason), Target("d1", 1, "pending")]
    rollout.state = "halted"
    rollout.save(state)
    port = free_port()
    command = [sys.executable, "-m", "fleet.cli", "dashboard", "--port", str(mosquitto), "--state-dir", str(state)]
    page = subprocess.Popen([*command, "--http-port", str(port)], stdout=subprocess.DEVNULL)
    browser = chromium
    try:
        wait_until_serving(port)
        browser.get(f"http://127.0.0.1:{port}/")
        script = "return Array.from(document.querySelectorAll('#failures li')).map(li => li.innerText);"
        WebDriverWait(browser, 30).until(lambda b: b.execute_script(script))
        assert browser.execute_script(script) == [f"d0 (failed): {reason}"]
        assert not browser.execute_script("return document.querySelectorAll('#rollout img').length")
    finally:
        page.terminate()
        page.wait()


def wait_until_serving(port: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/fleet", timeout=2).close()
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"the dashboard did not answer on port {port}")
