"""The MQTT contract between agents and fleet tools, and the limits managed brokers impose on it.

Topics, per device (``agent.control.mqtt`` publishes them)::

    <prefix>/<device>/status          retained: state, labels, engine, fps, p99, drift, last event
    <prefix>/<device>/events          lifecycle and camera events (QoS 1, from the agent's outbox)
    <prefix>/<device>/cmd             commands to the device
    <prefix>/<device>/reply           replies
    <prefix>/<device>/<camera>/result per-frame results
    <prefix>/<device>/metrics         periodic metrics

The deepest is four levels and the longest is 32 + 64 + 64 characters plus separators
(the config's patterns for prefix, device and camera names; tests/test_fleet_plan.py
checks the worst case), within AWS IoT Core's limits (at most 7 slashes, 256 bytes), which are the tightest
of the brokers edgevit targets (Mosquitto, EMQX, HiveMQ, AWS IoT Core). Commands are
at most 16 KiB and status documents a few hundred bytes, against AWS IoT Core's
128 KiB per message.
"""

from __future__ import annotations

AWS_MAX_TOPIC_BYTES = 256
AWS_MAX_TOPIC_SLASHES = 7
AWS_MAX_PAYLOAD_BYTES = 128 * 1024


def status_topic(prefix: str, device: str = "+") -> str:
    return f"{prefix}/{device}/status"


def events_topic(prefix: str, device: str = "+") -> str:
    return f"{prefix}/{device}/events"


def command_topic(prefix: str, device: str) -> str:
    return f"{prefix}/{device}/cmd"


def reply_topic(prefix: str, device: str = "+") -> str:
    return f"{prefix}/{device}/reply"


def metrics_topic(prefix: str, device: str = "+") -> str:
    return f"{prefix}/{device}/metrics"


def device_of(topic: str) -> str:
    """The device id in ``<prefix>/<device>/...``."""
    return topic.split("/")[1]
