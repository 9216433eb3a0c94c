"""The passport: what was measured about an engine before it may ship.

Accuracy is always relative to the FP32 reference export, on the same preprocessed
frames: top-1 of both, the drop in points, top-1 agreement and logit error. An embedding
model is judged on its embeddings (cosine similarity to FP32, gated) and, through the
bundle's references (:mod:`agent.engine.similarity`), on the top-1 of its similarity
scores as a classifier would be. The gate
turns those figures into a verdict with a budget; latency and memory come from a
separate process that serves only the engine (``python -m agent.engine.profile``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from agent.engine.runtimes import Engine
from agent.engine.similarity import SimilarityHead
from builder.errors import BuildError


@dataclass(frozen=True)
class Accuracy:
    images: int
    reference_top1: float
    engine_top1: float
    top1_drop_points: float
    top1_agreement: float
    max_abs_logit_error: float  # of the raw output: an embedding model's embeddings
    mean_abs_logit_error: float
    mean_cosine: float | None = None  # an embedding model's: per frame, to the FP32 embedding
    min_cosine: float | None = None


@dataclass(frozen=True)
class Gate:
    max_top1_drop_points: float = 1.0
    min_top1_agreement: float = 0.99
    min_cosine: float = 0.99  # embedding models: the mean cosine similarity to FP32's embeddings

    def misses(self, accuracy: Accuracy) -> list[str]:
        """Each way ``accuracy`` is outside the budget, with by how much."""
        misses = []
        if accuracy.mean_cosine is not None and accuracy.mean_cosine < self.min_cosine:
            misses.append(
                f"mean cosine similarity to FP32's embeddings is {accuracy.mean_cosine:.4f}, under the required "
                f"{self.min_cosine:g} (worst frame {accuracy.min_cosine:.4f})"
            )
        if accuracy.top1_drop_points > self.max_top1_drop_points:
            over = accuracy.top1_drop_points - self.max_top1_drop_points
            misses.append(
                f"top-1 dropped {accuracy.top1_drop_points:.2f} points, {over:.2f} over the budget of "
                f"{self.max_top1_drop_points:g}"
            )
        if accuracy.top1_agreement < self.min_top1_agreement:
            short = (self.min_top1_agreement - accuracy.top1_agreement) * 100
            misses.append(
                f"top-1 agreement with FP32 is {accuracy.top1_agreement:.2%}, {short:.2f} points under the "
                f"required {self.min_top1_agreement:.0%}"
            )
        return misses


def logits(engine: Engine, images: np.ndarray, batch_size: int, on_batch: Callable[[int, int], None]) -> np.ndarray:
    total = -(-len(images) // batch_size)
    out = []
    for i, start in enumerate(range(0, len(images), batch_size), 1):
        out.append(engine.run(images[start : start + batch_size]))
        on_batch(i, total)
    return np.concatenate(out)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    norms = np.maximum(np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1), 1e-12)
    similarity: np.ndarray = (a64 * b64).sum(axis=1) / norms
    return similarity


def compare(
    reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray, head: SimilarityHead | None = None
) -> Accuracy:
    """``candidate``'s outputs against the FP32 ``reference``'s; with ``head``, both are embeddings, compared by
    cosine similarity, and top-1 is of their similarity scores to the references."""
    if head is not None:
        scored = compare(head.scores(reference), head.scores(candidate), labels)
        error, similarity = np.abs(candidate - reference), cosine(reference, candidate)
        return replace(
            scored,
            max_abs_logit_error=float(error.max()),
            mean_abs_logit_error=float(error.mean()),
            mean_cosine=float(similarity.mean()),
            min_cosine=float(similarity.min()),
        )
    ref_top1 = float((reference.argmax(-1) == labels).mean())
    eng_top1 = float((candidate.argmax(-1) == labels).mean())
    error = np.abs(candidate - reference)
    return Accuracy(
        images=len(labels),
        reference_top1=ref_top1,
        engine_top1=eng_top1,
        top1_drop_points=round((ref_top1 - eng_top1) * 100, 6),
        top1_agreement=float((candidate.argmax(-1) == reference.argmax(-1)).mean()),
        max_abs_logit_error=float(error.max()),
        mean_abs_logit_error=float(error.mean()),
    )


def profile_engine(
    path: Path,
    backend: str,
    target: str,
    size: int,
    batches: list[int],
    max_seconds: float,
    threads: int | None,
    images_per_stream: int = 1,
) -> dict:
    """Latency per batch size and peak RSS of a process serving only this engine."""
    command = [
        sys.executable,
        "-m",
        "agent.engine.profile",
        str(path),
        "--backend",
        backend,
        "--target",
        target,
        "--size",
        str(size),
        "--batches",
        *map(str, batches),
        "--max-seconds",
        str(max_seconds),
        "--images-per-stream",
        str(images_per_stream),
    ]
    if threads:
        command += ["--threads", str(threads)]
    proc = subprocess.run(command, capture_output=True, text=True, errors="replace")
    if proc.returncode != 0:
        raise BuildError(f"profiling {path.name} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def golden_set(images: np.ndarray, reference: np.ndarray, candidate: np.ndarray, count: int) -> dict[str, np.ndarray]:
    """The first ``count`` frames with FP32 reference logits, and the error a device may show.

    The allowance is twice what the engine showed here plus 0.1 % of the logit range:
    another CPU or GPU rounds differently, a broken engine is off by far more.
    """
    images, reference, candidate = images[:count], reference[:count], candidate[:count]
    allowed = 2 * float(np.abs(candidate - reference).max()) + 1e-3 * max(1.0, float(np.abs(reference).max()))
    return {"images": images, "reference": reference.astype(np.float32), "allowed_error": np.float32(allowed)}
