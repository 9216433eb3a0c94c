"""The engine job: verified export -> candidate engines -> passport and gate -> signed bundle.

For INT8 on the CPU there are two candidates, static QDQ (calibrated) and dynamic;
both are measured and the passport decides: of those inside the accuracy budget, the
one with the highest throughput at the maximum batch ships, and the passport keeps
the figures of all of them. A build with no candidate inside the budget produces no
bundle unless ``accept_accuracy_loss`` is set, which the passport then records. With a
``baseline`` (the bundle or export the new engine replaces), the passport also records what a
device's canary should expect of the pair, and a new model less accurate than its baseline
beyond the top-1 budget is refused the same way (:mod:`builder.evaluate.baseline`).
"""

from __future__ import annotations

import json
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from rich.progress import Progress

from agent.engine.bundle import PROVIDERS, SCHEMA_VERSION, file_digest
from agent.engine.device import X86_INT8_FEATURES, DeviceInfo, full_range_int8_exact
from agent.engine.preprocess import METADATA_KEY, InputSpec
from agent.engine.runtimes import open_engine
from agent.engine.signing import load_private_key
from agent.stream.drift import output_profile
from builder.bundle.writer import write_bundle
from builder.choices import (
    DEFAULT_TENSORRT,
    RUNTIMES,
    TARGETS,
    Calibration,
    Flavour,
    Int8Cpu,
    Precision,
    Quantization,
    QuantizeOps,
    Runtime,
    Target,
)
from builder.errors import BuildError, GateError
from builder.evaluate.baseline import Baseline, baseline_misses, bundle_baseline, compare_with_baseline, is_bundle
from builder.evaluate.datasets import Frames, calibration_set, evaluation_set, load_labels
from builder.evaluate.measure import Accuracy, Gate, compare, golden_set, logits, profile_engine
from builder.export.onnx_export import EXTERNAL_DATA_FILE, MODEL_FILE, read_metadata
from builder.export.verify import REPORT_FILE
from builder.progress import counter, note, step
from builder.quantize.int8_recipe import (
    Int8Search,
    MixedPrecisionError,
    Trial,
    parse_smoothing,
    recipes_for,
)
from builder.quantize.precision import ALL_OPS, WEIGHT_OPS, quantize_dynamic_int8, to_fp16
from builder.rewrites.class_token import class_token_only
from builder.targets import openvino as openvino_engines
from builder.targets.tensorrt_check import require_parsable
from builder.targets.tensorrt_plan import PlanSettings, build_plan, tensorrt_version

TENSORRT_RECIPE_MODEL = "model-int8-qdq.onnx"
TENSORRT_RECIPE_REPORT = "recipe.json"
# Oldest ONNX Runtime that reads a given ONNX IR version / default-domain opset.
ORT_FOR_IR = {8: "1.12", 9: "1.15", 10: "1.18", 11: "1.21"}
ORT_FOR_OPSET = {17: "1.14", 18: "1.14", 19: "1.16", 20: "1.17", 21: "1.18", 22: "1.20", 23: "1.22"}


@dataclass(frozen=True)
class EngineOptions:
    target: Target = "cpu"
    precision: Precision = "fp32"
    eval: str = "demo"
    calib: str | None = None
    labels: Path | None = None
    max_batch: int = 8
    quantization: Quantization = "auto"
    calibration: Calibration = "minmax"
    smoothing: str = "auto"  # SmoothQuant α: auto (searched on held-aside calibration frames) | off | a value
    quantize_ops: QuantizeOps = "weights"
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
    runtime: Runtime = "auto"
    tensorrt_version: str = DEFAULT_TENSORRT  # the parser rules a TensorRT-bound graph is checked against here
    baseline: Path | None = None  # the bundle or export this engine replaces (builder.evaluate.baseline)
    int8_cpu: Int8Cpu = "auto"


def cpu_flavour(options: EngineOptions, device: DeviceInfo) -> Flavour:
    """The INT8 flavour of a CPU build (:data:`builder.choices.Flavour`).

    ``vnni`` keeps full 8-bit weights, which are exact and fastest on CPUs with VNNI or AMX and which
    devices without them refuse; ``any`` keeps weights in 7 bits, exact on every x86. ``auto`` builds
    for the kind of CPU the engine is measured on, so that the passport's figures are the device's.
    """
    wanted = options.int8_cpu
    if wanted == "auto":
        wanted = "vnni" if full_range_int8_exact(device) else "any"
    return "cpu" if wanted == "vnni" else "cpu-portable"


