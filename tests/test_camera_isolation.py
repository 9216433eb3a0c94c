"""Cameras that cannot reach their stream do not starve the ones that can: each camera decodes in its
own process. A real RTSP server, cameras whose RTSP port accepts and never answers, a decoder killed
with SIGKILL, and streams that are not video at all."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
from agent_helpers import (
    dead_listener,
    read_results,
    start_agent,
    start_rtsp_server,
    stop_agent,
    wait_for_port,
    write_config,
)

from conftest import free_port


def first_results(results: Path, cameras: set[str], since: float, timeout: float) -> dict[str, float]:
    """When each of ``cameras`` produced its first result captured after ``since`` (epoch seconds)."""
    deadline, seen = time.monotonic() + timeout, {}
    while time.monotonic() < deadline and set(seen) != cameras:
        for r in read_results(results):
            if r["camera"] in cameras and r["captured"] > since:
                seen.setdefault(r["camera"], r["captured"])
        time.sleep(0.2)
    return seen


def decoders(agent: subprocess.Popen[str]) -> dict[str, psutil.Process]:
    """The agent's decoder processes by camera name (the name is on their command line, the source never)."""
    found = {}
    for child in psutil.Process(agent.pid).children():
        line = child.cmdline()
        if "agent.stream.decoder" in line:
            found[line[line.index("--camera") + 1]] = child
    return found


def test_dead_cameras_do_not_hold_back_good_ones(demo_bundle, signing_key, tmp_path: Path) -> None:
    # a server per good camera, as real cameras are: gst-rtsp-server's shared media has been seen to wedge
    # for every client when several set up at the same instant (bench/README.md, camera bench)
    ports, dead_port = [free_port(), free_port()], free_port()
    servers = [start_rtsp_server(port, "--size", "320x240") for port in ports]
    good = {"stall_timeout_s": 5, "reconnect": {"initial_s": 0.2, "max_s": 1}, "fps": 10}
    # stall 20 s: the setting under which two such cameras kept a good one dark for minutes when all
    # cameras decoded in the agent's own process
    dead = {"stall_timeout_s": 20, "reconnect": {"initial_s": 0.2, "max_s": 1}}
    cameras = [
        *({"name": f"good{i}", "source": f"rtsp://127.0.0.1:{port}/cam", **good} for i, port in enumerate(ports)),
        *({"name": f"dead{i}", "source": f"rtsp://127.0.0.1:{dead_port}/cam", **dead} for i in range(2)),
    ]
    results = tmp_path / "results.jsonl"
    with dead_listener(dead_port):
        agent = start_agent(write_config(tmp_path / "agent.yaml", demo_bundle, signing_key[1], cameras))
        try:
            started = first_results(results, {"good0", "good1"}, 0, timeout=60)
            assert set(started) == {"good0", "good1"}, f"good cameras that never started: {started}"

            for server in servers:  # the cameras lose power
                server.send_signal(signal.SIGKILL)
                server.wait()
            time.sleep(5)
            servers = [start_rtsp_server(port, "--size", "320x240") for port in ports]
            back_at = time.time()
            back = first_results(results, {"good0", "good1"}, back_at, timeout=30)
            assert set(back) == {"good0", "good1"}, f"good cameras that never recovered: {back}"

            victim = decoders(agent)["good0"]  # a decoder that crashes is restarted; the others go on
            victim.send_signal(signal.SIGKILL)
            killed_at = time.time()
            again = first_results(results, {"good0"}, killed_at + 0.5, timeout=30)
            assert "good0" in again, "the killed decoder was not restarted"
            assert decoders(agent)["good0"].pid != victim.pid
            assert first_results(results, {"good1"}, killed_at, timeout=5), "the other camera paused"
        finally:
            running = [p.pid for p in decoders(agent).values()]
            _, stderr = stop_agent(agent)
            for server in servers:
                server.kill()
                server.wait()
    assert agent.returncode == 0, stderr[-3000:]
    assert re.search(r"'camera': 'good0', 'state': 'restarting', 'reason': 'its decoder exited", stderr)
    assert not [r for r in read_results(results) if r["camera"].startswith("dead")]
    assert len(running) == 4 and not any(psutil.pid_exists(pid) for pid in running), "decoders outlived the agent"


def test_streams_that_are_not_video_cannot_crash_the_agent(
    demo_bundle, signing_key, digits_video: Path, tmp_path: Path
) -> None:
    """Random bytes, a video cut short with its middle overwritten, and an HTTP server that sends noise:
    each camera fails and retries on its own, the good camera serves throughout, the agent exits 0."""
    garbage = tmp_path / "noise.mp4"
    garbage.write_bytes(bytes(range(256)) * 4096)
    damaged = tmp_path / "damaged.mp4"
    data = bytearray(digits_video.read_bytes())
    data[len(data) // 3 : len(data) // 3 + 4096] = bytes(4096)
    damaged.write_bytes(bytes(data[: len(data) * 2 // 3]))
    port = free_port()
    noise = subprocess.Popen(  # answers any HTTP request with a video content type and random bytes
        ["/usr/bin/python3", "-c", NOISE_SERVER, str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for_port(port, noise)
    retry = {"stall_timeout_s": 2, "reconnect": {"initial_s": 0.2, "max_s": 1}}
    cameras = [
        {"name": "good", "source": str(digits_video), "loop": True, "fps": 15},
        {"name": "noise", "source": str(garbage), "loop": True, **retry},
        {"name": "damaged", "source": str(damaged), "loop": True, **retry},
        {"name": "http", "source": f"http://127.0.0.1:{port}/live.ts", "backend": "ffmpeg", **retry},
    ]
    agent = start_agent(write_config(tmp_path / "agent.yaml", demo_bundle, signing_key[1], cameras))
    try:
        assert first_results(tmp_path / "results.jsonl", {"good"}, 0, timeout=60), "the good camera never served"
        time.sleep(10)
        assert agent.poll() is None
    finally:
        _, stderr = stop_agent(agent)
        noise.kill()
        noise.wait()
    assert agent.returncode == 0, stderr[-3000:]
    good = [r["captured"] for r in read_results(tmp_path / "results.jsonl") if r["camera"] == "good"]
    assert len(good) > 60 and max(b - a for a, b in zip(good, good[1:], strict=False)) < 1.0


NOISE_SERVER = """
import os, socketserver, sys
class Noise(socketserver.StreamRequestHandler):
    def handle(self):
        self.rfile.readline()
        self.wfile.write(b"HTTP/1.0 200 OK\\r\\nContent-Type: video/mp2t\\r\\n\\r\\n")
        for _ in range(2000):
            self.wfile.write(os.urandom(4096))
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer(("127.0.0.1", int(sys.argv[1])), Noise).serve_forever()
"""
