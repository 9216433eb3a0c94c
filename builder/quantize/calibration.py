"""Looking inside an FP32 export while it runs: intermediate tensors on calibration frames.

Calibration-time analyses (SmoothQuant's per-channel ranges, per-layer quantization
sensitivity) need tensors that are not graph outputs. ONNX Runtime computes them anyway;
naming them as extra outputs of a copy of the graph hands them back, batch by batch.

Activation ranges are kept in ONNX Runtime's calibration cache, which its quantizer reads.
With min/max calibration they are measured here, in the same pass as the per-channel ranges,
for the tensors its calibrator would range (:func:`calibrated_tensors`, :func:`minmax_ranges`):
its own pass runs the graph once more, unoptimized, a frame at a time. :func:`rescaled_ranges`
writes a cache with some tensors' ranges worked out instead, for graphs that differ from a
calibrated one only by an exact per-channel scaling.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization.calibrate import (
    CalibrationMethod,
    MinMaxCalibrater,
    TensorData,
    TensorsData,
    load_tensors_data,
    save_tensors_data,
)

# Above this a copy of the graph is saved with its weights beside it (protobuf stops at 2 GiB).
_EXTERNAL_ABOVE = 1536 * 2**20


def observe(
    model: onnx.ModelProto | Path,
    images: np.ndarray,
    tensors: Iterable[str],
    visit: Callable[[str, np.ndarray], None],
    batch_size: int = 8,
    visited: int | None = None,
    extrema: Iterable[str] = (),
    visit_extrema: Callable[[str, float, float], None] = lambda name, low, high: None,
) -> np.ndarray:
    """Run ``images`` through ``model`` (a graph, or a file of one); ``visit(name, value)`` sees each of
    ``tensors`` per batch of the first ``visited`` images (all by default); the rest run for their logits
    alone, in the same session.

    ``visit_extrema(name, low, high)`` sees the min and max of each of ``extrema`` per batch of those images,
    reduced inside the graph: a ViT-B's Dense inputs and outputs at batch 8 would be hundreds of MB a batch.

    Given a file, the graph is read and freed again before the session opens, so that the pass holds one
    copy of a large model's weights (the session's) rather than two.

    Returns the model's own first output (the logits) for all images.
    """
    names = list(dict.fromkeys(tensors))
    if isinstance(model, Path):
        copy = onnx.load(str(model))
    else:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
    graph_outputs = [o.name for o in copy.graph.output]
    copy.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in graph_outputs)
    reduced = list(dict.fromkeys(extrema))
    _add_extrema(copy, reduced)
    # the weights are nearly all of it, and summing theirs is quick where the whole graph's size is not
    external = sum(t.ByteSize() for t in copy.graph.initializer) > _EXTERNAL_ABOVE
    seen = len(images) if visited is None else visited
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "observe.onnx"
        onnx.save(copy, str(path), save_as_external_data=external)
        del copy
        session = _session(path)
        image = session.get_inputs()[0].name
        logits = []
        lows_and_highs = [f"{n}{suffix}" for n in reduced for suffix in _EXTREMA_SUFFIXES]
        for start in range(0, seen, batch_size):
            batch = images[start : min(start + batch_size, seen)]
            values = session.run([graph_outputs[0], *names, *lows_and_highs], {image: batch})
            logits.append(values[0])
            for name, value in zip(names, values[1:], strict=False):
                visit(name, value)
            pairs = values[1 + len(names) :]
            for name, low, high in zip(reduced, pairs[0::2], pairs[1::2], strict=True):
                visit_extrema(name, float(low), float(high))
        for start in range(seen, len(images), batch_size):
            logits.append(
                session.run(graph_outputs[:1], {image: images[start : min(start + batch_size, len(images))]})[0]
            )
        del session
    return np.concatenate(logits)


def _session(path: Path) -> ort.InferenceSession:
    """A CPU session that runs nodes in the graph's order where it may. With ONNX Runtime's default order the
    reductions :func:`_add_extrema` adds ran after the whole graph, each tensor they read held until then."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


_EXTREMA_SUFFIXES = ("/edgevit_min", "/edgevit_max")


def _add_extrema(model: onnx.ModelProto, names: list[str]) -> None:
    """Adds a ReduceMin and a ReduceMax over the whole of each of ``names`` as graph outputs.

    Each pair goes right after the node that makes its tensor, where :func:`_session` runs it.
    """

    def reductions(name: str) -> list[onnx.NodeProto]:
        return [
            onnx.helper.make_node(op, [name], [name + suffix], name + suffix, keepdims=0)
            for op, suffix in zip(("ReduceMin", "ReduceMax"), _EXTREMA_SUFFIXES, strict=True)
        ]

    wanted = set(names)
    made = {out for node in model.graph.node for out in node.output}
    nodes = [r for name in names if name not in made for r in reductions(name)]  # graph inputs: first
    for node in model.graph.node:
        nodes.append(node)
        nodes.extend(r for out in node.output if out in wanted for r in reductions(out))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.output.extend(onnx.ValueInfoProto(name=name + suffix) for name in names for suffix in _EXTREMA_SUFFIXES)


