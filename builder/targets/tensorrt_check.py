"""Will TensorRT's ONNX parser take this graph? Checked on any machine, before a Jetson is involved.

A graph bound for TensorRT (a plan, or ONNX Runtime's TensorRT provider) is refused
here with the node and the rule it breaks, so a Jetson user never learns it at flash
time. The rules are onnx-tensorrt's, for the TensorRT release the bundle requires:

- **opset**: the default-domain opset the parser reads (TensorRT 8.6: ≤ 17; 10.x: ≤ 20);
- **operators**: only ops the parser imports; no ``com.microsoft`` contrib ops (ONNX
  Runtime's own); ``Gelu`` (opset 20) only from TensorRT 10;
- **Q/DQ**: explicit quantization is symmetric and signed: a QuantizeLinear needs an INT8
  zero point (none means UINT8) equal to 0; a DequantizeLinear reads INT8 (or FP8/INT4),
  never INT32 (ONNX Runtime's default bias quantization); scales are positive finite
  constants, one per tensor for activations, and per channel only for weights along
  their output-channel axis;
- **uint8**: only the network input, and only into a Cast;
- **hybrids' ResNet**: ``MaxPool`` without its indices output; ``GroupNormalization`` only
  from opset 21, where its scale and bias are per channel (opset 18's are per group, which
  is not what a GroupNorm layer computes; edgevit exports GroupNorm as primitive ops).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from builder.errors import BuildError

# onnx-tensorrt's importers that ViT, hybrid and Mixer exports (and their Q/DQ forms) can contain; 10.x adds Gelu.
_COMMON_OPS = frozenset(
    "Abs Add ArgMax Cast Clip Concat Constant ConstantOfShape Conv DequantizeLinear Div Einsum Equal Erf Exp "
    "Expand Flatten Gather Gemm GlobalAveragePool GroupNormalization Identity LayerNormalization MatMul Max MaxPool "
    "Min Mul Neg Pad Pow "
    "QuantizeLinear Range Reciprocal ReduceMax ReduceMean ReduceSum Relu Reshape Resize Shape Sigmoid Slice "
    "Softmax Split Sqrt Squeeze Sub Tanh Tile Transpose Unsqueeze Where".split()
)
SUPPORTED = {
    (8, 6): {"max_opset": 17, "ops": _COMMON_OPS},
    (10, 0): {"max_opset": 20, "ops": _COMMON_OPS | {"Gelu"}},
}
Q_TYPES = {TensorProto.INT8, TensorProto.FLOAT8E4M3FN, TensorProto.INT4}


class TensorRTCompatibilityError(BuildError):
    """The graph breaks a rule of TensorRT's ONNX parser; the message names each node and rule."""


@dataclass(frozen=True)
class Problem:
    node: str
    rule: str

    def __str__(self) -> str:
        return f"{self.node}: {self.rule}"


def rules_for(version: str) -> dict:
    """The parser's rules for TensorRT ``version`` (``10.3``, ``8.6.2``): the newest release not after it."""
    major, minor = (int(p) for p in (version.split(".") + ["0"])[:2])
    known = [v for v in sorted(SUPPORTED) if v <= (major, minor)]
    if not known:
        raise TensorRTCompatibilityError(f"TensorRT {version} is older than any this build knows (8.6, 10.x)")
    return SUPPORTED[known[-1]]


