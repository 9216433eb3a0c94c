"""What devices publish, as typed records: parsed at the boundary, never trusted, never raising.

A device writes its own status, events and replies; a broken or hostile one can write
anything that is JSON. Every field the controller, the CLI or the dashboard reads goes
through here: what is not of the expected type is absent (None, empty), strings are cut to
:data:`MAX_TEXT` characters, lists to a bound. The records keep device text as data; the
terminal and the page make it printable (:mod:`fleet.text`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

MAX_TEXT = 512  # characters of any one string a device sent
MAX_LIST = 64  # entries of a list (bundles marked bad, labels)


def text(value: Any) -> str | None:
    return value[:MAX_TEXT] if isinstance(value, str) else None


def number(value: Any) -> float | None:
    """A finite number from a device's message, or None."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def texts(value: Any) -> list[str]:
    return [s[:MAX_TEXT] for s in value[:MAX_LIST] if isinstance(s, str)] if isinstance(value, list) else []


@dataclass(frozen=True)
class Engine:
    active: str | None = None
    previous: str | None = None
    canary: str | None = None
    bad: tuple[str, ...] = ()

    @classmethod
    def of(cls, value: Any) -> Engine:
        e = mapping(value)
        return cls(text(e.get("active")), text(e.get("previous")), text(e.get("canary")), tuple(texts(e.get("bad"))))


@dataclass(frozen=True)
class Status:
    """A device's retained status."""

    state: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    engine: Engine = field(default_factory=Engine)
    fps: float | None = None
    p99_ms: float | None = None
    drift: dict[str, float | None] = field(default_factory=dict)
    last_event: dict[str, Any] = field(default_factory=dict)
    last_canary: dict[str, Any] = field(default_factory=dict)
    protocol: int = 1  # the MQTT protocol version the agent speaks; version 1 statuses carry none

    @classmethod
    def of(cls, payload: dict[str, Any]) -> Status:
        labels = mapping(payload.get("labels"))
        drift = mapping(payload.get("drift"))
        last = mapping(payload.get("last_event"))
        canary = mapping(payload.get("last_canary"))
        return cls(
            text(payload.get("state")),
            {k[:MAX_TEXT]: v[:MAX_TEXT] for k, v in list(labels.items())[:MAX_LIST] if isinstance(v, str)},
            Engine.of(payload.get("engine")),
            number(payload.get("fps")),
            number(payload.get("p99_ms")),
            {k: number(drift.get(k)) for k in ("class_mix_distance", "confidence_drift")},
            {"event": text(last.get("event")), "bundle_id": text(last.get("bundle_id")), "ok": last.get("ok") is True},
            {
                "bundle_id": text(canary.get("bundle_id")),
                "verdict": text(canary.get("verdict")),
                "agreement": number(canary.get("agreement")),
            },
            protocol_of(payload),
        )


def protocol_of(payload: dict[str, Any]) -> int:
    """The protocol version a status declares: 1 when absent (agents before it was numbered), or when unreadable."""
    version = payload.get("protocol")
    return version if isinstance(version, int) and not isinstance(version, bool) and 1 <= version <= 1000 else 1


MAX_POOLED_BLOCKS = 10_000  # per event: far more time blocks than one canary window yields


@dataclass(frozen=True)
class Pool:
    """A device's canary agreement evidence: the limit its rule held the new engine to and, per time block,
    (frames, agreeing). Read as hostile input, and only this is kept of what the device sent: events are
    held for the rollout and journaled, so junk beside the evidence would cost memory and disk per device."""

    limit: float
    blocks: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, value: Any) -> Pool | None:
        raw = mapping(value)
        limit, blocks = number(raw.get("limit")), raw.get("blocks")
        if limit is None or not 0 < limit <= 1 or not isinstance(blocks, list):
            return None
        read = []
        for block in blocks[:MAX_POOLED_BLOCKS]:
            if not (isinstance(block, list) and len(block) == 2 and all(isinstance(x, int) for x in block)):
                return None
            frames, agreeing = block
            if not 0 <= agreeing <= frames:
                return None
            read.append((frames, agreeing))
        return cls(limit, tuple(read))

    def as_dict(self) -> dict[str, Any]:
        """The event payload's form, which :meth:`of` reads back (a journal is input too)."""
        return {"limit": self.limit, "blocks": [list(block) for block in self.blocks]}


@dataclass(frozen=True)
class Event:
    """A lifecycle event of one device about one command."""

    device: str
    kind: str
    command_id: str
    ok: bool | None = None
    reason: str | None = None  # a revert's reason, a refusal's error
    alpha: float | None = None  # the canary's, from its verdict
    pool: Pool | None = None  # canary evidence for pooling (fleet.gates reads it)

    @classmethod
    def of(cls, device: str, payload: dict[str, Any]) -> Event | None:
        kind, command_id = text(payload.get("event")), text(payload.get("command_id"))
        if kind is None or command_id is None:
            return None
        ok = payload.get("ok")
        return cls(
            device,
            kind,
            command_id,
            ok if isinstance(ok, bool) else None,
            text(payload.get("reason")) or text(payload.get("error")),
            number(mapping(payload.get("verdict")).get("alpha")),
            Pool.of(payload.get("pool")),
        )


@dataclass(frozen=True)
class Reply:
    device: str
    id: str
    ok: bool
    error: str | None = None

    @classmethod
    def of(cls, device: str, payload: dict[str, Any]) -> Reply | None:
        reply_id, ok = text(payload.get("id")), payload.get("ok")
        if reply_id is None or not isinstance(ok, bool):
            return None
        return cls(device, reply_id, ok, text(payload.get("error")))
