"""Graph passes an engine build applies to a verified export: exact, or bounded and measured by the gate.

``gemm_to_matmul`` gives ONNX Runtime's dynamic quantizer the ``MatMul`` it looks for; the others prepare
OpenVINO's copy of a Q/DQ graph (float Dense outputs, GELU in its erf form where its output is quantized
at once) and read a quantization grid back out of one.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from builder.export.tidy import replace_uses


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
        replace_uses(graph, gemm.outputs[0], add.outputs[0])
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