@dataclass
class Activations:
    """What one pass over the calibration frames measured (:func:`measure`)."""

    channels: dict[str, tuple[np.ndarray, np.ndarray]]  # per tensor: min and max of each channel (last axis)
    extrema: dict[str, tuple[float, float]]  # per tensor: min and max over the whole tensor
    logits: np.ndarray  # of the images run after, for their logits alone


def measure(
    model: onnx.ModelProto | Path,
    images: np.ndarray,
    per_channel: Iterable[str],
    whole: Iterable[str] = (),
    then: np.ndarray | None = None,
    batch_size: int = 8,
) -> Activations:
    """Ranges of tensors over ``images``: per channel for ``per_channel``, whole for ``whole``; and the logits
    of ``then``, from the same copy of the graph and session (a large model's copy, its file and its session
    cost seconds each)."""
    found = Activations({}, {}, np.zeros(0))

    def visit(name: str, value: np.ndarray) -> None:
        flat = value.reshape(-1, value.shape[-1])
        low, high = flat.min(axis=0), flat.max(axis=0)
        if name in found.channels:
            low, high = np.minimum(found.channels[name][0], low), np.maximum(found.channels[name][1], high)
        found.channels[name] = (low, high)

    def visit_extrema(name: str, low: float, high: float) -> None:
        before = found.extrema.get(name, (low, high))
        found.extrema[name] = (min(before[0], low), max(before[1], high))

    rest = images[:0] if then is None else then
    logits = observe(
        model, np.concatenate([images, rest]), per_channel, visit, batch_size, len(images), whole, visit_extrema
    )
    found.logits = logits[len(images) :]
    return found


def channel_ranges(
    model: onnx.ModelProto, images: np.ndarray, tensors: Iterable[str], batch_size: int = 8
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """min and max of each tensor per channel (the last axis), over all ``images``."""
    return measure(model, images, tensors, batch_size=batch_size).channels


def channel_absmax(
    model: onnx.ModelProto, images: np.ndarray, tensors: Iterable[str], batch_size: int = 8
) -> dict[str, np.ndarray]:
    """max |x| of each tensor per channel (the last axis), over all ``images``."""
    return absmax(channel_ranges(model, images, tensors, batch_size))


def absmax(ranges: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """max |x| per channel from per-channel (min, max)."""
    return {name: np.maximum(-low, high) for name, (low, high) in ranges.items()}


def calibrated_tensors(prepared: Path, op_types: tuple[str, ...]) -> set[str]:
    """The tensors ONNX Runtime's calibrator takes ranges of when it quantizes ``op_types`` of ``prepared``:
    asked of the calibrator itself, so that ranges measured elsewhere (:func:`minmax_ranges`) stand in for
    exactly the ones it would measure."""
    calibrator = MinMaxCalibrater(prepared, list(op_types))
    return set(calibrator.select_tensors_to_calibrate(calibrator.model)[0])


def minmax_ranges(dst: Path, extrema: dict[str, tuple[float, float]]) -> None:
    """Writes ``extrema`` as ONNX Runtime's min/max calibration cache, in the shapes its calibrator writes."""

    def value(x: float) -> np.ndarray:
        return np.asarray([x], np.float32)

    ranges = {name: TensorData(lowest=value(low), highest=value(high)) for name, (low, high) in extrema.items()}
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, ranges), dst)


def rescaled_ranges(base: Path, dst: Path, ranges: dict[str, tuple[float, float]], known: set[str]) -> bool:
    """Writes ``base`` (an ONNX Runtime min/max calibration cache) to ``dst`` with ``ranges`` in place of the
    ranges of those tensors; False, writing nothing, when ``base`` names a tensor outside ``known`` (the graph
    the ranges were worked out for), whose values could then not be vouched for."""
    data = load_tensors_data(base)
    if data.calibration_method != CalibrationMethod.MinMax or not set(data.keys()) <= known:
        return False
    changed = {}
    for name, value in data.items():
        low, high = value.range_value
        if name in ranges:
            low = np.asarray(ranges[name][0], low.dtype).reshape(low.shape)
            high = np.asarray(ranges[name][1], high.dtype).reshape(high.shape)
        changed[name] = TensorData(lowest=low, highest=high)
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, changed), dst)
    return True
