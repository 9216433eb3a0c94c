"""edgevit-fleet against 1,000 to 10,000 SIMULATED devices on one Mosquitto: rollout time, messages, CPU.

The devices are protocol-level simulators, not agents: each is its own MQTT
connection with its own retained status and last will, answers ``deploy`` like an
agent (reply, then ``verify``, ``swap`` and, after a simulated canary window,
``commit`` events and an updated retained status), and runs no engine. The
controller is the real ``edgevit-fleet deploy`` process. Measured in one run:

- wall time of a staged rollout (canary 1 %, then steps), against the sum of the
  simulated canary windows on its critical path (the waves' lower bound);
- MQTT messages and bytes through the broker per device (from Mosquitto's ``$SYS`` counters);
- CPU of the broker(s) per device, of the controller per 1,000 devices, and of the simulators
  apart (they share this machine's cores with the broker and the controller);
- what an operator waits for at that size: ``status --summary``, a page of ``status``, and a
  page of the dashboard's API;
- past one broker (``--bridged``): the same rollout with the devices on an edge Mosquitto
  bridged (MQTT 5, ``edgevit/#`` both ways) into the central one the controller uses.
  Messages are counted on the central broker.

    python bench/fleet_bench.py [--devices 1000 5000 10000] [--canary-s 2] [--step 10%] [--out bench/results]

Needs the ``mosquitto`` binary.
"""

from __future__ import annotations

import argparse
import heapq
import io
import json
import multiprocessing
import os
import resource
import selectors
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from broker import start_broker
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "edgevit"


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Loop:
    """One thread per simulator process: every device's socket (paho's external-loop API) and timers.

    A paho network thread per simulated device (10,000 threads) would spend more CPU switching
    between them than the controller spends on the whole rollout; real devices each have their own
    machine. One selector per process serves its devices' sockets and the commit timers in order.
    """

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self._heap: list[tuple[float, int, Any]] = []
        self._n = 0
        self.clients: list[mqtt.Client] = []

    def at(self, delay: float, action: Any) -> None:
        self._n += 1
        heapq.heappush(self._heap, (time.monotonic() + delay, self._n, action))

    def add(self, client: mqtt.Client) -> None:
        client.on_socket_open = lambda c, userdata, sock: self.selector.register(sock, selectors.EVENT_READ, c)
        client.on_socket_close = lambda c, userdata, sock: self.selector.unregister(sock)
        self.clients.append(client)

    def run(self, stop: Any) -> None:
        housekeeping = time.monotonic()
        while not stop.is_set():
            wait = min(self._heap[0][0] - time.monotonic(), 0.5) if self._heap else 0.5
            for key, _ in self.selector.select(max(wait, 0.0)):
                key.data.loop_read()
                if key.data.want_write():  # what its callbacks published
                    key.data.loop_write()
            while self._heap and self._heap[0][0] <= time.monotonic():
                heapq.heappop(self._heap)[2]()
            if time.monotonic() - housekeeping > 1.0:  # keepalive pings, retries
                housekeeping = time.monotonic()
                for client in self.clients:
                    client.loop_misc()
                    if client.want_write():
                        client.loop_write()


