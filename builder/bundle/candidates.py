"""Candidate engines: made from the export for each runtime and recipe, measured, and chosen.

For INT8 on the CPU the candidates are static Q/DQ (calibrated, its recipe searched) and dynamic
quantization for ONNX Runtime, and OpenVINO's; each is measured on the evaluation set against the
FP32 export. Of those inside the accuracy budget the fastest at the maximum batch ships (ties to the
more accurate); a runtime whose INT8 misses but would be the fastest gets mixed precision: the
fewest sensitive layers in float, searched on that runtime.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import psutil
from rich.progress import Progress

from agent import bounded_json
from agent.engine.bundle import PROVIDERS
from agent.engine.device import DeviceInfo
from agent.engine.preprocess import METADATA_KEY, InputSpec
from agent.engine.runtimes import open_engine
from agent.engine.similarity import SimilarityHead
from builder.bundle import layout
from builder.bundle.options import EngineOptions, checked_tensorrt, cpu_flavour, runtimes_for, served_mix
from builder.errors import BuildError, GateError
from builder.evaluate.datasets import Frames, calibration_set
from builder.evaluate.measure import Accuracy, compare, logits, profile_engine
from builder.evaluate.runoff import NEGLIGIBLE, RelativeSpeed, Served, relative_speeds, time_head_to_head
from builder.export.onnx_export import EXTERNAL_DATA_FILE, MODEL_FILE, read_metadata
from builder.export.verify import REPORT_FILE
from builder.memory import release_freed_memory
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
from builder.rewrites.row_split import ROW_BLOCK, split_rows
from builder.targets import openvino as openvino_engines
from builder.targets.tensorrt_check import require_parsable
from builder.targets.tensorrt_plan import PlanSettings, build_plan

_DOCUMENTS = ("edgevit.architecture", "edgevit.source")  # an export's metadata besides its input spec


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
        try:
            report = bounded_json.load(report_path) if report_path.is_file() else {}
        except (OSError, ValueError) as exc:
            raise BuildError(f"{report_path} cannot be read: {str(exc)[:200]}") from None
        if not isinstance(report, dict) or report.get("passed") is not True:
            raise BuildError(f"{folder} has no passing {REPORT_FILE}: only verified exports become engines")
        meta = read_metadata(model)
        if METADATA_KEY not in meta:
            raise BuildError(f"{model} lacks edgevit metadata: it was not exported by edgevit-build")
        files = [model] + ([folder / EXTERNAL_DATA_FILE] if (folder / EXTERNAL_DATA_FILE).is_file() else [])
        try:
            architecture, source = (
                bounded_json.loads(meta.get(key, ""), bounded_json.FILE_LIMITS) for key in _DOCUMENTS
            )
            spec = InputSpec.from_json(meta[METADATA_KEY])
        except (ValueError, TypeError) as exc:
            raise BuildError(f"{model}'s edgevit metadata cannot be read: {str(exc)[:200]}") from None
        if not isinstance(architecture, dict) or not isinstance(source, dict):
            raise BuildError(f"{model}'s edgevit metadata is not what edgevit-build export writes")
        return cls(files, spec, architecture, source)


def output_width(architecture: dict[str, Any]) -> int:
    """Width of an export's output: its classes, or a headless model's embedding."""
    return int(
        architecture.get("num_classes") or architecture.get("representation_size") or architecture["hidden_size"]
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
    choice: dict[str, Any] | None = None  # set on the one that ships: the rule, and the ties it broke
    over_memory: str | None = None  # why its measured peak RSS rules it out (--max-memory)
    served: dict[int, float] = field(default_factory=dict)  # batch size -> weight in its speed (served_mix)
    runoff: RelativeSpeed | None = None  # timed head to head against the other close candidates (contenders)
    images_per_stream: int = 1  # how the agent serves it (OpenVINO: builder.bundle.layout)
    layouts: dict[str, Any] | None = None  # the serving layouts timed for it, and the one kept
    row_split: dict[str, Any] | None = None  # its Dense layers split by rows for the threads: timed, kept or not

    def _served_rows(self) -> list[dict[str, Any]]:
        assert self.profile is not None
        rows = [r for r in self.profile["latency"] if r["batch"] in self.served]
        return rows or self.profile["latency"][-1:]

    def throughput(self) -> float:
        """Images/s at the batch sizes the device will serve (:func:`served_mix`; default the largest): the
        harmonic mean weighted by each size's share of the images, the mean speed such a device sees."""
        if not self.profile:
            return 0.0
        rows = self._served_rows()
        weights = [self.served.get(r["batch"], 1.0) for r in rows]
        return sum(weights) / sum(w / float(r["images_per_s"]) for w, r in zip(weights, rows, strict=True))

    def noise(self) -> float:
        """The throughput's relative 95 % half-interval (0 for profiles from before it was measured)."""
        return max(r.get("rel_ci95", 0.0) for r in self._served_rows()) if self.profile else 0.0

    def accuracy_key(self) -> tuple[float, float]:
        assert self.accuracy is not None  # measured
        return self.accuracy.top1_agreement, -self.accuracy.max_abs_logit_error

    def summary(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "runtime": self.backend,
            "quantization": self.quantization,
            "accuracy": asdict(self.accuracy) if self.accuracy else None,
            "gate_misses": self.misses,
            "over_memory": self.over_memory,
            "latency": self.profile["latency"] if self.profile else None,
            "peak_rss_mib": self.profile["peak_rss_mib"] if self.profile else None,
            "head_to_head": self.runoff.as_dict() if self.runoff else None,
            "images_per_stream": self.images_per_stream,
            "serving_layouts": self.layouts,
            "row_split": self.row_split,
            "measured_with": self.measured_with,
        }


