"""Native TensorRT 10 engines, with device buffers from pycuda.

Written against the TensorRT 10 API (JetPack 6): named I/O tensors,
``set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3``. A plan only
deserializes on the GPU model and TensorRT version it was built with; the bundle
check refuses a mismatch before this code runs, and a failure here is reported as
such rather than as a crash.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agent.engine.runtimes import EngineError


class TensorRTEngine:
    def __init__(self, path: Path, max_batch: int) -> None:
        try:
            import pycuda.driver as cuda
            import tensorrt as trt
        except ImportError as exc:
            raise EngineError(f"TensorRT engines need tensorrt and pycuda: {exc}") from exc
        try:
            import pycuda.autoprimaryctx  # noqa: F401  (the primary context, shared with TensorRT)
        except Exception as exc:  # pycuda's cuInit/context errors: no GPU, driver mismatch, no /dev/nvhost access
            raise EngineError(f"CUDA cannot start here ({type(exc).__name__}: {exc}); is the GPU visible?") from exc
        self._cuda = cuda
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self._engine is None:
            raise EngineError(f"TensorRT {trt.__version__} cannot deserialize {path}: built for another GPU or version")
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise EngineError(f"{path} has inputs {inputs} and outputs {outputs}; expected one of each")
        self._input, self._output = inputs[0], outputs[0]
        _, height, width, channels = self._engine.get_tensor_shape(self._input)
        self._classes = self._engine.get_tensor_shape(self._output)[-1]
        self._context = self._engine.create_execution_context()
        self._stream = cuda.Stream()
        # host buffers page-locked: asynchronous copies from pageable memory (the worker's memmap) are not async
        self._h_input = cuda.pagelocked_empty((max_batch, height, width, channels), np.uint8)
        self._h_output = cuda.pagelocked_empty((max_batch, self._classes), np.float32)
        self._d_input = cuda.mem_alloc(self._h_input.nbytes)
        self._d_output = cuda.mem_alloc(self._h_output.nbytes)
        self._context.set_tensor_address(self._input, int(self._d_input))
        self._context.set_tensor_address(self._output, int(self._d_output))
        self._max_batch = max_batch

    def run(self, images: np.ndarray) -> np.ndarray:
        n = len(images)
        if n > self._max_batch:
            raise EngineError(f"batch of {n} exceeds the engine's maximum {self._max_batch}")
        if not self._context.set_input_shape(self._input, images.shape):
            raise EngineError(f"the plan's profile does not admit input shape {images.shape}")
        shape = tuple(self._context.get_tensor_shape(self._output))  # what this input shape makes of the output
        if shape != (n, self._classes):
            raise EngineError(f"the plan gives output shape {shape} for a batch of {n}; expected {(n, self._classes)}")
        host_in = self._h_input[:n]
        host_in[...] = images
        self._cuda.memcpy_htod_async(self._d_input, host_in, self._stream)
        if not self._context.execute_async_v3(stream_handle=self._stream.handle):
            raise EngineError("TensorRT execution failed")
        out = self._h_output[:n]
        self._cuda.memcpy_dtoh_async(out, self._d_output, self._stream)
        self._stream.synchronize()
        return np.array(out, copy=True)

    def close(self) -> None:
        self._d_input.free()
        self._d_output.free()
        del self._context, self._engine
