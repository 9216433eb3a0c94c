"""Staged rollouts: waves, health gates, halt, rollback, and a state file that survives the controller.

A rollout sends ``deploy`` to the selected devices wave by wave: a canary wave first,
then steps of a share of the fleet. A device succeeds when its retained status shows
the bundle active with no canary pending (the agent committed it after its own canary
window); it fails when it refuses the bundle, reverts it, goes offline or times out.
The next wave starts only when every device of the current one has an outcome; once
failures exceed ``max_failures`` percent of the devices attempted, the rollout halts
and, unless told otherwise, rolls this rollout's updated devices back to the engine
each had before. Every change is written to ``<state_dir>/rollouts/<id>.json``
(atomically), so a controller killed mid-rollout resumes from the file, and the
devices' retained statuses tell it what happened while it was away.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent.lifecycle.store import atomic_write
from fleet.link import Device, FleetLink

PENDING, SENT, SUCCEEDED, FAILED, ROLLED_BACK, SKIPPED = (
    "pending",
    "sent",
    "succeeded",
    "failed",
    "rolled-back",
    "skipped",
)
TERMINAL = (SUCCEEDED, FAILED, ROLLED_BACK, SKIPPED)
POLL_S = 0.25


def parse_selector(text: str) -> dict[str, str]:
    """``site=lab,hardware=orin`` -> labels that must all match; empty selects every device."""
    selector = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"--select takes key=value[,key=value...], got {part!r}")
        selector[key.strip()] = value.strip()
    return selector


def selects(selector: dict[str, str], device: Device) -> bool:
    labels = {**device.labels, "device": device.name}
    return all(labels.get(k) == v for k, v in selector.items())


def parse_count(text: str, total: int) -> int:
    """``N`` devices or ``N%`` of ``total`` (at least one)."""
    if text.endswith("%"):
        return max(1, math.ceil(total * float(text[:-1]) / 100))
    return max(1, int(text))


def plan_waves(devices: list[str], canary: str, step: str) -> list[list[str]]:
    first = parse_count(canary, len(devices))
    size = parse_count(step, len(devices))
    waves = [devices[:first]]
    waves += [devices[i : i + size] for i in range(first, len(devices), size)]
    return [w for w in waves if w]


@dataclass
class Target:
    device: str
    wave: int
    state: str = PENDING
    before: str | None = None  # the engine it ran before this rollout: what a rollback restores
    command_id: str | None = None
    sent_at: float | None = None
    detail: str = ""


@dataclass
class Rollout:
    id: str
    bundle_id: str
    reference: dict[str, Any]  # what the deploy command carries: url, sha256, size
    selector: dict[str, str]
    max_failures_pct: float
    timeout_s: float
    rollback_on_halt: bool
    force: bool = False
    state: str = "running"  # running | completed | halted | rolled-back
    wave: int = 0
    created: float = field(default_factory=time.time)
    targets: list[Target] = field(default_factory=list)
    log: list[str] = field(default_factory=list)

    @classmethod
    def new(cls, bundle_id: str, reference: dict[str, Any], selector: dict[str, str], **options: Any) -> Rollout:
        return cls(
            f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}", bundle_id, reference, selector, **options
        )

    def save(self, folder: Path) -> Path:
        path = folder / "rollouts" / f"{self.id}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(asdict(self), indent=2).encode() + b"\n")
        return path

    @classmethod
    def load(cls, path: Path) -> Rollout:
        data = json.loads(path.read_text())
        return cls(**{**data, "targets": [Target(**t) for t in data["targets"]]})

    def counts(self) -> dict[str, int]:
        counts = {s: 0 for s in (PENDING, SENT, *TERMINAL)}
        for target in self.targets:
            counts[target.state] += 1
        return counts


def list_rollouts(folder: Path) -> list[Rollout]:
    return sorted((Rollout.load(p) for p in (folder / "rollouts").glob("*.json")), key=lambda r: r.created)


class Runner:
    """Drives one rollout to an end; ``report`` gets one line per change.

    The file is saved once per step (a wave's sends, a poll's outcomes), never after
    the action it records: a restart may re-check an outcome, but never sends blind.
    """

    def __init__(self, rollout: Rollout, link: FleetLink, folder: Path, report: Callable[[str], None]) -> None:
        self.rollout, self.link, self.folder, self.report = rollout, link, folder, report

    def _note(self, line: str) -> None:
        self.rollout.log.append(f"{time.strftime('%H:%M:%S')} {line}")
        self.report(line)

    def _save(self) -> None:
        self.rollout.save(self.folder)

    def plan(self, canary: str, step: str) -> None:
        """Choose the devices: online ones matching the selector, in name order; offline ones are skipped."""
        devices = self.link.snapshot()
        chosen = sorted(n for n, d in devices.items() if selects(self.rollout.selector, d))
        online = [n for n in chosen if devices[n].online]
        for n in chosen:
            if not devices[n].online:
                self.rollout.targets.append(Target(n, -1, SKIPPED, detail="offline when the rollout started"))
        for wave, names in enumerate(plan_waves(online, canary, step)):
            self.rollout.targets += [Target(n, wave) for n in names]
        waves = max((t.wave for t in self.rollout.targets), default=-1) + 1
        self._note(f"rollout {self.rollout.id}: {self.rollout.bundle_id} to {len(online)} devices in {waves} waves")
        self._save()

    def run(self) -> Rollout:
        rollout = self.rollout
        while rollout.state == "running":
            wave = [t for t in rollout.targets if t.wave == rollout.wave]
            if not wave:
                rollout.state = "completed"
                self._note(f"completed: {rollout.counts()[SUCCEEDED]} devices run {rollout.bundle_id}")
                self._save()
                break
            self._send([t for t in wave if t.state == PENDING])
            self._await(wave)
            attempted = [t for t in rollout.targets if 0 <= t.wave <= rollout.wave]
            failed = [t for t in attempted if t.state == FAILED]
            if 100 * len(failed) / len(attempted) > rollout.max_failures_pct:
                rollout.state = "halted"
                self._note(
                    f"halted after wave {rollout.wave}: {len(failed)} of {len(attempted)} devices failed, "
                    f"over --max-failures {rollout.max_failures_pct:g}%"
                )
                updated = [t for t in attempted if t.state == SUCCEEDED]
                if rollout.rollback_on_halt and updated:
                    self._roll_back(updated)
                    rollout.state = "rolled-back"
                self._save()
                break
            rollout.wave += 1
            self._save()
        return rollout

    def _send(self, targets: list[Target]) -> None:
        devices = self.link.snapshot()
        for target in targets:
            device = devices.get(target.device)
            target.before = device.engine.get("active") if device else None
            target.command_id = f"{self.rollout.id}-{secrets.token_hex(3)}"
            target.state, target.sent_at = SENT, time.time()
        self._save()  # before sending: a restarted controller knows what it may have sent, and under which id
        for target in targets:
            command = {"id": target.command_id, "cmd": "deploy", "bundle": self.rollout.reference}
            if self.rollout.force:
                command["force"] = True
            self.link.send(target.device, command)
            self._note(f"wave {target.wave}: deploy sent to {target.device}")

    def outcome(self, target: Target, devices: dict[str, Device]) -> tuple[str, str] | None:
        """(state, detail) once ``target`` has an outcome, from its events, reply and retained status."""
        bundle = self.rollout.bundle_id
        assert target.command_id is not None and target.sent_at is not None
        for event in self.link.events_for(target.command_id):
            if event["event"] == "commit":
                return SUCCEEDED, "committed after its canary window"
            if event["event"] == "revert":
                return FAILED, f"reverted: {event.get('reason')}"
            if event["event"] == "deploy" and event.get("ok") is False:
                return FAILED, f"refused: {event.get('error')}"
        reply = self.link.reply_for(target.command_id)
        if reply and not reply.get("ok"):
            return FAILED, f"refused: {reply.get('error')}"
        device = devices.get(target.device)
        if device is not None:
            engine = device.engine
            if engine.get("active") == bundle and not engine.get("canary"):
                return SUCCEEDED, "runs it, committed"
            if not device.online:
                return FAILED, "went offline"
            if bundle in engine.get("bad", ()) and engine.get("active") != bundle:
                return FAILED, "the device marked it bad"
        if time.time() - target.sent_at > self.rollout.timeout_s:
            return FAILED, f"no outcome within --timeout {self.rollout.timeout_s:g} s"
        return None

    def _await(self, wave: list[Target]) -> None:
        while True:
            waiting = [t for t in wave if t.state == SENT]
            if not waiting:
                return
            devices = self.link.snapshot()
            changed = False
            for target in waiting:
                result = self.outcome(target, devices)
                if result:
                    target.state, target.detail = result
                    self._note(f"wave {target.wave}: {target.device} {target.state}: {target.detail}")
                    changed = True
            if changed:
                self._save()
            time.sleep(POLL_S)

    def _roll_back(self, targets: list[Target]) -> None:
        wanted = {t.device: t.before for t in targets if t.before and t.before != self.rollout.bundle_id}
        outcomes = roll_back(self.link, wanted, self.rollout.timeout_s, self._note)
        for target in targets:
            ok, target.detail = outcomes.get(target.device, (False, "nothing to roll back to"))
            if ok:
                target.state = ROLLED_BACK


def roll_back(
    link: FleetLink, wanted: dict[str, str | None], timeout_s: float, report: Callable[[str], None]
) -> dict[str, tuple[bool, str]]:
    """Send ``rollback`` to each device (to the named bundle, or to its previous) and await the outcomes.

    A device has rolled back when its retained status shows the expected engine active and
    no canary pending: the named bundle, or the ``previous`` its status named when the
    command left (a canary in progress is reverted to that same engine).
    """
    devices = link.snapshot()
    pending: dict[str, tuple[str | None, str]] = {}
    for name, bundle in wanted.items():
        device = devices.get(name)
        expected = bundle or (device.engine.get("previous") if device else None)
        command_id = f"rollback-{secrets.token_hex(4)}"
        link.send(name, {"id": command_id, "cmd": "rollback", **({"bundle": bundle} if bundle else {})})
        pending[name] = (expected, command_id)
    outcomes: dict[str, tuple[bool, str]] = {}
    deadline = time.time() + timeout_s
    while pending and time.time() < deadline:
        devices = link.snapshot()
        for name, (expected, command_id) in list(pending.items()):
            engine = devices[name].engine if name in devices else {}
            reply = link.reply_for(command_id)
            failed = [e for e in link.events_for(command_id) if e["event"] == "rollback" and e.get("ok") is False]
            if reply and not reply.get("ok"):
                outcomes[name] = (False, f"rollback refused: {reply.get('error')}")
            elif failed:
                outcomes[name] = (False, f"rollback failed: {failed[0].get('error')}")
            elif expected and engine.get("active") == expected and not engine.get("canary"):
                outcomes[name] = (True, f"rolled back to {expected}")
            else:
                continue
            del pending[name]
            report(f"{name}: {outcomes[name][1]}")
        time.sleep(POLL_S)
    for name in pending:
        outcomes[name] = (False, f"rollback sent, no outcome within {timeout_s:g} s")
        report(f"{name}: {outcomes[name][1]}")
    return outcomes
