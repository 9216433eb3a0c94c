"""The engine lifecycle on a device: boot, deploy, verify, swap, canary, then commit or revert.

Boot
    ``engine.bundle`` from the config is the first engine: installed into the store
    and made active when its id changes. The active engine is verified (signature,
    hashes, this device) and must reproduce its golden set in its worker; if it does
    not, the previous one, then the config's, is tried, and the agent says which it
    fell back to. A canary interrupted by restarts is resumed, and reverted once the
    agent has started more than ``canary.max_restarts`` times during it (a crash loop).

Deploy (MQTT ``deploy`` or a bundle dropped into ``engine.inbox``), in a job thread
    fetch (path or URL) -> verify and install in the store -> refused if a build already
    found it less accurate than the serving bundle -> open the candidate in its own worker
    beside the serving engine -> golden set -> latency against the serving engine, timed
    back to back under the same conditions -> state file names it active in canary -> swap
    between two batches.

Canary
    For ``canary.window_s`` (and at least ``min_frames`` served), the rules of
    :mod:`agent.lifecycle.canary` judge the evidence continuously: failed batches, and
    sequential tests of agreement (or, without an expectation for the pair, of confidence
    and class mix), and of tail latency, on shadow runs and holdback batches of the previous
    engine (:class:`~agent.engine.shadow.Shadow`); a golden recheck at the end. A regression
    swaps the previous engine back, marks the bundle bad with the rule's evidence (refused
    later unless forced, except after a latency verdict) and publishes a ``revert`` event;
    otherwise a ``commit`` event, and the passport's output profile is the drift reference.
    A canary never commits before its window ends, however clear the evidence: slow faults
    (a leak, a drifting scene, a warming device) need the time.
"""

from __future__ import annotations

import bisect
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from agent.config import AgentConfig
from agent.engine.bundle import Bundle, BundleError, read_passport, verify_bundle
from agent.engine.device import DeviceInfo
from agent.engine.golden import GoldenCheck, check_golden
from agent.engine.headroom import MemoryShortage, check_headroom
from agent.engine.runtimes import EngineError
from agent.engine.shadow import Shadow
from agent.engine.signing import SignatureError, load_public_key
from agent.engine.worker import WorkerEngine, WorkerSpec
from agent.lifecycle import canary as rules
from agent.lifecycle.failpoints import failpoint
from agent.lifecycle.fetch import BundleRef, fetch
from agent.lifecycle.store import Canary, EngineStore, Mark, StoreError
from agent.stream.drift import DriftMonitor
from agent.stream.pipeline import EventSink, PassportLatency, Pipeline, Serving

log = logging.getLogger("edgevit.lifecycle")
PRE_SWAP_QUANTILE = 0.5  # the candidate's median against the serving engine's: a few pairs show 2x
Done = Callable[[bool, str], None]


class LifecycleError(RuntimeError):
    """A deploy or rollback request is refused before it starts; the message says why."""


class CandidateCheckError(RuntimeError):
    """A candidate engine failed a check on this device; the message carries the figures."""


class TooSlowHere(CandidateCheckError):
    """The candidate is slower than the serving engine here, now: not a verdict on the bundle."""


REFUSALS = (
    BundleError,
    SignatureError,
    EngineError,
    CandidateCheckError,
    LifecycleError,
    StoreError,
    MemoryShortage,
    OSError,
)


def facts(bundle: Bundle) -> rules.BundleFacts:
    checkpoint = bundle.manifest.get("model", {}).get("checkpoint_sha256")
    return rules.BundleFacts(bundle.bundle_id, checkpoint, bundle.passport)


