"""edgevit-fleet against ten real agents on one real Mosquitto: staged rollouts, halts, resume, offline devices.

Site ``a`` has six devices, site ``b`` four; each serves one low-rate looping camera
with the demo engine. Bundles are packed archives served by ``edgevit-fleet serve``.
Ten agents take a minute to start and every rollout waits out canary windows, so the module is one
scenario on one fleet (``test_a_fleet_scenario``): each step starts from the fleet the previous one left,
and a failure names its step.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_helpers import (
    rebundle,
    start_agent,
    start_mosquitto,
    stop_agent,
    wait_for_port,
    write_config,
)
from engine_variants import slow_down
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from agent.engine.bundle import verify_bundle
from builder.bundle.pack import pack_bundle

from conftest import free_port

SITES = {"a": 6, "b": 4}
# Ten agents share two cores here: 5 ms of slack for scheduling.
CANARY = {"window_s": 6, "min_frames": 8, "shadow_every": 1, "max_latency_ratio": 2.0, "latency_slack_ms": 5.0}


class Fleet:
    def __init__(self, folder: Path, port: int, http: str, agents: dict[str, subprocess.Popen[str]]) -> None:
        self.folder, self.port, self.http, self.agents = folder, port, http, agents

    def cli(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(*args), capture_output=True, text=True, timeout=timeout)

    def command(self, *args: str) -> list[str]:
        connection = ["--port", str(self.port), "--state-dir", str(self.folder / "controller")]
        return [sys.executable, "-m", "fleet.cli", args[0], *connection, *args[1:]]

    def status(self) -> dict[str, dict]:
        done = self.cli("status", "--json")
        assert done.returncode == 0, done.stderr
        return {row["device"]: row for row in json.loads(done.stdout)}

    def deploy(self, archive: str, *args: str) -> list[str]:
        """The arguments of ``edgevit-fleet deploy`` for an archive in the served folder."""
        return ["deploy", str(self.folder / "served" / archive), "--url-base", self.http, *args]


@pytest.fixture(scope="module")
def archives(demo_bundle: Path, signing_key, tmp_path_factory) -> dict[str, str]:
    """Packed bundles in the served folder: two good versions and a slow one, by name."""
    work = tmp_path_factory.mktemp("fleet-bundles")
    served = work / "served"
    engine = verify_bundle(demo_bundle, None).engine_path
    bundles = {
        "v2": rebundle(demo_bundle, work / "v2", signing_key[0], "vit-digits-v2"),
        "v3": rebundle(demo_bundle, work / "v3", signing_key[0], "vit-digits-v3"),
        "slow": rebundle(
            demo_bundle, work / "slow", signing_key[0], "vit-slow", engine=slow_down(engine, work / "s.onnx")
        ),
    }
    for name, bundle in bundles.items():
        pack_bundle(bundle, served / f"{name}.tar.gz", None)
    return {"root": str(work)}


@pytest.fixture(scope="module")
def fleet(archives, demo_bundle, signing_key, digits_video, tmp_path_factory) -> Iterator[Fleet]:
    folder = Path(archives["root"])
    port, http_port = free_port(), free_port()
    broker = start_mosquitto(folder, port)
    server = subprocess.Popen(
        [sys.executable, "-m", "fleet.cli", "serve", str(folder / "served"), "--bind", "127.0.0.1",
         "--http-port", str(http_port)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    wait_for_port(http_port, server)
    agents = {}
    for site, count in SITES.items():
        for i in range(1, count + 1):
            name = f"{site}-{i}"
            (folder / name).mkdir()
            config = write_config(
                folder / name / "agent.yaml",
                demo_bundle,
                signing_key[1],
                [{"name": "cam", "source": str(digits_video), "loop": True, "fps": 5}],
                device=name,
                labels={"site": site, "hardware": "x86"},
                mqtt={"host": "127.0.0.1", "port": port, "keepalive_s": 5},
                metrics={"publish_every_s": 1},
                canary=CANARY,
                engine={"bundle": str(demo_bundle), "trusted_keys": [str(signing_key[1])], "threads": 1},
            )
            agents[name] = start_agent(config)
    fleet = Fleet(folder, port, f"http://127.0.0.1:{http_port}", agents)
    deadline = time.monotonic() + 300  # ten agents starting on two cores, beside the suite's other worker
    while time.monotonic() < deadline and len([d for d in fleet.status().values() if d["fps"]]) < len(agents):
        time.sleep(1)
    yield fleet
    for agent in agents.values():
        if agent.poll() is None:
            stop_agent(agent)
    server.terminate()
    broker.terminate()
    broker.wait()


def status_shows_every_device(fleet: Fleet, demo_bundle: Path) -> None:
    status = fleet.status()
    first = verify_bundle(demo_bundle, None).bundle_id
    assert sorted(status) == sorted(fleet.agents)
    assert all(d["state"] == "online" and d["active"] == first and d["fps"] > 0 for d in status.values())
    assert status["b-2"]["labels"] == {"site": "b", "hardware": "x86"}
    table = fleet.cli("status", "--select", "site=b")
    assert table.returncode == 0 and "b-4" in table.stdout and "a-1" not in table.stdout


def a_good_rollout_reaches_every_selected_device(fleet: Fleet) -> None:
    before = fleet.status()
    done = fleet.cli(*fleet.deploy("v2.tar.gz", "--select", "site=a", "--canary", "1", "--step", "50%"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "completed: 6 devices run vit-digits-v2" in done.stdout
    after = fleet.status()
    assert all(after[f"a-{i}"]["active"] == "vit-digits-v2" for i in range(1, 7))
    assert all(after[f"a-{i}"]["agreement"] == 1.0 for i in range(1, 7)), "each device's canary verdict is reported"
    assert "wave 1: 0 of 3 failed; with canary.alpha 0.01, chance alone gives up to 1" in done.stdout
    assert re.search(
        r"wave 1: pooled canary evidence, \d+ blocks and \d+ frames: agreement 100.00%, no regr", done.stdout
    )
    assert all(after[f"b-{i}"]["active"] == before[f"b-{i}"]["active"] for i in range(1, 5)), "site b untouched"
    waves = [line for line in done.stdout.splitlines() if "deploy sent" in line]
    assert [w.split(":")[0] for w in waves] == ["wave 0"] + ["wave 1"] * 3 + ["wave 2"] * 2


def a_bad_bundle_halts_after_the_canary_wave(fleet: Fleet) -> None:
    before = fleet.status()
    done = fleet.cli(*fleet.deploy("slow.tar.gz", "--canary", "1", "--step", "50%", "--max-failures", "0%"))
    assert done.returncode == 5, done.stdout + done.stderr
    assert "a-1 failed: refused: vit-slow is slower than the serving engine" in done.stdout, done.stdout
    assert "halted after wave 0: 1 of 1 devices failed" in done.stdout
    after = fleet.status()
    assert all(after[n]["active"] == before[n]["active"] for n in after)
    assert not [n for n in after if "vit-slow" in after[n]["bad"]], "slow here and now is no verdict on the bundle"
    history = json.loads(fleet.cli("history", "--json").stdout)
    assert history[-1]["state"] == "halted" and history[-1]["pending"] == 9 and history[-1]["failed"] == 1


def a_killed_controller_resumes(fleet: Fleet) -> None:
    controller = subprocess.Popen(
        fleet.command(*fleet.deploy("v3.tar.gz", "--select", "site=b", "--canary", "1", "--step", "1")),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert controller.stdout is not None
    for line in controller.stdout:
        if "wave 1: deploy sent" in line:  # the canary is done, the next wave is under way
            controller.send_signal(signal.SIGKILL)
            break
    controller.wait()
    assert controller.returncode == -signal.SIGKILL
    history = json.loads(fleet.cli("history", "--json").stdout)
    assert history[-1]["state"] == "running" and history[-1]["succeeded"] == 1
    done = fleet.cli("resume")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resuming" in done.stdout and "completed: 4 devices run vit-digits-v3" in done.stdout
    assert all(fleet.status()[f"b-{i}"]["active"] == "vit-digits-v3" for i in range(1, 5))


ROWS = """return Array.from(document.querySelectorAll('#devices tbody tr'))
    .map(tr => [tr.dataset.device, Array.from(tr.querySelectorAll('td')).map(td => td.innerText.trim())]);"""
SPARK_SCALES = "return Array.from(document.querySelectorAll('svg.spark text'), t => t.textContent);"
SPARK_POINTS = "return Array.from(document.querySelectorAll('svg.spark')).map(s => Number(s.dataset.points));"
ROLLOUT_TEXT = """return [(document.querySelector('.rollout-head') || {innerText: ''}).innerText,
    Array.from(document.querySelectorAll('#waves tr'))
        .map(tr => Array.from(tr.children).map(td => td.innerText.trim()).join(' ')),
    document.getElementById('summary').innerText];"""


def page_rows(browser) -> dict[str, list[str]]:
    """Each device's row of cells, read in one script."""
    return dict(browser.execute_script(ROWS))


