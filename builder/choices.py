"""The builder's vocabulary: the values each option takes, as types and as the command line's choices.

Kept apart so that ``edgevit-build --help`` offers them before anything heavy is imported.
"""

from __future__ import annotations

from typing import Literal, get_args

Target = Literal["cpu", "cuda", "tensorrt"]
Precision = Literal["fp32", "bf16", "fp16", "int8"]
Runtime = Literal["auto", "onnxruntime", "openvino"]  # CPU runtimes to build candidates for; auto: all installed
Quantization = Literal["auto", "static", "dynamic"]  # auto: both, the passport decides
QuantizeOps = Literal["weights", "all"]  # all: deliberately over-quantized, for comparison
Calibration = Literal["minmax", "entropy", "percentile"]  # ONNX Runtime's INT8 calibration methods
Int8Cpu = Literal["auto", "vnni", "any"]  # x86 CPUs a CPU INT8 engine must be exact on; auto: as this machine
Flavour = Literal["cpu", "cpu-portable", "tensorrt"]  # INT8 arithmetic: u8 x s8, u8 x s7, s8 x s8

RUNTIMES: tuple[Runtime, ...] = get_args(Runtime)
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
QUANTIZATIONS: tuple[Quantization, ...] = get_args(Quantization)
QUANTIZE_OPS: tuple[QuantizeOps, ...] = get_args(QuantizeOps)
CALIBRATIONS: tuple[Calibration, ...] = get_args(Calibration)
INT8_CPUS: tuple[Int8Cpu, ...] = get_args(Int8Cpu)
TARGETS: dict[Target, tuple[Precision, ...]] = {
    "cpu": ("fp32", "bf16", "int8"),
    "cuda": ("fp32", "fp16"),
    "tensorrt": ("fp32", "fp16", "int8"),
}
DEFAULT_OPSET = 20  # TensorRT 10 reads opsets <= 20; native Gelu needs 20.
DEFAULT_TENSORRT = "10.3"  # JetPack 6.1/6.2's: what TensorRT-bound graphs are checked against without one
DEFAULT_TOLERANCE = 1e-3  # max |Δlogit| / max(1, max |logit|) allowed between ONNX Runtime and JAX
