"""RTSP end to end against a real RTSP server (GStreamer's gst-rtsp-server in its own process): TCP and UDP,
digest and basic authentication, the server killed and restarted at another resolution mid-stream, with a
file camera beside them unaffected, and no password anywhere the agent writes (issue 13)."""

from __future__ import annotations

import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_helpers import read_results, start_agent, start_rtsp_server, stop_agent, write_config

from conftest import free_port

PASSWORD = "Rtsp-Pw-42"


def start_server(port: int, size: str = "320x240", auth: str = "digest") -> subprocess.Popen[bytes]:
    # a pipeline per client: cameras open at once (a process each), which a shared media has been seen to wedge on
    return start_rtsp_server(
        port, "--size", size, "--user", "admin", "--password", PASSWORD, "--auth", auth, "--per-client"
    )


@pytest.fixture
def server_port() -> Iterator[int]:
    yield free_port()


def counts(results_file: Path, since: float) -> Counter[str]:
    return Counter(r["camera"] for r in read_results(results_file) if r["captured"] > since)


def wait_for(results_file: Path, cameras: set[str], since: float, timeout: float = 30) -> Counter[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = counts(results_file, since)
        if all(seen[c] >= 5 for c in cameras):
            return seen
        time.sleep(0.5)
    raise AssertionError(f"no results from {cameras - {c for c, n in seen.items() if n >= 5}} in {timeout} s: {seen}")


def test_rtsp_tcp_udp_auth_and_a_server_restart(demo_bundle, signing_key, digits_video, tmp_path, server_port):
    server = start_server(server_port, "320x240")
    url = f"rtsp://admin:${{RTSP_PW}}@127.0.0.1:{server_port}/cam"
    quick = {"stall_timeout_s": 2, "reconnect": {"initial_s": 0.2, "max_s": 1}, "backend": "ffmpeg", "fps": 10}
    cameras = [
        {"name": "tcp", "source": url, "rtsp_transport": "tcp", **quick},
        {"name": "udp", "source": url, "rtsp_transport": "udp", **quick},
        {"name": "wrong", "source": f"rtsp://admin:not-{PASSWORD}@127.0.0.1:{server_port}/cam", **quick},
        {"name": "file", "source": str(digits_video), "loop": True, "fps": 10},
    ]
    config = write_config(tmp_path / "agent.yaml", demo_bundle, signing_key[1], cameras)
    agent = start_agent(config, env={"RTSP_PW": PASSWORD})
    results = tmp_path / "results.jsonl"
    failure: AssertionError | None = None
    try:
        wait_for(results, {"tcp", "udp", "file"}, 0, timeout=40)
        server.kill()  # mid-stream, as a camera losing power
        server.wait()
        killed = time.time()
        time.sleep(4)
        during = counts(results, killed + 1)
        assert during["file"] >= 20, during  # the file camera does not notice
        assert during["tcp"] == during["udp"] == 0, during
        server = start_server(server_port, "640x480")  # back, at another resolution
        restarted = time.time()
        after = wait_for(results, {"tcp", "udp", "file"}, restarted, timeout=40)
        assert after["wrong"] == 0
    except AssertionError as exc:
        failure = exc
    finally:
        out, err = stop_agent(agent)
        server.kill()
        server.wait()
    if failure is not None:  # once seen under a full suite's load, never alone: the agent's log says why
        raise AssertionError(f"{failure}\nthe agent's log ends:\n{err[-4000:]}") from failure
    assert "401" in err or "reconnecting" in err, err[-2000:]
    assert f"rtsp://admin:***@127.0.0.1:{server_port}/cam" in err  # the failing camera, named without its password
    written = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != "agent.yaml")
    for blob in (out.encode(), err.encode(), written):
        assert PASSWORD.encode() not in blob


def test_rtsp_basic_authentication(demo_bundle, signing_key, tmp_path, server_port):
    server = start_server(server_port, auth="basic")
    cameras = [{"name": "cam", "source": f"rtsp://admin:{PASSWORD}@127.0.0.1:{server_port}/cam", "fps": 10}]
    config = write_config(tmp_path / "agent.yaml", demo_bundle, signing_key[1], cameras)
    agent = start_agent(config)
    try:
        wait_for(tmp_path / "results.jsonl", {"cam"}, 0, timeout=40)
    finally:
        stop_agent(agent)
        server.kill()
        server.wait()
