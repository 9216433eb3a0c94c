"""ONNX Runtime engines: CPU, CUDA, and ONNX Runtime's own TensorRT provider.

The TensorRT provider builds TensorRT engines from the ONNX graph when a session
starts. Unconfigured, it rebuilds them at every worker start and for every new batch
size, which on a Jetson takes minutes; :func:`tensorrt_provider_options` gives it an
engine and timing cache under the agent's state dir, one optimization profile covering
the bundle's batch range (so no batch size triggers a rebuild), and FP16 when the
bundle is FP16.

Serving on the CPU, unless ``threads`` fixes the thread count, a batch of more than one image is
split across *streams*, one part per core run at once on a single-threaded session. With
spinning off (as it must be beside the decoders) that measured faster than one session
with a thread per core (``bench/worker_bench.py``). A batch of one image has nothing to
split and runs on a second session, with a thread per core. The two sessions each hold
the weights.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

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


def tensorrt_provider_options(
    input_name: str, shape: tuple[int, ...], max_batch: int, precision: str, cache_dir: Path | None
) -> dict[str, str]:
    """TensorrtExecutionProvider's options for a bundle: caches, the batch profile, precision."""
    dims = "x".join(map(str, shape))
    options = {
        "trt_profile_min_shapes": f"{input_name}:1x{dims}",
        "trt_profile_opt_shapes": f"{input_name}:{max_batch}x{dims}",
        "trt_profile_max_shapes": f"{input_name}:{max_batch}x{dims}",
        "trt_fp16_enable": "True" if precision == "fp16" else "False",
        "trt_max_workspace_size": str(1 << 30),
    }
    if cache_dir is not None:
        folder = cache_dir / "tensorrt"
        folder.mkdir(parents=True, exist_ok=True)
        options |= {
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": str(folder),
            "trt_timing_cache_enable": "True",
            "trt_timing_cache_path": str(folder),
        }
    return options


def _model_input(path: Path) -> tuple[str, tuple[int, ...]]:
    """The graph input's name and per-image shape, read without loading weights."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    tensor = graph.input[0]
    return tensor.name, tuple(d.dim_value for d in tensor.type.tensor_type.shape.dim[1:])


class OnnxRuntimeEngine:
    def __init__(
        self,
        path: Path,
        target: str = "cpu",
        threads: int | None = None,
        max_batch: int = 8,
        precision: str = "fp32",
        cache_dir: Path | None = None,
        split_batches: bool = False,
    ) -> None:
        """``split_batches``: serve with streams (see the module); off, one session (the builder's
        offline runs, which want logits, not speed)."""
        if target not in PROVIDERS:
            raise EngineError(f"ONNX Runtime has no target {target!r} (choose {', '.join(PROVIDERS)})")
        wanted = PROVIDERS[target][0]
        if wanted not in ort.get_available_providers():
            hint = (
                " (on Jetson: NVIDIA's onnxruntime-gpu wheel for JetPack; scripts/jetson-install)"
                if target != "cpu"
                else ""
            )
            raise EngineError(f"{wanted} is not available in this ONNX Runtime ({ort.__version__}){hint}")
        providers: list[str | tuple[str, dict[str, Any]]] = list(PROVIDERS[target])
        if target == "tensorrt-ep":
            name, shape = _model_input(path)
            providers[0] = (wanted, tensorrt_provider_options(name, shape, max_batch, precision, cache_dir))
        cores = len(os.sched_getaffinity(0))
        self.streams = cores if split_batches and target == "cpu" and not threads and cores > 1 else 1
        self.session = self._session(path, providers, threads)
        if self.session.get_providers()[0] != wanted:  # ORT falls back to CPU silently
            raise EngineError(f"ONNX Runtime loaded {path} without {wanted}")
        self._per_stream = self._session(path, providers, 1) if self.streams > 1 else self.session
        self._pool = ThreadPoolExecutor(self.streams - 1, "ort-stream") if self.streams > 1 else None
        self.input_name = self.session.get_inputs()[0].name

    @staticmethod
    def _session(path: Path, providers: list[str | tuple[str, dict[str, Any]]], threads: int | None) -> Any:
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: quantized graphs trigger benign initializer warnings
        # Decoders and the agent share the cores: idle ORT workers must sleep, not spin.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        try:
            return ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # ORT raises its own exception types for corrupt or unsupported models
            raise EngineError(f"ONNX Runtime cannot load {path}: {exc}") from exc

    def run(self, images: np.ndarray) -> np.ndarray:
        n = len(images)
        if n == 1 or self._pool is None:
            logits: np.ndarray = self.session.run(None, {self.input_name: images})[0]
            return logits
        parts = np.array_split(images, min(n, self.streams))
        others = [self._pool.submit(self._run_part, part) for part in parts[1:]]
        return np.concatenate([self._run_part(parts[0]), *(other.result() for other in others)])

    def _run_part(self, images: np.ndarray) -> np.ndarray:
        logits: np.ndarray = self._per_stream.run(None, {self.input_name: images})[0]
        return logits

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
        del self.session, self._per_stream
