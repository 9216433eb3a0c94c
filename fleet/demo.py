"""``make fleet-demo``: the fleet's main job on one machine, with the demo's bundles.

``start`` runs a local Mosquitto on a free loopback port, three demo agents labelled ``site=lab``
(each playing the demo video as its camera, serving the ViT bundle), ``edgevit-fleet serve`` for
the packed bundles and the dashboard, all on 127.0.0.1 and all writing under ``--out``; then a
staged rollout of the Mixer bundle to the three (a canary wave of one, then the rest), printed as
it goes. Everything it started keeps running so the dashboard can be looked at; ``stop`` ends it.
Each process is started in its own session, so the ``make`` that started it may exit.

The canary window is shortened to ``--canary-s`` (the agents' default is 300 s): long enough for
the sequential tests to see a few hundred frames, short enough for a demo.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

DEVICES = ("lab-1", "lab-2", "lab-3")
FIRST, ROLLED_OUT = "vit-digits", "mixer-digits"
PIDS = "pids.json"


class DemoError(Exception):
    """Something the demo needs is missing, or a process it started failed."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _spawn(name: str, command: list[str], out: Path, pids: dict[str, int]) -> subprocess.Popen[bytes]:
    """A process in its own session, its output in ``<out>/logs/<name>.log``, its pid recorded at once."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{name}.log", "wb") as log:
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    pids[name] = proc.pid
    (out / PIDS).write_text(json.dumps(pids))
    return proc


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise DemoError(f"{what} is not listening on 127.0.0.1:{port} after {timeout_s:.0f} s")


def _fleet(*args: str) -> list[str]:
    return [sys.executable, "-m", "fleet.cli", *args]


def _agent_config(demo: Path, out: Path, device: str, broker: int, canary_s: float) -> Path:
    home = out / device
    home.mkdir(parents=True, exist_ok=True)
    config = {
        "device": device,
        "labels": {"site": "lab", "camera": "digits"},
        "state_dir": str(home / "state"),
        "engine": {
            "bundle": str(demo / "bundles" / f"{FIRST}-cpu-int8"),
            "trusted_keys": [str(demo / "keys" / "edgevit.pub")],
        },
        "cameras": [{"name": "digits", "source": str(demo / "digits.mp4"), "loop": True, "fps": 10}],
        "results": {"jsonl": str(home / "results.jsonl")},
        "mqtt": {"host": "127.0.0.1", "port": broker},
        "canary": {"window_s": canary_s},
        "metrics": {"print_every_s": 10},
    }
    path = home / "agent.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _online(broker: int, timeout_s: float) -> None:
    """Until every demo device's retained status says it is online and serving its first bundle."""
    deadline = time.monotonic() + timeout_s
    seen: list[str] = []
    while time.monotonic() < deadline:
        done = subprocess.run(
            _fleet("status", "--port", str(broker), "--select", "site=lab", "--json"),
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode == 0:
            devices = json.loads(done.stdout)
            seen = sorted(d["device"] for d in devices if d.get("online") and d.get("active"))
            if seen == sorted(DEVICES):
                return
        time.sleep(2)
    raise DemoError(f"only {', '.join(seen) or 'no device'} of {', '.join(DEVICES)} came online in {timeout_s:.0f} s")


def start(demo: Path, out: Path, canary_s: float, online_s: float) -> int:
    """Everything up, then the rollout; the rollout's exit status (0: completed)."""
    needed = [demo / "bundles" / f"{n}-cpu-int8" for n in (FIRST, ROLLED_OUT)]
    needed += [demo / "keys" / "edgevit.pub", demo / "digits.mp4"]
    if missing := [str(p) for p in needed if not p.exists()]:
        raise DemoError(f"missing {', '.join(missing)}: run `edgevit-build demo --out {demo}` (make demo) first")
    if stop(out):
        print("stopped the fleet demo that was still running")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    pids: dict[str, int] = {}

    broker = free_port()
    (out / "mosquitto.conf").write_text(f"listener {broker} 127.0.0.1\nallow_anonymous true\n")
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    _wait_for_port(broker, _spawn("mosquitto", [mosquitto, "-c", str(out / "mosquitto.conf")], out, pids), "mosquitto")
    print(f"broker: Mosquitto on 127.0.0.1:{broker}")

    store = out / "store"
    for name in (FIRST, ROLLED_OUT):
        pack = [sys.executable, "-m", "builder.cli", "pack", str(demo / "bundles" / f"{name}-cpu-int8")]
        subprocess.run([*pack, "--out", str(store / f"{name}.tar.gz")], check=True, stdout=subprocess.DEVNULL)
    files = free_port()
    serve = _fleet("serve", str(store), "--http-port", str(files), "--bind", "127.0.0.1")
    _wait_for_port(files, _spawn("serve", serve, out, pids), "edgevit-fleet serve")
    print(f"bundles: {store} served on http://127.0.0.1:{files}/")

    for device in DEVICES:
        config = _agent_config(demo, out, device, broker, canary_s)
        _spawn(device, [sys.executable, "-m", "agent.daemon", "--config", str(config)], out, pids)
    print(f"agents: {', '.join(DEVICES)} (site=lab) serving {FIRST}; logs in {out / 'logs'}")
    _online(broker, online_s)

    page = free_port()
    dashboard = _fleet("dashboard", "--port", str(broker), "--http-port", str(page), "--state-dir", str(out / "fleet"))
    _wait_for_port(page, _spawn("dashboard", dashboard, out, pids), "edgevit-fleet dashboard")

    deploy = _fleet(
        "deploy", str(store / f"{ROLLED_OUT}.tar.gz"), "--url-base", f"http://127.0.0.1:{files}",
        "--select", "site=lab", "--canary", "1", "--step", "100%", "--timeout", str(int(canary_s * 4 + 300)),
        "--port", str(broker), "--state-dir", str(out / "fleet"),
    )  # fmt: skip
    print(f"\n$ edgevit-fleet deploy {ROLLED_OUT}.tar.gz --select site=lab --canary 1 --step 100%")
    sys.stdout.flush()
    code = subprocess.run(deploy).returncode
    print(f"\nrollout {'completed' if code == 0 else f'ended with exit status {code}'}")
    print(f"dashboard: http://127.0.0.1:{page}/")
    env = out / "fleet.env"
    env.write_text(
        f"export EDGEVIT_MQTT_PORT={broker} EDGEVIT_FLEET_STATE={shlex.quote(str((out / 'fleet').resolve()))}\n"
    )
    print(f"fleet:     source {env}   # then edgevit-fleet status, history, rollback ... act on this demo")
    print(f"stop it:   make fleet-demo-stop (python -m fleet.demo stop --out {out})")
    return code


def stop(out: Path, grace_s: float = 20) -> bool:
    """SIGTERM to everything ``start`` recorded (agents drain and flush), SIGKILL after ``grace_s``."""
    try:
        pids: dict[str, Any] = json.loads((out / PIDS).read_text())
    except (OSError, ValueError):
        return False
    mine = {name: pid for name, pid in pids.items() if isinstance(pid, int) and _started_here(pid, out)}
    alive = {name: pid for name, pid in mine.items() if _signal(pid, signal.SIGTERM)}
    deadline = time.monotonic() + grace_s
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = {name: pid for name, pid in alive.items() if _signal(pid, 0)}
    for pid in alive.values():
        _signal(pid, signal.SIGKILL)
    (out / PIDS).unlink(missing_ok=True)
    return True


def _started_here(pid: int, out: Path) -> bool:
    """Whether ``pid`` is still a process of this demo: each one's command line names a path under ``out``
    (a recorded pid reused by another process after a reboot is left alone)."""
    try:
        return str(out.resolve()) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def _signal(pid: int, sig: int) -> bool:
    """Whether ``pid`` was there to take ``sig`` (a zombie child of this process counts as gone)."""
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:  # not our child: it exists
        return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fleet.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["start", "stop"], help="start the demo fleet and roll out; stop it")
    parser.add_argument("--demo", type=Path, default=Path("out/demo"), help="edgevit-build demo's output folder")
    parser.add_argument("--out", type=Path, default=Path("out/fleet-demo"), help="where everything started writes")
    parser.add_argument("--canary-s", type=float, default=45.0, help="the agents' canary window, seconds")
    parser.add_argument("--online-s", type=float, default=300.0, help="how long the agents may take to come online")
    args = parser.parse_args(argv)
    args.demo, args.out = args.demo.resolve(), args.out.resolve()  # each process's command line names them
    try:
        if args.action == "stop":
            print("stopped" if stop(args.out) else f"no fleet demo recorded in {args.out}")
            return 0
        return start(args.demo, args.out, args.canary_s, args.online_s)
    except (DemoError, subprocess.CalledProcessError) as exc:
        print(f"fleet demo: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
