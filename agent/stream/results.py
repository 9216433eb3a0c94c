"""Turning a batch of logits into per-frame results, and the sinks that receive them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from agent.stream.frames import FrameInfo


def top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, softmax scores) of the k best classes per row, best first; vectorised over the batch."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=1, keepdims=True)
    k = min(k, logits.shape[1])
    idx = np.argpartition(-probs, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(probs, idx, axis=1).argsort(axis=1)[:, ::-1]
    idx = np.take_along_axis(idx, order, axis=1)
    return idx, np.take_along_axis(probs, idx, axis=1)


def make_results(
    infos: list[FrameInfo],
    idx: np.ndarray,
    scores: np.ndarray,
    labels: list[str],
    engine_id: str,
    done: float,
    boot: str,
) -> list[dict[str, Any]]:
    """One result per frame from :func:`top_k`'s (indices, scores).

    ``seq`` counts a camera's frames within one run of the agent, ``boot`` names that run: (camera, boot,
    seq) identifies a result across restarts, which a consumer of the at-least-once outbox dedupes by.
    """
    return [
        {
            "camera": info.camera,
            "boot": boot,
            "seq": info.seq,
            "captured": round(info.captured, 6),
            "top": [{"label": labels[c], "score": round(float(s), 6)} for c, s in zip(row, srow, strict=True)],
            "engine": engine_id,
            "latency_ms": round((done - info.arrived) * 1e3, 3),
            "batch": len(infos),
        }
        for info, row, srow in zip(infos, idx, scores, strict=True)
    ]


class ResultSink(Protocol):
    def emit(self, results: list[dict[str, Any]]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """One JSON object per line, flushed per batch so a crash loses at most the batch in flight."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (lives as long as the agent)

    def emit(self, results: list[dict[str, Any]]) -> None:
        self._file.write("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in results))
        self._file.flush()

    def close(self) -> None:
        self._file.close()
