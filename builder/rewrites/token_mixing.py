"""Mixer's token mixing with the weights on the left, in OpenVINO's copy of the Q/DQ graph.

jax2onnx exports a token-mixing MLP as the original code writes it, with channels last: transpose the
[B, T, C] tokens to [B, C, T], flatten to [B·C, T], Dense T→D, GELU, Dense D→T, unflatten, transpose
back. OpenVINO runs both transposes as copies of the whole activation and each Dense as a
FullyConnected whose reduction is the token count (196 for Mixer-B/16), which it serves less well.

Per image the same MLP is ``W₂ᵀ · GELU(W₁ᵀ · X + b₁) + b₂`` with ``X`` the [T, C] tokens: two
MatMuls with a constant on the left and no transposes. OpenVINO runs such a MatMul in INT8 only when
its activation operand is signed 8-bit with zero point 0 and the weight's dequantization is one
scale for the whole tensor. So the rewrite

- keeps every weight's INT8 values and moves the per-output-channel scale after the MatMul, as a Mul
  by an [N, 1] constant: ``diag(s)·(Q·X) = (diag(s)·Q)·X``, exact; the bias becomes [N, 1] too;
- requantizes the two activations it feeds (the norm's output and GELU's) as s8 with zero point 0,
  over a range that covers the calibrated one. That is the only change in values: the norm's output is
  nearly centred, so little is lost there; GELU's is nearly one-signed, so its step is up to twice as
  coarse. The build's gate measures the candidate like any other.

ONNX Runtime keeps its own graph, which it runs best as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from builder.rewrites.graph_passes import per_tensor_grid

# the nodes of one exported token-mixing MLP, in order, in edgevit's static Q/DQ graph
# once its Dense outputs are left float (graph_passes.float_dense_outputs)
_CHAIN = (
    "Transpose", "Reshape", "QuantizeLinear", "DequantizeLinear", "Gemm", "Gelu",
    "QuantizeLinear", "DequantizeLinear", "Gemm", "Reshape", "Transpose",
)  # fmt: skip
_SWAP_LAST_TWO = (0, 2, 1)
S8_MAX = 127


@dataclass(frozen=True)
class _Dense:
    """An INT8 Dense layer's parts: values [K, N], per-output scale [N], float bias [N]."""

    values: np.ndarray
    scales: np.ndarray
    bias: np.ndarray


def _only_reader(value: ir.Value, op_type: str) -> ir.Node | None:
    uses = list(value.uses())
    return uses[0].node if len(uses) == 1 and uses[0].node.op_type == op_type else None


def _chain(first: ir.Node) -> list[ir.Node] | None:
    """The token-mixing MLP starting at ``first``, or None where the graph is anything else."""
    nodes = [first]
    for op_type in _CHAIN[1:]:
        reader = _only_reader(nodes[-1].outputs[0], op_type)
        if reader is None:
            return None
        nodes.append(reader)
    transposes = (nodes[0], nodes[-1])
    if any(tuple(t.attributes.get_ints("perm", ())) != _SWAP_LAST_TWO for t in transposes):
        return None
    return nodes


def _constant(value: ir.Value | None) -> np.ndarray | None:
    """A constant's values, through a DequantizeLinear of constants (how the quantizer stores biases)."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is None or node.op_type != "DequantizeLinear":
        return None
    parts = [_constant(v) for v in node.inputs]
    if any(p is None for p in parts):
        return None
    values, scale, *zero = parts
    if scale.size > 1 and values.ndim != 1:
        return None  # per-axis scales of a matrix: no bias has them
    offset = zero[0] if zero else 0
    return ((values.astype(np.float64) - offset) * scale).astype(np.float32)


def _dense(gemm: ir.Node) -> _Dense | None:
    """A plain ``Gemm(x, DequantizeLinear(int8 W), bias)`` with symmetric weights, else None."""
    attributes = gemm.attributes
    plain = not attributes.get_int("transA", 0) and not attributes.get_int("transB", 0)
    if not plain or attributes.get_float("alpha", 1.0) != 1.0 or attributes.get_float("beta", 1.0) != 1.0:
        return None
    weight = gemm.inputs[1].producer() if gemm.inputs[1] is not None else None
    if weight is None or weight.op_type != "DequantizeLinear" or len(gemm.inputs) < 3:
        return None
    values, scales = (v.const_value for v in weight.inputs[:2])
    zero = _constant(weight.inputs[2]) if len(weight.inputs) > 2 else None
    bias = _constant(gemm.inputs[2])
    if values is None or scales is None or bias is None or values.dtype != ir.DataType.INT8 or len(values.shape) != 2:
        return None
    if (zero is not None and np.any(zero)) or (scales.size > 1 and weight.attributes.get_int("axis", 1) != 1):
        return None  # a zero point, or per-row scales, would not move past the MatMul
    columns = values.shape[1]
    scale = np.broadcast_to(scales.numpy(), (columns,)).astype(np.float32)  # astype copies: no zero strides
    return _Dense(values.numpy(), scale, np.broadcast_to(bias, (columns,)).astype(np.float32))


def _symmetric_s8(quantize: ir.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """Scale and zero point 0 of an s8 grid covering ``quantize``'s per-tensor 8-bit grid."""
    grid = per_tensor_grid(quantize)
    if grid is None or grid[1].dtype not in (np.uint8, np.int8):
        return None
    scale, zero = grid[0], int(grid[1].item())
    if grid[1].dtype == np.int8 and zero == 0:
        return np.float32(scale), np.int8(0)  # already what OpenVINO needs
    low, high = np.iinfo(grid[1].dtype).min, np.iinfo(grid[1].dtype).max
    return np.float32(max(zero - low, high - zero) * scale / S8_MAX), np.int8(0)


