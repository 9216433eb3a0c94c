"""OpenVINO engines for x86 CPUs: an ONNX (Q/DQ INT8 included) or OpenVINO IR model, compiled per batch size.

OpenVINO's CPU plugin runs a model compiled for one static shape far faster than one
compiled for a dynamic batch (on ViT-B/16 INT8 here: 60 against 40 images/s), so the
model is compiled for the batch sizes :func:`compiled_sizes` names (powers of two up to
the bundle's maximum, and the maximum) and a batch runs on the smallest compiled size
that holds it, padded. The passport's latency per batch size is measured this way too,
so the agent's batcher sees what padding costs and prefers the compiled sizes.

Targets: ``cpu`` runs the float parts of the model in FP32; ``cpu-bf16`` in BF16 (what
OpenVINO picks by default on CPUs with AVX-512 BF16 or AMX; a bundle built for it
requires such a CPU). Compiled models are cached under ``cache_dir`` (OpenVINO's model
cache), so an agent restart or a hot swap back to a known engine does not recompile.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

import numpy as np

from agent.engine.runtimes import EngineError

PRECISION = {"cpu": "f32", "cpu-bf16": "bf16"}


def load_openvino() -> ModuleType:
    """``openvino``, imported without its usage telemetry.

    ``import openvino`` (and NNCF) send usage events unless a consent file in the user's home says
    no; each event forks a process to post it. A device never phones home, and forking a process
    that runs camera threads (or has run JAX) can deadlock. Every caller of OpenVINO's telemetry
    falls back to a stub when ``openvino_telemetry`` cannot be imported, which this arranges.
    """
    sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]
    try:
        import openvino
    except ImportError as exc:
        raise EngineError("this bundle needs OpenVINO: pip install 'edgevit[openvino]'") from exc
    return openvino


def compiled_sizes(max_batch: int) -> list[int]:
    """Batch sizes compiled: powers of two below ``max_batch``, and ``max_batch``."""
    sizes = {max_batch}
    size = 1
    while size < max_batch:
        sizes.add(size)
        size *= 2
    return sorted(sizes)


class OpenVINOEngine:
    def __init__(
        self,
        path: Path,
        target: str = "cpu",
        max_batch: int = 8,
        threads: int | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        if target not in PRECISION:
            raise EngineError(f"OpenVINO has no target {target!r} (choose {', '.join(PRECISION)})")
        core = load_openvino().Core()
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            core.set_property({"CACHE_DIR": str(cache_dir)})
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": PRECISION[target]}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        try:
            model = core.read_model(str(path))
            name = model.inputs[0].any_name
            shape = list(model.inputs[0].get_partial_shape().get_min_shape())[1:]
            self._requests = {}
            for size in compiled_sizes(max_batch):
                model.reshape({name: [size, *shape]})
                self._requests[size] = core.compile_model(model, "CPU", config).create_infer_request()
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own for bad models
            raise EngineError(f"OpenVINO cannot load {path}: {exc}") from exc
        # one padded input per compiled size, allocated once: the per-batch path only copies
        self._padded = {size: np.zeros((size, *shape), np.uint8) for size in self._requests}

    def run(self, images: np.ndarray) -> np.ndarray:
        n = len(images)
        size = next((s for s in self._requests if s >= n), None)
        if size is None:
            raise EngineError(f"batch of {n} is over this engine's maximum of {max(self._requests)}")
        batch = images
        if size != n:
            batch = self._padded[size]
            batch[:n] = images
        request = self._requests[size]
        request.infer({0: batch})
        return request.get_output_tensor(0).data[:n].copy()

    def close(self) -> None:
        self._requests.clear()
