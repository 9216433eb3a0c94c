"""camera -> preprocess -> batcher -> engine -> results: the agent's data path, one way.

Each camera's decoder process decodes and preprocesses; its camera thread puts the frames
into the :class:`FrameQueue`; one inference thread asks the
:class:`BatchPolicy` for a batch size and wait, takes frames into one of two
preallocated batch buffers, submits the batch to the engine's worker, and hands the
results of the batch before it to the sinks. Two batches are in flight: the worker
starts the next the moment one ends, so the engine does not wait while the agent
takes frames and hands results on. The next batch stops waiting for frames when the
one running ends. During a canary the pipeline runs one batch at a time, so the
shadow's and the held-back batches' timings compare engines under the same conditions.
The inference thread also records when it last finished a batch: with frames waiting
and no batch done for too long, the pipeline is stalled and the systemd watchdog is
no longer fed.

Supervision: an unexpected error in an inference step is reported (``inference`` event,
``inference_failures`` metric) and the loop goes on after a backoff; the daemon calls
:meth:`Pipeline.supervise` a few times a second, which restarts an inference thread that
ended and replaces a camera whose thread ended (a camera restarts its own stuck decoder).
:meth:`healthy` is false while the inference thread is dead or makes no progress with frames waiting,
so the systemd watchdog is not fed and the status says so.

An engine swap is handed to the inference thread and happens between two batches:
cameras keep filling the queue, no frame is dropped by the swap itself, and the
pause (the inference thread busy swapping) and the gap (last result of the old
engine to first result of the new) are measured and reported.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import numpy as np

from agent.config import AgentConfig, BatchingConfig, CameraConfig
from agent.engine.bundle import Bundle
from agent.engine.shadow import Shadow
from agent.engine.worker import Ticket, WorkerEngine
from agent.stream.batching import BatchPolicy, Decision
from agent.stream.camera import Camera, CameraState
from agent.stream.drift import DriftMonitor
from agent.stream.frames import FrameInfo, FrameQueue, never
from agent.stream.metrics import Metrics
from agent.stream.results import ResultSink, make_results, top_k

log = logging.getLogger("edgevit.pipeline")
STOP_WAIT_S = 15.0  # longest a stop waits for one camera to kill its decoder
TAKE_LEAD_S = 0.003  # how long before the running batch's expected end the next one's frames are taken
EventSink = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class PassportLatency:
    """The bundle's speed as its passport measured it: p99 and mean seconds per batch size, where the
    batch policy starts from."""

    p99: dict[int, float]
    mean: dict[int, float]  # from the rows' images/s; a size without one is ranked by its p99
    runs_as: dict[int, int]  # a size timed at another that runs the same requests ("timed_at"): that size

    @classmethod
    def of(cls, bundle: Bundle) -> PassportLatency:
        """The passport's latency rows that hold a batch size within the bundle's range and finite positive
        figures; the rest are passed over. The passport is signed, but a builder wrote it: a faulty figure
        costs the policy its head start, never the pipeline its start (with none usable, it starts from its
        neutral guess)."""
        low, high = bundle.batch_range
        rows = bundle.passport.get("latency")
        p99: dict[int, float] = {}
        mean: dict[int, float] = {}
        runs_as: dict[int, int] = {}
        for row in rows if isinstance(rows, list) else []:
            size = row.get("batch") if isinstance(row, dict) else None
            if not _size_within(size, low, high):
                continue
            if (ms := _positive(row.get("p99_ms"))) is not None:
                p99[size] = ms / 1e3
            if (rate := _positive(row.get("images_per_s"))) is not None:
                mean[size] = size / rate
            if _size_within(timed_at := row.get("timed_at"), size, high):
                runs_as[size] = timed_at
        return cls(p99, mean, runs_as)


def _size_within(value: object, low: int, high: int) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _positive(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) and value > 0 else None


@dataclass
class Serving:
    """The engine in service and what it did since it went live (the canary reads these)."""

    bundle: Bundle
    engine: WorkerEngine  # every engine serves from its own worker process
    labels: list[str]
    drift: DriftMonitor
    shadow: Shadow | None = None
    since: float = field(default_factory=time.monotonic)
    batches: int = 0
    frames: int = 0
    errors: int = 0

    @classmethod
    def of(cls, bundle: Bundle, engine: WorkerEngine, shadow: Shadow | None = None) -> Serving:
        labels = bundle.labels
        return cls(bundle, engine, labels, DriftMonitor(bundle.passport.get("outputs"), len(labels)), shadow)


@dataclass
class _InFlight:
    """A batch the engine runs while the next one fills: what it takes to hand its results on."""

    infos: list[FrameInfo]
    images: np.ndarray  # its frames, in the batch buffer they were taken into (the shadow samples them)
    serving: Serving
    held_back: Shadow | None  # the previous engine serves this batch, to be timed
    ticket: Ticket  # the worker's, until collected

    @property
    def engine(self) -> WorkerEngine:
        return _engine(self.serving, self.held_back)

    def ended(self) -> bool:
        return self.ticket.done.is_set()


def _engine(serving: Serving, held_back: Shadow | None) -> WorkerEngine:
    return held_back.engine if held_back else serving.engine


@dataclass
class _Swap:
    serving: Serving
    done: threading.Event = field(default_factory=threading.Event)
    pause_s: float = 0.0
    applied_at: float = 0.0
    last_old_result: float = 0.0


class Pipeline:
    def __init__(self, config: AgentConfig, serving: Serving, sinks: list[ResultSink], events: EventSink) -> None:
        self.serving, self.sinks, self.events = serving, sinks, events
        self.spec = serving.bundle.input_spec
        self.queue = FrameQueue([c.name for c in config.cameras], self.spec.height, self.spec.width)
        self.policy = BatchPolicy(
            1.0,
            (passport := PassportLatency.of(serving.bundle)).p99,
            serving.bundle.batch_range[1],
            mean_by_batch=passport.mean,
            runs_as=passport.runs_as,
        )
        self.metrics = Metrics()
        # two batch buffers: one runs on the engine while the next fills
        self._batches = [self._batch_buffer(serving.bundle.batch_range[1]) for _ in range(2)]
        self._slot = 0
        self._in_flight: _InFlight | None = None
        self.cameras: dict[str, Camera] = {}
        self._decision = Decision(1, 0.0, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self.boot = secrets.token_hex(6)  # this run of the agent: results carry it beside their seq
        self.inference_failures = 0
        self.inference_restarts = 0
        self.last_inference_error: str | None = None
        self._swap: _Swap | None = None
        self._swap_lock = threading.Lock()
        self.last_batch_done = time.monotonic()
        self.top_k = config.results.top_k
        self._batching = config.batching
        self.apply(config)

    @property
    def bundle(self) -> Bundle:
        return self.serving.bundle

    # -- configuration ---------------------------------------------------------------------------
    def apply(self, config: AgentConfig) -> None:
        """Apply batching, result and camera settings; cameras whose source changed are reopened."""
        self._configure_batching(config.batching)
        self.top_k = config.results.top_k
        wanted = {c.name: c for c in config.cameras}
        for name in list(self.cameras):
            camera = self.cameras[name]
            new = wanted.get(name)
            if new is None or (new.source, new.backend) != (camera.config.source, camera.config.backend):
                camera.stop()
                del self.cameras[name]
                self.queue.remove_camera(name)
            elif new != camera.config:
                camera.update(new)
        for name, camera_config in wanted.items():
            if name not in self.cameras:
                self._add_camera(camera_config)

    def _configure_batching(self, batching: BatchingConfig) -> None:
        self._batching = batching
        engine_max = self.serving.bundle.batch_range[1]
        limit = min(batching.max_batch or engine_max, engine_max)
        self.policy.configure(batching.latency_budget_ms / 1e3, limit, batching.mode, batching.fixed_batch)

    # -- swapping engines --------------------------------------------------------------------------
    def swap(self, serving: Serving, cancel: threading.Event, timeout_s: float = 60.0) -> dict[str, float | None]:
        """Put ``serving`` in service between two batches; returns the pause and gap in ms.

        The caller has verified the engine; its input spec must be this pipeline's, because
        cameras preprocess for it. The gap (to the new engine's first result) is only measured:
        with no frames coming it would wait ``timeout_s``, so ``cancel`` (the agent stopping) ends
        that wait and the gap is reported as unknown.
        """
        if serving.bundle.input_spec != self.spec:
            raise ValueError(
                f"{serving.bundle.bundle_id} expects {serving.bundle.input_spec}, the cameras feed {self.spec}"
            )
        with self._swap_lock:
            request = self._swap = _Swap(serving)
            if not self._thread.is_alive():
                self._apply_swap()
            elif not request.done.wait(timeout_s):
                raise TimeoutError(f"the inference thread did not take the new engine within {timeout_s:g} s")
        first_new = self._first_result_after(request, cancel, timeout_s)
        gap = (first_new - request.last_old_result) if first_new else None
        return {"pause_ms": round(request.pause_s * 1e3, 3), "gap_ms": None if gap is None else round(gap * 1e3, 3)}

    def _first_result_after(self, request: _Swap, cancel: threading.Event, timeout_s: float) -> float | None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.serving is request.serving:
            if self.last_batch_done > request.applied_at:
                return self.last_batch_done
            if cancel.wait(0.002):
                break
        return None

    def _apply_swap(self) -> None:
        """In the inference thread, between batches."""
        request = self._swap
        if request is None:
            return
        started = time.monotonic()
        request.last_old_result = self.last_batch_done
        max_batch = request.serving.bundle.batch_range[1]
        if max_batch > len(self._batches[0]):
            self._batches = [self._batch_buffer(max_batch) for _ in range(2)]
        self.serving = request.serving
        passport = PassportLatency.of(request.serving.bundle)
        self.policy.relearn(passport.p99, passport.mean, passport.runs_as)
        self._configure_batching(self._batching)
        self._swap = None
        request.applied_at = time.monotonic()
        request.pause_s = request.applied_at - started
        request.done.set()

    def _batch_buffer(self, max_batch: int) -> np.ndarray:
        return np.empty((max_batch, self.spec.height, self.spec.width, 3), np.uint8)

    def _add_camera(self, config: CameraConfig) -> None:
        self.queue.add_camera(config.name)
        camera = Camera(config, self.spec, self.queue, self.events)
        self.cameras[config.name] = camera
        if self._thread.is_alive():
            camera.start()

    # -- running ---------------------------------------------------------------------------------
    def start(self) -> Pipeline:
        self._thread.start()
        for camera in self.cameras.values():
            camera.start()
        return self

    def stop(self, drain: bool = True) -> None:
        """Stop cameras, finish the batch in flight (and, with ``drain``, what is queued), flush sinks."""
        for camera in self.cameras.values():
            camera.stop()
        for camera in self.cameras.values():  # each kills its decoder process: no read can hold the stop
            camera.join(timeout=STOP_WAIT_S)
        self._stop.set()
        self._thread.join(timeout=30)
        if drain and not self._thread.is_alive():  # a hung engine gets no more batches
            while self.queue.depth():
                self._step(timeout=0)
            self._finish()
        for sink in self.sinks:
            sink.close()

    def _run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            try:
                self._step(timeout=0.2)
                backoff = 0.1
            except Exception as exc:  # a bug or an impossible setting costs a step, never the thread
                self.inference_failures += 1
                self.last_inference_error = f"{type(exc).__name__}: {exc}"[:300]
                log.exception("inference step failed")
                self.events("inference", {"error": self.last_inference_error, "failures": self.inference_failures})
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    # -- supervision -----------------------------------------------------------------------------
    def supervise(self, now: float) -> None:
        """Restart a dead inference thread; replace a camera whose thread ended (a bug: its decoder is its own)."""
        if not self._stop.is_set() and self._thread.ident is not None and not self._thread.is_alive():
            self.inference_restarts += 1
            self.events("inference", {"restarted": True, "restarts": self.inference_restarts})
            self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
            self._thread.start()
        for name, camera in list(self.cameras.items()):
            reason = camera.failure(now)
            if reason is None:
                continue
            replacement = Camera(camera.config, self.spec, self.queue, self.events, replaces=camera)
            self.cameras[name] = replacement
            self.events(
                "camera", {"camera": name, "state": "restarting", "reason": reason, "restarts": replacement.restarts}
            )
            log.warning("camera %s: %s; restarting it (restart %d)", name, reason, replacement.restarts)
            replacement.start()

    def _step(self, timeout: float) -> None:
        if self._swap is not None:
            self._finish()  # the batch in flight is the old engine's
            self._apply_swap()
        if self._in_flight is not None and self._in_flight.ended():
            self._finish()
        flight = self._in_flight
        now = time.monotonic()
        sources = sum(c.state == CameraState.CONNECTED for c in self.cameras.values())
        self._decision = decision = self.policy.decide(self.queue.arrivals.rate(now), sources)
        shed_after = max(self.policy.budget - self.policy.latency(decision.batch), 0.0)
        into = self._batches[self._slot]
        stop_waiting = never
        if flight is not None:
            # the next batch's frames are taken as the one running is about to end: fresh, and in time to
            # start the moment it ends; they stop waiting to fill when it ends
            ticket, stop_waiting = flight.ticket, flight.ended
            if ticket.started is not None:
                ticket.done.wait(ticket.started + self.policy.typical(ticket.n) - TAKE_LEAD_S - now)
        infos = self.queue.take(decision.batch, decision.max_wait, shed_after, into, timeout, stop_waiting)
        if not infos:
            self._finish()
            return
        serving = self.serving
        shadow = serving.shadow
        held_back = shadow if shadow is not None and shadow.holdback_due() else None  # the previous engine serves
        submitted = self._submit(infos, into[: len(infos)], serving, held_back)
        self._finish()  # the batch before, which the engine ended or is ending
        self._in_flight, self._slot = submitted, 1 - self._slot
        if shadow is not None:  # during a canary one batch at a time: both engines are timed alike
            self._finish()

    def _submit(
        self, infos: list[FrameInfo], images: np.ndarray, serving: Serving, held_back: Shadow | None
    ) -> _InFlight | None:
        """Start a batch on its engine's worker, queued behind the batch in flight there."""
        try:
            ticket = _engine(serving, held_back).submit(images, self.queue.wake)
        except Exception as exc:  # a failing engine must not kill the pipeline; every loss is counted
            self._failed(infos, serving, held_back, exc)
            return None
        return _InFlight(infos, images, serving, held_back, ticket)

    def _finish(self) -> None:
        """Wait for the batch in flight, if any, and hand its results on."""
        flight, self._in_flight = self._in_flight, None
        if flight is None:
            return
        infos, serving, held_back = flight.infos, flight.serving, flight.held_back
        try:
            logits, seconds = flight.engine.collect(flight.ticket), flight.ticket.seconds
        except Exception as exc:  # as in _submit
            self._failed(infos, serving, held_back, exc)
            return
        n = len(infos)
        done = time.monotonic()
        idx, scores = top_k(logits, self.top_k)
        if held_back:
            held_back.record_holdback(n, seconds)
            labels, engine_id = held_back.labels, held_back.bundle_id
        else:
            self.policy.observe(n, seconds)
            serving.batches += 1
            serving.frames += n
            serving.drift.observe(idx[:, 0], scores[:, 0])
            if serving.shadow is not None:
                serving.shadow.offer(flight.images, idx[:, 0], scores[:, 0], [i.camera for i in infos], seconds)
            labels, engine_id = serving.labels, serving.bundle.bundle_id
        results = make_results(infos, idx, scores, labels, engine_id, done, self.boot)
        for sink in self.sinks:
            sink.emit(results)
        for info in infos:
            counters = self.queue.counters[info.camera]
            counters.processed += 1
            counters.last_processed = done
        self.metrics.record_batch(n, seconds, np.asarray([done - i.arrived for i in infos]))
        self.last_batch_done = done

    def _failed(self, infos: list[FrameInfo], serving: Serving, held_back: Shadow | None, exc: Exception) -> None:
        self.metrics.engine_errors += 1
        if not held_back:
            serving.errors += 1
        for info in infos:
            self.queue.counters[info.camera].failed += 1
        bundle_id = held_back.bundle_id if held_back else serving.bundle.bundle_id
        self.events("engine", {"bundle_id": bundle_id, "error": str(exc), "frames": len(infos)})
        log.error("engine failed on a batch of %d: %s", len(infos), exc)

    # -- state -----------------------------------------------------------------------------------
    def healthy(self, now: float, stall_after: float) -> bool:
        """False while the inference thread is dead, or frames wait and no batch completed for ``stall_after`` s."""
        if not self._thread.is_alive():
            return False
        return not self.queue.depth() or now - self.last_batch_done < stall_after

    def inference_state(self, now: float) -> dict[str, Any]:
        return {
            "alive": self._thread.is_alive(),
            "failures": self.inference_failures,
            "restarts": self.inference_restarts,
            "last_error": self.last_inference_error,
            "seconds_since_batch": round(now - self.last_batch_done, 2),
        }

    def sources_ended(self) -> bool:
        return all(c.state in (CameraState.ENDED, CameraState.STOPPED) for c in self.cameras.values()) and not (
            self.queue.depth()
        )

    def camera_states(self) -> dict[str, dict[str, Any]]:
        states = {}
        for name, camera in self.cameras.items():
            c = self.queue.counters[name]
            counts = {
                "decoded": camera.decoded,
                "taken": c.taken,
                "processed": c.processed,
                "skipped": c.skipped,
                "shed": c.shed,
                "failed": c.failed,
            }
            # from the first frame to the latest frame or result, whichever is later: the span the run's rates cover
            active = max(camera.last_frame, c.last_processed) - camera.first_frame if camera.first_frame else 0.0
            states[name] = {
                "state": camera.state.value,
                "decode": camera.decode,
                "active_s": round(max(active, 0.0), 3),
                "error": camera.error,
                "reconnects": camera.reconnects,
                "restarts": camera.restarts,
                "counts": counts,
                "cost": {
                    "decode_cpu_s": camera.decode_cpu_s,
                    "preprocess_s": camera.preprocess_s,
                    "preprocessed": camera.preprocessed,
                },
            }
        return states

    def decision_summary(self) -> dict[str, float]:
        d = self._decision
        return {
            "batch": d.batch,
            "max_wait_ms": round(d.max_wait * 1e3, 2),
            "predicted_worst_ms": round(d.predicted_worst * 1e3, 2),
        }
