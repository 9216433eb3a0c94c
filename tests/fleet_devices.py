"""Protocol-level devices for the controller's tests: each its own MQTT connection, not an agent.

An honest device answers ``deploy`` as an agent does (a reply, then a ``commit`` event and a
status showing the bundle active, committed); its ``behaviour`` changes that: ``dead`` never
answers, ``liar`` publishes a status claiming the bundle without answering, ``refuses_rollback``
answers rollbacks with an error; ``verdict_lag_s`` publishes the committed status first and the
``commit`` event that long after (an agent's events go through its outbox, its status does not).
What a device sends is chosen by the test; nothing here is the agent's code.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from fleet.link import Broker, FleetLink
from fleet.rollout import Rollout, Runner


def blocks(rng: np.random.Generator, agreement: float, count: int = 150, frames: int = 15) -> list[list[int]]:
    """Canary evidence as an agent sends it: ``count`` blocks of ``frames`` frames, each agreeing at ``agreement``."""
    return [[frames, int(a)] for a in rng.binomial(frames, agreement, count)]


class SimulatedDevice:
    def __init__(
        self,
        port: int,
        name: str,
        behaviour: str = "honest",
        pool: list[list[int]] | None = None,
        labels: dict[str, str] | None = None,
        commit_after_s: float = 0.2,
        verdict_lag_s: float = 0.0,
    ) -> None:
        self.name, self.behaviour, self.pool, self.active = name, behaviour, pool, "old"
        self.labels, self.commit_after_s, self.verdict_lag_s = labels or {"site": "lab"}, commit_after_s, verdict_lag_s
        self.commands: list[dict[str, Any]] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sim-{name}", protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"edgevit/{name}/cmd", 1)
        self.client.loop_start()
        self.publish_status().wait_for_publish(5)

    def publish(self, kind: str, payload: Any, retain: bool = False) -> mqtt.MQTTMessageInfo:
        """Queued at QoS 1 (never awaited here: callbacks run in the network thread that would deliver it)."""
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return self.client.publish(f"edgevit/{self.name}/{kind}", data, qos=1, retain=retain)

    def publish_status(self, **engine: Any) -> mqtt.MQTTMessageInfo:
        status = {"state": "online", "labels": self.labels, "engine": {"active": self.active, "bad": [], **engine}}
        return self.publish("status", status, retain=True)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        command = json.loads(message.payload)
        self.commands.append(command)
        if self.behaviour == "dead":
            return
        if self.behaviour == "liar":
            self.active = command.get("bundle_id", "new")
            self.publish_status(active="new")
            return
        if command["cmd"] == "rollback" and self.behaviour == "refuses_rollback":
            self.publish("reply", {"id": command["id"], "ok": False, "error": "there is no previous engine"})
            return
        self.publish("reply", {"id": command["id"], "ok": True, "result": {"accepted": True}})
        if command["cmd"] == "deploy":
            threading.Timer(self.commit_after_s, self._commit, (command,)).start()
        elif command["cmd"] == "rollback":
            self.active = command.get("bundle", "old")
            self.publish_status()

    def _commit(self, command: dict[str, Any]) -> None:
        self.active = "new"
        event: dict[str, Any] = {"event": "commit", "bundle_id": "new", "command_id": command["id"]}
        if self.pool is not None:
            event |= {"verdict": {"alpha": 0.01}, "pool": {"limit": 0.976, "blocks": self.pool}}
        if self.verdict_lag_s:
            self.publish_status()
            threading.Timer(self.verdict_lag_s, self.publish, ("events", event)).start()
            return
        self.publish("events", event)
        self.publish_status()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def run_rollout(
    mosquitto: int, folder: Path, devices: list[SimulatedDevice], canary: str, step: str, timeout_s: float
) -> tuple[Rollout, list[str]]:
    """A rollout of bundle ``new`` to every device on the broker, halting at the first failure and rolling
    back; (the rollout as it ended, its progress lines). The devices are closed afterwards."""
    link = FleetLink(Broker("127.0.0.1", mosquitto)).connect()
    lines: list[str] = []
    try:
        rollout = Rollout.new("new", {"url": "u"}, {}, max_failures_pct=0, timeout_s=timeout_s, rollback_on_halt=True)
        runner = Runner(rollout, link, folder, lines.append)
        runner.plan(canary, step)
        return runner.run(), lines
    finally:
        link.close()
        for device in devices:
            device.close()
