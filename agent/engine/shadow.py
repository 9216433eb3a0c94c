"""Shadow runs during a canary: the previous engine sees a sample of the same live batches.

Every ``every``-th batch the new engine served is copied (into a preallocated buffer)
to a shadow thread, which runs it on the previous engine and records whether the
top-1 classes agree and how long each engine took on that very batch. A sample is
skipped rather than queued when the shadow is still busy, so the serving path never
waits for it. The paired latencies make the canary's tail-latency comparison like for
like: same frames, same batch size, same moment.

The tail compared is :func:`agent.engine.profile.tail_quantile` of the pairs: p99 once there
are enough of them, a lower quantile before.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np

from agent.engine.profile import tail_quantile
from agent.engine.runtimes import Engine

log = logging.getLogger("edgevit.shadow")
MAX_PAIRS = 4096


class Shadow:
    def __init__(self, engine: Engine, every: int, batch_shape: tuple[int, ...]) -> None:
        self.engine, self.every = engine, every
        self._images = np.empty(batch_shape, np.uint8)
        self._top1 = np.empty(batch_shape[0], np.int64)
        self._n, self._serving_s = 0, 0.0
        self._offered = 0
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.frames = self.agreeing = self.errors = 0
        self.serving_s: list[float] = []
        self.previous_s: list[float] = []
        self._thread = threading.Thread(target=self._run, name="shadow", daemon=True)
        self._thread.start()

    def offer(self, images: np.ndarray, top1: np.ndarray, serving_s: float) -> None:
        """Called by the inference thread after each batch; copies every ``every``-th when idle."""
        self._offered += 1
        if self._offered % self.every or self._ready.is_set():
            return
        n = len(images)
        self._images[:n] = images
        self._top1[:n] = top1
        self._n, self._serving_s = n, serving_s
        self._ready.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._ready.wait(0.2):
                continue
            n = self._n
            try:
                started = time.monotonic()
                logits = self.engine.run(self._images[:n])
                took = time.monotonic() - started
            except Exception as exc:  # the previous engine failing says nothing against the new one
                log.warning("shadow run on the previous engine failed: %s", exc)
                with self._lock:
                    self.errors += 1
                self._ready.clear()
                continue
            agree = int((logits.argmax(-1) == self._top1[:n]).sum())
            with self._lock:
                self.frames += n
                self.agreeing += agree
                if len(self.serving_s) < MAX_PAIRS:
                    self.serving_s.append(self._serving_s)
                    self.previous_s.append(took)
            self._ready.clear()

    def figures(self) -> dict[str, Any]:
        with self._lock:
            serving, previous = np.asarray(self.serving_s), np.asarray(self.previous_s)
            figures: dict[str, Any] = {"shadow_batches": len(serving), "shadow_frames": self.frames}
            figures["agreement"] = round(self.agreeing / self.frames, 4) if self.frames else None
            figures["shadow_errors"] = self.errors
        if len(serving):
            q = tail_quantile(len(serving))
            new, old = np.quantile(serving, q) * 1e3, np.quantile(previous, q) * 1e3
            figures["tail_quantile"] = round(q, 3)
            figures["tail_ms"] = round(float(new), 3)
            figures["previous_tail_ms"] = round(float(old), 3)
            figures["latency_ratio"] = round(float(new / max(old, 1e-6)), 3)
        return figures

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
