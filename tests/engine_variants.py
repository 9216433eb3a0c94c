"""Real ONNX engines that misbehave on purpose: the demo engine plus a side computation.

Each variant adds ``0 * f(images)`` to the logits, so its outputs equal the original's
while ``f`` makes it hang on bright frames or run several times slower.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper


def _add_to_logits(src: Path, dst: Path, nodes: list, constants: dict[str, np.ndarray], term: str) -> Path:
    """Rewrite ``src`` so that ``logits = original logits + 0 * term``; ``nodes`` compute ``term``."""
    model = onnx.load(str(src))
    graph = model.graph
    producer = next(n for n in graph.node if "logits" in n.output)
    producer.output[list(producer.output).index("logits")] = "logits_raw"
    constants = {**constants, "variant_zero": np.array(0.0, np.float32)}
    graph.initializer.extend(onnx.numpy_helper.from_array(v, k) for k, v in constants.items())
    graph.node.extend(
        [
            helper.make_node("Cast", ["images"], ["variant_f"], to=TensorProto.FLOAT),
            *nodes,
            helper.make_node("Mul", [term, "variant_zero"], ["variant_nothing"]),
            helper.make_node("Add", ["logits_raw", "variant_nothing"], ["logits"]),
        ]
    )
    onnx.save(model, str(dst))
    return dst


def hang_on_bright_frames(src: Path, dst: Path) -> Path:
    """A Loop that runs ~forever when the batch's mean pixel exceeds 200: a white frame never returns."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Identity", ["v_in"], ["v_out"])],
        "spin",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, []),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, []),
        ],
    )
    constants = {
        "hang_200": np.array(200.0, np.float32),
        "hang_many": np.array(10**15, np.int64),
        "hang_none": np.array(0, np.int64),
        "hang_true": np.array(True),
        "hang_start": np.array(0.0, np.float32),
    }
    nodes = [
        helper.make_node("ReduceMean", ["variant_f"], ["hang_mean"], keepdims=0),
        helper.make_node("Greater", ["hang_mean", "hang_200"], ["hang_bright"]),
        helper.make_node("Where", ["hang_bright", "hang_many", "hang_none"], ["hang_trips"]),
        helper.make_node("Loop", ["hang_trips", "hang_true", "hang_start"], ["hang_v"], body=body),
    ]
    return _add_to_logits(src, dst, nodes, constants, "hang_v")


def slow_down(src: Path, dst: Path, size: int = 512, matmuls: int = 16) -> Path:
    """A chain of ``matmuls`` [size x size] float products per batch, seeded from the input."""
    rng = np.random.default_rng(0)
    weights = (rng.standard_normal((size, size)) / np.sqrt(size)).astype(np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["variant_f"], ["slow_mean"], keepdims=0),
        helper.make_node("Mul", ["slow_w", "slow_mean"], ["slow_0"]),
        *[helper.make_node("MatMul", [f"slow_{i}", "slow_w"], [f"slow_{i + 1}"]) for i in range(matmuls)],
        helper.make_node("ReduceSum", [f"slow_{matmuls}"], ["slow_sum"], keepdims=0),
    ]
    return _add_to_logits(src, dst, nodes, {"slow_w": weights}, "slow_sum")
