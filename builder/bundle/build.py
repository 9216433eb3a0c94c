"""The engine job: verified export -> candidate engines -> passport and gate -> signed bundle.

The steps live beside it: what was asked (:mod:`~builder.bundle.options`), the candidates and the
choice among them (:mod:`~builder.bundle.candidates`), and the documents a bundle carries
(:mod:`~builder.bundle.document`). The passport keeps the figures of every candidate. A build with
no candidate inside the budget produces no bundle unless ``accept_accuracy_loss`` is set, which the
passport then records. With a ``baseline`` (the bundle or export the new engine replaces), the
passport also records what a device's canary should expect of the pair, and a new model less
accurate than its baseline beyond the top-1 budget is refused the same way
(:mod:`builder.evaluate.baseline`).
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.progress import Progress

from agent.engine.device import DeviceInfo
from agent.engine.runtimes import open_engine
from agent.engine.signing import load_private_key
from agent.engine.similarity import SimilarityHead
from builder.bundle.candidates import (
    Candidate,
    Evaluation,
    Export,
    choose,
    make_candidates,
    mixed_precision,
    output_width,
    plan_settings,
    rewritten,
)
from builder.bundle.document import write_signed_bundle, write_tensorrt_recipe
from builder.bundle.options import EngineOptions, check_options, checked_tensorrt, not_tried
from builder.errors import BuildError, GateError
from builder.evaluate.baseline import Baseline, baseline_misses, bundle_baseline, compare_with_baseline, is_bundle
from builder.evaluate.datasets import evaluation_set, load_labels
from builder.evaluate.measure import logits
from builder.evaluate.references import prototypes, read_references
from builder.memory import return_large_blocks
from builder.progress import counter, step
from builder.targets.tensorrt_check import require_parsable
from builder.targets.tensorrt_plan import build_plan, tensorrt_version


@dataclass(frozen=True)
class BundleResult:
    path: Path
    chosen: Candidate
    candidates: list[Candidate]
    passport: dict[str, Any]  # the bundle's passport, or the TensorRT recipe's report
    bundle: bool = True  # False: a TensorRT INT8 recipe, gated here, whose plan is built on the device


def build_engine_bundle(
    export_dir: Path,
    out: Path,
    key_path: Path,
    options: EngineOptions = EngineOptions(),
    progress: Progress | None = None,
) -> BundleResult:
    """Build, measure, gate and sign; raises :class:`BuildError` (``GateError`` for the gate).

    TensorRT INT8 on a machine without TensorRT gates the Q/DQ recipe in ONNX Runtime and writes it with its
    report to ``out`` instead of a bundle (``BundleResult.bundle`` is False): the plan is built on the device.
    """
    progress = progress or Progress(disable=True)
    check_options(options)
    return_large_blocks()
    key = load_private_key(key_path)
    if out.exists():
        raise BuildError(f"{out} exists; choose another --out or remove it")
    export = Export.read(export_dir)
    embeddings = export.architecture.get("output") == "embeddings"
    given = read_references(options.references, output_width(export.architecture)) if options.references else None
    if options.references and not embeddings:
        raise BuildError("--references is for embedding models; this export outputs logits")
    classes = None if embeddings else int(export.architecture["num_classes"])
    labels = given.names if given else load_labels(options.labels, export.source["checkpoint"], options.eval, classes)
    evaluation_frames = evaluation_set(options.eval, labels, export.source["checkpoint"])
    images = evaluation_frames.preprocessed(export.spec)
    reference = open_engine("onnxruntime", "cpu", export.model, options.max_batch, options.threads, split_batches=False)
    reference_logits = logits(reference, images, options.max_batch, counter(progress, "evaluating the FP32 reference"))
    reference.close()
    references = None
    if embeddings:
        references = given or prototypes(
            reference_logits, evaluation_frames.labels, labels, evaluation_frames.description
        )
    evaluation = Evaluation(
        export,
        options,
        DeviceInfo.probe(),
        evaluation_frames,
        images,
        evaluation_frames.labels,
        reference_logits,
        progress,
        SimilarityHead(references.vectors) if references else None,
    )
    baseline = _baseline(options.baseline) if options.baseline else None
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.work-") as tmp:
        checked = slice(0, options.max_batch)
        source = rewritten(export, options, images[checked], reference_logits[checked], Path(tmp), progress)
        candidates, search = make_candidates(source, options, Path(tmp), progress)
        for c in candidates:
            evaluation.measure(c)
        tried = mixed_precision(search, candidates, evaluation) if search else ""
        evaluation.runoff(candidates)
        chosen = choose(candidates, options, tried)
        skipped = not_tried(options, evaluation.device)
        against = _against(baseline, chosen, evaluation, labels) if baseline else None
        if options.target == "tensorrt" and options.precision == "int8":
            require_parsable(chosen.files[0], checked_tensorrt(options))  # the gated Q/DQ graph, before any device
            if tensorrt_version() is None:
                report = write_tensorrt_recipe(
                    out, chosen, candidates, skipped, evaluation_frames.description, options, against
                )
                return BundleResult(out, chosen, candidates, report, bundle=False)
            with step(progress, "building TensorRT int8 plan from the gated Q/DQ graph"):
                plan = build_plan(chosen.files[0], Path(tmp) / "model.plan", plan_settings(export, options))
            assert chosen.accuracy is not None  # measured
            quant = {**(chosen.quantization or {}), "qdq_accuracy": asdict(chosen.accuracy)}
            chosen = evaluation.measure(Candidate("tensorrt int8", "tensorrt", [plan], quant))
            candidates.append(chosen)
            chosen = choose([chosen], options)
        evaluation.serving_layout(chosen)
        evaluation.profile_every_size(chosen)
        path, passport = write_signed_bundle(
            out,
            export,
            source.rewrites,
            options,
            evaluation,
            evaluation_frames.description,
            labels,
            key,
            chosen,
            candidates,
            skipped,
            against,
            references,
        )
    return BundleResult(path, chosen, candidates, passport)


def _baseline(path: Path) -> Baseline:
    if is_bundle(path):
        return bundle_baseline(path)
    export = Export.read(path)
    return Baseline(
        path.name, None, export.source.get("sha256"), 1.0, "onnxruntime", "cpu", export.model, export.spec, None
    )


def _against(baseline: Baseline, chosen: Candidate, evaluation: Evaluation, labels: list[str]) -> dict[str, Any]:
    """The chosen engine against the baseline; a GateError when it is less accurate beyond the budget."""
    options = evaluation.options
    assert chosen.logits is not None  # measured
    with step(evaluation.progress, f"comparing with the baseline {baseline.name}"):
        section = compare_with_baseline(
            baseline,
            evaluation.frames,
            chosen.logits,
            labels,
            options.max_batch,
            options.threads,
        )
    misses = baseline_misses(section, options.gate)
    if misses and not options.accept_accuracy_loss:
        raise GateError(f"no bundle: {misses[0]}; --accept-accuracy-loss ships it anyway and records that it did")
    section["accepted_accuracy_loss"] = bool(misses)
    return section
