"""Choosing an INT8 recipe on the calibration frames: smoothing strength, then layers left in float.

The calibration frames are split in two: every other frame sets activation ranges (and
SmoothQuant's per-channel maxima), the rest is held aside to *score* recipes against the FP32
export, by top-1 agreement first and logit error second. The evaluation set that the gate
judges is never looked at here.

1. **Smoothing** (:mod:`builder.quantize.smoothing`): the α of :data:`ALPHAS` (``None`` = no
   smoothing), weakest first, are each folded into the export, quantized and scored, until one
   scores no better than the one before (:func:`smoothed_enough`); the best-scoring α wins, so a
   model without outlier channels keeps its unsmoothed recipe when that scores best.
2. **Mixed precision**, when every candidate still misses the gate: every quantized layer's
   sensitivity is measured on calibration frames (the relative error its own INT8 input and
   weight put on its output, with the chosen smoothing), and the fewest most-sensitive layers
   are kept in float that bring the candidate inside the gate. Only that count is judged by the
   gate itself (a pass/fail per count, found by doubling and bisection); which layers, in which
   order, comes from the calibration frames. At most :data:`MAX_FLOAT_SHARE` of the layers may
   stay float; past that the engine is hardly INT8 any more, and the build says so.

Work is shared across the recipes of a search, since it dominates a build's time and memory: the
export goes through ONNX Runtime's pre-quantization pass once (each smoothing is folded in after
it); min/max ranges are taken in the pass that measures the per-channel ranges and the held-aside
reference (:func:`~builder.quantize.calibration.measure`), and ONNX Runtime's calibrator runs once
for each other calibration method. Every recipe with the same calibration
and smoothing reads the same ranges, the mixed-precision steps included, and with min/max
calibration each smoothed graph's ranges are worked out exactly from the unsmoothed graph's
(:func:`~builder.quantize.smoothing.smoothed_ranges`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from agent.engine.runtimes.onnxruntime import OnnxRuntimeEngine
from builder.choices import Flavour
from builder.errors import BuildError
from builder.evaluate.measure import cosine
from builder.memory import release_freed_memory
from builder.quantize.calibration import (
    absmax,
    calibrated_tensors,
    measure,
    minmax_ranges,
    observe,
    rescaled_ranges,
)
from builder.quantize.precision import (
    WEIGHT_OPS,
    prepare,
    prepare_for_dynamic,
    quantize_dynamic_int8,
    quantize_static_int8,
    require_quantized,
)
from builder.quantize.smoothing import balance, find_targets, smooth, smoothed_ranges, weight_maxima

ALPHAS: tuple[float | None, ...] = (None, 0.5, 0.65, 0.8)  # weakest migration first: see smoothed_enough
MAX_FLOAT_SHARE = 0.5


@dataclass(frozen=True)
class Recipe:
    """How one INT8 candidate is made."""

    method: str  # static | dynamic
    flavour: Flavour = "cpu"
    calibration: str = "minmax"  # activation ranges of static recipes
    alpha: float | None = None  # SmoothQuant migration strength; None = not smoothed
    float_layers: tuple[str, ...] = ()  # Dense/Conv nodes of the export left in float

    @property
    def label(self) -> str:
        """Short and unique among a build's candidates; :meth:`describe` holds the rest."""
        name = f"int8 static ({self.calibration})" if self.method == "static" else "int8 dynamic"
        return f"{name} +{len(self.float_layers)} float" if self.float_layers else name

    @property
    def detail(self) -> str:
        smoothing = f"smoothed α={self.alpha:g}" if self.alpha is not None else "not smoothed"
        return f"{self.label}, {smoothing}"

    def describe(self) -> dict[str, Any]:
        scheme = {"cpu": "u8s8", "cpu-portable": "u8s7", "tensorrt": "s8s8"}[self.flavour]
        method = f"static-qdq-{scheme}" if self.method == "static" else f"dynamic-{scheme}"
        return {
            "method": method,
            "calibration": self.calibration if self.method == "static" else None,
            "smoothing_alpha": self.alpha,
            "float_layers": list(self.float_layers),
        }


@dataclass(frozen=True)
class Score:
    """A recipe against the FP32 export on the held-aside calibration frames."""

    images: int
    agreement: float  # top-1 agreement; an embedding model's: mean cosine similarity of the embeddings
    mean_rel_logit_error: float

    def key(self) -> tuple[float, float]:
        return (self.agreement, -self.mean_rel_logit_error)


