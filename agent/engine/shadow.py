"""The previous engine beside the new one during a canary: agreement and latency evidence.

Agreement: every ``every``-th batch the new engine served is copied (into preallocated
buffers) to a shadow thread, which runs it on the previous engine and records, per frame,
whether the top-1 classes agree, both confidences and both classes, into time blocks
(:class:`agent.lifecycle.canary.Blocks`, handed in by the lifecycle). A sample is skipped,
never queued, while the shadow is busy, so the serving path never waits for it.

Latency: both engines are timed by the inference thread, on live batches, under the same
conditions. Every ``latency_every``-th batch, when the shadow is idle, is a *holdback*:
served by the previous engine (its results carry the previous engine's id); the next batch,
served by the new engine, is its pair when it has the same size. Neither timing overlaps a
shadow run (only the inference thread starts one), and each engine of a pair runs right
after the other one did, so neither finds the caches warmer. Timing the new engine in the
inference thread and the previous one in a thread running beside it made whichever engine
was new look twice as slow, in both directions of a swap.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from typing import Any, Protocol

import numpy as np

from agent.engine.worker import WorkerEngine

log = logging.getLogger("edgevit.shadow")
MAX_PAIRS = 100_000  # latency pairs kept (the quantile bounds need no more); later ones are not recorded
MAX_BLOCKS = 2_000  # agreement blocks kept: over an hour at the shortest block length


class Evidence(Protocol):
    """Where shadow runs go: time blocks of per-frame outcomes (:class:`agent.lifecycle.canary.Blocks`)."""

    closed: list[Any]

    def add(
        self,
        at: float,
        cameras: list[str],
        agree: np.ndarray,
        confidence_new: np.ndarray,
        confidence_old: np.ndarray,
        top1_new: np.ndarray,
        top1_old: np.ndarray,
    ) -> None: ...


def top1(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 class and its softmax probability per row."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    return logits.argmax(axis=1), 1 / probs.sum(axis=1)


class Shadow:
    def __init__(
        self,
        engine: WorkerEngine,
        bundle_id: str,
        labels: list[str],
        every: int,
        latency_every: int,
        batch_shape: tuple[int, ...],
        blocks: Evidence,
    ) -> None:
        self.engine, self.bundle_id, self.labels = engine, bundle_id, labels
        self.every, self.latency_every = every, latency_every
        self._images = np.empty(batch_shape, np.uint8)
        self._top1 = np.empty(batch_shape[0], np.int64)
        self._confidence = np.empty(batch_shape[0], np.float32)
        self._cameras: list[str] = []
        self._n = 0
        self._served = 0  # new-engine batches since the canary began
        self._holdback: tuple[int, float] | None = None  # (batch size, seconds) awaiting its pair
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.blocks = blocks
        self.frames = self.agreeing = self.errors = 0
        self.holdbacks = 0
        self.new_s: list[float] = []  # paired timings, each list sorted
        self.previous_s: list[float] = []
        self._thread = threading.Thread(target=self._run, name="shadow", daemon=True)
        self._thread.start()

    # -- the inference thread's side ------------------------------------------------------------
    def holdback_due(self) -> bool:
        """Whether the next batch goes to the previous engine to be timed (the shadow is idle then)."""
        return (
            self._served >= self.latency_every
            and self._holdback is None
            and not self._ready.is_set()
            and len(self.new_s) < MAX_PAIRS
        )

    def record_holdback(self, n: int, seconds: float) -> None:
        """The previous engine served a batch of ``n`` in ``seconds``; the next new batch is its pair."""
        self._holdback = (n, seconds)
        self._served = 0
        self.holdbacks += 1

    def offer(
        self, images: np.ndarray, top1: np.ndarray, confidence: np.ndarray, cameras: list[str], seconds: float
    ) -> None:
        """After each batch the new engine served: pairs its timing, samples it for agreement when due."""
        self._served += 1
        if self._holdback is not None:
            held, self._holdback = self._holdback, None
            if held[0] == len(images):
                with self._lock:
                    bisect.insort(self.previous_s, held[1])
                    bisect.insort(self.new_s, seconds)
        if self._served % self.every or self._ready.is_set():
            return
        n = len(images)
        self._images[:n] = images
        self._top1[:n] = top1
        self._confidence[:n] = confidence
        self._cameras = cameras
        self._n = n
        self._ready.set()

    # -- the shadow thread ------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._ready.wait(0.2):
                continue
            n = self._n
            try:
                logits = self.engine.run(self._images[:n])
            except Exception as exc:  # the previous engine failing says nothing against the new one
                log.warning("shadow run on the previous engine failed: %s", exc)
                with self._lock:
                    self.errors += 1
                self._ready.clear()
                continue
            classes, confidence = top1(logits)
            agree = classes == self._top1[:n]
            with self._lock:
                self.frames += n
                self.agreeing += int(agree.sum())
                if len(self.blocks.closed) < MAX_BLOCKS:
                    self.blocks.add(
                        time.monotonic(),
                        self._cameras,
                        agree,
                        self._confidence[:n],
                        confidence,
                        self._top1[:n],
                        classes,
                    )
            self._ready.clear()

    # -- what the canary reads ----------------------------------------------------------------------
    def evidence(self) -> tuple[list[Any], list[float], list[float]]:
        """Closed agreement blocks and the two sorted timing lists, copied under the lock."""
        with self._lock:
            return list(self.blocks.closed), list(self.new_s), list(self.previous_s)

    def figures(self) -> dict[str, Any]:
        with self._lock:
            return {
                "shadow_frames": self.frames,
                "agreement": round(self.agreeing / self.frames, 4) if self.frames else None,
                "shadow_errors": self.errors,
                "blocks": len(self.blocks.closed),
                "latency_pairs": len(self.new_s),
                "holdbacks": self.holdbacks,
            }

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
