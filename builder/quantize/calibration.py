"""Looking inside an FP32 export while it runs: intermediate tensors on calibration frames.

Calibration-time analyses (SmoothQuant's per-channel ranges, per-layer quantization
sensitivity) need tensors that are not graph outputs. ONNX Runtime computes them anyway;
naming them as extra outputs of a copy of the graph hands them back, batch by batch.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import onnx

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


def channel_absmax(
    model: onnx.ModelProto, images: np.ndarray, tensors: Iterable[str], batch_size: int = 8
) -> dict[str, np.ndarray]:
    """max |x| of each tensor per channel (the last axis), over all ``images``."""
    found: dict[str, np.ndarray] = {}

    def visit(name: str, value: np.ndarray) -> None:
        peak = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
        found[name] = np.maximum(found[name], peak) if name in found else peak

    observe(model, images, tensors, visit, batch_size)
    return found
