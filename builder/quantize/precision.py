"""Lowering an exported model's precision: INT8 (static QDQ or dynamic) and FP16.

Static INT8 calibrates activation ranges on real frames and writes QDQ pairs around
the weight-bearing ops only (``Gemm``, ``Conv``): LayerNorm, Softmax, GELU and the
activation x activation attention products stay in float, because quantizing them
costs ViTs far more agreement than it buys speed. Two flavours, by where it runs:

- ``cpu``: u8 activations x s8 weights (asymmetric activations). On x86 with VNNI
  that is ONNX Runtime's fast path; s8 x s8 measured slower than FP32 there.
- ``cpu-portable``: the same with weights in [-64, 64] (ONNX Runtime's ``reduce_range``), which
  x86 CPUs without VNNI multiply exactly (:data:`agent.engine.device.X86_INT8_FEATURES`).
- ``tensorrt``: s8 x s8 with symmetric activations and zero points of 0, the only Q/DQ
  TensorRT accepts; biases stay float (TensorRT's DequantizeLinear takes no INT32 input,
  so ONNX Runtime's default INT32 bias would make the parser reject the model).

Dynamic INT8 quantizes weights ahead of time and activations per batch, needing no
calibration; it only touches ``MatMul``, so ``Gemm`` is rewritten first.

Both take ``exclude``: names of Dense/Conv nodes *of the source graph* to leave in float
(the mixed-precision search of :mod:`builder.quantize.int8_recipe` picks them).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import get_args

import numpy as np
import onnx
import onnx_ir as ir
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.transformers.float16 import convert_float_to_float16

from builder.choices import CALIBRATIONS, Flavour
from builder.errors import BuildError
from builder.memory import release_freed_memory
from builder.rewrites.graph_passes import gemm_to_matmul

CALIBRATION_METHODS = dict(
    zip(CALIBRATIONS, (CalibrationMethod.MinMax, CalibrationMethod.Entropy, CalibrationMethod.Percentile), strict=True)
)
WEIGHT_OPS = ("Gemm", "Conv")
ALL_OPS: tuple[str, ...] = ()  # quantize every op the quantizer knows: the over-quantized build
FLAVOURS: tuple[Flavour, ...] = get_args(Flavour)  # see the module docstring
FP16_BLOCKED_OPS = ("LayerNormalization", "Softmax")  # reductions that lose most in half precision


class QuantizationError(BuildError):
    """Quantization failed or left weight-bearing ops in float."""


class _Batches(CalibrationDataReader):
    def __init__(self, images: np.ndarray, batch_size: int, on_batch: Callable[[int, int], None] | None) -> None:
        self._chunks: Iterator[np.ndarray] = iter(np.array_split(images, max(1, -(-len(images) // batch_size))))
        self._total, self._done, self._on_batch = -(-len(images) // batch_size), 0, on_batch

    def get_next(self) -> dict[str, np.ndarray] | None:
        chunk = next(self._chunks, None)
        if chunk is None:
            return None
        self._done += 1
        if self._on_batch:
            self._on_batch(self._done, self._total)
        return {"images": chunk}


def prepare(src: Path, dst: Path) -> Path:
    """``src`` through ONNX Runtime's recommended pre-quantization pass (shape inference, graph clean-up), once
    for every recipe quantized from it (``quantize_static_int8(..., prepared=True)``)."""
    quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    return dst


def _descendants(prepared: Path, exclude: tuple[str, ...]) -> list[str]:
    """The nodes of the pre-processed graph that stand for ``exclude``'s nodes of the export.

    Rewrites rename what they touch (``node_Gemm_33`` becomes ``node_Gemm_33_matmul`` and then
    ``node_Gemm_33_matmul/MatMulAddFusion``), always keeping the original name as a prefix; the
    dynamic quantizer of recent ONNX Runtime turns each Gemm back into a MatMul named ``<name>_MatMul``.
    """
    if not exclude:
        return []
    names = [n.name for n in onnx.load(str(prepared), load_external_data=False).graph.node]
    found = [n for n in names if any(n == e or n.startswith((f"{e}_", f"{e}/")) for e in exclude)]
    return found + [f"{n}_MatMul" for n in found]


def quantize_static_int8(
    src: Path,
    dst: Path,
    calibration: np.ndarray,
    method: str = "minmax",
    flavour: str = "cpu",
    op_types: tuple[str, ...] = WEIGHT_OPS,
    on_batch: Callable[[int, int], None] | None = None,
    batch_size: int = 1,
    exclude: tuple[str, ...] = (),
    prepared: bool = False,
    ranges: Path | None = None,
) -> Path:
    """QDQ INT8 model calibrated on ``calibration`` (preprocessed uint8 NHWC).

    The calibrator runs the graph with its optimizations off and holds each intermediate of a batch
    until its range is taken; one frame at a time keeps that memory down (a ViT-B/16 build's largest)
    and costs no time. Min/max ranges do not depend on the batching.

    ``prepared``: ``src`` already went through :func:`prepare`. ``ranges``: a file of activation ranges
    (ONNX Runtime's calibration cache) that is read when it exists and written when it does not; the
    ranges depend only on the float graph, the frames and ``method``, so recipes that differ in the
    layers left float share one calibration.
    """
    symmetric = flavour == "tensorrt"
    if flavour not in FLAVOURS:
        raise QuantizationError(f"unknown INT8 flavour {flavour!r}; one of {', '.join(FLAVOURS)}")
    with tempfile.TemporaryDirectory() as tmp:
        source = src if prepared else prepare(src, Path(tmp) / "prepared.onnx")
        quantize_static(
            str(source),
            str(dst),
            _Batches(calibration, batch_size, on_batch),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=list(op_types) or None,
            per_channel=True,
            reduce_range=flavour == "cpu-portable",
            calibrate_method=CALIBRATION_METHODS[method],
            nodes_to_exclude=_descendants(source, exclude),
            calibration_cache_path=ranges,
            extra_options={
                "ActivationSymmetric": symmetric,
                "WeightSymmetric": True,
                "CalibPercentile": 99.999,
                "QuantizeBias": not symmetric,
            },
        )
    return dst


def quantize_dynamic_int8(
    src: Path, dst: Path, exclude: tuple[str, ...] = (), flavour: str = "cpu", prepared: bool = False
) -> Path:
    """Dynamic INT8 (weights s8 ahead of time, activations u8 per batch) of every Dense layer.

    ``prepared``: ``src`` already went through :func:`prepare_for_dynamic`.
    """
    with tempfile.TemporaryDirectory() as tmp:
        source = src if prepared else prepare_for_dynamic(src, Path(tmp) / "prepared.onnx")
        quantize_dynamic(
            str(source),
            str(dst),
            weight_type=QuantType.QInt8,
            reduce_range=flavour == "cpu-portable",
            op_types_to_quantize=["MatMul"],
            nodes_to_exclude=_descendants(source, exclude),
        )
    return dst


def prepare_for_dynamic(src: Path, dst: Path) -> Path:
    """``src`` with its Dense layers as ``MatMul`` (all the dynamic quantizer touches), through :func:`prepare`."""
    with tempfile.TemporaryDirectory() as tmp:
        rewritten = Path(tmp) / "matmul.onnx"
        model = ir.load(src)
        gemm_to_matmul(model)
        ir.save(model, rewritten)
        del model  # before the pass, which reads the file into copies of its own
        release_freed_memory()
        return prepare(rewritten, dst)


def float_weight_ops(path: Path) -> list[tuple[str, str]]:
    """(op type, name) of weight-bearing ops whose weight is still a float initializer."""
    model = onnx.load(str(path))
    floats = {
        t.name for t in model.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    }
    weighted = ("Gemm", "MatMul", "Conv")
    return [(n.op_type, n.name) for n in model.graph.node if n.op_type in weighted and n.input[1] in floats]


def require_quantized(path: Path, op_types: tuple[str, ...]) -> None:
    """Fail when a layer of ``op_types`` escaped quantization: a silent FP32 layer is a wrong benchmark."""
    left = [name for op, name in float_weight_ops(path) if op in op_types]
    if left:
        raise QuantizationError(f"{len(left)} {'/'.join(op_types)} layers were left in float: {', '.join(left[:5])}")


def to_fp16(src: Path, dst: Path, blocked: tuple[str, ...] = FP16_BLOCKED_OPS) -> Path:
    """FP16 weights and activations; uint8 input and float32 logits kept; ``blocked`` ops stay FP32.

    The converter turns every initializer to FP16 and casts back in front of a blocked op, so a
    LayerNorm's scale and bias would still be rounded through FP16; they are given back their
    original FP32 values here (:func:`_restore_fp32_parameters`).
    """
    original = onnx.load(str(src))
    model = convert_float_to_float16(original, keep_io_types=True, op_block_list=list(blocked))
    _restore_fp32_parameters(model, original, blocked)
    onnx.save(model, str(dst))
    return dst


def _restore_fp32_parameters(model: onnx.ModelProto, original: onnx.ModelProto, blocked: tuple[str, ...]) -> None:
    """Blocked ops read their constant inputs from the FP32 originals, not through an FP16 round trip."""
    fp32 = {t.name: t for t in original.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    graph = model.graph
    casts = {n.output[0]: n for n in graph.node if n.op_type == "Cast"}
    restored: dict[str, str] = {}
    for node in graph.node:
        if node.op_type not in blocked:
            continue
        for i, name in enumerate(node.input):
            cast = casts.get(name)
            source = cast.input[0] if cast is not None else None
            if source in fp32:
                if source not in restored:
                    tensor = onnx.TensorProto()
                    tensor.CopyFrom(fp32[source])
                    tensor.name = restored[source] = f"{source}_fp32"
                    graph.initializer.append(tensor)
                node.input[i] = restored[source]
    used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    dead = [n for n in graph.node if n.op_type == "Cast" and n.output[0] not in used]
    for node in dead:
        graph.node.remove(node)
    used = {name for n in graph.node for name in n.input}
    for tensor in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(tensor)