def checked_tensorrt(options: EngineOptions) -> str:
    """The TensorRT whose parser rules apply: the one installed here, else the one the options name."""
    return tensorrt_version() or options.tensorrt_version


@dataclass
class Export:
    """A verified export folder, as written by ``edgevit-build export``."""

    files: list[Path]
    spec: InputSpec
    architecture: dict[str, Any]
    source: dict[str, str]
    rewrites: tuple[str, ...] = ()  # exact engine-build rewrites applied to the export's graph

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
    target: str | None = None  # the engine's own target where it differs from the build's (cpu-bf16)
    trial: Trial | None = None  # how an INT8 candidate was found: its recipe, held-aside score, search

    def throughput(self) -> float:
        return self.profile["latency"][-1]["images_per_s"] if self.profile else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "runtime": self.backend,
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
    passport: dict[str, Any]  # the bundle's passport, or the TensorRT recipe's report
    bundle: bool = True  # False: a TensorRT INT8 recipe, gated here, whose plan is built on the device


def _check(options: EngineOptions) -> None:
    if options.precision not in TARGETS.get(options.target, ()):
        allowed = ", ".join(f"{t}: {'/'.join(p)}" for t, p in TARGETS.items())
        raise BuildError(f"--precision {options.precision} is not offered for --target {options.target} ({allowed})")
    if options.max_batch < 1:
        raise BuildError("--max-batch must be at least 1")
    parse_smoothing(options.smoothing)
    if options.runtime not in RUNTIMES:
        raise BuildError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {options.runtime!r}")
    if options.runtime == "openvino" and options.target != "cpu":
        raise BuildError(f"--runtime openvino is a CPU runtime; --target {options.target} has its own")
    if options.runtime == "openvino" or options.precision == "bf16":
        openvino_engines.require()


def _runtimes(options: EngineOptions) -> tuple[str, ...]:
    """The runtimes whose candidates a build makes: the target's own, or for the CPU those asked for."""
    if options.target != "cpu":
        return ("onnxruntime",)
    if options.precision == "bf16":
        return ("openvino",)
    if options.runtime == "auto":
        return ("onnxruntime", "openvino") if openvino_engines.available() else ("onnxruntime",)
    return (options.runtime,)


def _rewritten(export: Export, options: EngineOptions, frames: np.ndarray, work: Path, progress: Progress) -> Export:
    """The export with the exact rewrites a CPU engine build applies (:mod:`builder.rewrites.class_token`).

    Not yet for TensorRT and CUDA: the rewrite is exact there too, but their graph rules and plans
    have not been checked with it on a GPU.
    """
    if options.target != "cpu":
        return export
    with step(progress, "checking the class-token rewrite of the last block"):
        files = class_token_only(export.model, work / "model-class-token.onnx", export.architecture, frames)
    return export if files is None else replace(export, files=files, rewrites=("class-token-only last block",))


def _int8_search(export: Export, options: EngineOptions, work: Path, progress: Progress) -> Int8Search | None:
    """The calibration-driven recipe search, or None for dynamic INT8 without calibration frames."""
    if options.calib is None:
        if options.quantization == "dynamic" and options.target == "cpu":
            return None
        raise BuildError("static INT8 needs --calib (a folder of images, or demo)")
    frames = calibration_set(options.calib, export.source["checkpoint"]).subset(options.calibration_images)
    op_types = ALL_OPS if options.quantize_ops == "all" else WEIGHT_OPS
    return Int8Search(export.model, frames.preprocessed(export.spec), work, op_types, lambda text: note(progress, text))