def _output_channel_axis(consumer: onnx.NodeProto, weight_rank: int) -> int | None:
    """The axis of a weight that indexes output channels, for the op that reads it."""
    if consumer.op_type == "Gemm":
        trans_b = next((a.i for a in consumer.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if consumer.op_type == "MatMul":
        return weight_rank - 1
    if consumer.op_type == "Conv":
        return 0
    return None


def check_graph(model: onnx.ModelProto, version: str) -> list[Problem]:
    """Every rule of TensorRT ``version``'s ONNX parser that ``model`` breaks (empty: it parses)."""
    rules = rules_for(version)
    graph = model.graph
    problems: list[Problem] = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset > rules["max_opset"]:
        problems.append(Problem("model", f"opset {opset}; TensorRT {version} reads opsets up to {rules['max_opset']}"))
    constants = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    constants[node.output[0]] = attr.t
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in graph.node:
        where = f"node {node.name or node.output[0]} ({node.op_type})"
        if node.domain not in ("", "ai.onnx"):
            problems.append(Problem(where, f"op of domain {node.domain}: TensorRT imports only standard ONNX ops"))
            continue
        if node.op_type not in rules["ops"]:
            problems.append(Problem(where, f"TensorRT {version}'s ONNX parser has no importer for {node.op_type}"))
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            problems += _check_qdq(node, where, constants, consumers)
        if node.op_type == "MaxPool" and len([o for o in node.output if o]) > 1:
            problems.append(Problem(where, "MaxPool's indices output: TensorRT computes the pooled values only"))
        if node.op_type == "GroupNormalization" and opset < 21:
            problems.append(Problem(where, f"GroupNormalization at opset {opset} scales per group, not per channel "
                                           "(opset 21 changed it); export GroupNorm as primitive ops"))  # fmt: skip
        if node.op_type == "Cast" and any(a.name == "to" and a.i == TensorProto.UINT8 for a in node.attribute):
            problems.append(Problem(where, "casts to uint8: TensorRT takes uint8 only as a network input"))
    for tensor in graph.input:
        if tensor.type.tensor_type.elem_type == TensorProto.UINT8:
            readers = consumers.get(tensor.name, [])
            if any(r.op_type != "Cast" for r in readers):
                bad = next(r for r in readers if r.op_type != "Cast")
                problems.append(Problem(
                    f"input {tensor.name}", f"uint8 input read by {bad.op_type} {bad.name}: TensorRT needs a Cast first"
                ))  # fmt: skip
    for tensor in graph.initializer:
        if tensor.data_type == TensorProto.UINT8:
            problems.append(Problem(f"initializer {tensor.name}", "uint8 constant: TensorRT takes uint8 only as input"))
    return problems


def _check_qdq(
    node: onnx.NodeProto, where: str, constants: dict[str, TensorProto], consumers: dict[str, list[onnx.NodeProto]]
) -> list[Problem]:
    problems = []
    scale = constants.get(node.input[1])
    zero_point = constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if node.op_type == "QuantizeLinear" and zero_point is None:
        problems.append(Problem(where, "no zero point, so UINT8 output: TensorRT quantizes to INT8 (zero point 0)"))
    if zero_point is not None:
        if zero_point.data_type not in Q_TYPES:
            kind = TensorProto.DataType.Name(zero_point.data_type)
            problems.append(Problem(where, f"zero point of type {kind}: TensorRT's Q/DQ are signed INT8 (or FP8/INT4)"))
        elif np.any(numpy_helper.to_array(zero_point) != 0):
            problems.append(Problem(where, "non-zero zero point: TensorRT's quantization is symmetric"))
    data = constants.get(node.input[0])
    if node.op_type == "DequantizeLinear" and data is not None and data.data_type not in Q_TYPES:
        kind = TensorProto.DataType.Name(data.data_type)
        problems.append(Problem(where, f"dequantizes {kind}: TensorRT's DequantizeLinear takes INT8/FP8/INT4 only "
                                       "(quantize biases? leave them float)"))  # fmt: skip
    if scale is None:
        return [*problems, Problem(where, "scale is not a constant: TensorRT needs constant Q/DQ scales")]
    values = numpy_helper.to_array(scale).astype(np.float64)
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        problems.append(Problem(where, "scale not positive and finite"))
    if values.size > 1:
        if data is None:
            problems.append(Problem(where, "per-channel scales on an activation: TensorRT takes them for weights only"))
        else:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            axis %= len(data.dims)
            weights_of = [r for r in consumers.get(node.output[0], []) if list(r.input[1:2]) == [node.output[0]]]
            wanted = {_output_channel_axis(r, len(data.dims)) for r in weights_of} - {None}
            if wanted and axis not in wanted:
                problems.append(Problem(
                    where, f"per-channel along axis {axis}; TensorRT quantizes weights per output channel "
                           f"(axis {', '.join(map(str, sorted(wanted)))})",
                ))  # fmt: skip
    return problems


def require_parsable(path: Path, version: str) -> None:
    """Raise :class:`TensorRTCompatibilityError` naming every node and rule that TensorRT ``version`` refuses."""
    problems = check_graph(onnx.load(str(path), load_external_data=False), version)
    if problems:
        shown = "; ".join(map(str, problems[:10])) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise TensorRTCompatibilityError(f"TensorRT {version} would refuse {path.name}: {shown}")
