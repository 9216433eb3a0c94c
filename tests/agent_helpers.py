"""Running the real agent process from tests: configs, processes, results."""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

# The swap-time latency gates, opened wide: for tests that judge something else (the canary,
# a crash), where the demo engine's sub-millisecond passport figures on a busy test machine
# would only add noise. Their own behaviour is tested with the defaults.
NO_SWAP_LATENCY_GATE = {"max_latency_ratio": 1000}


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
    """The complete lines of an agent's results file: one it is still writing may end mid-line."""
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]


def wait_for_result(path: Path, wanted: Callable[[dict[str, Any]], bool], timeout_s: float) -> bool:
    """Whether a complete line of the agent's results file satisfies ``wanted`` within ``timeout_s``.

    Tests wait on what the agent wrote rather than sleeping a fixed time: start-up on a loaded CI machine
    takes anywhere from one to many seconds.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(wanted(r) for r in read_results(path)):
            return True
        time.sleep(0.2)
    return False


def summary(stdout: str) -> dict[str, Any]:
    return next(json.loads(line)["summary"] for line in reversed(stdout.splitlines()) if line.startswith('{"summary"'))


def stop_agent(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """SIGTERM (drain and flush), then the agent's (stdout, stderr). The wait is systemd's default
    TimeoutStopSec (90 s) plus margin; an agent that outlives it is asked for its threads' stacks
    (SIGUSR1) so the failure names what it waited on."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)
        time.sleep(2)
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(
            f"the agent did not stop within 120 s of SIGTERM; its stderr ends:\n{err[-20000:]}"
        ) from None


def start_mosquitto(folder: Path, port: int, access: str = "allow_anonymous true\n") -> subprocess.Popen[bytes]:
    """A real Mosquitto on a loopback port, persistent so sessions and queued messages survive a restart.

    ``access`` holds the authentication and TLS lines. Run as root, Mosquitto would switch to its
    own user, which cannot read the test's folders: it keeps the user that starts it.
    """
    (folder / "broker").mkdir(parents=True, exist_ok=True)
    conf = folder / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nuser {getpass.getuser()}\n{access}persistence true\n"
        f"persistence_location {folder / 'broker'}/\nmax_queued_messages 100000\n"
    )
    proc = subprocess.Popen(
        [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, proc)
    return proc


def wait_for_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    """Until something listens on the loopback ``port``; kills ``proc`` if nothing does within 5 s."""
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"nothing listens on port {port}")


def rebundle(
    original: Path,
    out: Path,
    key: Path,
    bundle_id: str,
    engine: Path | None = None,
    manifest_changes: dict[str, Any] | None = None,
) -> Path:
    """A copy of a bundle signed with ``key``: another id, engine file or requirements, same golden set."""
    import numpy as np

    from agent.engine.bundle import verify_bundle
    from agent.engine.signing import load_private_key
    from builder.bundle.writer import write_bundle

    bundle = verify_bundle(original, None)
    with np.load(bundle.golden_path) as golden:
        golden_set = dict(golden)
    manifest = {k: v for k, v in bundle.manifest.items() if k != "files"}
    manifest.update(bundle_id=bundle_id, **(manifest_changes or {}))
    files = [engine or bundle.engine_path]
    return write_bundle(out, files, bundle.labels, bundle.passport, golden_set, manifest, load_private_key(key))


def blank_image_folder(root: Path, count: int = 4) -> Path:
    """Black PNGs: calibrating INT8 on them over-quantizes a model reliably."""
    import cv2
    import numpy as np

    root.mkdir(parents=True)
    for i in range(count):
        cv2.imwrite(str(root / f"{i}.png"), np.zeros((48, 48, 3), np.uint8))
    return root


