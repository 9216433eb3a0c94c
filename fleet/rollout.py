"""Staged rollouts: waves, health gates, halt, rollback, and a state file that survives the controller.

A rollout sends ``deploy`` to the selected devices wave by wave: a canary wave first,
then steps of a share of the fleet. A device succeeds when its retained status shows
the bundle active with no canary pending (the agent committed it after its own canary
window); it fails when it refuses the bundle, reverts it, goes offline or times out.
The next wave starts only when every device of the current one has an outcome; once
failures exceed ``max_failures`` percent of the devices attempted, the rollout halts
and, unless told otherwise, rolls this rollout's updated devices back to the engine
each had before. The rollout is written to ``<state_dir>/rollouts/<id>.json``
(atomically) when it is planned and when it ends; every change in between is appended to
``<id>.journal`` (one JSON line per target change, wave or note, flushed to disk before
the action it records), so a controller killed mid-rollout resumes from the file plus its
journal, and the devices' retained statuses tell it what happened while it was away.

After each wave the controller also weighs the wave as a whole (:mod:`fleet.gates`): whether
its failures exceed what the devices' ``canary.alpha`` explains, and one pooled agreement
test over every device's canary evidence, which halts the rollout when it finds a regression
that no single device's canary was sure of.

The controller's cost is linear in the fleet: it looks only at the devices it heard
from (:meth:`FleetLink.wait_changes <fleet.link.FleetLink.wait_changes>`) and at targets
whose timeout has passed, and writes only what changed.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from agent import bounded_json
from agent.lifecycle.canary import REGRESSION
from agent.lifecycle.failpoints import failpoint
from agent.lifecycle.store import atomic_write
from fleet.gates import failures_note, pooled_verdict, wave_alpha
from fleet.link import BrokerLost, Device, FleetLink
from fleet.records import Event


class _Named(str, Enum):
    """A state that prints as its value: what rollout files, ``--json`` and the terminal show."""

    def __str__(self) -> str:
        return str(self.value)


class TargetState(_Named):
    """Where one device stands in a rollout. The values are what rollout files and ``--json`` hold."""

    PENDING = "pending"
    SENT = "sent"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ROLLED_BACK = "rolled-back"
    SKIPPED = "skipped"


class RolloutState(_Named):
    """Where a rollout stands; ``running`` and ``interrupted`` (resumable) hold its devices."""

    RUNNING = "running"
    INTERRUPTED = "interrupted"
    COMPLETED = "completed"
    HALTED = "halted"
    ROLLED_BACK = "rolled-back"
    ABANDONED = "abandoned"


ACTIVE = (RolloutState.RUNNING, RolloutState.INTERRUPTED)
POLL_S = 0.25
OUTCOMES_FLUSH_S = 1.0  # how often observed outcomes reach the journal while a wave is awaited
# What a rollout file and one journal line may hold when read back. The controller writes both, but a file is
# outside input once on disk (damage, a hand edit). A target keeps its device's canary evidence (a pool of up to
# 10,000 blocks, fleet.records) until its wave is weighed; the rest is a few hundred bytes per device.
ROLLOUT_LIMITS = bounded_json.JSONLimits(max_bytes=1 << 30, max_depth=16, max_string_chars=64 * 1024, non_finite=True)
JOURNAL_LINE_LIMITS = bounded_json.JSONLimits(
    max_bytes=1 << 20, max_depth=16, max_string_chars=64 * 1024, non_finite=True
)
REASON_GRACE_S = 2.0  # how long a failed device's reason (its revert event) may trail its status
VERDICT_KINDS = ("commit", "revert")  # the events that carry a device's canary verdict
VERDICT_GRACE_S = 5.0  # how long a committed device's canary verdict (its commit event) may trail its status
BROKER_GRACE_S = 60.0  # a broker away longer than this interrupts the rollout (resumable)


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
    state: TargetState = TargetState.PENDING
    before: str | None = None  # the engine it ran before this rollout: what a rollback restores
    command_id: str | None = None
    sent_at: float | None = None
    detail: str = ""
    # its canary verdict, as the commit or revert event's payload (event, command_id, verdict, pool), kept until
    # its wave is weighed: the event is not retained, so a controller killed before the weighing would lose it
    verdict: dict[str, Any] | None = None


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
    state: RolloutState = RolloutState.RUNNING
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
        """The whole rollout, atomically; its journal, now folded in, is removed (compaction)."""
        path = folder / "rollouts" / f"{self.id}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(asdict(self)).encode() + b"\n")
        path.with_suffix(".journal").unlink(missing_ok=True)
        return path

    def append(self, folder: Path, entries: list[dict[str, Any]]) -> None:
        """Changes since the last save, appended and flushed to disk: O(changes), not O(fleet)."""
        if not entries:
            return
        with open(folder / "rollouts" / f"{self.id}.journal", "a", encoding="utf-8") as journal:
            journal.write("".join(json.dumps(e) + "\n" for e in entries))
            journal.flush()
            os.fsync(journal.fileno())

    @classmethod
    def load(cls, path: Path) -> Rollout:
        """The saved rollout with its journal replayed; raises :class:`RolloutFileError` naming the file.

        Journal lines that are not whole (a crash mid-write) or not what this controller writes (damage)
        are skipped, and counted in the rollout's log.
        """
        try:
            data = bounded_json.load(path, ROLLOUT_LIMITS)
            targets = [Target(**t) for t in data.pop("targets")]
            rollout = cls(**data, targets=targets)
            rollout.state = RolloutState(rollout.state)
            for target in targets:
                target.state = TargetState(target.state)
                if not isinstance(target.device, str):
                    raise ValueError("a target of an unknown shape")
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            raise RolloutFileError(f"{path.name} cannot be read: {str(exc)[:200]}") from None
        journal = path.with_suffix(".journal")
        if journal.exists():
            by_device = {t.device: t for t in rollout.targets}
            skipped = sum(line is None or not rollout._replay(line, by_device) for line in journal_lines(journal))
            if skipped:
                rollout.log.append(f"{journal.name}: {skipped} damaged lines skipped")
        return rollout

    def _replay(self, line: bytes, targets: dict[str, Target]) -> bool:
        """Apply one journal line; False when it is not one this controller writes."""
        try:
            entry = bounded_json.loads(line, JOURNAL_LINE_LIMITS)
        except bounded_json.JSONLimitError:
            return False
        if not isinstance(entry, dict):
            return False
        if "target" in entry:
            target = targets.get(str(entry.pop("target")))
            if target is None or not all(_JOURNAL_FIELDS.get(k, _never)(v) for k, v in entry.items()):
                return False
            vars(target).update(entry)
            target.state = TargetState(target.state)
        elif isinstance(entry.get("note"), str):
            self.log.append(entry["note"])
        elif isinstance(entry.get("wave"), int) and set(entry) <= {"wave", "state"}:
            if entry.get("state", self.state) not in list(RolloutState):
                return False
            self.wave, self.state = entry["wave"], RolloutState(entry.get("state", self.state))
        else:
            return False
        return True

    def counts(self) -> dict[TargetState, int]:
        counts = dict.fromkeys(TargetState, 0)
        for target in self.targets:
            counts[target.state] += 1
        return counts


def _never(value: Any) -> bool:
    return False


def _optional(kind: type | tuple[type, ...]) -> Callable[[Any], bool]:
    return lambda value: value is None or (isinstance(value, kind) and not isinstance(value, bool))


_JOURNAL_FIELDS: dict[str, Callable[[Any], bool]] = {  # what a target's journal entry may set, and to what
    "wave": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "state": lambda v: v in list(TargetState),
    "before": _optional(str),
    "command_id": _optional(str),
    "sent_at": _optional((int, float)),
    "detail": lambda v: isinstance(v, str),
    "verdict": lambda v: v is None or (isinstance(v, dict) and v.get("event") in VERDICT_KINDS),
}


class RolloutFileError(ValueError):
    """A rollout file that is empty, damaged or not one this controller wrote; the message names it."""


def journal_lines(path: Path) -> Iterator[bytes | None]:
    """A journal's whole lines, read one at a time: ``None`` for a line over :data:`JOURNAL_LINE_LIMITS`
    (skipped, never held). A last line without its newline (torn by a crash) is left out."""
    limit = JOURNAL_LINE_LIMITS.max_bytes
    with open(path, "rb") as fh:
        while line := fh.readline(limit + 1):
            if line.endswith(b"\n"):
                yield line
                continue
            if len(line) <= limit:
                return  # the torn end
            while (rest := fh.readline(limit)) and not rest.endswith(b"\n"):
                pass
            if rest:
                yield None


def repair_journal(path: Path) -> None:
    """Cut a torn last line (a crash mid-write) off a journal before appending to it: read from the end, back
    to the last newline, so a long journal is not read whole."""
    try:
        fh = open(path, "r+b")
    except FileNotFoundError:
        return
    with fh:
        end = fh.seek(0, os.SEEK_END)
        cut = end
        while cut > 0:
            start = max(0, cut - 64 * 1024)
            fh.seek(start)
            block = fh.read(cut - start)
            if (newline := block.rfind(b"\n")) >= 0:
                cut = start + newline + 1
                break
            cut = start
        if cut != end:
            fh.truncate(cut)
            fh.flush()
            os.fsync(fh.fileno())


def list_rollouts(folder: Path) -> tuple[list[Rollout], list[str]]:
    """Every rollout in the state folder, oldest first, and what could not be read (one line a file)."""
    rollouts, problems = [], []
    for path in sorted((folder / "rollouts").glob("*.json")):
        try:
            rollouts.append(Rollout.load(path))
        except RolloutFileError as exc:
            problems.append(str(exc))
    return sorted(rollouts, key=lambda r: r.created), problems


def latest_rollout(folder: Path) -> Rollout | None:
    """The newest readable rollout, reading as few files as it can (ids start with their creation time)."""
    for path in sorted((folder / "rollouts").glob("*.json"), reverse=True):
        try:
            return Rollout.load(path)
        except RolloutFileError:
            continue
    return None


class Runner:
    """Drives one rollout to an end; ``report`` gets one line per change.

    Every change is journaled before the action it records is taken: a wave's deploys are
    journaled as intended (their command ids, no send time) before they are published and
    as sent after, and a resumed controller sends again, under the same ids, every deploy of
    the current wave that has no outcome yet (the agent applies a repeated id once and
    answers it again, so nothing runs twice and the answer is this controller's to see).
    A broker that stays away longer than ``broker_grace_s`` interrupts the rollout cleanly:
    state ``interrupted``, resumable.
    """

    def __init__(
        self,
        rollout: Rollout,
        link: FleetLink,
        folder: Path,
        report: Callable[[str], None],
        broker_grace_s: float = BROKER_GRACE_S,
    ) -> None:
        self.rollout, self.link, self.folder, self.report = rollout, link, folder, report
        self.broker_grace_s = broker_grace_s
        self._pending: list[dict[str, Any]] = []  # journal entries not yet on disk
        self._bad_since: dict[str, float] = {}  # devices whose status marked the bundle bad before their event came

    def _note(self, line: str) -> None:
        stamped = f"{time.strftime('%H:%M:%S')} {line}"
        self.rollout.log.append(stamped)
        self._pending.append({"note": stamped})
        self.report(line)

    def _changed(self, target: Target) -> None:
        entry = dict(vars(target))  # its fields are flat: no deep copy (asdict's showed at 10,000 devices)
        entry["target"] = entry.pop("device")
        self._pending.append(entry)

    def _flush(self) -> None:
        self.rollout.append(self.folder, self._pending)
        self._pending = []

    def _save(self) -> None:
        self._pending = []
        self.rollout.save(self.folder)

    def plan(self, canary: str, step: str) -> None:
        """Choose the devices: online ones matching the selector, in name order; offline ones are skipped."""
        devices = self.link.snapshot()
        chosen = sorted(n for n, d in devices.items() if selects(self.rollout.selector, d))
        online = [n for n in chosen if devices[n].online]
        for n in chosen:
            if not devices[n].online:
                self.rollout.targets.append(
                    Target(n, -1, TargetState.SKIPPED, detail="offline when the rollout started")
                )
        for wave, names in enumerate(plan_waves(online, canary, step)):
            self.rollout.targets += [Target(n, wave) for n in names]
        waves = max((t.wave for t in self.rollout.targets), default=-1) + 1
        self._note(f"rollout {self.rollout.id}: {self.rollout.bundle_id} to {len(online)} devices in {waves} waves")
        self._save()

    def run(self) -> Rollout:
        """Until the rollout completes, halts or is interrupted by the broker's loss (resumable)."""
        rollout = self.rollout
        repair_journal(self.folder / "rollouts" / f"{rollout.id}.journal")
        if rollout.state == RolloutState.INTERRUPTED:
            rollout.state = RolloutState.RUNNING
            self._pending.append({"wave": rollout.wave, "state": RolloutState.RUNNING})
        try:
            self._run()
        except BrokerLost as exc:
            rollout.state = RolloutState.INTERRUPTED
            self._note(f"interrupted at wave {rollout.wave}: {exc}; edgevit-fleet resume {rollout.id} carries on")
            self._save()
        return rollout

    def _run(self) -> None:
        rollout = self.rollout
        by_wave: dict[int, list[Target]] = {}
        for t in rollout.targets:
            by_wave.setdefault(t.wave, []).append(t)
        attempted = failed = 0
        for w in range(rollout.wave):  # a resumed rollout: the waves already done, and weighed
            for target in by_wave.get(w, []):
                target.verdict = None
            attempted += len(by_wave.get(w, []))
            failed += sum(t.state == TargetState.FAILED for t in by_wave.get(w, []))
        while rollout.state == RolloutState.RUNNING:
            wave = by_wave.get(rollout.wave, [])
            if not wave:
                rollout.state = RolloutState.COMPLETED
                self._note(f"completed: {rollout.counts()[TargetState.SUCCEEDED]} devices run {rollout.bundle_id}")
                self._save()
                break
            self._send(
                [t for t in wave if t.state in (TargetState.PENDING, TargetState.SENT)]
            )  # sent: a resumed wave, again by its ids
            self._await(wave)
            attempted += len(wave)
            failed += sum(t.state == TargetState.FAILED for t in wave)
            pooled = self._weigh(wave)
            for target in wave:  # weighed: the journal keeps them until the next wave is under way
                target.verdict = None
            self.link.forget([t.command_id for t in wave if t.command_id])
            over = 100 * failed / attempted > rollout.max_failures_pct
            if over or pooled:
                rollout.state = RolloutState.HALTED
                self._note(
                    f"halted after wave {rollout.wave}: "
                    + (
                        f"{failed} of {attempted} devices failed, over --max-failures {rollout.max_failures_pct:g}%"
                        if over or not pooled
                        else pooled
                    )
                )
                updated = [
                    t for t in rollout.targets if 0 <= t.wave <= rollout.wave and t.state == TargetState.SUCCEEDED
                ]
                if rollout.rollback_on_halt and updated:
                    back = self._roll_back(updated)
                    if back == len(updated):
                        rollout.state = RolloutState.ROLLED_BACK
                    else:
                        self._note(f"{len(updated) - back} of {len(updated)} updated devices could not be rolled back")
                self._save()
                break
            failpoint("wave-done")
            rollout.wave += 1
            self._pending.append({"wave": rollout.wave})
            self._flush()

    def _verdicts(self, wave: list[Target]) -> list[Event]:
        """The wave's canary verdicts (commit and revert events), waiting up to :data:`VERDICT_GRACE_S` for the
        commit of each device that succeeded: a success can be read off a device's status, which its events
        (sent through the agent's outbox) may trail, and a wave weighed without them would skip its pooled
        test. A verdict still missing after the grace is noted, and the wave is weighed without it. Verdicts
        read before a resume come from the journal: the broker does not send an event twice."""
        deadline = time.monotonic() + VERDICT_GRACE_S
        while True:
            for target in wave:
                if target.verdict is None and (found := self._verdict_of(target)):
                    target.verdict = found
                    self._changed(target)
            missing = [t.device for t in wave if t.state == TargetState.SUCCEEDED and t.verdict is None]
            if not missing or time.monotonic() >= deadline:
                break
            self.link.wait_changes(POLL_S)
        self._flush()
        if missing:
            self._note(
                f"wave {wave[0].wave}: no canary verdict from {', '.join(sorted(missing))} within "
                f"{VERDICT_GRACE_S:g} s of its status; weighed without"
            )
        return [event for t in wave if t.verdict and (event := Event.of(t.device, t.verdict))]

    def _verdict_of(self, target: Target) -> dict[str, Any] | None:
        """The target's canary verdict as the link read it, in its event's form: what the journal keeps, and
        :meth:`Event.of <fleet.records.Event.of>` reads back as it reads a device's (a journal is input too)."""
        found = [e for e in self.link.events_for(target.command_id or "") if e.kind in VERDICT_KINDS]
        if not found:
            return None
        event = found[-1]
        return {
            "event": event.kind,
            "command_id": event.command_id,
            "verdict": {"alpha": event.alpha},
            "pool": event.pool.as_dict() if event.pool else {},
        }

    def _weigh(self, wave: list[Target]) -> str | None:
        """The wave's failures against chance, and its pooled agreement test; why to halt, if it must."""
        events = self._verdicts(wave)
        alpha = wave_alpha(events)
        if alpha is None:
            return None
        self._note(
            f"wave {wave[0].wave}: " + failures_note(sum(t.state == TargetState.FAILED for t in wave), len(wave), alpha)
        )
        pooled = pooled_verdict(events, alpha)
        if pooled is None:
            return None
        found = "a regression" if pooled.verdict == REGRESSION else "no regression"
        self._note(
            f"wave {wave[0].wave}: pooled canary evidence, {pooled.units} blocks and {pooled.frames} frames: "
            f"agreement {pooled.estimate:.2%}, {found} at alpha {alpha:g} ({pooled.detail})"
        )
        if pooled.verdict != REGRESSION:
            return None
        return f"the devices' pooled canary evidence shows a regression no single device was sure of ({pooled.detail})"

    def _send(self, targets: list[Target]) -> None:
        """Journal the deploys as intended, publish them, journal them as sent (each step flushed)."""
        for target in targets:
            if target.state == TargetState.PENDING:
                device = self.link.device(target.device)
                target.before = device.engine.active if device else None
                target.command_id = f"{self.rollout.id}-{secrets.token_hex(3)}"
                target.state = TargetState.SENT
                self._changed(target)
        self._flush()  # intended: a controller killed from here on sends these again, under the same ids
        failpoint("deploys-intended")
        commands = []
        for target in targets:
            command: dict[str, Any] = {"id": target.command_id, "cmd": "deploy", "bundle": self.rollout.reference}
            if self.rollout.force:
                command["force"] = True
            commands.append((target.device, command))
        self.link.send_all(commands)
        failpoint("deploys-published")
        now = time.time()
        for target in targets:
            if target.sent_at is None:
                target.sent_at = now
                self._changed(target)
            self._note(f"wave {target.wave}: deploy sent to {target.device}")
        self._flush()

    def outcome(self, target: Target) -> tuple[TargetState, str] | None:
        """(state, detail) once ``target`` has an outcome, from its own events, reply and retained status.

        Only the target's own answers count (the link keeps no other). Success needs the device to
        have answered this command, then a status showing the bundle active with no canary pending.
        """
        bundle = self.rollout.bundle_id
        command_id = target.command_id
        assert command_id is not None and target.sent_at is not None
        for event in self.link.events_for(command_id):
            if event.kind == "commit":
                return TargetState.SUCCEEDED, "committed after its canary window"
            if event.kind == "revert":
                return TargetState.FAILED, f"reverted: {event.reason}"
            if event.kind == "deploy" and event.ok is False:
                return TargetState.FAILED, f"refused: {event.reason}"
        reply = self.link.reply_for(command_id)
        if reply is not None and not reply.ok:
            return TargetState.FAILED, f"refused: {reply.error}"
        device = self.link.device(target.device)
        answered = self.link.answered_at(command_id)
        if device is not None:
            engine = device.engine
            if answered is not None and device.seen >= answered and engine.active == bundle and not engine.canary:
                return TargetState.SUCCEEDED, "runs it, committed"
            if not device.online:
                return TargetState.FAILED, "went offline"
            if answered is not None and bundle in engine.bad and engine.active != bundle:
                # its status can overtake the revert event that says why (events go through the agent's outbox):
                # give the event a moment before settling for the bare fact
                first = self._bad_since.setdefault(target.device, time.monotonic())
                if time.monotonic() - first >= REASON_GRACE_S:
                    return TargetState.FAILED, "the device marked it bad"
        if time.time() - target.sent_at > self.rollout.timeout_s:
            silent = "" if answered is not None else " (it never answered the command)"
            return TargetState.FAILED, f"no outcome within --timeout {self.rollout.timeout_s:g} s{silent}"
        return None

    def _await(self, wave: list[Target]) -> None:
        """Until every target of the wave has an outcome, looking only at devices heard from, and at timeouts.

        Outcomes are observations, not actions: they reach the journal in batches (every
        :data:`OUTCOMES_FLUSH_S`, and when the wave ends, before the next wave is sent). A controller that
        dies in between reads them again from the devices when it resumes.
        """
        waiting = {t.device: t for t in wave if t.state == TargetState.SENT}
        check = list(waiting)  # all once: a resumed rollout's devices may have answered while it was away
        timeout = self.rollout.timeout_s
        due = min((t.sent_at or 0.0 for t in waiting.values()), default=0.0) + timeout  # the first timeout
        flushed = time.monotonic()
        while waiting:
            for name in check:
                target = waiting.get(name)
                result = self.outcome(target) if target else None
                if target and result:
                    target.state, target.detail = result
                    target.verdict = self._verdict_of(target) or target.verdict
                    self._changed(target)
                    self._note(f"wave {target.wave}: {target.device} {target.state}: {target.detail}")
                    del waiting[name]
            if not waiting:
                break
            if time.monotonic() - flushed >= OUTCOMES_FLUSH_S:
                self._flush()
                flushed = time.monotonic()
            if self.link.down_for() > self.broker_grace_s:
                self._flush()
                raise BrokerLost(f"the MQTT broker has been unreachable for over {self.broker_grace_s:g} s")
            check = list(self.link.wait_changes(POLL_S)) + [n for n in self._bad_since if n in waiting]
            if time.time() > due:  # a timeout is due: look at whoever has one, then find the next one
                check += [n for n, t in waiting.items() if time.time() - (t.sent_at or 0.0) > timeout]
                due = min((t.sent_at or 0.0 for t in waiting.values()), default=0.0) + timeout
        self._flush()
        failpoint("outcomes-journaled")

    def _roll_back(self, targets: list[Target]) -> int:
        """Roll the updated devices back; how many reached the engine they had before."""
        wanted: dict[str, str | None] = {
            t.device: t.before for t in targets if t.before and t.before != self.rollout.bundle_id
        }
        outcomes = roll_back(self.link, wanted, self.rollout.timeout_s, self._note)
        back = 0
        for target in targets:
            ok, target.detail = outcomes.get(target.device, (False, "nothing to roll back to"))
            if ok:
                target.state = TargetState.ROLLED_BACK
                back += 1
        return back


def rollback_plan(devices: dict[str, Device], to: str | None) -> tuple[dict[str, str | None], dict[str, str]]:
    """Which selected devices a ``rollback`` goes to and where (None: each one's previous), and why the
    others are left as they are.

    With ``to``, every device goes to that installed bundle, whatever it ran before: the explicit way
    to re-apply anything. Without it, a device goes back to its previous engine, except when there is
    none, or when its last change was itself a successful rollback (a halted rollout's, or an
    operator's): its previous engine is then the very bundle it was taken off, and going "back" would
    re-apply what was just removed.
    """
    if to:
        return dict.fromkeys(sorted(devices), to), {}
    wanted: dict[str, str | None] = {}
    skipped: dict[str, str] = {}
    for name in sorted(devices):
        engine, last = devices[name].engine, devices[name].status.last_event
        if not engine.previous:
            skipped[name] = "no previous engine to go back to"
        elif last.get("event") == "rollback" and last.get("ok") and last.get("bundle_id") == engine.active:
            skipped[name] = (
                f"already rolled back to {engine.active}; its previous engine {engine.previous} is the one it was "
                f"taken off (--to {engine.previous} re-applies it)"
            )
        else:
            wanted[name] = None
    return wanted, skipped


def roll_back(
    link: FleetLink, wanted: dict[str, str | None], timeout_s: float, report: Callable[[str], None]
) -> dict[str, tuple[bool, str]]:
    """Send ``rollback`` to each device (to the named bundle, or to its previous) and await the outcomes.

    A device has rolled back when, after answering the command, its retained status shows the
    expected engine active and no canary pending: the named bundle, or the ``previous`` its
    status named when the command left (a canary in progress is reverted to that same engine).
    """
    pending: dict[str, tuple[str | None, str]] = {}
    commands = []
    for name, bundle in wanted.items():
        device = link.device(name)
        expected = bundle or (device.engine.previous if device else None)
        command_id = f"rollback-{secrets.token_hex(4)}"
        commands.append((name, {"id": command_id, "cmd": "rollback", **({"bundle": bundle} if bundle else {})}))
        pending[name] = (expected, command_id)
    link.send_all(commands)
    outcomes: dict[str, tuple[bool, str]] = {}
    deadline = time.time() + timeout_s
    check = list(pending)
    while pending and time.time() < deadline:
        for name in check:
            if name not in pending:
                continue
            expected, command_id = pending[name]
            device = link.device(name)
            reply = link.reply_for(command_id)
            failed = [e for e in link.events_for(command_id) if e.kind == "rollback" and e.ok is False]
            answered = link.answered_at(command_id) is not None
            if reply and not reply.ok:
                outcomes[name] = (False, f"rollback refused: {reply.error}")
            elif failed:
                outcomes[name] = (False, f"rollback failed: {failed[0].reason}")
            elif answered and expected and device and device.engine.active == expected and not device.engine.canary:
                outcomes[name] = (True, f"rolled back to {expected}")
            else:
                continue
            del pending[name]
            report(f"{name}: {outcomes[name][1]}")
        check = list(link.wait_changes(POLL_S))
    for name in pending:
        outcomes[name] = (False, f"rollback sent, no outcome within {timeout_s:g} s")
        report(f"{name}: {outcomes[name][1]}")
    link.forget([command_id for _, command_id in pending.values()] + [c["id"] for _, c in commands])
    return outcomes
