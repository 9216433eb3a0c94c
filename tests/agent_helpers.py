"""Running the real agent process from tests: configs, processes, results."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml


def write_config(path: Path, bundle: Path, public_key: Path, cameras: list[dict[str, Any]], **sections: Any) -> Path:
    config = {
        "device": "test-box",
        "state_dir": str(path.parent / "state"),
        "engine": {"bundle": str(bundle), "trusted_keys": [str(public_key)]},
        "cameras": cameras,
        "results": {"jsonl": str(path.parent / "results.jsonl")},
        **sections,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def start_agent(config: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "agent.daemon", "--config", str(config), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def run_agent(config: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.daemon", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_results(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def summary(stdout: str) -> dict[str, Any]:
    return next(json.loads(line)["summary"] for line in reversed(stdout.splitlines()) if line.startswith('{"summary"'))


def stop_agent(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """SIGTERM (drain and flush), then the agent's (stdout, stderr)."""
    proc.send_signal(signal.SIGTERM)
    return proc.communicate(timeout=60)


def start_mosquitto(folder: Path, port: int) -> subprocess.Popen[bytes]:
    """A real Mosquitto on a loopback port, persistent so sessions and queued messages survive a restart."""
    (folder / "broker").mkdir(parents=True, exist_ok=True)
    conf = folder / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
        f"persistence_location {folder / 'broker'}/\nmax_queued_messages 100000\n"
    )
    proc = subprocess.Popen(
        [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"mosquitto did not start on port {port}")