@dataclass
class Trial:
    recipe: Recipe
    path: Path
    score: Score
    tried: list[dict[str, Any]] = field(default_factory=list)  # what the search scored on the way


class Int8Search:
    """Builds and scores INT8 recipes of one export on one calibration set."""

    def __init__(
        self,
        model_path: Path,
        calibration: np.ndarray,
        work: Path,
        op_types: tuple[str, ...] = WEIGHT_OPS,
        on_step: Callable[[str], None] | None = None,
        embeddings: bool = False,
    ) -> None:
        if len(calibration) < 2:  # one to set ranges, one held aside
            raise BuildError(f"INT8 needs at least 2 calibration images, got {len(calibration)}")
        self.model_path, self.work, self.op_types = model_path, work, op_types
        self.embeddings = embeddings  # outputs are embeddings: agree by cosine, argmax means nothing
        self._say = on_step or (lambda _: None)
        prepared = prepare(self.model_path, work / "prepared.onnx")
        calibrated = calibrated_tensors(prepared, op_types) if op_types else None
        model = onnx.load(str(model_path))  # not kept: a build holds no more graphs than the step at hand
        self.ranges, self.holdout = calibration[0::2], calibration[1::2]
        self.targets = find_targets(model)
        self._tensors = {name for node in model.graph.node for name in node.output}
        self._shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
        self._weight_max = weight_maxima(model, self.targets)
        del model  # before the measuring pass, whose session holds the weights once more
        release_freed_memory()
        self.prepared = self._prepared(prepared)
        self.prepared_dynamic: Path | None = None  # made when the first dynamic recipe needs it
        # min/max ranges are taken in this pass where every tensor the calibrator would range is in the export
        whole = calibrated if self.prepared and calibrated and calibrated <= self._tensors else set()
        self._say(f"measuring activations on {len(calibration)} calibration images")
        scaled = [n for t in self.targets for n in t.scaled]
        seen = measure(model_path, self.ranges, scaled, whole, self.holdout)
        self.channels, self.reference = seen.channels, seen.logits
        if whole:
            minmax_ranges(self._ranges("minmax", None), seen.extrema)
        self.absmax = absmax({t.norm: self.channels[t.norm] for t in self.targets})
        self._count = 0
        release_freed_memory()

    def _prepared(self, path: Path) -> Path | None:
        """``path`` (the export through ONNX Runtime's pre-quantization pass, shared by every recipe of a kind),
        or None when the pass changed what smoothing rescales: then each smoothed graph is prepared on its own."""
        shapes = {t.name: tuple(t.dims) for t in onnx.load(str(path), load_external_data=False).graph.initializer}
        rescaled = [name for t in self.targets for name in (t.scale, t.bias, *t.weights)]
        if all(shapes.get(name) == self._shapes[name] for name in rescaled):
            return path
        path.unlink()
        return None

    # -- building and scoring --------------------------------------------------------------------------
    def _factors(self, alpha: float) -> dict[str, np.ndarray]:
        return balance(self._weight_max, self.absmax, alpha)

    def _smoothed(self, alpha: float | None) -> onnx.ModelProto:
        model = onnx.load(str(self.model_path))
        return model if alpha is None or not self.targets else smooth(model, self.targets, self._factors(alpha))

    def _source(self, method: str, alpha: float | None, source: Path) -> Path:
        """The prepared graph a recipe quantizes: smoothed after the shared pass where it could be shared."""
        preparing = prepare if method == "static" else prepare_for_dynamic
        if method == "dynamic" and self.prepared_dynamic is None:
            self.prepared_dynamic = self._prepared(preparing(self.model_path, self.work / "prepared-dynamic.onnx"))
        shared = self.prepared if method == "static" else self.prepared_dynamic
        if shared is None:
            onnx.save(self._smoothed(alpha), str(source))
            prepared = preparing(source, source.with_name(f"prepared-{source.name}"))
            source.unlink()
            return prepared
        if alpha is None or not self.targets:
            return shared
        onnx.save(smooth(onnx.load(str(shared)), self.targets, self._factors(alpha)), str(source))
        return source

    def _ranges(self, calibration: str, alpha: float | None) -> Path:
        """The activation-range file a static recipe reads, or writes when it is the first to need it.

        Every recipe with the same calibration and smoothing shares one file (layers left in float do not
        change the float graph's ranges). With min/max calibration, each smoothed graph's ranges are worked
        out exactly from the unsmoothed graph's (:func:`~builder.quantize.smoothing.smoothed_ranges`), so the
        frames run through the calibrator once per build.
        """
        alpha = alpha if self.targets else None
        path = self.work / f"ranges-{calibration}-{alpha}.json"
        base = self.work / f"ranges-{calibration}-None.json"
        if alpha is None or path.exists() or not base.exists() or self.prepared is None:
            return path
        try:
            scaled = smoothed_ranges(self.channels, self.targets, self._factors(alpha))
        except ValueError:
            return path
        rescaled_ranges(base, path, scaled, self._tensors)  # or, where it cannot vouch for them, the calibrator runs
        return path

    def build(self, recipe: Recipe) -> Path:
        """The recipe's engine file (under ``work``)."""
        self._count += 1
        source = self.work / f"source-{self._count}.onnx"
        dst = self.work / f"int8-{recipe.method}-{self._count}.onnx"
        source = self._source(recipe.method, recipe.alpha, source)
        if recipe.method == "static":
            quantize_static_int8(
                source,
                dst,
                self.ranges,
                recipe.calibration,
                recipe.flavour,
                self.op_types,
                exclude=recipe.float_layers,
                prepared=True,
                ranges=self._ranges(recipe.calibration, recipe.alpha),
            )
        else:
            quantize_dynamic_int8(source, dst, exclude=recipe.float_layers, flavour=recipe.flavour, prepared=True)
        if source not in (self.prepared, self.prepared_dynamic):
            source.unlink()
        release_freed_memory()
        if not recipe.float_layers:
            require_quantized(dst, self.op_types if recipe.method == "static" else ("Gemm", "MatMul"))
        return dst

    def score(self, path: Path) -> Score:
        engine = OnnxRuntimeEngine(path)
        logits = np.concatenate([engine.run(self.holdout[i : i + 8]) for i in range(0, len(self.holdout), 8)])
        engine.close()
        error = np.abs(logits - self.reference).mean() / max(float(np.abs(self.reference).mean()), 1e-6)
        if self.embeddings:
            agreement = float(cosine(logits, self.reference).mean())
        else:
            agreement = float((logits.argmax(-1) == self.reference.argmax(-1)).mean())
        release_freed_memory()
        return Score(len(self.holdout), agreement, float(error))

    def _trial(self, recipe: Recipe) -> Trial:
        path = self.build(recipe)
        return Trial(recipe, path, self.score(path))

    # -- the searches -----------------------------------------------------------------------------------
    def best_smoothing(self, recipe: Recipe, alphas: tuple[float | None, ...] = ALPHAS) -> Trial:
        """``recipe`` with the α of ``alphas`` that scores best (``None`` alone if nothing can be smoothed),
        scored in order until :func:`smoothed_enough`."""
        alphas = alphas if self.targets else (None,)
        trials: list[Trial] = []
        for alpha in alphas:
            if smoothed_enough([t.score for t in trials]):
                break
            self._say(f"scoring {replace(recipe, alpha=alpha).detail}")
            trials.append(self._trial(replace(recipe, alpha=alpha)))
        best = max(trials, key=lambda t: t.score.key())
        best.tried = [{"alpha": t.recipe.alpha, **asdict(t.score)} for t in trials]
        for t in trials:
            if t is not best:
                t.path.unlink()
        return best

    def layers(self, model: onnx.ModelProto) -> list[onnx.NodeProto]:
        """The quantizable layers of ``model`` (the export, smoothed or not: their names are what
        ``float_layers`` holds)."""
        initializers = {t.name for t in model.graph.initializer}
        kinds = self.op_types or ("Gemm", "Conv", "MatMul")
        return [n for n in model.graph.node if n.op_type in kinds and n.input[1] in initializers]

    def sensitivity(self, alpha: float | None) -> dict[str, float]:
        """Per Dense layer: relative output error from fake-quantizing its input (u8) and weight (s8/channel).

        Measured on one batch of the ranges split, with the recipe's smoothing applied. Convolutions (the
        patch embedding, whose input is the image itself at 256 levels) are ranked last.
        """
        model = self._smoothed(alpha)
        weights = {t.name: t for t in model.graph.initializer}
        gemms = [n for n in self.layers(model) if n.op_type == "Gemm"]
        inputs: dict[str, np.ndarray] = {}
        observe(model, self.ranges[:8], [n.input[0] for n in gemms], inputs.__setitem__, batch_size=8)
        found = {n.name: 0.0 for n in self.layers(model)}
        for node in gemms:
            x = inputs[node.input[0]].reshape(-1, inputs[node.input[0]].shape[-1])
            w = onnx.numpy_helper.to_array(weights[node.input[1]])
            exact = x @ w
            found[node.name] = float(np.linalg.norm(_fake_u8(x) @ _fake_s8_columns(w) - exact)) / max(
                float(np.linalg.norm(exact)), 1e-12
            )
        return found

    def fewest_float_layers(self, start: Trial, passes: Callable[[Trial], str | None]) -> Trial:
        """``start`` with the fewest most-sensitive layers in float for which ``passes`` reports no miss.

        ``passes(trial)`` returns None when the trial is good enough, else why not. Layers are taken in order
        of :meth:`sensitivity` (calibration frames); their count is found by doubling, then bisection.
        """
        order = sorted(self.sensitivity(start.recipe.alpha).items(), key=lambda kv: -kv[1])
        names = [name for name, _ in order]
        limit = max(1, int(len(names) * MAX_FLOAT_SHARE))
        cache: dict[int, tuple[Trial, str | None]] = {}
        tried: list[dict[str, Any]] = []

        def attempt(k: int) -> str | None:
            if k not in cache:
                recipe = replace(start.recipe, float_layers=tuple(names[:k]))
                self._say(f"trying {recipe.detail}")
                trial = start if k == 0 else self._trial(recipe)
                cache[k] = (trial, passes(trial))
                tried.append({"float_layers": k, "misses": cache[k][1], **asdict(trial.score)})
            return cache[k][1]

        k = 0
        while attempt(k) is not None:
            if k == limit:
                raise MixedPrecisionError(
                    f"{start.recipe.detail}, with its {limit} most sensitive of {len(names)} layers in float (the "
                    f"most this builder allows): {cache[k][1]}",
                    tried,
                )
            k = min(limit, max(1, 2 * k))
        low = k // 2  # the last count that missed (or 0): bisect between it and k
        while k - low > 1:
            middle = (low + k) // 2
            if attempt(middle) is None:
                k = middle
            else:
                low = middle
        best = cache[k][0]
        best.tried = sorted(tried, key=lambda t: t["float_layers"])
        for count, (trial, _) in cache.items():
            if count not in (0, k):
                trial.path.unlink(missing_ok=True)
        return best


