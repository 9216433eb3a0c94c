"""The controller's one MQTT connection: every device's retained status, lifecycle events, replies.

Retained statuses arrive at subscribe time, so a controller that starts (or restarts)
knows the whole fleet at once, offline devices included (their last will carries
their labels). Events and replies are indexed by command id, which is how a rollout
matches outcomes to the commands it sent.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import ssl
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from agent.control import bounded_json
from agent.control.command_auth import sign_command
from fleet.protocol import command_topic, device_of, events_topic, metrics_topic, reply_topic, status_topic


@dataclass
class Device:
    """What the fleet knows of one device, from its retained status."""

    name: str
    status: dict[str, Any] = field(default_factory=dict)
    seen: float = 0.0

    @property
    def online(self) -> bool:
        return self.status.get("state") == "online"

    @property
    def labels(self) -> dict[str, str]:
        labels = self.status.get("labels")
        return {k: v for k, v in labels.items() if isinstance(v, str)} if isinstance(labels, dict) else {}

    @property
    def engine(self) -> dict[str, Any]:
        engine = self.status.get("engine")
        return engine if isinstance(engine, dict) else {}

    def row(self) -> dict[str, Any]:
        """What the fleet tools show of this device (status table, ``--json``, ``--watch``, dashboard).

        A device's status is its own to write: what is not of the expected type is shown as absent.
        """
        status, engine = self.status, self.engine
        last = _mapping(status.get("last_event"))
        drift = _mapping(status.get("drift"))
        canary = _mapping(status.get("last_canary"))
        return {
            "device": self.name,
            "state": status.get("state"),
            "online": self.online,
            "labels": self.labels,
            "active": engine.get("active"),
            "previous": engine.get("previous"),
            "canary": engine.get("canary"),
            "bad": engine.get("bad", []),
            "fps": number(status.get("fps")),
            "p99_ms": number(status.get("p99_ms")),
            "canary_verdict": canary.get("verdict"),
            "agreement": number(canary.get("agreement")),
            "class_mix_distance": number(drift.get("class_mix_distance")),
            "confidence_drift": number(drift.get("confidence_drift")),
            "last_event": last.get("event") and f"{last['event']} {last.get('bundle_id') or ''}".strip(),
        }


def number(value: Any) -> float | None:
    """A finite number from a device's message, or None."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Broker:
    host: str
    port: int = 1883
    prefix: str = "edgevit"
    username: str | None = None
    password: str | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None


# Status documents and events are larger than commands; still bounded.
DEVICE_LIMITS = bounded_json.JSONLimits(max_bytes=256 * 1024, max_depth=32)
# What the controller reads comes at QoS 0. Its session is not persistent (a fresh client id per run), so
# QoS 1 would add no delivery guarantee over the TCP connection, only a PUBACK per message (six per device
# in a wave) and the broker's per-client in-flight window and queue limit: Mosquitto drops QoS 1 messages
# past ``max_queued_messages`` (1,000 by default) to a client that is behind, which a 1,000-device wave
# exceeds. Whatever a lost connection misses, the retained statuses replayed on reconnecting tell.
SUBSCRIBE_QOS = 0


