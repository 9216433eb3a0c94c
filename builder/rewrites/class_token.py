"""An exact engine-build rewrite for class-token ViTs: the last block computes the class token only.

A ViT with ``classifier: token`` reads one token out of the encoder: ``LN(x)[:, 0]``. Every
op after the last block's attention works per token (residual adds, LayerNorm, the MLP),
and the attention's output for token 0 needs token 0's query but every token's key and
value. So the last block can run its query projection, attention rows, output projection
and MLP for the class token alone, and skip the other tokens' (196 of 197 at 224 px):

    h = LN1(x); k, v = h @ Wkv (every token); q = h[:, 0] @ Wq
    y = x[:, 0] + Wo(softmax(q k^T * s) v);  z = y + MLP(LN2(y));  logits = head(LNf(z))

That is the same function (only float rounding differs), and on ViT-B/16 about 7 % fewer
multiply-adds. The export stays the faithful one-to-one conversion (``edgevit-build export``
checks it against JAX); this is an engine build's business, like the fusions a runtime
makes when it compiles, and :func:`class_token_only` checks the result against the export in
ONNX Runtime before anything uses it. Graphs that do not match the pattern of
``builder/export/models/vit.py`` are left alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper
from onnx_ir.passes.common import RemoveUnusedNodesPass

from builder.errors import BuildError
from builder.export.onnx_export import EXTERNAL_DATA_THRESHOLD, weight_bytes
from builder.memory import release_freed_memory

TOLERANCE = 1e-3  # max |Δlogit| against the export, relative to the largest logit


@dataclass
class _Graph:
    """Who makes and who reads each value of one ONNX graph, and its constants."""

    model: onnx.ModelProto

    def __post_init__(self) -> None:
        graph = self.model.graph
        self.producer = {out: node for node in graph.node for out in node.output}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)
        self.constants = {t.name: t for t in graph.initializer}

    def made_by(self, value: str, op: str) -> onnx.NodeProto:
        node = self.producer.get(value)
        if node is None or node.op_type != op:
            raise _NoMatch(f"{value} is not made by {op}")
        return node

    def read_by(self, value: str, op: str) -> onnx.NodeProto:
        found = [n for n in self.readers.get(value, []) if n.op_type == op]
        if len(found) != 1:
            raise _NoMatch(f"{value} is read by {len(found)} {op} nodes")
        return found[0]

    def array(self, name: str) -> np.ndarray:
        if name not in self.constants:
            raise _NoMatch(f"{name} is not a constant")
        return numpy_helper.to_array(self.constants[name])

    def through_reshape(self, value: str) -> str:
        """The value a Reshape was applied to, or ``value`` itself."""
        node = self.producer.get(value)
        return node.input[0] if node is not None and node.op_type == "Reshape" else value

    def dense(self, gemm: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray]:
        attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
        if attrs.get("transA", 0) or attrs.get("transB", 0) or attrs.get("alpha", 1.0) != 1.0 or len(gemm.input) < 3:
            raise _NoMatch(f"{gemm.name} is not a plain Dense layer")
        return self.array(gemm.input[1]), self.array(gemm.input[2])

    def between(self, start: str, stop: onnx.NodeProto) -> Iterator[onnx.NodeProto]:
        """Nodes reachable from ``start`` before ``stop``."""
        seen: set[str] = set()
        todo = [start]
        while todo:
            for node in self.readers.get(todo.pop(), []):
                if node is stop or node.name in seen:
                    continue
                seen.add(node.name)
                todo.extend(node.output)
                yield node


class _NoMatch(Exception):
    """The graph is not a class-token ViT as builder/export/models/vit.py exports it."""


def class_token_only(
    src: Path, dst: Path, architecture: dict[str, Any], check: np.ndarray, expected: np.ndarray | None = None
) -> list[Path] | None:
    """Write ``src`` with its last block for the class token only to ``dst``; the files, or None where it does
    not apply (weights past :data:`~builder.export.onnx_export.EXTERNAL_DATA_THRESHOLD` go to ``<dst>.data``,
    as exports do).

    ``check`` (a few preprocessed frames) is run through the rewritten graph in ONNX Runtime and compared with
    ``expected``, ``src``'s logits on them (run here when not given: a build has them from its FP32 reference);
    a rewrite whose logits differ by more than :data:`TOLERANCE` is a bug and fails the build rather than ship.
    """
    if architecture.get("family") != "vit" or architecture.get("classifier") != "token":
        return None
    model = onnx.load(str(src))
    try:
        _rewrite(model, int(architecture["hidden_size"]), int(architecture["num_heads"]))
    except _NoMatch:
        return None
    rewritten = ir.serde.deserialize_model(model)
    RemoveUnusedNodesPass()(rewritten)  # the other tokens' work, and the constants only it read
    external = weight_bytes(rewritten) > EXTERNAL_DATA_THRESHOLD
    data = dst.with_name(f"{dst.name}.data")
    ir.save(rewritten, dst, external_data=data.name if external else None, size_threshold_bytes=1024)
    del model, rewritten  # the IR's graph is a web of references: only a collection frees it, and the proto it reads
    release_freed_memory()
    _verify(dst, check, _logits(src, check) if expected is None else expected)
    return [dst, data] if external else [dst]


def _logits(path: Path, frames: np.ndarray) -> np.ndarray:
    from agent.engine.runtimes.onnxruntime import OnnxRuntimeEngine

    engine = OnnxRuntimeEngine(path)
    found = engine.run(frames)
    engine.close()
    return found


def _verify(dst: Path, frames: np.ndarray, expected: np.ndarray) -> None:
    found = _logits(dst, frames)
    error = float(np.abs(expected - found).max()) / max(float(np.abs(expected).max()), 1e-6)
    if error > TOLERANCE:
        raise BuildError(f"the class-token rewrite changed the logits by {error:.2e} of their range: not shipped")


def _rewrite(model: onnx.ModelProto, hidden: int, heads: int) -> None:
    g = _Graph(model)
    graph = model.graph
    if len(graph.output) != 1:
        raise _NoMatch("more than one output")
    head = g.made_by(graph.output[0].name, "Gemm")
    gather = g.made_by(head.input[0], "Gather")
    if g.array(gather.input[1]).tolist() != 0:
        raise _NoMatch("the head does not read token 0")
    final_norm = g.made_by(g.made_by(gather.input[0], "Transpose").input[0], "LayerNormalization")
    mlp_add = g.made_by(final_norm.input[0], "Add")
    # the MLP residual: y + fc2(gelu(fc1(LN2(y))))
    fc2 = g.made_by(g.through_reshape(mlp_add.input[1]), "Gemm")
    gelu = g.made_by(fc2.input[0], "Gelu")
    fc1 = g.made_by(gelu.input[0], "Gemm")
    norm2 = g.made_by(g.through_reshape(fc1.input[0]), "LayerNormalization")
    attention_add = g.made_by(mlp_add.input[0], "Add")
    if norm2.input[0] != attention_add.output[0]:
        raise _NoMatch("the MLP does not read the attention's residual")
    # the attention residual: x + out(attention(LN1(x)))
    out = g.made_by(g.through_reshape(attention_add.input[1]), "Gemm")
    x = attention_add.input[0]
    norm1 = g.read_by(x, "LayerNormalization")
    tokens_reshape = g.read_by(norm1.output[0], "Reshape")  # [batch * tokens, hidden]
    qkv = g.read_by(tokens_reshape.output[0], "Gemm")
    inner = list(g.between(qkv.output[0], out))
    if [n.op_type for n in inner].count("Softmax") != 1 or [n.op_type for n in inner].count("MatMul") != 2:
        raise _NoMatch("the attention is not one softmax between two matrix products")
    scales = [g.array(c) for n in inner if n.op_type == "Mul" for c in n.input if c in g.constants]
    if len(scales) != 1 or scales[0].size != 1:
        raise _NoMatch("no single query scale")
    w_qkv, b_qkv = g.dense(qkv)
    if w_qkv.shape != (hidden, 3 * hidden) or hidden % heads:
        raise _NoMatch("the fused q/k/v layer has an unexpected shape")
    depth = hidden // heads

    nodes: list[onnx.NodeProto] = []
    constants: list[onnx.TensorProto] = []

    def const(name: str, value: np.ndarray) -> str:
        constants.append(numpy_helper.from_array(np.asarray(value), f"class_token/{name}"))
        return constants[-1].name

    def node(op: str, inputs: list[str], name: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [f"class_token/{name}"], name=f"class_token/{name}", **attrs))
        return nodes[-1].output[0]

    def like(original: onnx.NodeProto, inputs: list[str], name: str, **override: Any) -> str:
        attrs = {a.name: helper.get_attribute_value(a) for a in original.attribute}
        return node(original.op_type, inputs, name, **{**attrs, **override})

    index0 = const("index0", np.array(0, np.int64))
    index1 = const("index1", np.array(1, np.int64))
    # keys and values of every token: the fused layer's last two thirds
    kv = node("Gemm", [tokens_reshape.output[0], const("kv_w", w_qkv[:, hidden:]), const("kv_b", b_qkv[hidden:])], "kv")
    batch_tokens = node("Shape", [norm1.output[0]], "batch_tokens", start=0, end=2)  # the export's resolution
    kv_shape = node(
        "Concat", [batch_tokens, const("kv_heads_shape", np.array([2, heads, depth], np.int64))], "kv_shape", axis=0
    )
    kv = node("Reshape", [kv, kv_shape], "kv5")
    kv = node("Transpose", [kv], "kv_heads", perm=[2, 0, 3, 1, 4])  # [2, batch, heads, tokens, depth]
    keys = node("Gather", [kv, index0], "k", axis=0)  # [batch, heads, tokens, depth]
    values = node("Gather", [kv, index1], "v", axis=0)
    # the class token's query, attention row and output projection; one query row is a weighted sum, written
    # as Mul + ReduceSum (OpenVINO 2026.4's attention fusion crashes compiling a one-row MatMul pattern)
    h0 = node("Gather", [norm1.output[0], index0], "h0", axis=1)
    q = node("Gemm", [h0, const("q_w", w_qkv[:, :hidden]), const("q_b", b_qkv[:hidden])], "q")
    q = node("Mul", [q, const("scale", scales[0])], "q_scaled")
    q = node("Reshape", [q, const("q_shape", np.array([-1, heads, 1, depth], np.int64))], "q_heads")
    scores = node("ReduceSum", [node("Mul", [q, keys], "qk"), const("depth_axis", np.array([3]))], "scores")
    weights = node("Softmax", [scores], "weights", axis=2)  # [batch, heads, tokens, 1]
    mixed = node("Mul", [weights, values], "weighted")
    mixed = node("ReduceSum", [mixed, const("token_axis", np.array([2]))], "mixed", keepdims=0)
    mixed = node("Reshape", [mixed, const("mixed_shape", np.array([-1, hidden], np.int64))], "mixed_flat")
    x0, attended = node("Gather", [x, index0], "x0", axis=1), like(out, [mixed, *out.input[1:]], "out")
    y = node("Add", [x0, attended], "y")
    # the MLP, the final LayerNorm and the head, on one token. The second residual is summed as
    # x0 + (attended + mlp), not y + mlp: OpenVINO 2026.4's FP32 CPU plugin crashes (SIGSEGV) compiling an
    # Add of two Dense outputs where one of them is already fused with a residual Add that a LayerNorm reads
    mlp = like(norm2, [y, *norm2.input[1:]], "norm2", axis=-1)
    mlp = like(fc2, [like(gelu, [like(fc1, [mlp, *fc1.input[1:]], "fc1")], "gelu"), *fc2.input[1:]], "fc2")
    z = node("Add", [node("Add", [mlp, attended], "residuals"), x0], "z")
    z = like(final_norm, [z, *final_norm.input[1:]], "final_norm", axis=-1)
    head.input[0] = z

    position = list(graph.node).index(head)
    for i, new in enumerate(nodes):
        graph.node.insert(position + i, new)
    graph.initializer.extend(constants)
