"""ONNX Runtime engines (CPU and CUDA execution providers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from agent.engine.runtimes import EngineError

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    # ONNX Runtime's own TensorRT provider: builds TensorRT engines from an ONNX bundle at load time
    # (on Jetson, NVIDIA's onnxruntime-gpu wheel), falling back to CUDA for unsupported nodes.
    "tensorrt-ep": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


class OnnxRuntimeEngine:
    def __init__(self, path: Path, target: str = "cpu", threads: int | None = None) -> None:
        if target not in PROVIDERS:
            raise EngineError(f"ONNX Runtime has no target {target!r} (choose {', '.join(PROVIDERS)})")
        wanted = PROVIDERS[target][0]
        if wanted not in ort.get_available_providers():
            raise EngineError(f"{wanted} is not available in this ONNX Runtime ({ort.__version__})")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: quantized graphs trigger benign initializer warnings
        # Camera threads share the cores: idle ORT workers must sleep, not spin.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=PROVIDERS[target])
        except Exception as exc:  # ORT raises its own exception types for corrupt or unsupported models
            raise EngineError(f"ONNX Runtime cannot load {path}: {exc}") from exc
        if self.session.get_providers()[0] != wanted:  # ORT falls back to CPU silently
            raise EngineError(f"ONNX Runtime loaded {path} without {wanted}")
        self.input_name = self.session.get_inputs()[0].name

    def run(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: images})[0]

    def close(self) -> None:
        del self.session
