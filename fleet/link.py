"""The controller's one MQTT connection: every device's retained status, lifecycle events, replies.

Retained statuses arrive at subscribe time, so a controller that starts (or restarts)
knows the whole fleet at once, offline devices included (their last will carries
their labels). Events and replies are indexed by command id, which is how a rollout
matches outcomes to the commands it sent.

Devices are not trusted. Every message is parsed with limits into a typed record
(:mod:`fleet.records`) inside a guard that logs and drops what it cannot read; nothing a
device sends can raise in the network thread. An event or reply is kept only when its
command id is one the controller is waiting on (:meth:`FleetLink.track`) *and* it came on
the topic of the device that command went to: a device speaks for itself, never for
another (with a broker ACL confining each device to its own topics, the topic names the
sender). Memory follows the commands in flight, not what devices choose to send.
"""

from __future__ import annotations

import json
import logging
import secrets
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from agent import bounded_json
from agent.control.command_auth import sign_command
from fleet.protocol import command_topic, device_of, events_topic, metrics_topic, reply_topic, status_topic
from fleet.records import Engine, Event, Reply, Status


@dataclass
class Device:
    """What the fleet knows of one device, from its retained status (:class:`fleet.records.Status`)."""

    name: str
    status: Status = field(default_factory=Status)
    seen: float = 0.0

    @property
    def online(self) -> bool:
        return self.status.state == "online"

    @property
    def labels(self) -> dict[str, str]:
        return self.status.labels

    @property
    def engine(self) -> Engine:
        return self.status.engine

    def row(self) -> dict[str, Any]:
        """What the fleet tools show of this device (status table, ``--json``, ``--watch``, dashboard)."""
        status, engine, last = self.status, self.status.engine, self.status.last_event
        return {
            "device": self.name,
            "state": status.state,
            "online": self.online,
            "labels": status.labels,
            "active": engine.active,
            "previous": engine.previous,
            "canary": engine.canary,
            "bad": list(engine.bad),
            "fps": status.fps,
            "p99_ms": status.p99_ms,
            "canary_verdict": status.last_canary.get("verdict"),
            "agreement": status.last_canary.get("agreement"),
            "class_mix_distance": status.drift.get("class_mix_distance"),
            "confidence_drift": status.drift.get("confidence_drift"),
            "last_event": last.get("event") and f"{last['event']} {last.get('bundle_id') or ''}".strip(),
            "protocol": status.protocol,
        }


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


# An agent's status is under 1 KiB; its events carry canary evidence (a few KiB to tens of KiB).
STATUS_LIMITS = bounded_json.JSONLimits(max_bytes=16 * 1024, max_depth=16)
DEVICE_LIMITS = bounded_json.JSONLimits(max_bytes=256 * 1024, max_depth=32)
MAX_EVENTS_PER_COMMAND = 16  # a deploy's outcome takes a handful (deploy, verify, swap, commit or revert)


