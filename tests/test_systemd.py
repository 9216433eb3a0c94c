"""systemd integration: the notify protocol on a real datagram socket, the watchdog, the unit file."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from agent_helpers import rebundle, start_agent, write_config
from engine_variants import hang_on_bright_frames

from agent.engine.bundle import verify_bundle

UNIT = Path(__file__).parents[1] / "systemd" / "edgevit-agent.service"


@pytest.fixture
def hanging_bundle(demo_bundle: Path, signing_key, tmp_path: Path) -> Path:
    engine = hang_on_bright_frames(verify_bundle(demo_bundle, None).engine_path, tmp_path / "model-hangs.onnx")
    return rebundle(demo_bundle, tmp_path / "hanging", signing_key[0], "hangs-on-white", engine=engine)


def digits_then_white(path: Path, digits: int, white: int) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30, (128, 128))
    rng = np.random.default_rng(0)
    for i in range(digits + white):
        frame = (
            np.full((128, 128, 3), 255, np.uint8) if i >= digits else (rng.random((128, 128, 3)) * 90).astype(np.uint8)
        )
        writer.write(frame)
    writer.release()
    return path


def test_ready_then_watchdog_stops_when_the_engine_hangs(hanging_bundle: Path, signing_key, tmp_path: Path) -> None:
    video = digits_then_white(tmp_path / "then-white.mp4", digits=75, white=60)
    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(0.2)
    config = write_config(
        tmp_path / "agent.yaml", hanging_bundle, signing_key[1], [{"name": "cam", "source": str(video), "fps": 30}]
    )
    agent = start_agent(config, env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"})
    messages: list[tuple[float, str]] = []
    started = time.monotonic()
    try:
        # 9 s from READY (a busy machine, such as the suite's two workers, delays the start), 60 s at most
        while (elapsed := time.monotonic() - started) < 60 and (not messages or elapsed - messages[0][0] < 9):
            try:
                messages.append((time.monotonic() - started, sock.recv(4096).decode()))
            except TimeoutError:
                pass
        alive = agent.poll() is None
    finally:
        agent.kill()
        agent.communicate()
        sock.close()
    assert alive, "a hung engine does not crash the agent: systemd's watchdog is what restarts it"
    assert messages[0][1].startswith("READY=1") and "STATUS=serving hangs-on-white" in messages[0][1]
    pets = [t for t, m in messages if m == "WATCHDOG=1"]
    ready_at = messages[0][0]
    assert len([t for t in pets if t < ready_at + 2.0]) >= 5, "fed while frames are processed"
    assert pets and pets[-1] < ready_at + 5.0, "white frames from 2.5 s hang the engine; feeding stops"
    assert max(t for t, _ in messages) - pets[-1] >= 3.0 or time.monotonic() - started - pets[-1] >= 3.0


def test_notify_is_a_no_op_outside_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.systemd import notify, watchdog_period

    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert notify("READY=1") is False and watchdog_period() is None


def test_unit_file_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze") or "systemd-analyze"  # .ci/run installs it where missing
    text = UNIT.read_text()
    assert "Type=notify" in text and "WatchdogSec=" in text and "Restart=on-failure" in text
    directives = [line.split("=", 1)[0] for line in text.splitlines() if "=" in line and not line.startswith("#")]
    assert "PrivateDevices" not in directives, "it would hide the Jetson GPU device nodes"
    assert "StateDirectory=edgevit" in text
    unit = tmp_path / UNIT.name  # point ExecStart at this checkout's interpreter so it exists
    unit.write_text(text.replace("/opt/edgevit/.venv/bin/edgevit-agent", str(Path(sys.executable).resolve())))
    proc = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
