"""Tidying the jax2onnx graph, as every export gets it: what matters to the tools downstream.

jax2onnx lowers ``x @ W + b`` to ``Gemm(x, W, C=0, beta=0)`` followed by a separate
``Add(b)``. Runtimes fuse that at load time, but quantizers do not: ONNX Runtime's
QDQ quantizer chokes on the scalar ``C`` and would leave the bias in float. Folding
the bias into the Gemm gives every Dense layer the canonical form.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import CommonSubexpressionEliminationPass, RemoveUnusedNodesPass


def _zero_scalar(value: ir.Value | None) -> bool:
    tensor = value.const_value if value is not None else None
    return tensor is not None and tensor.size == 1 and not np.any(tensor.numpy())


def _bias_of(add: ir.Node, gemm_out: ir.Value, features: int) -> ir.Value | None:
    other = add.inputs[1] if add.inputs[0] is gemm_out else add.inputs[0]
    tensor = other.const_value if other is not None else None
    # JAX broadcasting leaves biases as [1, N] constants; [N] is accepted too.
    return other if tensor is not None and tensor.size == features and tensor.shape[-1] == features else None


def replace_uses(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """Make every consumer of ``old`` read ``new``; a graph output keeps its name (``logits``)."""
    if old in graph.outputs:
        graph.outputs[graph.outputs.index(old)] = new
        new.name, old.name = old.name, None
    ir.convenience.replace_all_uses_with(old, new)


def _as_vector(graph: ir.Graph, value: ir.Value) -> ir.Value:
    """A 1-D initializer holding ``value``: quantizers expect Gemm's C as [N]."""
    tensor = value.const_value
    if len(tensor.shape) == 1:
        return value
    vector = ir.Value(name=f"{value.name}_vector", const_value=ir.tensor(tensor.numpy().reshape(-1)))
    graph.register_initializer(vector)
    return vector


def fold_gemm_bias(model: ir.Model) -> int:
    """Fold ``Gemm(C=0) -> Add(bias)`` into ``Gemm(C=bias)``; returns how many were folded."""
    graph, folded = model.graph, 0
    for gemm in list(graph):
        if gemm.op_type != "Gemm" or len(gemm.inputs) < 3 or not _zero_scalar(gemm.inputs[2]):
            continue
        weight = gemm.inputs[1].const_value
        out = gemm.outputs[0]
        uses = list(out.uses())
        if weight is None or len(uses) != 1 or uses[0].node.op_type != "Add" or out in graph.outputs:
            continue
        add = uses[0].node
        transposed = gemm.attributes.get_int("transB", 0)
        bias = _bias_of(add, out, weight.shape[0] if transposed else weight.shape[1])
        if bias is None:
            continue
        gemm.replace_input_with(2, _as_vector(graph, bias))
        gemm.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        replace_uses(graph, add.outputs[0], out)
        graph.remove(add, safe=True)
        folded += 1
    return folded


def tidy(model: ir.Model) -> ir.Model:
    """The passes every export gets: bias folding, then shared-subexpression and dead-code removal.

    jax2onnx computes the dynamic batch size afresh for every reshape; CSE merges those
    chains, and dead-code removal drops the biases and constants folding left unused.
    """
    fold_gemm_bias(model)
    CommonSubexpressionEliminationPass()(model)
    RemoveUnusedNodesPass()(model)
    return model