def rewritten(
    export: Export, options: EngineOptions, frames: np.ndarray, expected: np.ndarray, work: Path, progress: Progress
) -> Export:
    """The export with the exact rewrites a CPU engine build applies (:mod:`builder.rewrites.class_token`),
    checked on ``frames`` against ``expected``, the export's own logits on them.

    Not yet for TensorRT and CUDA: the rewrite is exact there too, but their graph rules and plans
    have not been checked with it on a GPU.
    """
    if options.target != "cpu":
        return export
    with step(progress, "checking the class-token rewrite of the last block"):
        files = class_token_only(export.model, work / "model-class-token.onnx", export.architecture, frames, expected)
    return export if files is None else replace(export, files=files, rewrites=("class-token-only last block",))


def _int8_search(export: Export, options: EngineOptions, work: Path, progress: Progress) -> Int8Search | None:
    """The calibration-driven recipe search, or None for dynamic INT8 without calibration frames."""
    if options.calib is None:
        if options.quantization == "dynamic" and options.target == "cpu":
            return None
        raise BuildError("static INT8 needs --calib (a folder of images, or demo)")
    frames = calibration_set(options.calib, export.source["checkpoint"]).subset(options.calibration_images)
    op_types = ALL_OPS if options.quantize_ops == "all" else WEIGHT_OPS
    embeddings = export.architecture.get("output") == "embeddings"
    images = frames.preprocessed(export.spec)
    return Int8Search(export.model, images, work, op_types, lambda text: note(progress, text), embeddings)