class BrokerLost(ConnectionError):
    """The broker is gone and did not come back in time: a clean stop, never a traceback."""


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
        self._tracked: dict[str, str] = {}  # command id -> the device it went to: whose answers count
        self.events: dict[str, list[Event]] = {}  # command id -> that device's events
        self.replies: dict[str, Reply] = {}
        self._answered: dict[str, float] = {}  # command id -> when its device's first answer arrived
        self._lock = threading.Lock()
        self._changes = threading.Condition(self._lock)
        self._changed: set[str] = set()  # devices whose status, events or replies arrived since the last wait
        self._connected = threading.Event()  # answered: connected, or refused (``_refusal``)
        self._refusal = ""
        self._up = False
        self._down_since: float | None = None  # when the connection was lost (None while up)
        self._ignored: set[tuple[str, str]] = set()  # (device, what) already logged as ignored
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
                certfile=str(broker.cert) if broker.cert else None,
                keyfile=str(broker.key) if broker.key else None,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
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
        self._up, self._down_since = True, None
        self._connected.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._up = False
        self._down_since = self._down_since or time.monotonic()
        with self._changes:
            self._changes.notify_all()

    def down_for(self) -> float:
        """Seconds since the connection to the broker was lost; 0 while it is up (paho reconnects by itself)."""
        since = self._down_since
        return 0.0 if self._up or since is None else time.monotonic() - since

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        """What devices publish, read with limits: a hostile or broken device must not end this loop."""
        try:
            self._read(message)
        except Exception:  # a bug here must not end the network thread: the message is dropped, once logged
            log.exception("a message on %r could not be read; dropped", message.topic[:200])

    def _read(self, message: mqtt.MQTTMessage) -> None:
        if message.retain:  # only what the broker replays on subscribing; live messages arrive unflagged
            self._last_retained = time.monotonic()
        parts = message.topic.split("/")
        if len(parts) != 3:
            return
        name, kind = device_of(message.topic), parts[2]
        limits = STATUS_LIMITS if kind == "status" else DEVICE_LIMITS
        try:
            payload = bounded_json.loads(bytes(message.payload), limits)
        except bounded_json.JSONLimitError:
            self._ignore(name, f"an unreadable {kind} message")
            return
        if not isinstance(payload, dict):
            return
        if kind == "metrics" and self.on_metrics is not None:
            try:
                self.on_metrics(name, payload)
            except Exception:  # a listener's bug, or a payload it cannot read: never the end of this loop
                log.exception("metrics from %r could not be recorded", name[:64])
            return
        with self._lock:
            if kind == "status":
                self.devices[name] = Device(name, Status.of(payload), time.time())
            elif kind == "events":
                event = Event.of(name, payload)
                if event is None or not self._concerns(name, event.command_id, "event"):
                    return
                kept = self.events.setdefault(event.command_id, [])
                if len(kept) < MAX_EVENTS_PER_COMMAND:
                    kept.append(event)
                self._answered.setdefault(event.command_id, time.time())
            elif kind == "reply":
                reply = Reply.of(name, payload)
                if reply is None or not self._concerns(name, reply.id, "reply"):
                    return
                self.replies[reply.id] = reply
                self._answered.setdefault(reply.id, time.time())
            else:
                return
            self._changed.add(name)
            self._changes.notify_all()

    def _concerns(self, device: str, command_id: str, what: str) -> bool:
        """Whether an answer to ``command_id`` from ``device`` counts (called holding the lock)."""
        target = self._tracked.get(command_id)
        if target is None:
            return False  # not a command in flight: nothing to keep
        if target != device:
            self._ignore(device, f"a {what} naming another device's command ({command_id[:80]!r}, sent to {target!r})")
            return False
        return True

    def _ignore(self, device: str, what: str) -> None:
        if (device, what) not in self._ignored and len(self._ignored) < 10_000:
            self._ignored.add((device, what))
            log.warning("ignored %s from device %r", what, device[:64])

    def track(self, commands: dict[str, str]) -> None:
        """Keep answers to these command ids (id -> the device it goes to), from that device only."""
        with self._lock:
            self._tracked.update(commands)

    def forget(self, command_ids: list[str]) -> None:
        """Answers to these are no longer needed: their memory is freed, later ones are not kept."""
        with self._lock:
            for command_id in command_ids:
                self._tracked.pop(command_id, None)
                self.events.pop(command_id, None)
                self.replies.pop(command_id, None)
                self._answered.pop(command_id, None)

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

    def events_for(self, command_id: str) -> list[Event]:
        with self._lock:
            return list(self.events.get(command_id, ()))

    def answered_at(self, command_id: str) -> float | None:
        """When the device a command went to first answered it (a reply or an event carrying its id)."""
        with self._lock:
            return self._answered.get(command_id)

    def reply_for(self, command_id: str) -> Reply | None:
        with self._lock:
            return self.replies.get(command_id)

    def send(self, device: str, command: dict[str, Any]) -> None:
        """Publish a command (signed when the controller holds a key), QoS 1."""
        self.send_all([(device, command)])

    def send_all(self, commands: list[tuple[str, dict[str, Any]]], timeout_s: float = 30.0) -> None:
        """Publish every command, then wait for the broker's acknowledgements together (not one round trip each).

        Their answers are tracked. Raises :class:`BrokerLost` when the broker does not take them in time.
        """
        self.track({command["id"]: device for device, command in commands})
        sent = []
        try:
            for device, command in commands:
                if self.signing_key is not None:
                    command = sign_command(command, self.signing_key)
                info = self.client.publish(command_topic(self.broker.prefix, device), json.dumps(command), qos=1)
                sent.append(info)
            deadline = time.monotonic() + timeout_s
            for info in sent:
                info.wait_for_publish(max(deadline - time.monotonic(), 0.1))
        except (RuntimeError, ValueError, OSError) as exc:  # paho: not connected, queue full, socket gone
            where = f"{self.broker.host}:{self.broker.port}"
            raise BrokerLost(f"the MQTT broker {where} did not take the commands: {exc}") from None
        if not all(info.is_published() for info in sent):
            raise BrokerLost(
                f"the MQTT broker {self.broker.host}:{self.broker.port} did not acknowledge the commands in "
                f"{timeout_s:g} s"
            )

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
