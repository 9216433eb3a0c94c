"""The agent's MQTT link (paho-mqtt 2.x): results, metrics, events and a retained status.

``<prefix>/<device>/status`` is retained ``online`` while connected and set to
``offline`` by the broker through the last will when the agent vanishes. paho keeps
reconnecting with backoff by itself; messages published while disconnected wait in
its queue (an on-disk outbox that survives restarts is the control plane's job).
"""

from __future__ import annotations

import json
import logging
import ssl
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import MQTTConfig

log = logging.getLogger("edgevit.mqtt")


class MqttLink:
    def __init__(self, config: MQTTConfig, device: str) -> None:
        self.base = f"{config.prefix}/{device}"
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"edgevit-{device}", protocol=mqtt.MQTTv5)
        self.client.will_set(f"{self.base}/status", json.dumps({"state": "offline"}), qos=1, retain=True)
        if config.username:
            self.client.username_pw_set(config.username, config.password)
        if config.tls:
            self.client.tls_set(
                ca_certs=str(config.tls.ca),
                certfile=config.tls.cert and str(config.tls.cert),
                keyfile=config.tls.key and str(config.tls.key),
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        self.client.reconnect_delay_set(1, 30)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.connected = False
        self.client.connect_async(config.host, config.port, keepalive=config.keepalive_s)
        self.client.loop_start()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.warning("MQTT connection refused: %s", reason)
            return
        self.connected = True
        client.publish(f"{self.base}/status", json.dumps({"state": "online"}), qos=1, retain=True)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.connected = False
        log.warning("MQTT disconnected (%s); reconnecting", reason)

    def publish(self, suffix: str, payload: dict[str, Any], retain: bool = False) -> None:
        self.client.publish(f"{self.base}/{suffix}", json.dumps(payload, separators=(",", ":")), qos=1, retain=retain)

    def emit(self, results: list[dict[str, Any]]) -> None:
        for result in results:
            self.publish(f"{result['camera']}/result", result)

    def close(self) -> None:
        if self.connected:  # an orderly stop says so itself; otherwise the last will does
            info = self.client.publish(f"{self.base}/status", json.dumps({"state": "offline"}), qos=1, retain=True)
            info.wait_for_publish(2)
        self.client.disconnect()
        self.client.loop_stop()
