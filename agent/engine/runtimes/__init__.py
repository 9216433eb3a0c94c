"""One interface over the runtimes a bundle can name.

An :class:`Engine` takes a uint8 NHWC batch and returns float32 logits; which runtime
serves it comes from the bundle's manifest (``engine.backend`` / ``engine.target``).
Runtimes are imported only when asked for, so a CPU-only device needs no TensorRT.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from agent.engine.bundle import Bundle


class EngineError(RuntimeError):
    """The engine cannot be loaded or run on this device."""


class Engine(Protocol):
    def run(self, images: np.ndarray) -> np.ndarray:
        """uint8 [batch, H, W, 3] -> float32 [batch, classes]."""
        ...

    def close(self) -> None: ...


def open_engine(
    backend: str,
    target: str,
    path: Path,
    max_batch: int,
    threads: int | None = None,
    cache_dir: Path | None = None,
    precision: str = "fp32",
    split_batches: bool = True,
    images_per_stream: int = 1,
) -> Engine:
    """The engine a bundle names. ``cache_dir`` keeps runtimes' compiled forms across loads (OpenVINO,
    ONNX Runtime's TensorRT provider); ``precision`` is the bundle's (the TensorRT provider's FP16);
    ``split_batches`` off loads ONNX Runtime's CPU engine as one session, where only its logits matter;
    ``images_per_stream`` is an OpenVINO engine's chunk per CPU stream (the bundle's serving layout)."""
    if backend == "onnxruntime":
        from agent.engine.runtimes.onnxruntime import OnnxRuntimeEngine

        return OnnxRuntimeEngine(path, target, threads, max_batch, precision, cache_dir, split_batches)
    if backend == "openvino":
        from agent.engine.runtimes.openvino import OpenVINOEngine

        return OpenVINOEngine(path, target, max_batch, threads, cache_dir, images_per_stream)
    if backend == "tensorrt":
        from agent.engine.runtimes.tensorrt import TensorRTEngine

        return TensorRTEngine(path, max_batch)
    raise EngineError(f"unknown engine backend {backend!r}")


def open_bundle_engine(bundle: Bundle, max_batch: int | None = None, threads: int | None = None) -> Engine:
    """``bundle``'s engine in this process, served as its manifest says (runtime, target, OpenVINO's images per
    stream), for up to ``max_batch`` images (default the bundle's maximum). The agent itself serves through
    :class:`agent.engine.worker.WorkerEngine`; this is for tools and benches that must serve it alike."""
    return open_engine(
        bundle.backend,
        bundle.target,
        bundle.engine_path,
        max_batch or bundle.batch_range[1],
        threads,
        images_per_stream=bundle.images_per_stream,
    )