class SimulatedDevice:
    """Answers like an agent at the protocol level: status, replies, lifecycle events. No engine."""

    def __init__(self, name: str, port: int, labels: dict[str, str], canary_s: float, loop: Loop) -> None:
        self.name, self.canary_s, self.loop = name, canary_s, loop
        self.base = f"{PREFIX}/{name}"
        self.status = {"state": "online", "device": name, "labels": labels, "fps": 10.0, "p99_ms": 20.0,
                       "engine": {"active": "sim-v1", "previous": None, "canary": None, "bad": []}}  # fmt: skip
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sim-{name}", protocol=mqtt.MQTTv5)
        will = json.dumps({"state": "offline", "device": name, "labels": labels})
        self.client.will_set(f"{self.base}/status", will, qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        loop.add(self.client)
        self.client.connect("127.0.0.1", port, keepalive=60)

    def _publish_status(self) -> None:
        self.client.publish(f"{self.base}/status", json.dumps(self.status), qos=1, retain=True)

    def _event(self, kind: str, **detail: Any) -> None:
        self.client.publish(f"{self.base}/events", json.dumps({"event": kind, "at": time.time(), **detail}), qos=1)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        client.subscribe(f"{self.base}/cmd", qos=1)
        self._publish_status()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        command = json.loads(message.payload)
        reply = {"id": command["id"], "ok": True, "result": {"accepted": True}}
        client.publish(f"{self.base}/reply", json.dumps(reply), qos=1)
        if command["cmd"] != "deploy":
            return
        bundle = command["bundle"]["url"].rsplit("/", 1)[-1].removesuffix(".tar.gz")
        engine = self.status["engine"]
        self._event("verify", command_id=command["id"], bundle_id=bundle, ok=True)
        self.status["engine"] = {**engine, "active": bundle, "previous": engine["active"], "canary": bundle}
        self._event("swap", command_id=command["id"], bundle_id=bundle, to=bundle)
        self._publish_status()

        def commit() -> None:
            self.status["engine"] = {**self.status["engine"], "canary": None}
            self._event("commit", command_id=command["id"], bundle_id=bundle, figures={"simulated": True})
            self._publish_status()

        self.loop.at(self.canary_s, commit)


PER_PROCESS = 250  # devices per simulator process (40 processes at 10,000)


def simulate(port: int, first: int, count: int, canary_s: float, ready: Any, stop: Any, updated: Any) -> None:
    """A child process running ``count`` simulated devices until ``stop``; reports how many were updated."""
    loop = Loop()
    devices = [
        SimulatedDevice(f"sim-{i:05d}", port, {"site": f"s{i % 10}"}, canary_s, loop)
        for i in range(first, first + count)
    ]
    ready.release()
    loop.run(stop)
    updated.put(sum(d.status["engine"]["active"] == "sim-v2" for d in devices))


def _await_devices(port: int, devices: int, timeout_s: float = 300.0) -> None:
    """Until the broker holds a retained status from every simulated device (connections are asynchronous)."""
    seen: set[str] = set()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"count-{time.monotonic_ns()}")
    client.on_message = lambda c, u, m: seen.add(m.topic)
    client.connect("127.0.0.1", port)
    client.loop_start()
    deadline = time.monotonic() + timeout_s
    while len(seen) < devices and time.monotonic() < deadline:
        client.unsubscribe(f"{PREFIX}/+/status")  # subscribing again replays every retained status
        seen.clear()
        client.subscribe(f"{PREFIX}/+/status", qos=0)
        time.sleep(2)
    client.loop_stop()
    client.disconnect()
    if len(seen) < devices:
        sys.exit(f"only {len(seen)} of {devices} simulated devices connected within {timeout_s:g} s")


def _operator_views(port: int, state_dir: Path) -> dict[str, float]:
    """Seconds an operator waits at this fleet size: ``status --summary`` and a page of the table (whole
    commands: start, connect, the retained replay), and one dashboard API page once its server runs."""
    base = [sys.executable, "-m", "fleet.cli", "status", "--port", str(port), "--state-dir", str(state_dir)]
    views = {}
    for key, extra in (("status_summary_s", ["--summary"]), ("status_page_s", ["--per-page", "50"])):
        started = time.monotonic()
        subprocess.run([*base, *extra], cwd=ROOT, capture_output=True, check=True, timeout=300)
        views[key] = round(time.monotonic() - started, 2)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        http_port = sock.getsockname()[1]
    dashboard = subprocess.Popen(
        [sys.executable, "-m", "fleet.cli", "dashboard", "--port", str(port), "--state-dir", str(state_dir),
         "--http-port", str(http_port)], cwd=ROOT, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{http_port}/api/fleet?per_page=50"
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url, timeout=30).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        started = time.monotonic()
        urllib.request.urlopen(url, timeout=30).read()
        views["dashboard_page_s"] = round(time.monotonic() - started, 3)
    finally:
        dashboard.terminate()
        dashboard.wait()
    return views


