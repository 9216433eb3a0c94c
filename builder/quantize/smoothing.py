"""SmoothQuant, folded exactly into the export: outlier channels moved from activations into weights.

A few channels of a pretrained ViT's LayerNorm outputs span tens to hundreds of times the
range of the others; per-tensor activation quantization of those outputs (the inputs of the
fused q/k/v Dense and of the MLP's first Dense) spends its 256 levels on them. SmoothQuant
divides each input channel ``c`` of such a Dense by ``s_c`` and multiplies row ``c`` of its
weight by ``s_c``, with ``s_c = max|X_c|^α / max|W_c|^(1-α)`` from the calibration frames.

Here the division is folded into the LayerNorm's own scale and bias, so the smoothed graph has
exactly the nodes of the original and costs nothing at run time. Each ``s_c`` is rounded to a
power of two: multiplying and dividing by a power of two is exact in floating point, so the FP32
graph computes bit for bit what the original computed (rounding the factor costs at most a
factor √2 of the ideal balance). A LayerNorm qualifies when everything that reads its output
is a ``Gemm`` on a constant weight, directly or through ``Reshape``/``Flatten`` or a ``Gather``
of tokens (the class-token rewrite's query), or ``Shape``:
ViT's pre-attention and pre-MLP norms, Mixer's pre-channel-mixing norm. Mixer's token-mixing
Dense reads the norm's output transposed (its input features are tokens, not channels), so no
per-channel factor can be folded there.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

_PASS_THROUGH = ("Reshape", "Flatten")  # keep the channel axis last and values unchanged


@dataclass(frozen=True)
class SmoothTarget:
    """A LayerNorm whose output only feeds Dense layers, and those layers."""

    norm: str  # the LayerNormalization node's output: the tensor whose channels are measured
    scale: str  # its scale and bias initializers
    bias: str
    weights: tuple[str, ...]  # the [in, out] weight initializers of the Gemms that read it
    scaled: tuple[str, ...] = ()  # every tensor smoothing divides per channel: the norm's output and its pass-throughs


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    found: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            found[name].append(node)
    return found


def _plain_gemm(node: onnx.NodeProto) -> bool:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    return node.op_type == "Gemm" and not attrs.get("transA", 0) and not attrs.get("transB", 0)


def _attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((int(onnx.helper.get_attribute_value(a)) for a in node.attribute if a.name == name), default)


def _token_gather(reader: onnx.NodeProto, tensor: str, norm: onnx.NodeProto, norm_axis: int) -> bool:
    """A Gather that picks tokens straight out of the norm's output (channels untouched): the class token
    of :mod:`builder.rewrites.class_token`'s last block. Its axis must lie before the normalized (channel) axis."""
    if reader.op_type != "Gather" or reader.input[0] != tensor or tensor != norm.output[0]:
        return False
    return 0 <= _attribute(reader, "axis", 0) < norm_axis


def find_targets(model: onnx.ModelProto) -> list[SmoothTarget]:
    """Every LayerNorm whose smoothing factors can be folded exactly (see the module docstring)."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    consumers = _consumers(graph)
    targets = []
    for norm in graph.node:
        if norm.op_type != "LayerNormalization" or len(norm.input) < 3:
            continue
        scale, bias = norm.input[1], norm.input[2]
        if scale not in initializers or bias not in initializers:
            continue
        channels = initializers[scale].dims[-1]
        norm_axis = _attribute(norm, "axis", -1)
        weights, frontier, foldable = [], [norm.output[0]], True
        scaled = []
        while frontier and foldable:
            tensor = frontier.pop()
            scaled.append(tensor)
            for reader in consumers[tensor]:
                if reader.op_type == "Shape":
                    continue
                if reader.op_type in _PASS_THROUGH and reader.input[0] == tensor:
                    frontier.append(reader.output[0])
                elif _token_gather(reader, tensor, norm, norm_axis):
                    frontier.append(reader.output[0])
                elif _plain_gemm(reader) and reader.input[0] == tensor and reader.input[1] in initializers:
                    weights.append(reader.input[1])
                    foldable &= initializers[reader.input[1]].dims[0] == channels
                else:
                    foldable = False
        shared = any(len(consumers[name]) != 1 for name in (scale, bias, *weights))
        if foldable and weights and not shared:
            targets.append(SmoothTarget(norm.output[0], scale, bias, tuple(weights), tuple(scaled)))
    return targets


def smoothing_factors(
    model: onnx.ModelProto, targets: list[SmoothTarget], absmax: dict[str, np.ndarray], alpha: float
) -> dict[str, np.ndarray]:
    """Per target, ``s_c`` rounded to a power of two (see the module docstring)."""
    return balance(weight_maxima(model, targets), absmax, alpha)


def weight_maxima(model: onnx.ModelProto, targets: list[SmoothTarget]) -> dict[str, np.ndarray]:
    """Per target, max |W_c| over the rows ``c`` of the weights that read its norm."""
    initializers = {t.name: t for t in model.graph.initializer}
    return {
        target.norm: np.max(
            [np.abs(numpy_helper.to_array(initializers[w])).max(axis=1) for w in target.weights], axis=0
        )
        for target in targets
    }


def balance(weight_max: dict[str, np.ndarray], absmax: dict[str, np.ndarray], alpha: float) -> dict[str, np.ndarray]:
    """``s_c`` from the activations' and weights' per-channel maxima, rounded to a power of two."""
    factors = {}
    for norm, weights in weight_max.items():
        x = np.maximum(absmax[norm], 1e-6)
        s = x**alpha / np.maximum(weights, 1e-6) ** (1 - alpha)
        factors[norm] = np.exp2(np.round(np.log2(np.clip(s, 2.0**-20, 2.0**20)))).astype(np.float32)
    return factors


def smooth(model: onnx.ModelProto, targets: list[SmoothTarget], factors: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` with each target's factors folded into its norm and Dense weights."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    initializers = {t.name: t for t in out.graph.initializer}

    def rescale(name: str, factor: np.ndarray) -> None:
        tensor = initializers[name]
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * factor, name))

    for target in targets:
        s = factors[target.norm]
        rescale(target.scale, 1 / s)
        rescale(target.bias, 1 / s)
        for weight in target.weights:
            rescale(weight, s[:, None])
    return out


def smoothed_ranges(
    channels: dict[str, tuple[np.ndarray, np.ndarray]], targets: list[SmoothTarget], factors: dict[str, np.ndarray]
) -> dict[str, tuple[float, float]]:
    """The min and max of every tensor smoothing changes, in the smoothed graph, from each one's per-channel
    min and max in the original (``channels``, which must hold every ``scaled`` tensor).

    Exact: the smoothed tensor is the original divided per channel by a power of two, and every other
    tensor of the graph is bit for bit what it was (see the module docstring), so a graph is calibrated
    once for every smoothing strength.
    """
    found = {}
    for target in targets:
        s = factors[target.norm]
        for name in target.scaled:
            low, high = channels[name]
            if low.shape != s.shape:
                raise ValueError(f"{name} does not hold {target.norm}'s channels on its last axis")
            found[name] = (float((low / s).min()), float((high / s).max()))
    return found
