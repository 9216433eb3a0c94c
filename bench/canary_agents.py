"""Real agents on the demo video: what the canary decides for the swaps users make.

Bundles (built here, in one run):

- ``v2-int8``, ``v2-fp32``: the committed demo ViT, two engines of one checkpoint;
- ``v1-int8``: the same ViT trained for 20 epochs (builder.demo.variants), the weaker predecessor;
- ``v2-update``: v2's FP32 engine built with ``--baseline v1-int8``: a model update;
- ``damaged``: an engine with noise on its weights (a few points less accurate), carrying
  ``v2-int8``'s passport: an engine that does not compute what its build measured.

Scenarios, each agent a real process on a real Mosquitto with the demo video (the 450
held-out digits) looping at 30 fps as its camera, default canary settings but the window:

- same model: FP32 and INT8 swapped back and forth (every canary should commit);
- model update: ``v1-int8`` serving, ``v2-update`` deployed (should commit), then rolled back;
- damaged: ``v2-fp32`` serving, the damaged bundle deployed (should revert; later runs force it);
- fleet: the three again through ``edgevit-fleet deploy``, each to ten fresh agents (10 fps
  cameras: a canary wave of 3, then the other 7).
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parents[1]

from broker import start_broker  # noqa: E402

from agent.engine.bundle import verify_bundle  # noqa: E402
from builder.bundle.build import build_engine_bundle  # noqa: E402
from builder.bundle.keys import keygen  # noqa: E402
from builder.bundle.options import EngineOptions  # noqa: E402
from builder.bundle.pack import pack_bundle  # noqa: E402
from builder.demo.evaluate import held_out_indices  # noqa: E402
from builder.demo.train import CHECKPOINT_DIR  # noqa: E402
from builder.demo.variants import damaged_checkpoint, misdescribed_bundle, weaker_checkpoint  # noqa: E402
from builder.demo.video import write_labelled_video  # noqa: E402
from builder.export.job import export_checkpoint  # noqa: E402
from fleet.serve import BundleServer  # noqa: E402

DAMAGE = 0.3  # noise on every kernel, in units of its own spread
COMMAND_IDS = itertools.count()


def prepare(work: Path) -> dict[str, Path]:
    """Keys, the demo video and every bundle the scenarios deploy."""
    key, public, _ = keygen(work / "keys")
    fast: dict[str, Any] = {"profile_seconds": 0.2, "runtime": "onnxruntime"}
    v2 = export_checkpoint(CHECKPOINT_DIR / "vit-digits.npz", work / "v2-export").model_path.parent
    v1 = export_checkpoint(weaker_checkpoint(work / "v1-checkpoint"), work / "v1-export").model_path.parent
    damaged = damaged_checkpoint(CHECKPOINT_DIR / "vit-digits.npz", work / "damaged" / "vit-digits.npz", DAMAGE)
    damaged_model = export_checkpoint(damaged, work / "damaged-export").model_path
    out = {"key": key, "public": public}
    out["v2-int8"] = build_engine_bundle(
        v2, work / "v2-int8", key, EngineOptions(precision="int8", calib="demo", **fast)
    ).path
    out["v2-fp32"] = build_engine_bundle(v2, work / "v2-fp32", key, EngineOptions(precision="fp32", **fast)).path
    out["v1-int8"] = build_engine_bundle(
        v1, work / "v1-int8", key, EngineOptions(precision="int8", calib="demo", name="vit-digits-v1", **fast)
    ).path
    out["v2-update"] = build_engine_bundle(
        v2, work / "v2-update", key,
        EngineOptions(precision="fp32", baseline=out["v1-int8"], name="vit-digits-v2", **fast),
    ).path  # fmt: skip
    out["damaged"] = misdescribed_bundle(out["v2-int8"], damaged_model, work / "damaged-bundle", key, "vit-damaged")
    out["video"] = work / "digits.mp4"
    write_labelled_video(out["video"], held_out_indices(CHECKPOINT_DIR / "vit-digits.npz"))
    return out


@dataclass
class Agent:
    """One real agent process and an MQTT client that commands it and collects its events."""

    name: str
    port: int
    process: subprocess.Popen[str]
    events: list[dict[str, Any]] = field(default_factory=list)
    client: mqtt.Client | None = None

    def connect(self) -> Agent:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{self.name}", protocol=mqtt.MQTTv5)
        self.client.on_message = lambda c, u, m: self.events.append(json.loads(m.payload))
        self.client.connect("127.0.0.1", self.port)
        self.client.subscribe(f"edgevit/{self.name}/events", qos=1)
        self.client.loop_start()
        return self

    def command(self, command: dict[str, Any]) -> None:
        assert self.client is not None
        self.client.publish(f"edgevit/{self.name}/cmd", json.dumps(command), qos=1).wait_for_publish(10)

    def outcome(self, command_id: str, timeout: float) -> dict[str, Any]:
        """The commit, revert or refusal that ends a deploy."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in list(self.events):
                if event.get("command_id") != command_id:
                    continue
                if event["event"] in ("commit", "revert") or (event["event"] == "deploy" and not event.get("ok")):
                    return event
            time.sleep(0.2)
        raise TimeoutError(f"{self.name}: no outcome for {command_id} in {timeout:g} s")

    def stop(self) -> None:
        if self.client:
            self.client.loop_stop()
            self.client.disconnect()
        self.process.terminate()
        try:
            self.process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_agent(
    work: Path,
    name: str,
    port: int,
    bundle: Path,
    files: dict[str, Path],
    fps: float,
    canary: dict[str, Any],
    labels: dict[str, str] | None = None,
) -> Agent:
    folder = work / "agents" / name
    folder.mkdir(parents=True)
    config = {
        "device": name,
        "labels": labels or {},
        "state_dir": str(folder / "state"),
        "engine": {"bundle": str(bundle), "trusted_keys": [str(files["public"])], "threads": 1},
        "cameras": [{"name": "cam", "source": str(files["video"]), "loop": True, "fps": fps}],
        "mqtt": {"host": "127.0.0.1", "port": port},
        "canary": canary,
        "metrics": {"publish_every_s": 2},
    }
    (folder / "agent.yaml").write_text(yaml.safe_dump(config))
    process = subprocess.Popen(
        [sys.executable, "-m", "agent.daemon", "--config", str(folder / "agent.yaml"), "--log-level", "WARNING"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    return Agent(name, port, process)


def summarize(event: dict[str, Any]) -> dict[str, Any]:
    """What the bench keeps of an outcome: the verdict, the rule, agreement and latency evidence."""
    rules = (event.get("verdict") or {}).get("rules") or {}
    agreement, latency = rules.get("agreement") or {}, rules.get("latency") or {}
    return {
        "outcome": "refused" if event["event"] == "deploy" else event["event"],
        "rule": event.get("rule"),
        "reason": event.get("reason") or event.get("error"),
        "seconds": (event.get("figures") or {}).get("elapsed_s"),
        "agreement": agreement.get("estimate"),
        "agreement_bound": agreement.get("bound"),
        "agreement_limit": agreement.get("limit"),
        "blocks": agreement.get("units"),
        "shadow_frames": agreement.get("frames"),
        "latency_ratio": latency.get("estimate"),
        "latency_pairs": latency.get("units"),
    }


def run_deploys(agent: Agent, plan: list[tuple[str, Path, bool]], timeout: float, log: Any) -> list[dict[str, Any]]:
    """Each (label, bundle, force) deployed in turn; the agent's outcome of each."""
    outcomes = []
    for label, bundle, force in plan:
        command_id = f"{agent.name}-{next(COMMAND_IDS)}"  # unique: an agent applies a repeated id once
        agent.command({"id": command_id, "cmd": "deploy", "bundle": {"path": str(bundle)}, "force": force})
        row = {"deploy": label, **summarize(agent.outcome(command_id, timeout))}
        outcomes.append(row)
        log(f"  {agent.name} {label}: {row['outcome']} {row['rule'] or ''} agreement {row['agreement']} "
            f"latency x{row['latency_ratio']} ({row['seconds']} s)")  # fmt: skip
    return outcomes


def rollback(agent: Agent, to: str, command_id: str) -> None:
    agent.command({"id": command_id, "cmd": "rollback", "bundle": to})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(e.get("command_id") == command_id and e["event"] == "rollback" for e in agent.events):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{agent.name}: rollback {command_id} had no outcome")


def single_device(
    work: Path, files: dict[str, Path], swaps: int, runs: int, window_s: float, log: Any
) -> dict[str, list[dict[str, Any]]]:
    """The three scenarios on one device each (fresh state), default canary settings but the window."""
    broker, port = start_broker(work)
    results: dict[str, list[dict[str, Any]]] = {}
    short = {"window_s": window_s}
    try:
        agent = start_agent(work, "same-model", port, files["v2-int8"], files, 30, short).connect()
        time.sleep(5)
        plan = [
            (("int8 -> fp32", files["v2-fp32"], False), ("fp32 -> int8", files["v2-int8"], False))[i % 2]
            for i in range(swaps)
        ]
        results["same model"] = run_deploys(agent, plan, window_s + 120, log)
        agent.stop()
        agent = start_agent(work, "update", port, files["v1-int8"], files, 30, short).connect()
        time.sleep(5)
        v1 = verify_bundle(files["v1-int8"], None).bundle_id
        results["model update"] = []
        for i in range(runs):
            results["model update"] += run_deploys(
                agent, [("v1 -> v2 (retrained)", files["v2-update"], False)], window_s + 120, log
            )
            if i < runs - 1:
                rollback(agent, v1, f"back-{i}")
        back = [("v2 -> v1 (back to the weaker model)", files["v1-int8"], False)]
        results["model update"] += run_deploys(agent, back, 120, log)
        agent.stop()
        agent = start_agent(work, "damaged", port, files["v2-fp32"], files, 30, {}).connect()  # the default window
        time.sleep(5)
        plan = [("v2 -> damaged", files["damaged"], i > 0) for i in range(runs)]  # reverted bundles are refused
        results["damaged"] = run_deploys(agent, plan, 420, log)
        agent.stop()
    finally:
        broker.terminate()
    return results


def fleet(work: Path, files: dict[str, Path], devices: int, window_s: float, log: Any) -> list[dict[str, Any]]:
    """The three deploys through edgevit-fleet, each to ``devices`` fresh agents: a canary wave of 3, then the rest."""
    broker, port = start_broker(work)
    served = work / "served"
    for name in ("v2-fp32", "v2-update", "damaged"):
        pack_bundle(files[name], served / f"{name}.tar.gz", None)
    rows = []
    with BundleServer(served, "127.0.0.1", 0) as server:
        try:
            scenarios = (("same", "v2-int8", "v2-fp32"), ("update", "v1-int8", "v2-update"), ("damaged", "v2-fp32",
                         "damaged"))  # fmt: skip
            for group, first, archive in scenarios:
                canary = {} if group == "damaged" else {"window_s": window_s}  # the damaged bundle: default window
                agents = [
                    start_agent(work, f"{group}-{i:02d}", port, files[first], files, 10, canary, {"group": group})
                    for i in range(devices)
                ]
                time.sleep(15 + devices)
                command = [sys.executable, "-m", "fleet.cli", "deploy", str(served / f"{archive}.tar.gz"),
                           "--url-base", server.url, "--select", f"group={group}", "--canary", "3", "--step", "100%",
                           "--port", str(port), "--state-dir", str(work / "controller"),
                           "--timeout", "900"]  # fmt: skip
                started = time.monotonic()
                done = subprocess.run(command, capture_output=True, text=True, timeout=2400)
                lines = [line for line in done.stdout.splitlines() if "deploy sent" not in line]
                rows.append({"group": group, "bundle": archive, "exit": done.returncode,
                             "seconds": round(time.monotonic() - started, 1), "lines": lines})  # fmt: skip
                log(f"  fleet {group}: exit {done.returncode}\n    " + "\n    ".join(lines))
                for agent in agents:
                    agent.stop()
        finally:
            broker.terminate()
    return rows
