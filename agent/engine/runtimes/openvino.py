"""OpenVINO engines for x86 CPUs: an ONNX (Q/DQ INT8 included) or OpenVINO IR model.

The model is compiled twice, and each compile holds its own copy of the weights
(``bench/openvino_memory_bench.py`` measures the designs; figures in ``bench/results/``):

- for OpenVINO's CPU *streams* (its THROUGHPUT mode: each stream runs one infer request on its
  own share of the cores), for ``images_per_stream`` images. A batch of more than one image runs
  in chunks of that size, one per stream at once, in rounds, the last chunk padded: one request
  over every core spends part of every layer waiting for its threads to meet, and the split
  measured faster at batch 2 and up. A larger chunk waits less per image but pads the sizes
  between, so which serves a device best depends on the batch sizes it serves: the builder
  times the layouts there and the bundle names the fastest (``engine.images_per_stream``).
- with the LATENCY hint, one request over every core, for a batch of one image, where splitting
  would leave cores idle. Where OpenVINO runs one stream of one image anyway (one thread), the
  first compile serves it.

A compile per batch size measured no faster and held a copy of the weights and the activations
for each; one compile for a dynamic batch measured slower at batch 8.

Targets: ``cpu`` runs the float parts of the model in FP32; ``cpu-bf16`` in BF16 (what
OpenVINO picks by default on CPUs with AVX-512 BF16 or AMX; a bundle built for it
requires such a CPU). Compiled models are cached under ``cache_dir`` (OpenVINO's model
cache), so an agent restart or a hot swap back to a known engine does not recompile.
"""

from __future__ import annotations

import sys
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


def requests_for(n: int, chunk: int) -> int:
    """How many per-stream requests of ``chunk`` images a batch of ``n`` runs (0: one image, on the whole-core
    compile). Sizes with the same count run the same requests on the same shapes, a short chunk padded, so they
    take the same time: the profile times one of them (:func:`agent.engine.profile.timed_sizes`)."""
    return 0 if n == 1 else -(-n // chunk)


class OpenVINOEngine:
    def __init__(
        self,
        path: Path,
        target: str = "cpu",
        max_batch: int = 8,
        threads: int | None = None,
        cache_dir: Path | None = None,
        images_per_stream: int = 1,
    ) -> None:
        if target not in PRECISION:
            raise EngineError(f"OpenVINO has no target {target!r} (choose {', '.join(PRECISION)})")
        if not 1 <= images_per_stream <= max_batch:
            raise EngineError(f"images per stream must lie within 1..{max_batch}, got {images_per_stream}")
        self.chunk = images_per_stream
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
            model.reshape({name: [self.chunk, *shape]})
            # THROUGHPUT picks the stream count for this model, CPU and thread count
            per_stream = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "THROUGHPUT", **config})
            self.streams = max(1, int(per_stream.get_property("NUM_STREAMS")))
            whole = per_stream
            if self.streams > 1 or self.chunk > 1:
                model.reshape({name: [1, *shape]})
                whole = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY", **config})
            del model  # the compiled models hold what they need
            self._whole = whole.create_infer_request()
            # one request per stream (two per stream measured no faster)
            self._per_stream = [per_stream.create_infer_request() for _ in range(self.streams)]
            outputs = list(per_stream.outputs[0].get_partial_shape().get_min_shape())[1:]
            # allocated once: each batch fills them (a short last chunk is padded in its stream's own buffer)
            self._logits: np.ndarray = np.zeros((max_batch, *outputs), np.float32)
            self._padded = np.zeros((self.streams, self.chunk, *shape), np.uint8) if self.chunk > 1 else None
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own for bad models
            raise EngineError(f"OpenVINO cannot load {path}: {exc}") from exc

    def run(self, images: np.ndarray) -> np.ndarray:
        n = len(images)
        if n > len(self._logits):
            raise EngineError(f"batch of {n} is over this engine's maximum of {len(self._logits)}")
        if n == 1:
            self._whole.infer({0: images})
            self._logits[0] = self._whole.get_output_tensor(0).data[0]
        else:
            self._in_rounds(images)
        logits: np.ndarray = self._logits[:n].copy()
        return logits

    def requests(self, n: int) -> int:
        """:func:`requests_for` this engine's chunk."""
        return requests_for(n, self.chunk)

    def _in_rounds(self, images: np.ndarray) -> None:
        """Into ``_logits``: the images in chunks of ``chunk``, one per stream at once, round after round."""
        n, chunk = len(images), self.chunk
        starts = range(0, n, chunk)
        for first in range(0, len(starts), self.streams):
            part = starts[first : first + self.streams]
            for stream, (request, i) in enumerate(zip(self._per_stream, part, strict=False)):
                request.start_async({0: self._chunk_of(images, i, stream)})
            for request, i in zip(self._per_stream, part, strict=False):
                request.wait()
                end = min(n, i + chunk)
                self._logits[i:end] = request.get_output_tensor(0).data[: end - i]

    def _chunk_of(self, images: np.ndarray, i: int, stream: int) -> np.ndarray:
        """Images ``i`` to ``i + chunk``; a short last chunk copied into the stream's padded buffer."""
        if i + self.chunk <= len(images):
            return images[i : i + self.chunk]
        assert self._padded is not None  # a chunk of one image is never short
        padded: np.ndarray = self._padded[stream]
        padded[: len(images) - i] = images[i:]
        return padded

    def close(self) -> None:
        self._per_stream.clear()
        del self._whole
