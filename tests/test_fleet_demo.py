"""``make fleet-demo`` as a user runs it: a broker, three agents, a staged rollout of the Mixer bundle to them,
the dashboard left up, the documents' fleet commands run against it as written, and ``make fleet-demo-stop``
ending it all. The demo's bundles come from the one run of ``edgevit-build demo`` the suite shares; the canary
window is shortened, the rest is what the Makefile runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from doc_commands import RUN_BY, listed, run_block, sandbox, shell_blocks


def fleet_demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleet.demo", *args], capture_output=True, text=True, timeout=900, env=dict(os.environ)
    )


def test_the_fleet_demo_rolls_out_and_stops(demo_run, tmp_path: Path) -> None:
    root = sandbox(tmp_path / "clone", demo_run[0])
    out = root / "out" / "fleet-demo"
    started = fleet_demo("start", "--demo", str(root / "out" / "demo"), "--out", str(out), "--canary-s", "20")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert "rollout completed" in started.stdout and "completed: 3 devices run mixer-digits" in started.stdout
        page = next(line.split()[-1] for line in started.stdout.splitlines() if line.startswith("dashboard:"))
        assert page.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(f"{page}api/fleet", timeout=10) as answer:
            fleet = json.load(answer)
        assert fleet["summary"]["devices"] == 3 and fleet["rollout"]["state"] == "completed"
        pids = json.loads((out / "pids.json").read_text())
        assert set(pids) == {"mosquitto", "serve", "lab-1", "lab-2", "lab-3", "dashboard"}
        (block,) = [b for b in shell_blocks() if listed(b, RUN_BY) == "source out/fleet-demo/fleet.env"]
        done = run_block(block, root)
        assert done.returncode == 0, f"{block.where}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        assert "rolled back" in done.stdout and "completed" in done.stdout, done.stdout
    finally:
        stopped = fleet_demo("stop", "--out", str(out))
    assert stopped.returncode == 0 and stopped.stdout.strip() == "stopped"
    assert not any(Path(f"/proc/{pid}").exists() and _not_zombie(pid) for pid in pids.values())
    assert fleet_demo("stop", "--out", str(out)).stdout.startswith("no fleet demo recorded")


def _not_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
