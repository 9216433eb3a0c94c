"""OpenVINO engines for x86 CPUs: an ONNX (Q/DQ INT8 included) or OpenVINO IR model, compiled per batch size.

OpenVINO's CPU plugin runs a model compiled for one static shape faster than one compiled
for a dynamic batch (``bench/openvino_settings_bench.py``; figures in ``bench/results/``),
so the model is compiled for the batch sizes :func:`compiled_sizes` names (powers of two
up to the bundle's maximum, and the maximum) and a batch runs on the smallest compiled
size that holds it, padded. The passport's latency per batch size is measured this way
too, so the agent's batcher sees what padding costs and prefers the compiled sizes.

A batch of more than one image is split across OpenVINO's CPU *streams* (its THROUGHPUT
mode: each stream runs one infer request on its own share of the cores), and the parts
run at once: one request over every core (LATENCY mode) spends part of every layer waiting for
its threads to meet, and the split measured faster at batch 2 and up (the same bench). A single
image keeps one request over every core, where splitting would leave cores idle.

Targets: ``cpu`` runs the float parts of the model in FP32; ``cpu-bf16`` in BF16 (what
OpenVINO picks by default on CPUs with AVX-512 BF16 or AMX; a bundle built for it
requires such a CPU). Compiled models are cached under ``cache_dir`` (OpenVINO's model
cache), so an agent restart or a hot swap back to a known engine does not recompile.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

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
    return openvino  # type: ignore[no-any-return]  # OpenVINO ships no type information


def compiled_sizes(max_batch: int) -> list[int]:
    """Batch sizes compiled: powers of two below ``max_batch``, and ``max_batch``."""
    sizes = {max_batch}
    size = 1
    while size < max_batch:
        sizes.add(size)
        size *= 2
    return sorted(sizes)


@dataclass
class _Compiled:
    """One compiled batch size: its infer requests (one per stream), each fed ``part`` images of ``padded``."""

    requests: list[Any]
    part: int
    padded: np.ndarray  # allocated once: the per-batch path only copies into it

    def run(self, images: np.ndarray) -> np.ndarray:
        n = len(images)
        batch = images
        if n != len(self.padded):
            batch = self.padded
            batch[:n] = images
        for i, request in enumerate(self.requests):
            request.start_async({0: batch[i * self.part : (i + 1) * self.part]})
        for request in self.requests:
            request.wait()
        parts = [request.get_output_tensor(0).data for request in self.requests]
        return np.concatenate(parts)[:n] if len(parts) > 1 else parts[0][:n].copy()


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
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": PRECISION[target]}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        try:
            model = core.read_model(str(path))
            name = model.inputs[0].any_name
            shape = list(model.inputs[0].get_partial_shape().get_min_shape())[1:]
            # OpenVINO's THROUGHPUT mode picks the stream count for this model, CPU and thread count; its
            # model compiled for one image per stream serves the batches that split into single images
            model.reshape({name: [1, *shape]})
            per_stream = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "THROUGHPUT", **config})
            streams = max(1, int(per_stream.get_property("NUM_STREAMS")))
            self.streams = streams  # how many parts a full batch runs in at once
            self._compiled: dict[int, _Compiled] = {}
            for size in compiled_sizes(max_batch):
                count = min(streams, size)
                part = -(-size // count)
                count = -(-size // part)  # no stream left without images: 8 over 3 streams is 3 + 3 + 2 (padded)
                if count == 1:
                    model.reshape({name: [size, *shape]})
                    compiled = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY", **config})
                elif part == 1 and count == streams:
                    compiled = per_stream
                else:
                    model.reshape({name: [part, *shape]})
                    hint = {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": count}
                    compiled = core.compile_model(model, "CPU", {**config, **hint})
                requests = [compiled.create_infer_request() for _ in range(count)]
                self._compiled[size] = _Compiled(requests, part, np.zeros((part * count, *shape), np.uint8))
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own for bad models
            raise EngineError(f"OpenVINO cannot load {path}: {exc}") from exc

    def run(self, images: np.ndarray) -> np.ndarray:
        n = len(images)
        size = next((s for s in self._compiled if s >= n), None)
        if size is None:
            raise EngineError(f"batch of {n} is over this engine's maximum of {max(self._compiled)}")
        return self._compiled[size].run(images)

    def close(self) -> None:
        self._compiled.clear()
