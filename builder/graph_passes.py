"""Clean-ups of the jax2onnx graph that matter to downstream tools.

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


def _replace(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
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
        _replace(graph, add.outputs[0], out)
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


def gemm_to_matmul(model: ir.Model) -> int:
    """Rewrite plain ``Gemm`` (no transposes, alpha = beta = 1) as ``MatMul`` + ``Add``.

    ONNX Runtime's dynamic quantizer only quantizes ``MatMul``: without this rewrite
    it would leave every Dense layer of a jax2onnx export in float.
    """
    graph, rewritten = model.graph, 0
    for gemm in list(graph):
        attrs = gemm.attributes
        plain = not attrs.get_int("transA", 0) and not attrs.get_int("transB", 0)
        if gemm.op_type != "Gemm" or not plain or attrs.get_float("alpha", 1.0) != 1.0 or len(gemm.inputs) < 3:
            continue
        if attrs.get_float("beta", 1.0) != 1.0:
            continue
        a, b, c = gemm.inputs
        matmul = ir.node("MatMul", [a, b], name=f"{gemm.name}_matmul")
        add = ir.node("Add", [matmul.outputs[0], c], name=f"{gemm.name}_bias")
        graph.insert_after(gemm, [matmul, add])
        _replace(graph, gemm.outputs[0], add.outputs[0])
        graph.remove(gemm, safe=True)
        rewritten += 1
    return rewritten


def float_dense_outputs(model: ir.Model) -> int:
    """Drop the QuantizeLinear -> DequantizeLinear pair on every ``Gemm`` output; returns how many.

    ONNX Runtime's static quantizer quantizes a Dense layer's output too, which lets ONNX Runtime
    run the layer with an 8-bit output. OpenVINO instead fuses what follows a Dense layer (GELU,
    the residual add, the next layer's quantization) into the layer itself, which the Q/DQ pair in
    between prevents: with it, OpenVINO runs a separate GELU-and-quantize pass over every MLP's
    hidden activations (seen in its per-node profile of ViT-B/16 and Mixer-B/16). Without it the
    output stays float until the next quantized layer, so the model only gets more precise.
    A pair whose output is the graph's output (the logits) is kept, as is its name.
    """
    graph, dropped = model.graph, 0
    for quantize in list(graph):
        source = quantize.inputs[0] if quantize.op_type == "QuantizeLinear" else None
        producer = source.producer() if source is not None else None
        if producer is None or producer.op_type != "Gemm":
            continue
        readers = [use.node for use in quantize.outputs[0].uses()]
        if not readers or any(r.op_type != "DequantizeLinear" or r.outputs[0] in graph.outputs for r in readers):
            continue
        for dequantize in readers:
            ir.convenience.replace_all_uses_with(dequantize.outputs[0], source)
            graph.remove(dequantize, safe=True)
        graph.remove(quantize, safe=True)
        dropped += 1
    RemoveUnusedNodesPass()(model)
    return dropped


# The largest |GELU_tanh(x) - GELU(x)| over all x: 4.733e-4, near |x| = 2.7 (a test recomputes it).
GELU_FORMS_GAP = 4.74e-4
# The forms are swapped only where that is under this share of the step of the grid GELU's output is quantized to.
GELU_GAP_MAX_STEP_SHARE = 0.1


def exact_gelu_before_quantization(model: ir.Model) -> float | None:
    """Evaluate ``Gelu(approximate='tanh')`` in its exact (erf) form wherever its output is quantized at once.

    Returns the forms' largest difference as a fraction of the step of the grid it is quantized to,
    the largest over the Gelus changed, or None where none qualified. OpenVINO's CPU plugin evaluates
    the erf form faster, fused into the Dense layer before it or alone, and GELU is a large part of
    a Mixer's or a ViT's time outside matrix products. The two forms differ by at most
    ``GELU_FORMS_GAP``, while the QuantizeLinear that follows already rounds by up to half a step of
    its grid; a Gelu is changed only where the gap is under ``GELU_GAP_MAX_STEP_SHARE`` of that step,
    so a quantized value moves, by one step, only where it lies that close to a rounding boundary.
    The build's gate measures the candidate as a whole.
    """
    largest: float | None = None
    for gelu in model.graph:
        if gelu.op_type != "Gelu" or gelu.attributes.get_string("approximate", "none") != "tanh":
            continue
        readers = [use.node for use in gelu.outputs[0].uses()]
        if not readers or gelu.outputs[0] in model.graph.outputs:
            continue
        steps = [grid[0] for r in readers if r.op_type == "QuantizeLinear" and (grid := per_tensor_grid(r))]
        if len(steps) != len(readers) or GELU_FORMS_GAP > GELU_GAP_MAX_STEP_SHARE * min(steps):
            continue
        gelu.attributes["approximate"] = ir.AttrString("approximate", "none")
        largest = max(largest or 0.0, GELU_FORMS_GAP / min(steps))
    return largest


def per_tensor_grid(quantize: ir.Node) -> tuple[float, np.ndarray] | None:
    """The scale and zero point of a QuantizeLinear with one constant grid for the whole tensor, else None."""
    if len(quantize.inputs) < 3 or any(v is None or v.const_value is None for v in quantize.inputs[1:3]):
        return None
    scale, zero = (v.const_value.numpy() for v in quantize.inputs[1:3])
    return (float(scale.item()), zero) if scale.size == 1 and zero.size == 1 else None