def _int8_candidates(
    export: Export, options: EngineOptions, search: Int8Search | None, work: Path, progress: Progress
) -> list[Candidate]:
    device = DeviceInfo.probe()
    flavour = "tensorrt" if options.target == "tensorrt" else cpu_flavour(options, device)
    runtimes = _runtimes(options)
    candidates = []
    for recipe in recipes_for(options.quantization, flavour, options.calibration):
        if search is None:  # dynamic, with nothing to calibrate or score on
            dynamic = quantize_dynamic_int8(export.model, work / "model-int8-dynamic.onnx", flavour=flavour)
            candidates.append(Candidate(recipe.label, "onnxruntime", [dynamic], recipe.describe()))
        else:
            candidates.append(_from_trial(search.best_smoothing(recipe, parse_smoothing(options.smoothing)), options))
    if "openvino" in runtimes and search is not None:
        target = openvino_engines.float_target(device)
        for static in [c for c in candidates if c.trial and c.trial.recipe.method == "static"]:
            # the same searched Q/DQ graph, run by OpenVINO
            path, changes = openvino_engines.qdq_for_openvino(static.files[0])
            label = f"openvino {static.label}"
            quantization = {**(static.quantization or {}), **changes}
            candidates.append(
                replace(static, label=label, backend="openvino", files=[path], quantization=quantization, target=target)
            )
        with step(progress, "quantizing INT8 with NNCF (model_type=TRANSFORMER)"):
            files = openvino_engines.nncf_int8(export.model, search.ranges, work, flavour == "cpu-portable")
        nncf_recipe = {
            "method": "nncf-transformer",
            "calibration": "nncf",
            "smoothing_alpha": None,
            "smoothing": "NNCF's own SmoothQuant",
            "float_layers": [],
        }
        candidates.append(Candidate("openvino int8 (NNCF)", "openvino", files, nncf_recipe, target=target))
    if "onnxruntime" not in runtimes:
        candidates = [c for c in candidates if c.backend != "onnxruntime"]
    return candidates


def _from_trial(trial: Trial, options: EngineOptions) -> Candidate:
    quantization = {**trial.recipe.describe(), "holdout": asdict(trial.score), "searched": trial.tried}
    label = f"tensorrt {trial.recipe.label} Q/DQ" if options.target == "tensorrt" else trial.recipe.label
    return Candidate(label, "onnxruntime", [trial.path], quantization, trial=trial)


def _candidates(
    export: Export, options: EngineOptions, work: Path, progress: Progress
) -> tuple[list[Candidate], Int8Search | None]:
    """Every candidate engine file for the requested target and precision, and the INT8 search if any.

    TensorRT INT8 candidates are Q/DQ ONNX graphs: their accuracy is gated in ONNX Runtime (simulated
    quantization) before any plan is built from the one that ships.
    """
    model = export.model
    if options.precision == "int8":
        search = _int8_search(export, options, work, progress)
        return _int8_candidates(export, options, search, work, progress), search
    if options.target == "tensorrt":
        require_parsable(model, checked_tensorrt(options))
        with step(progress, f"building TensorRT {options.precision} plan"):
            plan = build_plan(model, work / "model.plan", _plan_settings(export, options))
        return [Candidate(f"tensorrt {options.precision}", "tensorrt", [plan])], None
    if options.precision == "fp16":
        return [Candidate("fp16", "onnxruntime", [to_fp16(model, work / "model-fp16.onnx")])], None
    runtimes = _runtimes(options)
    candidates = [Candidate("fp32", "onnxruntime", export.files)] if "onnxruntime" in runtimes else []
    if "openvino" in runtimes:
        label, target = ("openvino bf16", "cpu-bf16") if options.precision == "bf16" else ("openvino fp32", "cpu")
        candidates.append(Candidate(label, "openvino", export.files, target=target))
    return candidates, None


def _plan_settings(export: Export, options: EngineOptions) -> PlanSettings:
    batch = options.max_batch
    return PlanSettings(
        options.precision, export.spec.height, 1, batch, batch, options.workspace_mib, options.timing_cache
    )


def _measure_target(options: EngineOptions, candidate: Candidate, device: DeviceInfo) -> tuple[str, bool]:
    """Where a candidate runs on this machine, and whether its latency means anything here."""
    if candidate.target:
        return candidate.target, True
    if options.target == "cuda" and PROVIDERS["cuda"] not in device.providers:
        return "cpu", False  # accuracy of the CUDA graph measured with CPU kernels; latency belongs to the device
    if options.target == "tensorrt" and candidate.backend == "onnxruntime":
        return "cpu", False  # a Q/DQ graph bound for TensorRT: simulated quantization, accuracy only
    return options.target, True


