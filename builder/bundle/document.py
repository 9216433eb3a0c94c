"""The bundle's documents: the passport (what was measured), the manifest (what a device checks,
its ``requires`` included) and, for TensorRT INT8 without TensorRT, the gated recipe's report.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import onnx

from agent.engine.bundle import OLDEST_SCHEMA, PROVIDERS, file_digest, schema_of
from agent.engine.device import X86_INT8_FEATURES, DeviceInfo
from agent.stream.drift import output_profile
from builder.bundle.candidates import Candidate, Evaluation, Export
from builder.bundle.options import EngineOptions, cpu_flavour
from builder.bundle.writer import write_bundle
from builder.evaluate.measure import golden_set
from builder.evaluate.references import References
from builder.targets import openvino as openvino_engines

TENSORRT_RECIPE_MODEL = "model-int8-qdq.onnx"
TENSORRT_RECIPE_REPORT = "recipe.json"
# Oldest ONNX Runtime that reads a given ONNX IR version / default-domain opset.
ORT_FOR_IR = {8: "1.12", 9: "1.15", 10: "1.18", 11: "1.21"}
ORT_FOR_OPSET = {17: "1.14", 18: "1.14", 19: "1.16", 20: "1.17", 21: "1.18", 22: "1.20", 23: "1.22"}


def engine_requirements(options: EngineOptions, chosen: Candidate, device: DeviceInfo) -> dict[str, Any]:
    """What a device must have to run ``chosen`` as built on ``device`` (the manifest's ``requires``)."""
    engine = chosen.files[0]
    # CPU features an x86 device needs for this engine's INT8 kernels to be exact (none for 7-bit weights)
    full_range = options.precision == "int8" and cpu_flavour(options, device) == "cpu"
    features = sorted(X86_INT8_FEATURES) if full_range and device.arch in ("x86_64", "AMD64") else []
    if chosen.backend == "openvino":
        return openvino_engines.requirements(options.precision, chosen.target or options.target, device, features)
    if options.target == "tensorrt":
        return {
            "tensorrt": device.tensorrt,
            "compute_capability": device.compute_capability,
            "jetson_model": device.jetson_model,
        }
    proto = onnx.load(str(engine), load_external_data=False)
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    minimum = max(
        (ORT_FOR_IR.get(proto.ir_version, "1.18"), ORT_FOR_OPSET.get(opset, "1.18")),
        key=lambda v: tuple(map(int, v.split("."))),
    )
    requires: dict[str, Any] = {"onnxruntime": f">={minimum},<2", "providers": [PROVIDERS[options.target]]}
    if features:
        requires["cpu_features_any"] = features
    return requires


def write_tensorrt_recipe(
    out: Path,
    chosen: Candidate,
    candidates: list[Candidate],
    skipped: list[dict[str, str]],
    evaluated_on: str,
    options: EngineOptions,
    baseline: dict[str, Any] | None,
) -> dict[str, Any]:
    """The gated Q/DQ graph and its report, for building the plan where TensorRT is."""
    assert chosen.accuracy is not None and chosen.logits is not None  # a measured candidate
    out.mkdir()
    shutil.copy2(chosen.files[0], out / TENSORRT_RECIPE_MODEL)
    report = {
        "schema": OLDEST_SCHEMA,
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "engine": {
            "target": "tensorrt",
            "precision": "int8",
            "chosen": chosen.label,
            "quantization": chosen.quantization,
        },
        "evaluation_set": {"description": evaluated_on, "images": len(chosen.logits)},
        "calibration_set": options.calib,
        "accuracy": asdict(chosen.accuracy),
        "accuracy_measured_with": "onnxruntime-cpu (Q/DQ as simulated quantization)",
        "gate": {**asdict(options.gate), "passed": not chosen.misses, "misses": chosen.misses},
        "candidates": [c.summary() for c in candidates],
        "not_tried": skipped,
        "baseline": baseline,
        "parser_checked_for_tensorrt": options.tensorrt_version,
        "plan": "not built: this machine has no TensorRT. It is built on the device (TensorRT 10) with the same "
        "command, which repeats this recipe search and gate there and then builds the plan from the Q/DQ graph.",
    }
    (out / TENSORRT_RECIPE_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report


def write_signed_bundle(
    out: Path,
    export: Export,
    rewrites: tuple[str, ...],
    options: EngineOptions,
    evaluation: Evaluation,
    evaluated_on: str,
    labels: list[str],
    key: Any,
    chosen: Candidate,
    candidates: list[Candidate],
    skipped: list[dict[str, str]],
    baseline: dict[str, Any] | None,
    references: References | None = None,
) -> tuple[Path, dict[str, Any]]:
    """The passport, manifest and signed bundle of the chosen candidate (an embedding model's with its
    references, which the device scores each embedding against)."""
    assert chosen.accuracy is not None and chosen.logits is not None  # a measured candidate
    device, batch = evaluation.device, options.max_batch
    engine_sha = file_digest(chosen.files[0])["sha256"]
    name = options.name or Path(export.source["checkpoint"]).stem
    target = chosen.target or options.target
    bundle_id = f"{name}-{options.version}-{target}-{options.precision}-{engine_sha[:8]}"
    golden = golden_set(evaluation.images, evaluation.reference_scores, chosen.logits, options.golden)
    output = (
        {"kind": "embeddings", "width": int(references.vectors.shape[1]), "references": len(references.names)}
        if references
        else None
    )
    passport = {
        "schema": 2 if output else OLDEST_SCHEMA,
        "bundle_id": bundle_id,
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "engine": {
            "target": target,
            "precision": options.precision,
            "chosen": chosen.label,
            "choice": chosen.choice,
            "quantization": chosen.quantization,
            "rewrites": list(rewrites),
        },
        "evaluation_set": {"description": evaluated_on, "images": len(evaluation.images)},
        "calibration_set": options.calib,
        "accuracy": asdict(chosen.accuracy),
        "gate": {
            **asdict(options.gate),
            "passed": not chosen.misses,
            "misses": chosen.misses,
            "accepted_accuracy_loss": bool(chosen.misses),
        },
        "latency": chosen.profile["latency"] if chosen.profile else None,
        "peak_rss_mib": chosen.profile["peak_rss_mib"] if chosen.profile else None,
        "measured_on": {
            **device.describe(),
            "cpu": platform.processor() or platform.machine(),
            "latency_measured": chosen.profile is not None,
        },
        "candidates": [c.summary() for c in candidates],
        "not_tried": skipped,  # what this build machine left out, and what would add it
        "outputs": output_profile(chosen.logits),  # the agent's drift reference
        "baseline": baseline,  # what a canary against that engine should expect (builder.evaluate.baseline)
        "golden": {"images": len(golden["images"]), "allowed_error": float(golden["allowed_error"])},
        **({"output": {**output, "references_from": references.origin}} if references and output else {}),
    }
    manifest = {
        "schema": OLDEST_SCHEMA,
        "bundle_id": bundle_id,
        "created": passport["built"],
        "model": {
            "name": name,
            "version": options.version,
            "architecture": export.architecture["name"],
            "checkpoint": export.source["checkpoint"],
            "checkpoint_sha256": export.source["sha256"],
            "onnx_sha256": file_digest(export.model)["sha256"],
        },
        "engine": {
            "backend": chosen.backend,
            "target": target,
            "precision": options.precision,
            "quantization": chosen.quantization,
            "batch": {"min": 1, "opt": batch, "max": batch},
            **({"images_per_stream": chosen.images_per_stream} if chosen.backend == "openvino" else {}),
        },
        "input": json.loads(export.spec.to_json()),
        "requires": engine_requirements(options, chosen, device),
        "accepted_accuracy_loss": bool(chosen.misses),
        **({"output": output} if output else {}),
    }
    manifest["schema"] = schema_of(manifest)
    vectors = references.vectors if references else None
    return write_bundle(out, chosen.files, labels, passport, golden, manifest, key, vectors), passport