def the_dashboard_shows_the_live_fleet_in_a_browser(fleet: Fleet, tmp_path: Path, chromium: Any) -> None:
    """A real headless Chromium on ``edgevit-fleet dashboard``: every device, the last rollout, the charts."""
    http_port = free_port()
    page = subprocess.Popen(
        fleet.command("dashboard", "--bind", "127.0.0.1", "--http-port", str(http_port)), stdout=subprocess.DEVNULL
    )
    wait_for_port(http_port, page)  # type: ignore[arg-type]
    status = fleet.status()
    browser = chromium
    try:
        browser.get(f"http://127.0.0.1:{http_port}/")
        # the page redraws every 2 s: each look at it is one script, so no element it reads can go stale
        WebDriverWait(browser, 30).until(lambda b: len(page_rows(b)) == len(fleet.agents))
        # a chart needs two samples of the metrics topic (one per device per 5 s)
        WebDriverWait(browser, 40).until(lambda b: all(points >= 2 for points in b.execute_script(SPARK_POINTS)))
        rows = page_rows(browser)
        assert sorted(rows) == sorted(fleet.agents)
        for name, cells in rows.items():
            device, state, labels, active = cells[:4]
            assert device == name and state == "online" and active == status[name]["active"]
            assert labels == f"site={name[0]}, hardware=x86" or labels == f"hardware=x86, site={name[0]}"
            assert float(cells[6]) > 0  # fps
        assert all(rows[f"b-{i}"][9].startswith("commit") for i in range(1, 5)), "the last canary verdict"
        assert browser.find_elements(By.CSS_SELECTOR, "svg.spark polyline")
        scales = browser.execute_script(SPARK_SCALES)
        assert any(s.endswith(" peak") for s in scales) and any(s.endswith(" fps now") for s in scales), scales
        # the latest rollout (site b to v3, one device a wave), wave by wave with each device's outcome
        head, waves, cards = browser.execute_script(ROLLOUT_TEXT)
        assert "vit-digits-v3" in head and "completed" in head
        assert waves == [f"wave {i} b-{i + 1}: succeeded" for i in range(4)]
        assert "10\ndevices" in cards and "10\nonline" in cards
        browser.save_screenshot(str(os.environ.get("EDGEVIT_DASHBOARD_SCREENSHOT") or tmp_path / "dashboard.png"))
    finally:
        page.terminate()
        page.wait()