@dataclass
class _Evaluation:
    """The evaluation set, the FP32 reference's logits on it, and how candidates are measured against them."""

    export: Export
    options: EngineOptions
    device: DeviceInfo
    frames: Frames
    images: np.ndarray
    targets: np.ndarray
    reference: np.ndarray
    progress: Progress

    def _logits(self, backend: str, target: str, path: Path, label: str) -> np.ndarray:
        batch = self.options.max_batch
        engine = open_engine(backend, target, path, batch, self.options.threads)
        found = logits(engine, self.images, batch, counter(self.progress, f"evaluating {label}"))
        engine.close()
        return found

    def accuracy(self, path: Path) -> Accuracy:
        """An ONNX Runtime CPU graph's accuracy on the evaluation set (for the mixed-precision search)."""
        return compare(self.reference, self._logits("onnxruntime", "cpu", path, path.name), self.targets)

    def measure(self, c: Candidate) -> Candidate:
        options, batch = self.options, self.options.max_batch
        target, timed = _measure_target(options, c, self.device)
        c.logits = self._logits(c.backend, target, c.files[0], c.label)
        c.accuracy = compare(self.reference, c.logits, self.targets)
        c.misses = options.gate.misses(c.accuracy)
        c.measured_with = f"{c.backend}-{target}"
        if timed:
            batches = list(range(1, batch + 1))  # every size: the agent's batcher may pick any of them
            with step(self.progress, f"profiling {c.label} at batch sizes 1-{batch}"):
                c.profile = profile_engine(
                    c.files[0],
                    c.backend,
                    target,
                    self.export.spec.height,
                    batches,
                    options.profile_seconds,
                    options.threads,
                )
        return c


def _mixed_precision(search: Int8Search, candidates: list[Candidate], evaluation: _Evaluation) -> str:
    """When no candidate passes: the best-scoring one with its most sensitive layers in float.

    Appends the new candidate (measured) and returns what was tried, for a refusal message.
    """
    start = max((c for c in candidates if c.trial), key=lambda c: c.trial.score.key())  # type: ignore[union-attr]
    note(evaluation.progress, f"mixed precision: {start.label} misses the gate; keeping layers in float")

    def passes(trial: Trial) -> str | None:
        if trial is start.trial:
            return "; ".join(start.misses)
        misses = evaluation.options.gate.misses(evaluation.accuracy(trial.path))
        return "; ".join(misses) or None

    try:
        trial = search.fewest_float_layers(start.trial, passes)
    except MixedPrecisionError as exc:
        return f"; mixed precision: {exc}"
    mixed = evaluation.measure(_from_trial(trial, evaluation.options))
    if mixed.profile and start.profile:
        mixed.quantization = {**mixed.quantization, "speed_vs_all_int8": mixed.throughput() / start.throughput()}
    candidates.append(mixed)
    return ""


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


def _choose(candidates: list[Candidate], options: EngineOptions, tried: str = "") -> Candidate:
    passing = [c for c in candidates if not c.misses]
    if passing:
        return max(passing, key=Candidate.throughput)
    if options.accept_accuracy_loss:
        return max(candidates, key=lambda c: c.accuracy.top1_agreement if c.accuracy else 0.0)
    details = "; ".join(f"{c.trial.recipe.detail if c.trial else c.label}: {', '.join(c.misses)}" for c in candidates)
    raise GateError(
        f"no bundle: every candidate is outside the accuracy budget ({details}{tried}); "
        "--accept-accuracy-loss ships the best of them anyway and records that it did"
    )


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
    _check(options)
    key = load_private_key(key_path)
    if out.exists():
        raise BuildError(f"{out} exists; choose another --out or remove it")
    export = Export.read(export_dir)
    classes = int(export.architecture["num_classes"])
    labels = load_labels(options.labels, export.source["checkpoint"], options.eval, classes)
    evaluation_frames = evaluation_set(options.eval, labels, export.source["checkpoint"])
    images = evaluation_frames.preprocessed(export.spec)
    reference = open_engine("onnxruntime", "cpu", export.model, options.max_batch, options.threads)
    reference_logits = logits(reference, images, options.max_batch, counter(progress, "evaluating the FP32 reference"))
    reference.close()
    evaluation = _Evaluation(
        export,
        options,
        DeviceInfo.probe(),
        evaluation_frames,
        images,
        evaluation_frames.labels,
        reference_logits,
        progress,
    )
    baseline = _baseline(options.baseline) if options.baseline else None
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.work-") as tmp:
        source = _rewritten(export, options, images[: options.max_batch], Path(tmp), progress)
        candidates, search = _candidates(source, options, Path(tmp), progress)
        for c in candidates:
            evaluation.measure(c)
        tried = ""
        if search and not any(not c.misses for c in candidates):
            tried = _mixed_precision(search, candidates, evaluation)
        chosen = _choose(candidates, options, tried)
        against = _against(baseline, chosen, evaluation, labels) if baseline else None
        if options.target == "tensorrt" and options.precision == "int8":
            require_parsable(chosen.files[0], checked_tensorrt(options))  # the gated Q/DQ graph, before any device
            if tensorrt_version() is None:
                return _write_tensorrt_recipe(out, chosen, candidates, evaluation_frames.description, options, against)
            with step(progress, "building TensorRT int8 plan from the gated Q/DQ graph"):
                plan = build_plan(chosen.files[0], Path(tmp) / "model.plan", _plan_settings(export, options))
            quant = {**chosen.quantization, "qdq_accuracy": asdict(chosen.accuracy)}
            chosen = evaluation.measure(Candidate("tensorrt int8", "tensorrt", [plan], quant))
            candidates.append(chosen)
            chosen = _choose([chosen], options)
        path, passport = _write(
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
            against,
        )
    return BundleResult(path, chosen, candidates, passport)


