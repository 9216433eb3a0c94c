"""The engine job: verified export -> candidate engines -> passport and gate -> signed bundle.

For INT8 on the CPU there are two candidates, static QDQ (calibrated) and dynamic;
both are measured and the passport decides: of those inside the accuracy budget, the
one with the highest throughput at the maximum batch ships, and the passport keeps
the figures of all of them. A build with no candidate inside the budget produces no
bundle unless ``accept_accuracy_loss`` is set, which the passport then records.
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from rich.progress import Progress

from agent.bundle import PROVIDERS, SCHEMA_VERSION, file_digest
from agent.device import X86_INT8_FEATURES, DeviceInfo
from agent.drift import output_profile
from agent.preprocess import METADATA_KEY, InputSpec
from agent.runtimes import open_engine
from agent.signing import load_private_key
from builder.bundle_writer import write_bundle
from builder.datasets import calibration_set, evaluation_set, load_labels
from builder.errors import BuildError
from builder.onnx_export import EXTERNAL_DATA_FILE, MODEL_FILE, read_metadata
from builder.passport import Accuracy, Gate, GateError, compare, golden_set, logits, profile_engine
from builder.precision import (
    ALL_OPS,
    WEIGHT_OPS,
    quantize_dynamic_int8,
    quantize_static_int8,
    require_quantized,
    to_fp16,
)
from builder.progress import counter, step
from builder.tensorrt_plan import PlanSettings, build_plan
from builder.verify import REPORT_FILE

TARGETS = {"cpu": ("fp32", "int8"), "cuda": ("fp32", "fp16"), "tensorrt": ("fp32", "fp16", "int8")}
# Oldest ONNX Runtime that reads a given ONNX IR version / default-domain opset.
ORT_FOR_IR = {8: "1.12", 9: "1.15", 10: "1.18", 11: "1.21"}
ORT_FOR_OPSET = {17: "1.14", 18: "1.14", 19: "1.16", 20: "1.17", 21: "1.18", 22: "1.20", 23: "1.22"}


@dataclass(frozen=True)
class EngineOptions:
    target: str = "cpu"
    precision: str = "fp32"
    eval: str = "demo"
    calib: str | None = None
    labels: Path | None = None
    max_batch: int = 8
    quantization: str = "auto"  # static | dynamic | auto (both, passport decides)
    calibration: str = "minmax"
    quantize_ops: str = "weights"  # weights (Gemm, Conv) | all (deliberately over-quantized)
    calibration_images: int = 128
    gate: Gate = field(default_factory=Gate)
    accept_accuracy_loss: bool = False
    name: str | None = None
    version: str = "1"
    golden: int = 8
    workspace_mib: int = 1024
    timing_cache: Path | None = None
    profile_seconds: float = 1.0
    threads: int | None = None


@dataclass
class Export:
    """A verified export folder, as written by ``edgevit-build export``."""

    files: list[Path]
    spec: InputSpec
    architecture: dict[str, Any]
    source: dict[str, str]

    @property
    def model(self) -> Path:
        return self.files[0]

    @classmethod
    def read(cls, folder: Path) -> Export:
        model = folder / MODEL_FILE
        if not model.is_file():
            raise BuildError(f"{folder} holds no {MODEL_FILE}: run edgevit-build export first")
        report_path = folder / REPORT_FILE
        if not report_path.is_file() or not json.loads(report_path.read_text()).get("passed"):
            raise BuildError(f"{folder} has no passing {REPORT_FILE}: only verified exports become engines")
        meta = read_metadata(model)
        if METADATA_KEY not in meta:
            raise BuildError(f"{model} lacks edgevit metadata: it was not exported by edgevit-build")
        files = [model] + ([folder / EXTERNAL_DATA_FILE] if (folder / EXTERNAL_DATA_FILE).is_file() else [])
        return cls(
            files,
            InputSpec.from_json(meta[METADATA_KEY]),
            json.loads(meta["edgevit.architecture"]),
            json.loads(meta["edgevit.source"]),
        )


@dataclass
class Candidate:
    """One way of building the requested engine, and what was measured of it."""

    label: str
    backend: str
    files: list[Path]
    quantization: dict[str, Any] | None = None
    accuracy: Accuracy | None = None
    misses: list[str] = field(default_factory=list)
    profile: dict[str, Any] | None = None
    logits: np.ndarray | None = None
    measured_with: str = ""

    def throughput(self) -> float:
        return self.profile["latency"][-1]["images_per_s"] if self.profile else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "quantization": self.quantization,
            "accuracy": asdict(self.accuracy) if self.accuracy else None,
            "gate_misses": self.misses,
            "latency": self.profile["latency"] if self.profile else None,
            "peak_rss_mib": self.profile["peak_rss_mib"] if self.profile else None,
            "measured_with": self.measured_with,
        }


@dataclass(frozen=True)
class BundleResult:
    path: Path
    chosen: Candidate
    candidates: list[Candidate]
    passport: dict[str, Any]


def _check(options: EngineOptions) -> None:
    if options.precision not in TARGETS.get(options.target, ()):
        allowed = ", ".join(f"{t}: {'/'.join(p)}" for t, p in TARGETS.items())
        raise BuildError(f"--precision {options.precision} is not offered for --target {options.target} ({allowed})")
    if options.max_batch < 1:
        raise BuildError("--max-batch must be at least 1")


def _candidates(export: Export, options: EngineOptions, work: Path, progress: Progress) -> list[Candidate]:
    """Build every candidate engine file for the requested target and precision."""
    model, size = export.model, export.spec.height
    if options.precision == "fp32" and options.target != "tensorrt":
        return [Candidate("fp32", "onnxruntime", export.files)]
    if options.precision == "fp16" and options.target == "cuda":
        return [Candidate("fp16", "onnxruntime", [to_fp16(model, work / "model-fp16.onnx")])]
    op_types = ALL_OPS if options.quantize_ops == "all" else WEIGHT_OPS
    flavour = "tensorrt" if options.target == "tensorrt" else "cpu"
    static = None
    if options.precision == "int8" and options.quantization in ("auto", "static"):
        if options.calib is None:
            raise BuildError("static INT8 needs --calib (a folder of images, or demo)")
        frames = calibration_set(options.calib, export.source["checkpoint"]).subset(options.calibration_images)
        on_batch = counter(progress, f"calibrating INT8 ({options.calibration}, {len(frames)} images)")
        static = quantize_static_int8(
            model,
            work / "model-int8-static.onnx",
            frames.preprocessed(export.spec),
            options.calibration,
            flavour,
            op_types,
            on_batch,
        )
        if op_types:
            require_quantized(static, op_types)
    if options.target == "tensorrt":
        source = static or model
        settings = PlanSettings(
            options.precision,
            size,
            1,
            options.max_batch,
            options.max_batch,
            options.workspace_mib,
            options.timing_cache,
        )
        with step(progress, f"building TensorRT {options.precision} plan"):
            plan = build_plan(source, work / "model.plan", settings)
        quant = {"method": "static-qdq-s8s8", "calibration": options.calibration} if static else None
        return [Candidate(f"tensorrt {options.precision}", "tensorrt", [plan], quant)]
    candidates = []
    if static:
        quant = {"method": "static-qdq-u8s8", "calibration": options.calibration, "ops": list(op_types) or "all"}
        candidates.append(Candidate(f"int8 static ({options.calibration})", "onnxruntime", [static], quant))
    if options.quantization in ("auto", "dynamic"):
        with step(progress, "quantizing INT8 (dynamic)"):
            dynamic = quantize_dynamic_int8(model, work / "model-int8-dynamic.onnx")
        require_quantized(dynamic, ("Gemm", "MatMul"))
        candidates.append(Candidate("int8 dynamic", "onnxruntime", [dynamic], {"method": "dynamic-u8s8"}))
    return candidates


def _measure_target(options: EngineOptions, device: DeviceInfo) -> tuple[str, bool]:
    """Where candidates run on this machine, and whether their latency means anything here."""
    if options.target == "cuda" and PROVIDERS["cuda"] not in device.providers:
        return "cpu", False  # accuracy of the CUDA graph measured with CPU kernels; latency belongs to the device
    return options.target, True


def _requirements(options: EngineOptions, engine: Path, device: DeviceInfo) -> dict[str, Any]:
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
    if options.precision == "int8" and device.arch in ("x86_64", "AMD64"):
        requires["cpu_features_any"] = sorted(X86_INT8_FEATURES)
    return requires


def _choose(candidates: list[Candidate], options: EngineOptions) -> Candidate:
    passing = [c for c in candidates if not c.misses]
    if passing:
        return max(passing, key=Candidate.throughput)
    if options.accept_accuracy_loss:
        return max(candidates, key=lambda c: c.accuracy.top1_agreement if c.accuracy else 0.0)
    details = "; ".join(f"{c.label}: {', '.join(c.misses)}" for c in candidates)
    raise GateError(
        f"no bundle: every candidate is outside the accuracy budget ({details}); "
        "--accept-accuracy-loss ships the best of them anyway and records that it did"
    )


def build_engine_bundle(
    export_dir: Path,
    out: Path,
    key_path: Path,
    options: EngineOptions = EngineOptions(),
    progress: Progress | None = None,
) -> BundleResult:
    """Build, measure, gate and sign; raises :class:`BuildError` (``GateError`` for the gate)."""
    progress = progress or Progress(disable=True)
    _check(options)
    key = load_private_key(key_path)
    if out.exists():
        raise BuildError(f"{out} exists; choose another --out or remove it")
    export = Export.read(export_dir)
    classes = int(export.architecture["num_classes"])
    labels = load_labels(options.labels, export.source["checkpoint"], options.eval, classes)
    evaluation = evaluation_set(options.eval, labels, export.source["checkpoint"])
    images, targets = evaluation.preprocessed(export.spec), evaluation.labels
    device = DeviceInfo.probe()
    batch = options.max_batch
    reference = open_engine("onnxruntime", "cpu", export.model, batch, options.threads)
    reference_logits = logits(reference, images, batch, counter(progress, "evaluating the FP32 reference"))
    reference.close()
    measure_target, timed = _measure_target(options, device)
    batches = list(range(1, batch + 1))  # every size: the agent's batcher may pick any of them
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.work-") as tmp:
        candidates = _candidates(export, options, Path(tmp), progress)
        for c in candidates:
            engine = open_engine(c.backend, measure_target, c.files[0], batch, options.threads)
            c.logits = logits(engine, images, batch, counter(progress, f"evaluating {c.label}"))
            engine.close()
            c.accuracy = compare(reference_logits, c.logits, targets)
            c.misses = options.gate.misses(c.accuracy)
            c.measured_with = f"{c.backend}-{measure_target}"
            if timed:
                with step(progress, f"profiling {c.label} at batch sizes {batches}"):
                    c.profile = profile_engine(
                        c.files[0],
                        c.backend,
                        measure_target,
                        export.spec.height,
                        batches,
                        options.profile_seconds,
                        options.threads,
                    )
        chosen = _choose(candidates, options)
        engine_sha = file_digest(chosen.files[0])["sha256"]
        name = options.name or Path(export.source["checkpoint"]).stem
        bundle_id = f"{name}-{options.version}-{options.target}-{options.precision}-{engine_sha[:8]}"
        golden = golden_set(images, reference_logits, chosen.logits, options.golden)
        passport = {
            "schema": SCHEMA_VERSION,
            "bundle_id": bundle_id,
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "engine": {
                "target": options.target,
                "precision": options.precision,
                "chosen": chosen.label,
                "quantization": chosen.quantization,
            },
            "evaluation_set": {"description": evaluation.description, "images": len(evaluation)},
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
                "latency_measured": timed,
            },
            "candidates": [c.summary() for c in candidates],
            "outputs": output_profile(chosen.logits),  # the agent's drift reference
            "golden": {"images": len(golden["images"]), "allowed_error": float(golden["allowed_error"])},
        }
        manifest = {
            "schema": SCHEMA_VERSION,
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
                "target": options.target,
                "precision": options.precision,
                "quantization": chosen.quantization,
                "batch": {"min": 1, "opt": batch, "max": batch},
            },
            "input": json.loads(export.spec.to_json()),
            "requires": _requirements(options, chosen.files[0], device),
            "accepted_accuracy_loss": bool(chosen.misses),
        }
        path = write_bundle(out, chosen.files, labels, passport, golden, manifest, key)
    return BundleResult(path, chosen, candidates, passport)
