"""The builder's vocabulary that the command line offers before anything heavy is imported."""

from __future__ import annotations

RUNTIMES = ("auto", "onnxruntime", "openvino")
TARGETS = {"cpu": ("fp32", "bf16", "int8"), "cuda": ("fp32", "fp16"), "tensorrt": ("fp32", "fp16", "int8")}
CALIBRATIONS = ("minmax", "entropy", "percentile")  # ONNX Runtime's INT8 calibration methods
DEFAULT_OPSET = 20  # TensorRT 10 reads opsets <= 20; native Gelu needs 20.
DEFAULT_TENSORRT = "10.3"  # JetPack 6.1/6.2's: what TensorRT-bound graphs are checked against without one
DEFAULT_TOLERANCE = 1e-3  # max |Δlogit| / max(1, max |logit|) allowed between ONNX Runtime and JAX