def smoothed_enough(scores: list[Score]) -> bool:
    """Whether the smoothing search can stop: the last strength scored no better than the one before it.

    Migrating more of an activation's range into the weights first shrinks the activations' quantization
    error, then grows the weights'. The search assumes one best strength between, as the SmoothQuant
    paper's α sweep shows: once a stronger α stops helping, a still stronger one does not help either.
    Each α scored costs a quantized graph and a pass over the held-aside frames, the largest share of a
    build's time.
    """
    return len(scores) > 1 and scores[-1].key() <= scores[-2].key()


class MixedPrecisionError(BuildError):
    """No allowed number of float layers reached the agreement; ``tried`` holds what was scored."""

    def __init__(self, message: str, tried: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.tried = tried


def _fake_u8(x: np.ndarray) -> np.ndarray:
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = max(high - low, 1e-12) / 255
    zero = np.round(-low / scale)
    return (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale


def _fake_s8_columns(w: np.ndarray) -> np.ndarray:
    scale = np.maximum(np.abs(w).max(axis=0, keepdims=True), 1e-12) / 127
    return np.clip(np.round(w / scale), -127, 127) * scale


def parse_smoothing(value: str) -> tuple[float | None, ...]:
    """``auto`` (search :data:`ALPHAS`), ``off``, or one α in (0, 1]."""
    if value == "auto":
        return ALPHAS
    if value == "off":
        return (None,)
    try:
        alpha = float(value)
    except ValueError:
        alpha = -1.0
    if not 0 < alpha <= 1:
        raise BuildError(f"--smoothing must be auto, off or an alpha in (0, 1], got {value!r}")
    return (alpha,)


def recipes_for(method: str, flavour: str, calibration: str) -> list[Recipe]:
    """The recipes a build asks for: ``auto`` is static and dynamic; TensorRT takes static only."""
    if flavour == "tensorrt":
        if method == "dynamic":
            raise BuildError(
                "--quantization dynamic cannot target TensorRT: TensorRT needs explicit Q/DQ scales, and a plan "
                "built without them is not INT8 (static is what --target tensorrt uses)"
            )
        return [Recipe("static", flavour, calibration)]
    return [Recipe(m, flavour, calibration) for m in (("static", "dynamic") if method == "auto" else (method,))]
