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
) -> np.ndarray:
    """Run ``images`` through ``model``; ``visit(name, value)`` sees each of ``tensors`` per batch.

    Returns the model's own first output (the logits) for all images.
    """
    names = list(dict.fromkeys(tensors))
    graph_outputs = [o.name for o in model.graph.output]
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in graph_outputs)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "observe.onnx"
        onnx.save(copy, str(path), save_as_external_data=copy.ByteSize() > _EXTERNAL_ABOVE)
        del copy
        engine = OnnxRuntimeEngine(path)
        wanted = [graph_outputs[0], *names]
        logits = []
        for start in range(0, len(images), batch_size):
            values = engine.session.run(wanted, {engine.input_name: images[start : start + batch_size]})
            logits.append(values[0])
            for name, value in zip(names, values[1:], strict=True):
                visit(name, value)
        engine.close()
    return np.concatenate(logits)


def channel_ranges(
    model: onnx.ModelProto, images: np.ndarray, tensors: Iterable[str], batch_size: int = 8
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """min and max of each tensor per channel (the last axis), over all ``images``."""
    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def visit(name: str, value: np.ndarray) -> None:
        flat = value.reshape(-1, value.shape[-1])
        low, high = flat.min(axis=0), flat.max(axis=0)
        if name in found:
            low, high = np.minimum(found[name][0], low), np.maximum(found[name][1], high)
        found[name] = (low, high)

    observe(model, images, tensors, visit, batch_size)
    return found


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