class Lifecycle:
    def __init__(self, config: AgentConfig, events: EventSink) -> None:
        self.config, self.events = config, events
        self.store = EngineStore(config.state_dir)
        self.state = self.store.load()
        engine = config.engine
        self.keys = [load_public_key(p) for p in engine.trusted_keys] if engine.require_signature else None
        self.device = DeviceInfo.probe()
        self.pipeline: Pipeline | None = None
        self.previous: Serving | None = None  # kept open during a canary: shadow runs, instant revert
        self._job: threading.Thread | None = None
        self._job_lock = threading.Lock()
        self._rollback_requested_by: str | None = None  # the command that asked to end a canary now
        self._stop = threading.Event()
        self._judgement: rules.Judgement | None = None  # the running canary's latest verdict, for the status

    # -- building blocks ---------------------------------------------------------------------------
    def verify(self, folder: Path) -> Bundle:
        return verify_bundle(folder, self.keys, self.device)

    def open_checked(self, bundle: Bundle) -> tuple[Serving, GoldenCheck]:
        """The bundle's engine in its own worker, after it reproduced its golden set here.

        Beside a serving engine, only when the memory headroom allows it (:mod:`agent.engine.headroom`).
        """
        if self.pipeline is not None:
            check_headroom(bundle, self.pipeline.serving, self.config.swap.min_free_mib)
        target = bundle.target
        if self.config.engine.onnxruntime_tensorrt and target == "cuda":
            target = "tensorrt-ep"
        worker = WorkerEngine(
            WorkerSpec.of(bundle, target, self.config.engine.threads, cache_dir=self.config.state_dir / "engine-cache"),
            timeout_s=self.config.engine.batch_timeout_s,
            start_timeout_s=(
                self.config.engine.tensorrt_build_timeout_s
                if target == "tensorrt-ep"
                else self.config.engine.load_timeout_s
            ),
            max_rss_mib=self.config.engine.worker_max_rss_mib,
        )
        try:
            golden = check_golden(worker, bundle.golden_path, bundle.batch_range[1])
        except EngineError:
            worker.close()
            raise
        if not golden.passed:
            worker.close()
            raise CandidateCheckError(f"{bundle.bundle_id} does not reproduce its golden set here: {golden.summary()}")
        return Serving.of(bundle, worker), golden

    def _save(self) -> None:
        self.store.save(self.state)

    # -- boot --------------------------------------------------------------------------------------
    def boot(self) -> Serving:
        """The engine to serve at start (raises :class:`LifecycleError` when none loads)."""
        self._install_seed()
        canary = self.state.canary
        if canary:
            canary.boots += 1
            if canary.boots > self.config.canary.max_restarts:
                reason = f"crash loop: the agent started {canary.boots} times during the canary window"
                self._undo_canary(reason)
                self.events("revert", {"bundle_id": canary.bundle, "reason": reason, "restored": canary.previous})
            self._save()
        failures: list[str] = []
        order = dict.fromkeys(b for b in (self.state.active, self.state.previous, self.state.seed) if b)
        for installed_id in [*order, None]:  # None: reinstall engine.bundle, the last resort
            try:
                folder = self.store.path(installed_id) if installed_id else self._reinstall_seed()
                serving, golden = self.open_checked(self.verify(folder))
            except REFUSALS as exc:
                name = installed_id or f"engine.bundle {self.config.engine.bundle}"
                failures.append(f"{name}: {exc}")
                if installed_id:
                    self.state.bad[installed_id] = Mark(f"failed to load at start: {exc}", at=time.time())
                log.error("engine %s does not load: %s", name, exc)
                continue
            bundle_id = serving.bundle.bundle_id
            log.info("engine %s loaded (%s)", bundle_id, golden.summary())
            if bundle_id != self.state.active:
                self.events("fallback", {"bundle_id": bundle_id, "failed": failures})
                log.warning("fell back to engine %s: %s", bundle_id, "; ".join(failures))
                self.state.previous = self.state.previous if self.state.previous != bundle_id else None
                self.state.active, self.state.canary = bundle_id, None
            self._save()
            if self.state.canary:
                self.previous = self._open_previous(self.state.canary.previous)
                if self.previous:
                    serving.shadow = self._shadow_of(self.previous, serving.bundle)
            return serving
        self._save()
        raise LifecycleError("no installed engine loads: " + "; ".join(failures))

    def _reinstall_seed(self) -> Path:
        """Install engine.bundle afresh over a damaged copy in the store."""
        seed = self.verify(self.config.engine.bundle)
        shutil.rmtree(self.store.path(seed.bundle_id), ignore_errors=True)
        self.store.install(seed.root, self.verify)
        self.state.bad.pop(seed.bundle_id, None)
        log.warning("reinstalled %s from engine.bundle %s", seed.bundle_id, self.config.engine.bundle)
        return self.store.path(seed.bundle_id)

    def _install_seed(self) -> None:
        try:
            seed = self.verify(self.config.engine.bundle)
        except (BundleError, SignatureError) as exc:
            if not self.state.active:
                raise LifecycleError(str(exc)) from exc
            log.warning("engine.bundle is not usable (%s); serving the installed engines", exc)
            return
        if seed.bundle_id == self.state.seed:
            return
        self.store.install(seed.root, self.verify)
        if self.state.active != seed.bundle_id:  # the operator changed engine.bundle: it wins
            self.state.previous, self.state.active, self.state.canary = self.state.active, seed.bundle_id, None
        self.state.seed = seed.bundle_id
        self.state.bad.pop(seed.bundle_id, None)
        self._save()

    def _open_previous(self, bundle_id: str) -> Serving | None:
        try:
            return self.open_checked(self.verify(self.store.path(bundle_id)))[0]
        except REFUSALS as exc:
            log.error("the canary's previous engine %s does not load (%s): no shadow runs, no revert", bundle_id, exc)
            return None

    def _shadow_of(self, previous: Serving, candidate: Bundle) -> Shadow:
        cfg, spec = self.config.canary, candidate.input_spec
        shape = (candidate.batch_range[1], spec.height, spec.width, 3)
        blocks = rules.Blocks(len(candidate.labels), cfg.block_s, cfg.max_block_s)
        bundle = previous.bundle
        return Shadow(
            previous.engine, bundle.bundle_id, previous.labels, cfg.shadow_every, cfg.latency_every, shape, blocks
        )

    def attach(self, pipeline: Pipeline) -> None:
        """Start watching a canary that a restart interrupted."""
        self.pipeline = pipeline
        if self.state.canary:
            self._start_job("canary", self._watch_canary, pipeline.serving)

    # -- jobs --------------------------------------------------------------------------------------
    def _start_job(self, name: str, target: Callable[..., None], *args: Any) -> None:
        with self._job_lock:
            if self._job and self._job.is_alive():
                raise LifecycleError(f"busy: a {self._job.name} is in progress")
            self._job = threading.Thread(target=self._guarded, args=(name, target, *args), name=name, daemon=True)
            self._job.start()

    def _guarded(self, name: str, target: Callable[..., None], *args: Any) -> None:
        """A job that fails unexpectedly says so in an event: the engine in service keeps serving."""
        try:
            target(*args)
        except Exception as exc:  # a bug must not end a deploy silently
            log.exception("%s job failed", name)
            self.events(name, {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"})

    def busy(self) -> bool:
        return bool(self._job and self._job.is_alive())

    def idle(self) -> bool:
        """Neither a deploy nor a canary under way: a new one may start (the inbox waits for this)."""
        return not self.busy() and self.state.canary is None

    def request_deploy(self, ref: BundleRef, force: bool, command_id: str | None, on_done: Done | None = None) -> None:
        if self.state.canary:
            raise LifecycleError(f"the canary of {self.state.canary.bundle} is in progress; wait or roll back")
        self._start_job("deploy", self._deploy, ref, force, command_id, on_done or (lambda ok, msg: None))

    def request_rollback(self, target: str | None, force: bool, command_id: str | None) -> str:
        """Roll back now: during a canary, revert it; else swap to ``target`` (default: previous)."""
        if self.state.canary:
            self._rollback_requested_by = command_id or "an operator"
            return self.state.canary.previous
        target = target or self.state.previous
        if target is None:
            raise LifecycleError("there is no previous engine to roll back to")
        if target == self.state.active:
            raise LifecycleError(f"{target} is already the active engine")
        if target not in self.store.installed():
            raise LifecycleError(f"{target} is not installed (installed: {', '.join(self.store.installed())})")
        mark = self.state.bad.get(target)
        if mark and mark.refuse and not force:
            raise LifecycleError(f"{target} is marked bad ({mark.reason}); add force: true")
        self._start_job("rollback", self._rollback, target, force, command_id)
        return target

    def stop(self) -> None:
        self._stop.set()
        if self._job:
            self._job.join(timeout=60)

    # -- deploy ------------------------------------------------------------------------------------
    def _deploy(self, ref: BundleRef, force: bool, command_id: str | None, on_done: Done) -> None:
        """Refusals and unexpected errors alike end in a ``deploy`` event that names the command,
        so neither an operator, a fleet rollout nor an inbox item waits on a deploy that died."""
        context: dict[str, Any] = {"command_id": command_id, "source": ref.describe()}
        try:
            serving = self._prepare(ref, force, context)
            if serving is not None:
                self._go_live(serving, context)
        except Exception as exc:
            error = str(exc)
            if not isinstance(exc, REFUSALS):  # a bug: logged, and still reported under the command's id
                log.exception("deploy failed")
                error = f"internal error: {type(exc).__name__}: {exc}"
            self.events("deploy", {**context, "ok": False, "error": error})
            on_done(False, error)
            return
        if serving is None:  # deploying what already runs succeeds and changes nothing
            self.events("deploy", {**context, "ok": True, "already_active": True})
            on_done(True, context["bundle_id"])
            return
        on_done(True, serving.bundle.bundle_id)
        self._watch_canary(serving)

    def _prepare(self, ref: BundleRef, force: bool, context: dict[str, Any]) -> Serving | None:
        assert self.pipeline is not None
        state_dir = self.config.state_dir
        (state_dir / "staging").mkdir(parents=True, exist_ok=True)
        max_bytes = int(self.config.engine.max_bundle_mib * 2**20)
        with tempfile.TemporaryDirectory(dir=state_dir / "staging") as work:
            folder = fetch(ref, state_dir / "downloads", Path(work), max_bytes, self.config.engine.download_ca)
            bundle = self.store.install(folder, self.verify)
        bundle_id = context["bundle_id"] = bundle.bundle_id
        if bundle_id == self.state.active:
            return None

        mark = self.state.bad.get(bundle_id)
        if mark and mark.refuse and not force:
            raise CandidateCheckError(f"{bundle_id} is marked bad ({mark.reason}); add force: true")
        if bundle.input_spec != self.pipeline.spec:
            raise CandidateCheckError(
                f"{bundle_id} expects {bundle.input_spec}; the cameras feed {self.pipeline.spec}: "
                "an engine with other preprocessing needs engine.bundle and a restart"
            )
        known = rules.known_regression(facts(bundle), facts(self.pipeline.serving.bundle))
        if known and not force:
            raise CandidateCheckError(f"{known}; add force: true to deploy it anyway")
        try:
            serving, golden = self.open_checked(bundle)
            try:
                latency = self._latency_check(serving)
            except (CandidateCheckError, LifecycleError):
                serving.engine.close()
                raise
        except TooSlowHere:
            raise
        except (CandidateCheckError, EngineError) as exc:
            self.state.bad[bundle_id] = Mark(str(exc), at=time.time())
            self._save()
            raise
        self.events("verify", {**context, "ok": True, "golden": asdict(golden), "latency": latency})
        return serving

    def _latency_check(self, candidate: Serving) -> dict[str, Any]:
        """The candidate against the serving engine at the working batch size, timed back to back.

        Each pair of runs (alternating which engine goes first) holds the serving engine's worker, so
        the inference thread waits rather than competing with either run: both engines are timed under
        the same conditions, however loaded the device is. A passport's figure, measured on an idle
        build machine, is shown but judges nothing. Stops as soon as the sequential test decides, after
        ``swap.latency_runs`` pairs at most; raises :class:`TooSlowHere` when the candidate's median is
        confidently over ``swap.max_latency_ratio`` x the serving engine's + ``slack_ms``.
        """
        assert self.pipeline is not None
        bundle, cfg = candidate.bundle, self.config.swap
        serving = self.pipeline.serving
        batch = max(
            1, min(self.pipeline.decision_summary()["batch"], bundle.batch_range[1], serving.bundle.batch_range[1])
        )
        with np.load(bundle.golden_path) as golden:
            images = golden["images"][np.arange(batch) % len(golden["images"])]
        candidate.engine.run(images)  # warm-up
        times: dict[str, list[float]] = {"candidate": [], "serving": []}
        rule = None
        for i in range(cfg.latency_runs):
            if self._stop.is_set():  # not a verdict on the candidate: the deploy is simply not finished
                raise LifecycleError("the agent is stopping")
            order = [("candidate", candidate.engine), ("serving", serving.engine)]
            with serving.engine.exclusive():
                for name, engine in order if i % 2 == 0 else order[::-1]:
                    started = time.monotonic()
                    engine.run(images)
                    bisect.insort(times[name], time.monotonic() - started)
            rule = rules.latency_rule(
                times["candidate"],
                times["serving"],
                PRE_SWAP_QUANTILE,
                cfg.max_latency_ratio,
                cfg.slack_ms / 1e3,
                self.config.canary.alpha,
            )
            if rule.verdict != rules.UNDECIDED:
                break
            time.sleep(times["serving"][-1])  # the inference thread serves between pairs
        assert rule is not None
        figures: dict[str, Any] = {"batch": batch, "pairs": len(times["candidate"]), "test": rule.public()}
        if (passport_p99 := PassportLatency.of(bundle).p99.get(int(batch))) is not None:
            figures["passport_p99_ms"] = round(passport_p99 * 1e3, 3)
        if rule.verdict == rules.REGRESSION:
            raise TooSlowHere(
                f"{bundle.bundle_id} is slower than the serving engine at batch {batch} here: {rule.detail}"
            )
        return figures

    def _go_live(self, serving: Serving, context: dict[str, Any]) -> None:
        assert self.pipeline is not None
        old = self.pipeline.serving
        failpoint("before-state")
        self.state.canary = Canary(
            serving.bundle.bundle_id, old.bundle.bundle_id, self.state.previous, time.time(), 0, context["command_id"]
        )
        self.state.active, self.state.previous = serving.bundle.bundle_id, old.bundle.bundle_id
        self._save()
        failpoint("after-state")
        self.previous = Serving.of(old.bundle, old.engine)
        serving.shadow = self._shadow_of(self.previous, serving.bundle)
        try:
            swap = self.pipeline.swap(serving, self._stop)
        except (TimeoutError, ValueError) as exc:  # not swapped: the old engine still serves
            self._undo_canary(f"swap failed: {exc}")
            self._save()
            self._release_shadow(serving)
            serving.engine.close()
            raise CandidateCheckError(f"swap failed: {exc}") from exc
        self.events("swap", {**context, "from": old.bundle.bundle_id, "to": serving.bundle.bundle_id, **swap})
        log.info("swapped %s -> %s (%s)", old.bundle.bundle_id, serving.bundle.bundle_id, swap)
        failpoint("after-swap")

    # -- canary ------------------------------------------------------------------------------------
    def canary_figures(self, serving: Serving) -> dict[str, Any]:
        figures: dict[str, Any] = {
            "elapsed_s": round(time.monotonic() - serving.since, 1),
            "frames": serving.frames,
            "batches": serving.batches,
            "failed_batches": serving.errors,
            "worker_restarts": getattr(serving.engine, "restarts", 0),
        }
        if serving.shadow:
            figures.update(serving.shadow.figures())
        return figures

    def _evidence(self, serving: Serving) -> rules.CanaryEvidence:
        """What the rules judge: the shadow's blocks and timings, and what the two bundles' builds expect."""
        blocks, new_s, previous_s = serving.shadow.evidence() if serving.shadow else ([], [], [])
        previous = self.previous.bundle if self.previous else None
        return rules.CanaryEvidence(
            blocks,
            new_s,
            previous_s,
            serving.errors,
            rules.expectation_for(facts(serving.bundle), facts(previous)) if previous else None,
            rules.output_references(serving.bundle.passport, previous.passport) if previous else None,
        )

    def _window_done(self, figures: dict[str, Any]) -> bool:
        cfg = self.config.canary
        return bool(figures["elapsed_s"] >= cfg.window_s and figures["frames"] >= cfg.min_frames)

    def _watch_canary(self, serving: Serving) -> None:
        judged: tuple[int, ...] = ()
        judgement = rules.judge(self.config.canary, self._evidence(serving))
        while not self._stop.wait(0.25):
            figures = self.canary_figures(serving)
            requested = self._rollback_requested_by
            if requested:
                self._revert(serving, f"rolled back by command {requested}", figures, judgement, rule="rollback")
                return
            seen = (figures.get("blocks", 0), figures.get("latency_pairs", 0), figures["failed_batches"])
            if seen != judged:  # the rules change only with new evidence
                judged, judgement = seen, rules.judge(self.config.canary, self._evidence(serving))
                self._judgement = judgement
            if judgement.regression:
                self._revert(serving, judgement.reason, figures, judgement, rule=judgement.regression.name)
                return
            if self._window_done(figures):
                break
        else:
            return  # the agent is stopping: the canary resumes at the next start
        judgement = rules.judge(self.config.canary, self._evidence(serving))
        if judgement.regression:
            self._revert(serving, judgement.reason, figures, judgement, rule=judgement.regression.name)
            return
        if self.config.canary.golden_recheck:
            try:
                golden = check_golden(serving.engine, serving.bundle.golden_path, serving.bundle.batch_range[1])
            except EngineError as exc:
                self._revert(serving, f"golden recheck failed: {exc}", figures, judgement, rule="golden")
                return
            figures["golden"] = golden.summary()
            if not golden.passed:
                self._revert(serving, f"golden recheck failed: {golden.summary()}", figures, judgement, rule="golden")
                return
        self._commit(serving, figures, judgement)

    def _commit(self, serving: Serving, figures: dict[str, Any], judgement: rules.Judgement) -> None:
        assert self.state.canary is not None
        failpoint("before-commit")
        command_id = self.state.canary.command_id
        self.state.canary = None
        self.state.bad.pop(serving.bundle.bundle_id, None)
        self._save()
        failpoint("after-commit")
        self._release_shadow(serving)
        self._judgement = None
        serving.drift = DriftMonitor(serving.bundle.passport.get("outputs"), len(serving.labels))
        removed = self.store.prune(self.config.engine.keep_installed, self.state)
        self.events(
            "commit",
            {
                "bundle_id": serving.bundle.bundle_id,
                "command_id": command_id,
                "figures": figures,
                "verdict": judgement.public(),
                "pool": judgement.pool,
            },
        )
        log.info("committed %s after its canary: %s (pruned %s)", serving.bundle.bundle_id, figures, removed)

    def _release_shadow(self, serving: Serving) -> None:
        shadow, serving.shadow = serving.shadow, None
        if shadow:
            shadow.close()
        if self.previous:
            self.previous.engine.close()
            self.previous = None

    def _undo_canary(self, reason: str, rule: str | None = None, evidence: dict[str, Any] | None = None) -> None:
        """Back to the previous engine in the state; the bundle marked bad, refused later unless the
        verdict was about latency (this device's load at the time, not the bundle)."""
        canary = self.state.canary
        assert canary is not None
        refuse = rule != "latency"
        self.state.bad[canary.bundle] = Mark(reason, refuse, rule, evidence, time.time())
        self.state.active, self.state.previous, self.state.canary = canary.previous, canary.before_previous, None

    def _revert(
        self, serving: Serving, reason: str, figures: dict[str, Any], judgement: rules.Judgement, rule: str
    ) -> None:
        assert self.pipeline is not None and self.state.canary is not None
        canary = self.state.canary
        previous = self.previous or self._open_previous(canary.previous)
        verdict = judgement.public()
        if previous is None:
            log.error("cannot revert %s (%s): the previous engine does not load", canary.bundle, reason)
            self.events(
                "revert",
                {"bundle_id": canary.bundle, "ok": False, "reason": reason, "figures": figures, "verdict": verdict},
            )
            return
        swap = self.pipeline.swap(Serving.of(previous.bundle, previous.engine), self._stop)
        self.previous = None
        if serving.shadow:
            serving.shadow.close()
        serving.engine.close()
        self._undo_canary(reason, rule, verdict["rules"].get(rule))
        self._save()
        self._judgement = None
        requested_by, self._rollback_requested_by = self._rollback_requested_by, None
        self.events(
            "revert",
            {
                "bundle_id": canary.bundle,
                "command_id": canary.command_id,
                "rollback_command_id": requested_by,
                "reason": reason,
                "rule": rule,
                "refused_later": rule != "latency",
                "figures": figures,
                "verdict": verdict,
                "pool": judgement.pool,
                "restored": canary.previous,
                **swap,
            },
        )
        log.warning("reverted %s to %s: %s %s", canary.bundle, canary.previous, reason, figures)

    # -- rollback ----------------------------------------------------------------------------------
    def _rollback(self, target: str, force: bool, command_id: str | None) -> None:
        assert self.pipeline is not None
        context = {"command_id": command_id, "bundle_id": target}
        try:
            serving, golden = self.open_checked(self.verify(self.store.path(target)))
            old = self.pipeline.serving
            self.state.active, self.state.previous = target, old.bundle.bundle_id
            self.state.bad.pop(target, None)
            self._save()
            swap = self.pipeline.swap(serving, self._stop)
        except (*REFUSALS, ValueError) as exc:
            self.events("rollback", {**context, "ok": False, "error": str(exc)})
            return
        old.engine.close()
        self.events("rollback", {**context, "ok": True, "from": old.bundle.bundle_id, **swap})

    # -- reporting ---------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        state = self.state
        bad = {bundle_id: mark.public() for bundle_id, mark in state.bad.items()}
        described: dict[str, Any] = {"active": state.active, "previous": state.previous, "bad": bad}
        if state.canary and self.pipeline:
            described["canary"] = {"bundle_id": state.canary.bundle, **self.canary_figures(self.pipeline.serving)}
            if self._judgement:
                described["canary"]["verdict"] = self._judgement.public()
        return described

    def installed(self) -> list[dict[str, Any]]:
        rows = []
        for bundle_id in self.store.installed():
            try:
                accuracy = read_passport(self.store.path(bundle_id))["accuracy"]
            except (OSError, ValueError, KeyError):
                accuracy = {}
            rows.append(
                {
                    "bundle_id": bundle_id,
                    "active": bundle_id == self.state.active,
                    "previous": bundle_id == self.state.previous,
                    "bad": mark.reason if (mark := self.state.bad.get(bundle_id)) else None,
                    "refused_later": bool(mark and mark.refuse),
                    "top1": accuracy.get("engine_top1"),
                    "agreement": accuracy.get("top1_agreement"),
                }
            )
        return rows
