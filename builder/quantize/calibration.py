"""Looking inside an FP32 export while it runs: intermediate tensors on calibration frames.

Calibration-time analyses (SmoothQuant's per-channel ranges, per-layer quantization
sensitivity) need tensors that are not graph outputs. ONNX Runtime computes them anyway;
naming them as extra outputs of a copy of the graph hands them back, batch by batch.

Activation ranges are ONNX Runtime's own (its calibrator, kept in its calibration cache);
:func:`rescaled_ranges` writes one with some tensors' ranges worked out here instead, for
graphs that differ from a calibrated one only by an exact per-channel scaling.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization.calibrate import (
    CalibrationMethod,
    TensorData,
    TensorsData,
    load_tensors_data,
    save_tensors_data,
)

from agent.engine.runtimes.onnxruntime import OnnxRuntimeEngine

# Above this a copy of the graph is saved with its weights beside it (protobuf stops at 2 GiB).
_EXTERNAL_ABOVE = 1536 * 2**20


def observe(
    model: onnx.ModelProto,
    images: np.ndarray,
    tensors: Iterable[str],
    visit: Callable[[str, np.ndarray], None],
    batch_size: int = 8,
    visited: int | None = None,
) -> np.ndarray:
    """Run ``images`` through ``model``; ``visit(name, value)`` sees each of ``tensors`` per batch of the first
    ``visited`` images (all by default); the rest run for their logits alone, in the same session.

    Returns the model's own first output (the logits) for all images.
    """
    names = list(dict.fromkeys(tensors))
    graph_outputs = [o.name for o in model.graph.output]
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in graph_outputs)
    # the weights are nearly all of it, and summing theirs is quick where the whole graph's size is not
    external = sum(t.ByteSize() for t in copy.graph.initializer) > _EXTERNAL_ABOVE
    seen = len(images) if visited is None else visited
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "observe.onnx"
        onnx.save(copy, str(path), save_as_external_data=external)
        del copy
        engine = OnnxRuntimeEngine(path)
        logits = []
        for first, last, wanted in ((0, seen, [graph_outputs[0], *names]), (seen, len(images), graph_outputs[:1])):
            for start in range(first, last, batch_size):
                values = engine.session.run(wanted, {engine.input_name: images[start : min(start + batch_size, last)]})
                logits.append(values[0])
                for name, value in zip(wanted[1:], values[1:], strict=True):
                    visit(name, value)
        engine.close()
    return np.concatenate(logits)


def channel_ranges(
    model: onnx.ModelProto, images: np.ndarray, tensors: Iterable[str], batch_size: int = 8
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """min and max of each tensor per channel (the last axis), over all ``images``."""
    return channel_ranges_and_logits(model, images, tensors, images[:0], batch_size)[0]


def channel_ranges_and_logits(
    model: onnx.ModelProto, images: np.ndarray, tensors: Iterable[str], then: np.ndarray, batch_size: int = 8
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """:func:`channel_ranges` of ``images``, and the logits of ``then`` from the same copy of the graph and
    session: a large model's copy, its file and its session cost seconds each."""
    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def visit(name: str, value: np.ndarray) -> None:
        flat = value.reshape(-1, value.shape[-1])
        low, high = flat.min(axis=0), flat.max(axis=0)
        if name in found:
            low, high = np.minimum(found[name][0], low), np.maximum(found[name][1], high)
        found[name] = (low, high)

    logits = observe(model, np.concatenate([images, then]), tensors, visit, batch_size, visited=len(images))
    return found, logits[len(images) :]


def channel_absmax(
    model: onnx.ModelProto, images: np.ndarray, tensors: Iterable[str], batch_size: int = 8
) -> dict[str, np.ndarray]:
    """max |x| of each tensor per channel (the last axis), over all ``images``."""
    return absmax(channel_ranges(model, images, tensors, batch_size))


def absmax(ranges: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """max |x| per channel from per-channel (min, max)."""
    return {name: np.maximum(-low, high) for name, (low, high) in ranges.items()}


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
