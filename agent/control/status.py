"""The retained status fleet tools read: the engine's state, live figures, the last lifecycle event and canary.

The agent's parts report what happens (lifecycle events, metrics snapshots); this turns them into the one
document a fleet controller, ``edgevit-fleet status`` and the dashboard compare devices by, and republishes
it whenever what it says changes. The MQTT link adds the device's identity, labels and protocol version.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agent.control.mqtt import MqttLink
from agent.engine.jetson import jetson_summary
from agent.lifecycle.store import EngineState

# Events that change what the retained status says about the engine.
LIFECYCLE_EVENTS = ("deploy", "verify", "swap", "commit", "revert", "rollback", "fallback")


def figures_of(snapshot: dict[str, Any]) -> dict[str, Any]:
    """What the status shows of a metrics snapshot: throughput, tail latency, drift, a Jetson's summary."""
    cameras = snapshot["cameras"].values()
    return {
        "fps": round(sum(c["processed_fps"] for c in cameras), 2),
        "p99_ms": snapshot["latency"]["p99_ms"],
        "drift": snapshot["drift"],
        **({"jetson": jetson_summary(snapshot["jetson"])} if "jetson" in snapshot else {}),
    }


def canary_of(detail: dict[str, Any], kind: str) -> dict[str, Any]:
    """A canary verdict (``commit`` or ``revert`` with its figures) as the fleet compares devices by it."""
    figures = detail["figures"]
    verdict = detail.get("verdict") or {}
    agreement = verdict.get("rules", {}).get("agreement", {})
    return {
        "bundle_id": detail.get("bundle_id"),
        "verdict": kind,
        "rule": detail.get("rule"),
        "agreement": figures.get("agreement"),
        "agreement_bound": agreement.get("bound"),
        "agreement_limit": agreement.get("limit"),
        "alpha": verdict.get("alpha"),
        "shadow_frames": figures.get("shadow_frames"),
    }


def engine_of(state: EngineState) -> dict[str, Any]:
    return {
        "active": state.active,
        "previous": state.previous,
        "canary": state.canary.bundle if state.canary else None,
        "bad": sorted(state.bad),
    }


class StatusReport:
    """Keeps the retained status true: after every lifecycle event and every metrics publication."""

    def __init__(self, link: MqttLink, engine_state: Callable[[], EngineState], clock: Callable[[], float]) -> None:
        self._link, self._engine_state, self._clock = link, engine_state, clock
        self._figures: dict[str, Any] = {}
        self._last_event: dict[str, Any] | None = None
        self._last_canary: dict[str, Any] | None = None

    def event(self, kind: str, payload: dict[str, Any]) -> None:
        """An event the agent published; a lifecycle one changes the status."""
        if kind not in LIFECYCLE_EVENTS:
            return
        self._last_event = {k: payload.get(k) for k in ("event", "at", "bundle_id", "command_id", "ok")}
        if "figures" in payload:
            self._last_canary = canary_of(payload, kind)
        self.publish()

    def metrics(self, snapshot: dict[str, Any]) -> None:
        self._figures = figures_of(snapshot)
        self.publish()

    def publish(self) -> None:
        self._link.update_status(
            {
                "engine": engine_of(self._engine_state()),
                **self._figures,
                "last_event": self._last_event,
                "last_canary": self._last_canary,
                "updated": round(self._clock(), 3),
            }
        )