def _sys_counters(port: int) -> dict[str, float]:
    """Mosquitto's $SYS totals (messages and bytes, received and sent)."""
    values: dict[str, float] = {}
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sys-{time.monotonic_ns()}")
    client.on_message = lambda c, u, m: values.__setitem__(m.topic.removeprefix("$SYS/broker/"), float(m.payload))
    client.connect("127.0.0.1", port)
    client.subscribe([(f"$SYS/broker/{t}", 0) for t in ("messages/received", "messages/sent", "bytes/received",
                                                         "bytes/sent")])  # fmt: skip
    client.loop_start()
    deadline = time.monotonic() + 15  # $SYS is republished every sys_interval (1 s here)
    while time.monotonic() < deadline and len(values) < 4:
        time.sleep(0.2)
    client.loop_stop()
    client.disconnect()
    return values


BRIDGE = """connection central
address 127.0.0.1:{port}
topic {prefix}/# both 1
bridge_protocol_version mqttv50
cleansession true
try_private true
"""


def run_size(devices: int, canary_s: float, canary: str, step: str, bridged: bool = False) -> dict[str, Any]:
    """One rollout over ``devices`` simulated devices on fresh brokers; the figures of one table row.

    ``bridged``: the devices connect to an edge broker that bridges ``edgevit/#`` both ways into a
    central broker, where the controller connects (one site's broker in a fleet of sites).
    """
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        settings = "sys_interval 1\nmax_queued_messages 100000\n"
        (work / "central").mkdir()
        broker, port = start_broker(work / "central", settings)
        edge, device_port = broker, port
        if bridged:
            (work / "edge").mkdir()
            edge, device_port = start_broker(work / "edge", settings + BRIDGE.format(port=port, prefix=PREFIX))
        context = multiprocessing.get_context("spawn")
        ready, stop, updated = context.Semaphore(0), context.Event(), context.Queue()
        started = time.monotonic()
        simulators = [
            context.Process(
                target=simulate,
                args=(device_port, first, min(PER_PROCESS, devices - first), canary_s, ready, stop, updated),
            )
            for first in range(0, devices, PER_PROCESS)
        ]
        for process in simulators:
            process.start()
        for _ in simulators:
            ready.acquire()
        _await_devices(port, devices)  # every simulator connected, its retained status where the controller reads
        connect_s = time.monotonic() - started
        archive = work / "sim-v2.tar.gz"  # the controller reads the id from the manifest; simulators download nothing
        with tarfile.open(archive, "w:gz") as tar:
            data = json.dumps({"bundle_id": "sim-v2"}).encode()
            info = tarfile.TarInfo("sim-v2/manifest.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        before = _sys_counters(port)
        brokers = {broker.pid, edge.pid}
        broker_cpu = sum(map(_cpu_s, brokers))
        sims_cpu = sum(_cpu_s(p.pid) for p in simulators)
        command = [sys.executable, "-m", "fleet.cli", "deploy", str(archive), "--url-base", "http://store.invalid",
                   "--port", str(port), "--state-dir", str(work / "controller"), "--canary", canary,
                   "--step", step, "--timeout", "300"]  # fmt: skip
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        rolled = time.monotonic()
        controller = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        out, _ = controller.communicate()  # reaped: its CPU time is in RUSAGE_CHILDREN (simulators are not yet)
        rollout_s = time.monotonic() - rolled
        after_children = resource.getrusage(resource.RUSAGE_CHILDREN)
        controller_cpu = (after_children.ru_utime + after_children.ru_stime) - (children.ru_utime + children.ru_stime)
        broker_cpu = sum(map(_cpu_s, brokers)) - broker_cpu
        sims_cpu = sum(_cpu_s(p.pid) for p in simulators) - sims_cpu
        after = _sys_counters(port)
        waves = len({line.split(":")[0] for line in out.splitlines() if "deploy sent" in line})
        views = _operator_views(port, work / "controller")
        stop.set()
        done = sum(updated.get(timeout=120) for _ in simulators)
        for process in simulators:
            process.join(60)
        for process in (edge, broker) if bridged else (broker,):
            process.terminate()
            process.wait()
    messages = (
        after["messages/received"] + after["messages/sent"] - before["messages/received"] - before["messages/sent"]
    )
    return {
        "devices": devices,
        "brokers": "edge bridged to central" if bridged else "one",
        "canary": canary,
        "step": step,
        "connect_s": round(connect_s, 1),
        "waves": waves,
        "rollout_s": round(rollout_s, 1),
        "lower_bound_s": round(waves * canary_s, 1),
        "updated": done,
        "messages_per_device": round(messages / devices, 1),
        "bytes_per_device": round(
            (after["bytes/received"] + after["bytes/sent"] - before["bytes/received"] - before["bytes/sent"]) / devices
        ),
        "broker_cpu_ms_per_device": round(1e3 * broker_cpu / devices, 2),
        "controller_cpu_s": round(controller_cpu, 1),
        "controller_cpu_s_per_1000": round(1e3 * controller_cpu / devices, 2),
        "simulators_cpu_s": round(sims_cpu, 1),
        **views,
        "log_tail": out[-400:],
    }


PORT_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
PORTS_PER_DEVICE = 1  # its broker connection (no paho network thread, so no loopback socket pair)


def _enough_ports(devices: int) -> None:
    """Simulated devices each take an ephemeral port; Linux's default range (28k) ends near 27,000 devices."""
    low, high = map(int, PORT_RANGE.read_text().split())
    if high - low >= PORTS_PER_DEVICE * devices + 1000:
        return
    try:
        PORT_RANGE.write_text("1024 65535\n")  # root only; a bench-machine setting, said aloud
        print(f"widened net.ipv4.ip_local_port_range from {low}-{high} to 1024-65535", file=sys.stderr)
    except OSError:
        sys.exit(f"{devices} simulated devices need ~{PORTS_PER_DEVICE * devices} ephemeral ports; "
                 "run: sysctl -w net.ipv4.ip_local_port_range='1024 65535'")  # fmt: skip


def markdown(rows: list[dict[str, Any]]) -> str:
    """The README's table, a row per run."""
    table = (
        "| simulated devices | brokers | waves (canary, step) | rollout s | lower bound s | rollout / bound | updated "
        "| controller CPU s per 1,000 devices | broker CPU ms / device | broker messages / device "
        "| broker bytes / device | simulators' CPU s (apart) | status --summary s | status page s "
        "| dashboard page s |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    for r in rows:
        table += (
            f"| {r['devices']} | {r['brokers']} | {r['waves']} ({r['canary']}, {r['step']}) | {r['rollout_s']} "
            f"| {r['lower_bound_s']} "
            f"| {r['rollout_s'] / r['lower_bound_s']:.2f}× | {r['updated']} | {r['controller_cpu_s_per_1000']} "
            f"| {r['broker_cpu_ms_per_device']} | {r['messages_per_device']} | {r['bytes_per_device']} "
            f"| {r['simulators_cpu_s']} | {r['status_summary_s']} | {r['status_page_s']} | {r['dashboard_page_s']} |\n"
        )
    return table


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args.add_argument("--devices", type=int, nargs="*", default=[1000, 5000, 10000])
    args.add_argument("--canary-s", type=float, default=2.0, help="simulated canary window per device")
    args.add_argument("--canary", default="1%")
    args.add_argument("--step", default="10%")
    args.add_argument("--bridged", type=int, nargs="*", default=[2000], help="sizes also run through a bridge")
    args.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parsed = args.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(
        resource.RLIMIT_NOFILE, (min(hard, max(soft, 2 * max(parsed.devices + parsed.bridged + [0]) + 256)), hard)
    )
    _enough_ports(max(parsed.devices + parsed.bridged + [0]))
    rows = []
    for devices, bridged in [(n, False) for n in parsed.devices] + [(n, True) for n in parsed.bridged]:
        print(f"{devices} simulated devices{' (bridged)' if bridged else ''} ...", file=sys.stderr, flush=True)
        rows.append(run_size(devices, parsed.canary_s, parsed.canary, parsed.step, bridged))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "log_tail"}), file=sys.stderr, flush=True)
    table = markdown(rows)
    parsed.out.mkdir(parents=True, exist_ok=True)
    (parsed.out / "fleet_bench.json").write_text(json.dumps(rows, indent=2) + "\n")
    (parsed.out / "fleet_bench.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