def a_device_that_goes_offline_is_reported_not_waited_on(fleet: Fleet) -> None:
    controller = subprocess.Popen(
        fleet.command(
            *fleet.deploy("v3.tar.gz", "--select", "site=a", "--canary", "1", "--step", "100%", "--max-failures", "50%")
        ),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert controller.stdout is not None
    lines = []
    for line in controller.stdout:
        lines.append(line)
        if "wave 1: deploy sent to a-6" in line:
            fleet.agents["a-6"].kill()  # a power cut: only the broker's last will tells
    controller.wait(timeout=240)
    out = "".join(lines)
    assert controller.returncode == 0, out
    assert "a-6 failed: went offline" in out and "completed: 5 devices run vit-digits-v3" in out, out
    assert fleet.status()["a-6"]["state"] == "offline"


def rollback_by_selection(fleet: Fleet) -> None:
    done = fleet.cli("rollback", "--select", "site=b")
    assert done.returncode == 0, done.stdout + done.stderr
    status = fleet.status()
    assert all(status[f"b-{i}"]["active"] != "vit-digits-v3" for i in range(1, 5))
    assert "b-1: rolled back" in done.stdout


def a_second_rollback_leaves_rolled_back_devices_and_to_reapplies(fleet: Fleet) -> None:
    """After a rollback (an operator's or a halted rollout's), each device's previous engine is the bundle it was
    taken off: a plain rollback leaves it alone and says so; --to re-applies that bundle on purpose."""
    again = fleet.cli("rollback", "--select", "site=b")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "b-1: left as it is: already rolled back to" in again.stdout
    assert "rolled back to" not in again.stdout.replace("already rolled back to", ""), "nothing was sent"
    assert all(row["previous"] == "vit-digits-v3" for name, row in fleet.status().items() if name.startswith("b-"))
    reapplied = fleet.cli("rollback", "--select", "device=b-1", "--to", "vit-digits-v3")
    assert reapplied.returncode == 0 and "b-1: rolled back to vit-digits-v3" in reapplied.stdout, reapplied.stdout
    assert fleet.status()["b-1"]["active"] == "vit-digits-v3"


def test_a_fleet_scenario(fleet: Fleet, demo_bundle: Path, tmp_path: Path, chromium: Any) -> None:
    """Status, a staged rollout, a halt, a killed controller resumed, the dashboard, a device lost mid-wave,
    and two rollbacks, in that order on one fleet."""
    status_shows_every_device(fleet, demo_bundle)
    a_good_rollout_reaches_every_selected_device(fleet)
    a_bad_bundle_halts_after_the_canary_wave(fleet)
    a_killed_controller_resumes(fleet)  # site b on v3: what the dashboard then shows
    the_dashboard_shows_the_live_fleet_in_a_browser(fleet, tmp_path, chromium)
    a_device_that_goes_offline_is_reported_not_waited_on(fleet)
    rollback_by_selection(fleet)
    a_second_rollback_leaves_rolled_back_devices_and_to_reapplies(fleet)