class Operator:
    """An MQTT 5 client for one device: sends commands, reads replies in order, collects events."""

    def __init__(
        self,
        port: int,
        base: str = "edgevit/test-box",
        tls: dict[str, Any] | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        import queue
        import threading

        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.base = base
        self.process: subprocess.Popen[str] | None = None  # the agent, when one was started with it
        self.folder: Path | None = None
        self.replies: queue.Queue[tuple[str, dict, object]] = queue.Queue()
        self.events: list[dict[str, Any]] = []
        self._events_lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"operator-{port}", protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        if tls:
            self.client.tls_set(**tls)
        if username:
            self.client.username_pw_set(username, password)
        self.client.connect("127.0.0.1", port)
        self.client.subscribe([(f"{base}/reply", 1), ("operator/inbox", 1), (f"{base}/events", 1)])
        self.client.loop_start()
        time.sleep(0.3)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        payload = json.loads(message.payload)
        if message.topic == f"{self.base}/events":
            with self._events_lock:
                self.events.append(payload)
        else:
            self.replies.put((message.topic, payload, getattr(message.properties, "CorrelationData", None)))

    def send(self, payload: bytes | dict[str, Any]) -> dict[str, Any]:
        return self.send_many([payload if isinstance(payload, bytes) else json.dumps(payload).encode()])[0]

    def send_many(self, payloads: list[bytes]) -> list[dict[str, Any]]:
        """Publish all, then read as many replies: MQTT keeps QoS 1 messages of one client in order."""
        for data in payloads:
            self.client.publish(f"{self.base}/cmd", data, qos=1)
        replies = []
        for _ in payloads:
            topic, reply, _ = self.replies.get(timeout=30)
            assert topic == f"{self.base}/reply"
            replies.append(reply)
        return replies

    def wait_serving(self, timeout: float = 60) -> None:
        """Until the agent answers a ping: it may still be loading its engine or connecting when a test starts,
        and a command sent before it subscribed is lost. Replies to earlier pings are read and dropped."""
        import queue

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ping = f"ready-{time.monotonic_ns()}"
            self.client.publish(f"{self.base}/cmd", json.dumps({"id": ping, "cmd": "ping"}).encode(), qos=1)
            try:
                while self.replies.get(timeout=1)[1].get("id") != ping:
                    pass
                return
            except queue.Empty:
                continue
        raise AssertionError(f"the agent did not answer a ping in {timeout} s")

    def wait_status(self, wanted: Callable[[dict[str, Any]], bool], timeout: float = 60) -> dict[str, Any]:
        """The first ``status`` result ``wanted`` accepts, asked for every half second: a camera's state
        changes on its own clock (connect timeouts, backoff), which a loaded runner stretches."""
        self.wait_serving(timeout)
        deadline, result = time.monotonic() + timeout, {}
        while time.monotonic() < deadline:
            result = self.send({"id": f"status-{time.monotonic_ns()}", "cmd": "status"})["result"]
            if wanted(result):
                return result
            time.sleep(0.5)
        raise AssertionError(f"no status as wanted in {timeout} s; the last: {result}")

    def wait_event(self, kind: str, timeout: float = 90, **match: Any) -> dict[str, Any]:
        """The first event of ``kind`` whose fields equal ``match``; fails with every event seen."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._events_lock:
                for event in self.events:
                    if event["event"] == kind and all(event.get(k) == v for k, v in match.items()):
                        return event
            time.sleep(0.1)
        raise AssertionError(f"no {kind} event with {match} in {timeout} s; events: {self.events}")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@contextlib.contextmanager
def device_over_mqtt(
    folder: Path, bundle: Path, public_key: Path, video: Path, fps: float, **sections: Any
) -> Iterator[Operator]:
    """A real Mosquitto, a real agent with two looping cameras (door, yard), and an operator for it."""
    from conftest import free_port

    port = free_port()
    broker = start_mosquitto(folder, port)
    cameras = [{"name": n, "source": str(video), "loop": True, "fps": fps} for n in ("door", "yard")]
    config = write_config(
        folder / "agent.yaml", bundle, public_key, cameras, mqtt={"host": "127.0.0.1", "port": port}, **sections
    )
    process = start_agent(config)
    operator = Operator(port)
    operator.process, operator.folder = process, folder
    try:
        operator.wait_serving()
        yield operator
    finally:
        _, err = stop_agent(operator.process)  # a test may have restarted the agent
        operator.close()
        broker.terminate()
        broker.wait()
    assert operator.process.returncode == 0, err[-3000:]


RTSP_SERVER = Path(__file__).with_name("rtsp_server.py")


def start_rtsp_server(port: int, *options: str) -> subprocess.Popen[bytes]:
    """The test RTSP server (``tests/rtsp_server.py``) on ``port``, with its ``options`` (size, user, auth).
    The system Python has the GStreamer bindings (.ci/run installs them)."""
    proc = subprocess.Popen(
        ["/usr/bin/python3", str(RTSP_SERVER), str(port), *options],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, proc)
    return proc


@contextlib.contextmanager
def dead_listener(port: int) -> Iterator[None]:
    """A TCP port that accepts connections and never answers: a camera whose RTSP service hangs (a
    half-dead device, a VLAN that swallows replies). Clients wait out their own timeouts."""
    held: list[socket.socket] = []
    server = socket.create_server(("127.0.0.1", port))
    server.settimeout(0.2)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        for conn in [*held, server]:
            conn.close()