class _Builder:
    """New nodes for one MLP, collected in order and inserted together."""

    def __init__(self, graph: ir.Graph, prefix: str) -> None:
        self.graph, self.prefix, self.nodes = graph, prefix, list[ir.Node]()

    def add(self, op_type: str, inputs: list[ir.Value], name: str, **attributes: object) -> ir.Value:
        node = ir.node(op_type, inputs, attributes=attributes, name=f"{self.prefix}/{name}")
        self.nodes.append(node)
        return node.outputs[0]

    def constant(self, name: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(name=f"{self.prefix}/{name}", const_value=ir.tensor(array))
        self.graph.register_initializer(value)
        return value

    def quantized(self, x: ir.Value, grid: tuple[np.ndarray, np.ndarray], name: str) -> ir.Value:
        scale, zero = self.constant(f"{name}_scale", grid[0]), self.constant(f"{name}_zero_point", grid[1])
        q = self.add("QuantizeLinear", [x, scale, zero], f"{name}_quantize")
        return self.add("DequantizeLinear", [q, scale, zero], f"{name}_dequantize")

    def left_dense(self, dense: _Dense, x: ir.Value, name: str) -> ir.Value:
        """``diag(scales) · (Wᵀ · x) + bias``, with Wᵀ dequantized at scale 1 (its INT8 values as they are)."""
        values = self.constant(f"{name}_values", np.ascontiguousarray(dense.values.T))
        unit = self.constant(f"{name}_unit", np.float32(1.0))
        weight = self.add("DequantizeLinear", [values, unit], f"{name}_weight")
        product = self.add("MatMul", [weight, x], f"{name}_matmul")
        scales = self.constant(f"{name}_scales", dense.scales.reshape(-1, 1))
        scaled = self.add("Mul", [product, scales], f"{name}_scale")
        return self.add("Add", [scaled, self.constant(f"{name}_bias", dense.bias.reshape(-1, 1))], f"{name}_bias")


def _rewrite(graph: ir.Graph, chain: list[ir.Node]) -> bool:
    transpose_in, _, x_quantize, _, fc1, gelu, h_quantize, _, fc2, _, transpose_out = chain
    first, second = _dense(fc1), _dense(fc2)
    x_grid, h_grid = _symmetric_s8(x_quantize), _symmetric_s8(h_quantize)
    if first is None or second is None or x_grid is None or h_grid is None or transpose_out.outputs[0] in graph.outputs:
        return False
    build = _Builder(graph, f"{fc1.name}/left")
    x = build.quantized(transpose_in.inputs[0], x_grid, "x")
    hidden = build.add("Gelu", [build.left_dense(first, x, "fc1")], "gelu", **dict(gelu.attributes))
    out = build.left_dense(second, build.quantized(hidden, h_grid, "h"), "fc2")
    graph.insert_before(transpose_out, build.nodes)
    ir.convenience.replace_all_uses_with(transpose_out.outputs[0], out)
    return True


def left_weight_token_mixing(model: ir.Model) -> int:
    """Rewrite every token-mixing MLP of a Mixer Q/DQ graph (see the module docstring); returns how many.

    A graph without them (a ViT) is left as it is.
    """
    graph = model.graph
    chains = [c for node in list(graph) if node.op_type == "Transpose" and (c := _chain(node))]
    rewritten = sum(_rewrite(graph, chain) for chain in chains)
    RemoveUnusedNodesPass()(model)
    return rewritten