def _int8_candidates(
    export: Export, options: EngineOptions, search: Int8Search | None, work: Path, progress: Progress
) -> list[Candidate]:
    device = DeviceInfo.probe()
    flavour = "tensorrt" if options.target == "tensorrt" else cpu_flavour(options, device)
    runtimes = runtimes_for(options)
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
            candidates.append(_on_openvino(static, target))
        with step(progress, "quantizing INT8 with NNCF (model_type=TRANSFORMER)"):
            files = openvino_engines.nncf_int8(export.model, search.ranges, work, flavour == "cpu-portable")
        release_freed_memory()
        nncf_recipe: dict[str, Any] = {
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


def _on_openvino(static: Candidate, target: str) -> Candidate:
    """The same searched Q/DQ graph, as OpenVINO runs it best."""
    path, changes = openvino_engines.qdq_for_openvino(static.files[0])
    quantization = {**(static.quantization or {}), **changes}
    label = f"openvino {static.label}"
    return replace(static, label=label, backend="openvino", files=[path], quantization=quantization, target=target)


def _from_trial(trial: Trial, options: EngineOptions) -> Candidate:
    quantization = {**trial.recipe.describe(), "holdout": asdict(trial.score), "searched": trial.tried}
    label = f"tensorrt {trial.recipe.label} Q/DQ" if options.target == "tensorrt" else trial.recipe.label
    return Candidate(label, "onnxruntime", [trial.path], quantization, trial=trial)


def make_candidates(
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
            plan = build_plan(model, work / "model.plan", plan_settings(export, options))
        return [Candidate(f"tensorrt {options.precision}", "tensorrt", [plan])], None
    if options.precision == "fp16":
        return [Candidate("fp16", "onnxruntime", [to_fp16(model, work / "model-fp16.onnx")])], None
    runtimes = runtimes_for(options)
    candidates = [Candidate("fp32", "onnxruntime", export.files)] if "onnxruntime" in runtimes else []
    if "openvino" in runtimes:
        label, target = ("openvino bf16", "cpu-bf16") if options.precision == "bf16" else ("openvino fp32", "cpu")
        candidates.append(Candidate(label, "openvino", export.files, target=target))
    return candidates, None


def plan_settings(export: Export, options: EngineOptions) -> PlanSettings:
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


ROW_SPLIT_RULE = (
    f"OpenVINO engines: each chain of Dense layers split into the most rows a whole number of {ROW_BLOCK}-row "
    "blocks per thread and the rest, kept where its outputs on the evaluation set are the same and it leads a "
    "head to head at batch 1"
)


@dataclass
class Evaluation:
    """The evaluation set, the FP32 reference's outputs on it, and how candidates are measured against them.

    An embedding model's outputs are embeddings; ``head`` scores them against the bundle's references, and a
    candidate's ``logits`` are then those scores: what the device's worker outputs.
    """

    export: Export
    options: EngineOptions
    device: DeviceInfo
    frames: Frames
    images: np.ndarray
    targets: np.ndarray
    reference: np.ndarray
    progress: Progress
    head: SimilarityHead | None = None

    @property
    def reference_scores(self) -> np.ndarray:
        """The FP32 reference as the device's worker would output it."""
        return self.head.scores(self.reference) if self.head else self.reference

    def logits_of(self, backend: str, target: str, path: Path, label: str) -> np.ndarray:
        batch = self.options.max_batch
        engine = open_engine(backend, target, path, batch, self.options.threads, split_batches=False)
        found = logits(engine, self.images, batch, counter(self.progress, f"evaluating {label}"))
        engine.close()
        release_freed_memory()
        return found

    def accuracy(self, c: Candidate) -> Accuracy:
        """A candidate's accuracy on the evaluation set in its own runtime, not profiled (for searches)."""
        outputs = self.logits_of(c.backend, c.target or "cpu", c.files[0], c.label)
        return compare(self.reference, outputs, self.targets, self.head)

    def measure(self, c: Candidate) -> Candidate:
        """Accuracy on the evaluation set, the :meth:`row_split` where it is kept, and speed and memory at the
        batch sizes the choice looks at (batch 1, the largest, and ``--batches``); :meth:`profile_every_size`
        completes the one that ships."""
        options = self.options
        target, timed = _measure_target(options, c, self.device)
        outputs = self.logits_of(c.backend, target, c.files[0], c.label)
        c.accuracy = compare(self.reference, outputs, self.targets, self.head)
        c.logits = self.head.scores(outputs) if self.head else outputs
        c.misses = options.gate.misses(c.accuracy)
        c.measured_with = f"{c.backend}-{target}"
        c.served = served_mix(options)
        if timed:
            self.row_split(c, target)
            self._profile(c, target, sorted({1, options.max_batch, *options.batches}))
            peak = c.profile["peak_rss_mib"]  # type: ignore[index]  # just measured
            if options.max_memory and peak > options.max_memory:
                c.over_memory = f"peak RSS {peak:.0f} MiB > --max-memory {options.max_memory:g} MiB"
        return c

    def profile_every_size(self, c: Candidate, again: bool = False) -> None:
        """The shipped candidate's profile at every batch size up to the largest: the agent's batcher may
        pick any of them, and reads their latency from the passport. The sizes its profile holds are kept
        (the peak RSS is the larger of the two processes'); ``again`` profiles every size anew (the engine
        changed)."""
        if not c.profile:
            return
        known = {} if again else {r["batch"]: r for r in c.profile["latency"]}
        missing = [b for b in range(1, self.options.max_batch + 1) if b not in known]
        if not missing:
            return
        earlier = c.profile["peak_rss_mib"]
        self._profile(c, _measure_target(self.options, c, self.device)[0], missing)
        if known:
            rows = sorted([*known.values(), *c.profile["latency"]], key=lambda r: r["batch"])
            c.profile = {**c.profile, "latency": rows, "peak_rss_mib": max(earlier, c.profile["peak_rss_mib"])}

    def runoff(self, candidates: list[Candidate]) -> None:
        """Times the :func:`contenders` head to head at the batch sizes served, in one process, and records
        each one's speed relative to the fastest of them (:mod:`builder.evaluate.runoff`)."""
        racing = contenders(candidates)
        if len(racing) < 2:
            return
        engines = {c.label: self._served(c, c.images_per_stream) for c in racing}
        with step(self.progress, f"timing {', '.join(engines)} head to head"):
            speeds = self._head_to_head(engines)
        for c in racing:
            c.runoff = speeds[c.label]

    def serving_layout(self, c: Candidate) -> None:
        """Times the shipped candidate's serving layouts head to head and keeps the fastest (:mod:`builder.bundle.
        layout`), profiled at every batch size; a layout over ``--max-memory`` falls back to single images."""
        sizes = layout.layouts_to_try(c.backend, served_mix(self.options))
        if len(sizes) < 2 or not c.profile:
            return
        with step(self.progress, f"timing {c.label} served at {', '.join(map(str, sizes))} images per stream"):
            speeds = self._head_to_head({layout.label(k): self._served(c, k) for k in sizes})
        kept = layout.fastest_layout({k: speeds[layout.label(k)] for k in sizes})
        c.layouts = {"rule": layout.RULE, "timed": {str(k): speeds[layout.label(k)].as_dict() for k in sizes}}
        if kept != c.images_per_stream:
            c.images_per_stream = kept
            self.profile_every_size(c, again=True)
            peak = c.profile["peak_rss_mib"]
            c.images_per_stream = layout.within_memory(kept, peak, self.options.max_memory)
            if c.images_per_stream != kept:
                c.layouts["over_memory"] = {str(kept): f"peak RSS {peak:.0f} MiB > --max-memory"}
                self.profile_every_size(c, again=True)
        c.layouts["kept"] = c.images_per_stream

    def row_split(self, c: Candidate, target: str) -> None:
        """Splits an OpenVINO candidate's Dense layers by rows for this CPU's threads (:mod:`builder.rewrites.
        row_split`) where the split gives the same outputs on the evaluation set as ``c.logits`` and leads a
        head to head at batch 1, the one size served over every thread at once. Runs before the candidate's
        profile, which is then the kept graph's."""
        if c.backend != "openvino" or len(c.files) != 1 or c.files[0].suffix != ".onnx" or c.logits is None:
            return
        threads = self.options.threads or psutil.cpu_count(logical=False) or 1
        model = ir.load(c.files[0])
        first = split_rows(model, threads)
        if first is None:
            return
        path = c.files[0].with_name(f"{c.files[0].stem}-rows.onnx")
        ir.save(model, path)
        del model
        split = replace(c, files=[path])
        with step(self.progress, f"timing {c.label} with its Dense layers split at row {first} for {threads} threads"):
            speeds = self._head_to_head({"as built": self._served(c, 1), "split": self._served(split, 1)}, {1: 1.0})
        outputs = self.logits_of(c.backend, target, path, c.label)
        same = bool(np.array_equal(self.head.scores(outputs) if self.head else outputs, c.logits))
        gain = speeds["split"].ratio / speeds["as built"].ratio  # one of the two is the fastest, at 1
        kept = same and gain > 1
        c.row_split = {
            "rule": ROW_SPLIT_RULE,
            "first_rows": first,
            "threads": threads,
            "same_outputs": same,
            "timed_at_batch_1": {label: speed.as_dict() for label, speed in speeds.items()},
            "speed_vs_as_built": round(gain, 4),
            "kept": kept,
        }
        if kept:
            c.files = [path]
        else:
            path.unlink()

    def _served(self, c: Candidate, images_per_stream: int) -> Served:
        return c.backend, _measure_target(self.options, c, self.device)[0], c.files[0], images_per_stream

    def _head_to_head(
        self, engines: dict[str, Served], shares: dict[int, float] | None = None
    ) -> dict[str, RelativeSpeed]:
        shares = shares or served_mix(self.options)
        seconds = self.options.profile_seconds * len(engines) * len(shares)
        times = time_head_to_head(engines, self.export.spec.height, shares, seconds, self.options.threads)
        return relative_speeds(times)

    def _profile(self, c: Candidate, target: str, batches: list[int]) -> None:
        contiguous = len(batches) > 2 and batches == list(range(batches[0], batches[-1] + 1))
        sizes = f"{batches[0]}-{batches[-1]}" if contiguous else ", ".join(map(str, batches))
        with step(self.progress, f"profiling {c.label} at batch sizes {sizes}"):
            c.profile = profile_engine(
                c.files[0],
                c.backend,
                target,
                self.export.spec.height,
                batches,
                self.options.profile_seconds,
                self.options.threads,
                c.images_per_stream,
            )


def mixed_precision(search: Int8Search, candidates: list[Candidate], evaluation: Evaluation) -> str:
    """For each runtime whose all-INT8 candidates miss the gate and are faster than every candidate inside
    it: the best-scoring one with its fewest most sensitive layers in float, searched on that runtime.

    Float layers only slow a candidate down, so a runtime slower than one that passes is not searched.
    The decision and the speeds it compared go in the starting candidate's ``quantization`` as
    ``mixed_precision`` (the one that ships is profiled again later, so its figures change).
    Appends the new candidates (measured) and returns what was tried where nothing was found, for a
    refusal message.
    """
    inside = max((c.throughput() for c in candidates if not c.misses), default=0.0)
    tried = ""
    for backend in ("onnxruntime", "openvino"):
        own = [c for c in candidates if c.trial and c.backend == backend]
        if not own or any(not c.misses for c in own):
            continue
        start = max(own, key=lambda c: c.trial.score.key())  # type: ignore[union-attr]
        searched = not inside or (start.profile is not None and start.throughput() > inside)
        start.quantization = {
            **(start.quantization or {}),
            "mixed_precision": {
                "searched": searched,
                "images_per_s": start.throughput(),
                "fastest_inside_gate_images_per_s": inside,
            },
        }
        if searched:
            tried += _mixed_on(search, start, candidates, evaluation)
    return tried


def _mixed_on(search: Int8Search, start: Candidate, candidates: list[Candidate], evaluation: Evaluation) -> str:
    note(evaluation.progress, f"mixed precision: {start.label} misses the gate; keeping layers in float")

    def variant(trial: Trial) -> Candidate:
        made = _from_trial(trial, evaluation.options)
        return _on_openvino(made, start.target or "cpu") if start.backend == "openvino" else made

    def passes(trial: Trial) -> str | None:
        if trial is start.trial:
            return "; ".join(start.misses)
        return "; ".join(evaluation.options.gate.misses(evaluation.accuracy(variant(trial)))) or None

    assert start.trial is not None  # chosen among candidates that have one
    try:
        trial = search.fewest_float_layers(start.trial, passes)
    except MixedPrecisionError as exc:
        return f"; mixed precision on {start.backend}: {exc}"
    mixed = evaluation.measure(variant(trial))
    if mixed.profile and start.profile:
        mixed.quantization = {
            **(mixed.quantization or {}),
            "speed_vs_all_int8": mixed.throughput() / start.throughput(),
        }
    candidates.append(mixed)
    return ""


RUNOFF_MARGIN = 0.2  # profiles this close to the fastest are timed head to head: wider than their drift
TIE_RULE = (
    "the fastest candidate inside the gate at the batch sizes the device serves; candidates whose "
    f"profiles come within {RUNOFF_MARGIN:.0%} of the fastest are timed head to head in one process, and "
    "the fastest there leads; candidates whose speed cannot be told from the leader's (95 % intervals: "
    "of the median paired ratio head to head, else of the profiles) and whose median (else profile) is "
    f"within {NEGLIGIBLE:.0%} of it are ties, and of ties the more accurate ships (top-1 agreement with "
    "FP32, then the smaller logit error)"
)


def tied(a: Candidate, b: Candidate) -> bool:
    """Whether two candidates' profiled throughputs cannot be told apart: their 95 % intervals overlap."""
    ta, tb = a.throughput(), b.throughput()
    return abs(ta - tb) <= ta * a.noise() + tb * b.noise()


def even(a: Candidate, fastest: Candidate) -> bool:
    """A profiled tie the choice gives to accuracy (:data:`TIE_RULE`): not told apart from the fastest, and
    within :data:`~builder.evaluate.runoff.NEGLIGIBLE` of its throughput."""
    return tied(a, fastest) and a.throughput() >= (1 - NEGLIGIBLE) * fastest.throughput()


def _eligible(candidates: list[Candidate]) -> list[Candidate]:
    return [c for c in candidates if not c.misses and not c.over_memory]


def contenders(candidates: list[Candidate]) -> list[Candidate]:
    """The timed candidates that may ship whose profiles come within :data:`RUNOFF_MARGIN` of the fastest's
    (or cannot be told from it): the ones a head-to-head timing may reorder."""
    timed = [c for c in _eligible(candidates) if c.profile]
    if not timed:
        return []
    fastest = max(timed, key=Candidate.throughput)
    floor = (1 - RUNOFF_MARGIN) * fastest.throughput()
    return [c for c in timed if c.throughput() >= floor or tied(c, fastest)]


def choose(candidates: list[Candidate], options: EngineOptions, tried: str = "") -> Candidate:
    """The candidate that ships (:data:`TIE_RULE`); the choice and its ties are recorded on it."""
    inside_gate = [c for c in candidates if not c.misses]
    passing = _eligible(candidates)
    if inside_gate and not passing:
        details = "; ".join(f"{c.label}: {c.over_memory}" for c in inside_gate)
        raise BuildError(f"no bundle: every candidate inside the accuracy budget needs more memory ({details})")
    if passing:
        raced = [c for c in passing if c.runoff]
        if raced:
            ties = [c for c in raced if c.runoff and c.runoff.even]
        else:
            fastest = max(passing, key=Candidate.throughput)
            ties = [c for c in passing if even(c, fastest)]
        chosen = max(ties, key=Candidate.accuracy_key)
        chosen.choice = {
            "rule": TIE_RULE,
            "ties": [c.label for c in ties if c is not chosen],
            "batches": list(options.batches) or [options.max_batch],
        }
        if options.batch_shares:
            chosen.choice["batch_mix"] = {str(b): round(w, 4) for b, w in served_mix(options).items()}
        return chosen
    if options.accept_accuracy_loss:
        chosen = max(candidates, key=lambda c: c.accuracy.top1_agreement if c.accuracy else 0.0)
        chosen.choice = {"rule": "none inside the gate: --accept-accuracy-loss ships the best top-1 agreement"}
        return chosen
    details = "; ".join(f"{c.trial.recipe.detail if c.trial else c.label}: {', '.join(c.misses)}" for c in candidates)
    raise GateError(
        f"no bundle: every candidate is outside the accuracy budget ({details}{tried}); "
        "--accept-accuracy-loss ships the best of them anyway and records that it did"
    )
