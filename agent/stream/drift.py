"""Output drift: does the engine see the world the passport says it was measured on?

The builder stores an output profile in the passport (mean top-1 confidence and the
share of each class on its evaluation set). On the device a fixed-size window of
live top-1 classes and confidences is kept in preallocated arrays; the metrics
report the confidence drift (live minus reference) and the class-mix distance (total
variation: half the L1 distance between the two class distributions, 0 = same mix,
1 = disjoint). Neither is judged here: a camera pointed at a wall is drift, not a bug.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from agent.stream.results import top_k


def output_profile(logits: np.ndarray) -> dict[str, Any]:
    """The reference the passport keeps: mean top-1 confidence and the class mix."""
    classes, confidence = top_k(logits, 1)
    mix = np.bincount(classes[:, 0], minlength=logits.shape[1]) / len(logits)
    return {
        "frames": len(logits),
        "mean_confidence": round(float(confidence.mean()), 6),
        "class_mix": [round(float(x), 6) for x in mix],
    }


class DriftMonitor:
    def __init__(self, reference: dict[str, Any] | None, classes: int, window: int = 2048) -> None:
        self.reference = reference
        self._classes = np.zeros(window, np.int64)
        self._confidence = np.zeros(window, np.float32)
        self._count = 0
        self._n_classes = classes
        self._lock = threading.Lock()

    def observe(self, classes: np.ndarray, confidence: np.ndarray) -> None:
        """Add a batch's top-1 classes and confidences (ring buffer: two slice copies, no allocation)."""
        with self._lock:
            size, n = len(self._classes), len(classes)
            start = self._count % size
            head = min(n, size - start)
            self._classes[start : start + head] = classes[:head]
            self._confidence[start : start + head] = confidence[:head]
            self._classes[: n - head] = classes[head:]
            self._confidence[: n - head] = confidence[head:]
            self._count += n

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            n = min(self._count, len(self._classes))
            classes, confidence = self._classes[:n].copy(), self._confidence[:n].copy()
        if not n:
            return {"frames": 0}
        live_confidence = float(confidence.mean())
        figures: dict[str, Any] = {"frames": n, "mean_confidence": round(live_confidence, 4)}
        if self.reference:
            mix = np.bincount(classes, minlength=self._n_classes) / n
            reference_mix = np.asarray(self.reference["class_mix"])
            if len(reference_mix) == len(mix):
                figures["class_mix_distance"] = round(float(np.abs(mix - reference_mix).sum() / 2), 4)
            figures["confidence_drift"] = round(live_confidence - self.reference["mean_confidence"], 4)
        return figures
