"""The new engine against the one it replaces (``--baseline``): what a device's canary should expect.

A retrained model disagrees with its predecessor exactly where it improved, so a device
cannot judge "agrees less than before" as worse without knowing how much less to expect.
The build knows: it runs the baseline (a bundle, or a verified export) on the same
evaluation frames and records in the passport their top-1 agreement with a 95 % interval,
both accuracies and the baseline's identity. The device's canary then tests live agreement
against that figure (:func:`agent.lifecycle.canary.expectation_for`).

A new model measured *less* accurate than its baseline by more than the gate's top-1 budget
is refused like a lossy quantization (``--accept-accuracy-loss`` ships it, recorded).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.engine.bundle import MANIFEST, BundleError, file_digest, verify_bundle
from agent.engine.preprocess import InputSpec
from agent.engine.runtimes import EngineError, open_engine
from agent.engine.similarity import with_references
from agent.lifecycle.canary import wilson
from builder.errors import BuildError
from builder.evaluate.datasets import Frames
from builder.evaluate.measure import Gate, logits


@dataclass(frozen=True)
class Baseline:
    """An engine to compare with: a bundle (what devices run) or a verified export (its FP32 model)."""

    name: str  # the bundle id, or the export's folder name
    bundle_id: str | None
    source_sha256: str | None  # the checkpoint it was made from
    fp32_agreement: float  # its own top-1 agreement with that checkpoint's FP32 export
    backend: str
    target: str
    engine: Path
    spec: InputSpec
    labels: list[str] | None
    references: Path | None = None  # an embedding model's bundle: its engine is scored against them


def bundle_baseline(path: Path) -> Baseline:
    """A bundle folder as the baseline (its hashes checked; the signature is the builder's own business)."""
    try:
        bundle = verify_bundle(path, None)
    except BundleError as exc:
        raise BuildError(f"--baseline {path}: {exc}") from exc
    agreement = (bundle.passport.get("accuracy") or {}).get("top1_agreement", 1.0)
    return Baseline(
        bundle.bundle_id,
        bundle.bundle_id,
        bundle.manifest["model"].get("checkpoint_sha256"),
        float(agreement),
        bundle.backend,
        bundle.target,
        bundle.engine_path,
        bundle.input_spec,
        bundle.labels,
        bundle.references_path,
    )


def is_bundle(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def compare_with_baseline(
    baseline: Baseline,
    frames: Frames,
    engine_logits: np.ndarray,
    labels: list[str],
    max_batch: int,
    threads: int | None,
) -> dict[str, Any]:
    """The passport's ``baseline`` section: both engines on the same evaluation frames."""
    if baseline.labels is not None and baseline.labels != labels:
        raise BuildError(
            f"--baseline {baseline.name} has other classes ({len(baseline.labels)}: {', '.join(baseline.labels[:5])}"
            f"...): agreement between the two is undefined"
        )
    try:
        engine = open_engine(
            baseline.backend, baseline.target, baseline.engine, max_batch, threads, split_batches=False
        )
        engine = with_references(engine, baseline.references)
    except EngineError as exc:
        raise BuildError(f"--baseline {baseline.name} cannot run on this machine: {exc}") from exc
    try:
        found = logits(engine, frames.preprocessed(baseline.spec), max_batch, lambda done, total: None)
    finally:
        engine.close()
    if found.shape != engine_logits.shape:
        raise BuildError(
            f"--baseline {baseline.name} has {found.shape[1]} classes, the new engine {engine_logits.shape[1]}"
        )
    agreement = float((found.argmax(-1) == engine_logits.argmax(-1)).mean())
    baseline_top1 = float((found.argmax(-1) == frames.labels).mean())
    engine_top1 = float((engine_logits.argmax(-1) == frames.labels).mean())
    low, high = wilson(agreement, len(found))
    return {
        "name": baseline.name,
        "bundle_id": baseline.bundle_id,
        "engine_sha256": file_digest(baseline.engine)["sha256"],
        "source_sha256": baseline.source_sha256,
        "fp32_agreement": baseline.fp32_agreement,
        "images": len(found),
        "top1_agreement": agreement,
        "interval": [low, high],
        "baseline_top1": baseline_top1,
        "engine_top1": engine_top1,
        "top1_change_points": round((engine_top1 - baseline_top1) * 100, 6),
    }


def baseline_misses(section: dict[str, Any], gate: Gate) -> list[str]:
    """How the new engine falls short of its baseline's accuracy beyond the gate's top-1 budget."""
    drop, budget = -section["top1_change_points"], gate.max_top1_drop_points
    if drop <= budget:
        return []
    return [
        f"top-1 {section['engine_top1']:.2%} is {drop:.2f} points under the baseline {section['name']}'s "
        f"{section['baseline_top1']:.2%} on the same {section['images']} images, {drop - budget:.2f} over the "
        f"budget of {budget:g}"
    ]
