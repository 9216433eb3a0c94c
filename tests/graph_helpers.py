"""Running a rewritten graph the way its tests compare it: ONNX Runtime through the agent's engine."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agent.engine.runtimes.onnxruntime import OnnxRuntimeEngine


def onnxruntime_logits(path: Path, images: np.ndarray) -> np.ndarray:
    engine = OnnxRuntimeEngine(path)
    try:
        return engine.run(images)
    finally:
        engine.close()