class FleetLink:
    def __init__(
        self,
        broker: Broker,
        signing_key: Ed25519PrivateKey | None = None,
        on_metrics: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        """``on_metrics(device, payload)`` gets each device's periodic metrics (the dashboard's charts)."""
        self.broker, self.signing_key, self.on_metrics = broker, signing_key, on_metrics
        self.devices: dict[str, Device] = {}
        self.events: dict[str, list[dict[str, Any]]] = defaultdict(list)  # command id -> events
        self.replies: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._changes = threading.Condition(self._lock)
        self._changed: set[str] = set()  # devices whose status, events or replies arrived since the last wait
        self._connected = threading.Event()  # answered: connected, or refused (``_refusal``)
        self._refusal = ""
        self._last_retained = (
            0.0  # when the latest retained message came: the flood after subscribing is over when it ages
        )
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"edgevit-fleet-{secrets.token_hex(4)}", protocol=mqtt.MQTTv5
        )
        if broker.username:
            self.client.username_pw_set(broker.username, broker.password)
        if broker.ca:
            self.client.tls_set(
                ca_certs=str(broker.ca),
                certfile=broker.cert and str(broker.cert),
                keyfile=broker.key and str(broker.key),
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message

    def connect(self, settle_s: float = 1.0, timeout_s: float = 10.0, max_settle_s: float = 60.0) -> FleetLink:
        """Connect, subscribe, and wait for the retained statuses: at least ``settle_s``, then until no retained
        message has arrived for ``settle_s / 2`` (10,000 retained statuses take the broker seconds to deliver; a
        plan made before they are all in would leave devices out), at most ``max_settle_s``."""
        where = f"MQTT broker {self.broker.host}:{self.broker.port}"
        try:
            self.client.connect(self.broker.host, self.broker.port)
        except OSError as exc:  # refused, unreachable, name not found, TLS handshake
            raise ConnectionError(f"cannot reach the {where}: {exc.strerror or exc}") from exc
        self.client.loop_start()
        if not self._connected.wait(timeout_s):
            self.close()
            raise ConnectionError(f"no answer from the {where} in {timeout_s:g} s")
        if self._refusal:
            self.close()
            raise ConnectionError(f"the {where} refused this client: {self._refusal}")
        time.sleep(settle_s)
        deadline = time.monotonic() + max_settle_s
        while time.monotonic() - self._last_retained < settle_s / 2 and time.monotonic() < deadline:
            time.sleep(settle_s / 10)
        return self

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:  # bad credentials or not authorised: said at once, not after a timeout
            self._refusal = str(reason)
            self._connected.set()
            return
        prefix = self.broker.prefix
        topics = [status_topic(prefix), events_topic(prefix), reply_topic(prefix)]
        if self.on_metrics is not None:
            topics.append(metrics_topic(prefix))
        client.subscribe([(topic, SUBSCRIBE_QOS) for topic in topics])
        self._connected.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        """What devices publish, read with limits: a hostile or broken device must not end this loop."""
        if message.retain:  # only what the broker replays on subscribing; live messages arrive unflagged
            self._last_retained = time.monotonic()
        try:
            payload = bounded_json.loads(message.payload, DEVICE_LIMITS)
        except bounded_json.JSONLimitError:
            return  # not ours to judge: a fleet tool only reads what agents write
        if not isinstance(payload, dict):
            return
        name, kind = device_of(message.topic), message.topic.rsplit("/", 1)[-1]
        if kind == "metrics" and self.on_metrics is not None:
            try:
                self.on_metrics(name, payload)
            except Exception:  # a listener's bug, or a payload it cannot read: never the end of this loop
                log.exception("metrics from %s could not be recorded", name)
            return
        with self._lock:
            if kind == "status":
                self.devices[name] = Device(name, payload, time.time())
            elif kind == "events" and isinstance(payload.get("command_id"), str):
                self.events[payload["command_id"]].append({**payload, "device": name})
            elif kind == "reply" and isinstance(payload.get("id"), str):
                self.replies[payload["id"]] = payload
            else:
                return
            self._changed.add(name)
            self._changes.notify_all()

    def snapshot(self) -> dict[str, Device]:
        """Every device (a copy of the view: O(fleet), for planning and status, not for polling)."""
        with self._lock:
            return dict(self.devices)

    def device(self, name: str) -> Device | None:
        with self._lock:
            return self.devices.get(name)

    def wait_changes(self, timeout_s: float) -> set[str]:
        """The devices heard from since the previous call, waiting up to ``timeout_s`` for the first.

        What a rollout needs to look at: its cost follows the messages that arrive, not the fleet's size.
        """
        with self._changes:
            if not self._changed:
                self._changes.wait(timeout_s)
            changed, self._changed = self._changed, set()
            return changed

    def events_for(self, command_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.events.get(command_id, ()))

    def reply_for(self, command_id: str) -> dict[str, Any] | None:
        with self._lock:
            return self.replies.get(command_id)

    def send(self, device: str, command: dict[str, Any]) -> None:
        """Publish a command (signed when the controller holds a key), QoS 1."""
        self.send_all([(device, command)])

    def send_all(self, commands: list[tuple[str, dict[str, Any]]], timeout_s: float = 30.0) -> None:
        """Publish every command, then wait for the broker's acknowledgements together (not one round trip each)."""
        sent = []
        for device, command in commands:
            if self.signing_key is not None:
                command = sign_command(command, self.signing_key)
            sent.append(self.client.publish(command_topic(self.broker.prefix, device), json.dumps(command), qos=1))
        deadline = time.monotonic() + timeout_s
        for info in sent:
            info.wait_for_publish(max(deadline - time.monotonic(), 0.1))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
