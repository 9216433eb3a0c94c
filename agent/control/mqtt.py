"""The agent's MQTT link (paho-mqtt 2.x): results, events and metrics, and a retained status.

``<prefix>/<device>/status`` is retained: ``state`` (``online``, or ``offline`` after an
orderly stop or through the broker's last will), the device's ``labels``, and what
the agent last reported there (engine, figures, last lifecycle event). Results and events go
through the on-disk :class:`~agent.control.outbox.Outbox`: a publisher thread sends them
(QoS 1) while connected and deletes each one when the broker's PUBACK arrives; after
a reconnect or a restart everything not acknowledged is sent again (at least once).
Metrics are periodic snapshots and are published directly. Commands arrive on
``<prefix>/<device>/cmd``; replies go to ``<prefix>/<device>/reply`` and, for MQTT 5
requests, to the response topic with the request's correlation data.
"""

from __future__ import annotations

import functools
import json
import logging
import ssl
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import MQTTConfig
from agent.control.outbox import Outbox
from agent.control.protocol import PROTOCOL_VERSION

log = logging.getLogger("edgevit.mqtt")
MAX_IN_FLIGHT = 500
Callback = TypeVar("Callback", bound=Callable[..., None])


def _guarded(callback: Callback) -> Callback:
    """Whatever a paho callback raises is logged here and never reaches paho.

    paho re-raises a callback's exception out of its network loop, which ends the loop: the
    device would go offline through its last will while the process lives on. No input may do that.
    """

    @functools.wraps(callback)
    def guarded(self: MqttLink, client: mqtt.Client, userdata: Any, *args: Any) -> None:
        try:
            callback(self, client, userdata, *args)
        except Exception:
            topic = getattr(args[0], "topic", None) if args else None
            log.exception("MQTT %s failed%s", callback.__name__.lstrip("_"), f" on {topic!r}" if topic else "")

    return guarded  # type: ignore[return-value]