def _baseline(path: Path) -> Baseline:
    if is_bundle(path):
        return bundle_baseline(path)
    export = Export.read(path)
    return Baseline(
        path.name, None, export.source.get("sha256"), 1.0, "onnxruntime", "cpu", export.model, export.spec, None
    )


def _against(baseline: Baseline, chosen: Candidate, evaluation: _Evaluation, labels: list[str]) -> dict[str, Any]:
    """The chosen engine against the baseline; a GateError when it is less accurate beyond the budget."""
    options = evaluation.options
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


def _write_tensorrt_recipe(
    out: Path,
    chosen: Candidate,
    candidates: list[Candidate],
    evaluated_on: str,
    options: EngineOptions,
    baseline: dict[str, Any] | None,
) -> BundleResult:
    """The gated Q/DQ graph and its report, for building the plan where TensorRT is."""
    out.mkdir()
    shutil.copy2(chosen.files[0], out / TENSORRT_RECIPE_MODEL)
    report = {
        "schema": SCHEMA_VERSION,
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
        "baseline": baseline,
        "parser_checked_for_tensorrt": options.tensorrt_version,
        "plan": "not built: this machine has no TensorRT. It is built on the device (TensorRT 10) with the same "
        "command, which repeats this recipe search and gate there and then builds the plan from the Q/DQ graph.",
    }
    (out / TENSORRT_RECIPE_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return BundleResult(out, chosen, candidates, report, bundle=False)


def _write(
    out: Path,
    export: Export,
    rewrites: tuple[str, ...],
    options: EngineOptions,
    evaluation: _Evaluation,
    evaluated_on: str,
    labels: list[str],
    key: Any,
    chosen: Candidate,
    candidates: list[Candidate],
    baseline: dict[str, Any] | None,
) -> tuple[Path, dict[str, Any]]:
    """The passport, manifest and signed bundle of the chosen candidate."""
    device, batch = evaluation.device, options.max_batch
    engine_sha = file_digest(chosen.files[0])["sha256"]
    name = options.name or Path(export.source["checkpoint"]).stem
    target = chosen.target or options.target
    bundle_id = f"{name}-{options.version}-{target}-{options.precision}-{engine_sha[:8]}"
    golden = golden_set(evaluation.images, evaluation.reference, chosen.logits, options.golden)
    passport = {
        "schema": SCHEMA_VERSION,
        "bundle_id": bundle_id,
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "engine": {
            "target": target,
            "precision": options.precision,
            "chosen": chosen.label,
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
        "outputs": output_profile(chosen.logits),  # the agent's drift reference
        "baseline": baseline,  # what a canary against that engine should expect (builder.evaluate.baseline)
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
            "target": target,
            "precision": options.precision,
            "quantization": chosen.quantization,
            "batch": {"min": 1, "opt": batch, "max": batch},
        },
        "input": json.loads(export.spec.to_json()),
        "requires": engine_requirements(options, chosen, device),
        "accepted_accuracy_loss": bool(chosen.misses),
    }
    return write_bundle(out, chosen.files, labels, passport, golden, manifest, key), passport