def _json(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


class MqttLink:
    def __init__(self, config: MQTTConfig, device: str, outbox: Outbox, labels: dict[str, str]) -> None:
        self.base = f"{config.prefix}/{device}"
        self.outbox = outbox
        self._identity = {"device": device, "labels": labels, "protocol": PROTOCOL_VERSION}
        self._status: dict[str, Any] = {"state": "online", **self._identity}
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"edgevit-{device}", protocol=mqtt.MQTTv5)
        offline = _json({"state": "offline", **self._identity})
        self.client.will_set(f"{self.base}/status", offline, qos=1, retain=True)
        if config.username:
            self.client.username_pw_set(config.username, config.password)
        if config.tls:
            self.client.tls_set(
                ca_certs=str(config.tls.ca),
                certfile=str(config.tls.cert) if config.tls.cert else None,
                keyfile=str(config.tls.key) if config.tls.key else None,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        self.client.max_inflight_messages_set(MAX_IN_FLIGHT)
        self.client.reconnect_delay_set(1, 30)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        self.on_command: Callable[[bytes], dict[str, Any]] | None = None
        self.connected = False
        self._lock = threading.Lock()
        self._in_flight: dict[int, int] = {}  # paho mid -> outbox id
        self._cursor = 0  # highest outbox id handed to paho since the last (re)connect
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._publisher = threading.Thread(target=self._publish_loop, name="mqtt-outbox", daemon=True)
        self._network = threading.Thread(target=self._network_loop, name="mqtt-network", daemon=True)
        self.network_restarts = 0
        self._address = (config.host, config.port, config.keepalive_s)

    def start(self, on_command: Callable[[bytes], dict[str, Any]]) -> None:
        """Connect once the agent can answer commands; events queued before then go out first."""
        self.on_command = on_command
        host, port, keepalive = self._address
        self.client.connect_async(host, port, keepalive=keepalive)
        self._network.start()
        self._publisher.start()

    def _network_loop(self) -> None:
        """paho's network loop, rebuilt whenever it dies, until :meth:`close`.

        paho reconnects by itself after a lost link; this covers the loop itself ending on an
        exception (a paho bug, a callback that escaped ``_guarded``), which would otherwise leave
        the device offline for good with the process alive.
        """
        backoff = 1.0
        while not self._stop.is_set():
            try:
                self.client.loop_forever(retry_first_connection=True)
                if self._stop.is_set():
                    return
            except Exception as exc:
                log.exception("MQTT network loop died; rebuilding it")
                self.network_restarts += 1
                with self._lock:
                    self.connected = False
                self.event(
                    {
                        "event": "mqtt",
                        "error": f"network loop died: {type(exc).__name__}: {exc}"[:300],
                        "network_restarts": self.network_restarts,
                    }
                )
            if self._stop.wait(backoff):
                return
            backoff = min(backoff * 2, 30.0)
            try:
                self.client.reconnect()
            except Exception as exc:  # broker down: loop_forever keeps retrying
                log.warning("MQTT reconnect failed (%s); retrying", exc)

    # -- paho callbacks (network thread) ------------------------------------------------------------
    @_guarded
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.warning("MQTT connection refused: %s", reason)
            return
        with self._lock:
            self.connected = True
            self._cursor = 0  # resend what the broker has not acknowledged (paho resends its own in-flight)
        # subscribed first: the broker handles one client's packets in order, so whoever sees "online"
        # can send a command that will be delivered
        client.subscribe(f"{self.base}/cmd", qos=1)
        client.publish(f"{self.base}/status", _json(self._status), qos=1, retain=True)
        self._wake.set()

    @_guarded
    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if self.on_command is None:
            return
        props = message.properties
        response_topic = getattr(props, "ResponseTopic", None) if props else None
        refused = response_topic is not None and self._refused_response_topic(response_topic)
        if refused:  # answered on this device's own reply topic only, and not acted upon
            client.publish(f"{self.base}/reply", _json({"id": None, "ok": False, "error": refused}), qos=1)
            return
        reply = _json(self.on_command(bytes(message.payload)))
        client.publish(f"{self.base}/reply", reply, qos=1)
        if response_topic:  # MQTT 5 request/response
            out = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            correlation = getattr(props, "CorrelationData", None)
            if correlation is not None:
                out.CorrelationData = correlation
            client.publish(response_topic, reply, qos=1, properties=out)

    def _refused_response_topic(self, topic: str) -> str | None:
        """Why an MQTT 5 response topic is refused, or None.

        The device publishes its reply there with its own credentials: inside the fleet's namespace only
        its own ``<prefix>/<device>/reply/...`` is allowed (never another device's ``cmd``); outside it, an
        operator's inbox, any plain topic. The broker's ACL should confine the device the same way.
        """
        if not topic or len(topic) > 256 or any(c in topic for c in "+#\x00") or topic.startswith("$"):
            return f"response topic {topic[:80]!r} is not a plain topic name"
        prefix = self.base.split("/")[0]
        if (topic == prefix or topic.startswith(f"{prefix}/")) and not topic.startswith(f"{self.base}/reply/"):
            return f"response topic {topic[:80]!r} is inside {prefix}/ but not under {self.base}/reply/"
        return None

    @_guarded
    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        with self._lock:
            self.connected = False
        if self._stop.is_set():  # our own disconnect at shutdown: nothing to reconnect
            log.info("MQTT disconnected at shutdown")
        else:
            log.warning("MQTT disconnected (%s); reconnecting", reason)

    @_guarded
    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        with self._lock:
            outbox_id = self._in_flight.pop(mid, None)
        if outbox_id is not None:
            self.outbox.ack(outbox_id)

    # -- publisher thread ---------------------------------------------------------------------------
    def _publish_loop(self) -> None:
        """Hands the outbox to paho; an unexpected error is logged and the loop goes on (the outbox keeps all)."""
        while not self._stop.is_set():
            try:
                self._publish_some()
            except Exception:
                log.exception("MQTT outbox publisher failed; retrying")
                self._stop.wait(1.0)

    def _publish_some(self) -> None:
        with self._lock:
            ready = self.connected and len(self._in_flight) < MAX_IN_FLIGHT
            cursor, busy = self._cursor, set(self._in_flight.values())
        batch = self.outbox.next_batch(cursor, 100) if ready else []
        if not batch:
            self._wake.wait(0.2)
            self._wake.clear()
            return
        for message in batch:
            if message.id not in busy:
                info = self.client.publish(message.topic, message.payload, qos=1)
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    break  # connection lost: the next connect rescans from the start
                with self._lock:
                    self._in_flight[info.mid] = message.id
            with self._lock:
                self._cursor = max(self._cursor, message.id)

    # -- what the agent calls ------------------------------------------------------------------------
    def emit(self, results: list[dict[str, Any]]) -> None:
        self.outbox.put("result", [(f"{self.base}/{r['camera']}/result", _json(r)) for r in results])
        self._wake.set()

    def event(self, payload: dict[str, Any]) -> None:
        self.outbox.put("event", [(f"{self.base}/events", _json(payload))])
        self._wake.set()

    def update_status(self, document: dict[str, Any]) -> None:
        """Replace the retained status (what fleet tools read): engine, figures, last event."""
        self._status = {"state": "online", **self._identity, **document}
        if self.connected:
            self.client.publish(f"{self.base}/status", _json(self._status), qos=1, retain=True)

    def publish_metrics(self, payload: dict[str, Any]) -> None:
        self.client.publish(f"{self.base}/metrics", _json(payload), qos=1)

    def close(self, flush_s: float = 5.0) -> None:
        """Give the outbox a moment to drain, say offline, disconnect; what is left stays on disk."""
        deadline = threading.Event()
        for _ in range(int(flush_s * 10)):
            if not self.connected or not self.outbox.depth():
                break
            deadline.wait(0.1)
        self._stop.set()
        if self._publisher.is_alive():
            self._publisher.join(timeout=2)
        if self.connected:
            offline = _json({**self._status, "state": "offline"})
            info = self.client.publish(f"{self.base}/status", offline, qos=1, retain=True)
            info.wait_for_publish(2)
        self.client.disconnect()
        if self._network.is_alive():
            self._network.join(timeout=5)
        self.outbox.close()
