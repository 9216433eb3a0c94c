"""Mixer's token mixing with the weights on the left, in OpenVINO's copy of the Q/DQ graph (issue 11).

The demo Mixer's real export and real digit images; the graphs run in ONNX Runtime and OpenVINO."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from graph_helpers import onnxruntime_logits
from onnx_ir.passes.common import RemoveUnusedNodesPass

from agent.engine.device import DeviceInfo
from agent.engine.runtimes.openvino import OpenVINOEngine
from builder.bundle.options import EngineOptions, cpu_flavour
from builder.demo.digits import digit_images
from builder.demo.train import DEMO_MODELS
from builder.quantize.precision import quantize_static_int8
from builder.rewrites.graph_passes import float_dense_outputs
from builder.rewrites.token_mixing import left_weight_token_mixing

MIXER = DEMO_MODELS["mixer-digits"]
BLOCKS = MIXER.num_blocks


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return digit_images(64)[0][:32]


@pytest.fixture(scope="module")
def openvino_qdq(demo_exports, images, tmp_path_factory) -> Path:
    """The demo Mixer's static Q/DQ graph as the OpenVINO candidate starts from it: Dense outputs float."""
    folder = tmp_path_factory.mktemp("token-mixing")
    flavour = cpu_flavour(EngineOptions(precision="int8"), DeviceInfo.probe())  # exact in this CPU's kernels
    qdq = quantize_static_int8(
        demo_exports["mixer-digits"] / "model.onnx", folder / "qdq.onnx", images, flavour=flavour
    )
    model = ir.load(qdq)
    float_dense_outputs(model)
    ir.save(model, folder / "float-outputs.onnx")
    return folder / "float-outputs.onnx"


def _rewritten(source: Path, out: Path) -> tuple[Path, int]:
    model = ir.load(source)
    count = left_weight_token_mixing(model)
    ir.save(model, out)
    return out, count


def _op_counts(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in ir.load(path).graph:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def test_token_mixing_runs_without_transposes(openvino_qdq: Path, tmp_path: Path) -> None:
    rewritten, count = _rewritten(openvino_qdq, tmp_path / "left.onnx")
    assert count == BLOCKS
    before, after = _op_counts(openvino_qdq), _op_counts(rewritten)
    assert before["Transpose"] - after["Transpose"] == 2 * BLOCKS
    assert before["Gemm"] - after["Gemm"] == after["MatMul"] == 2 * BLOCKS  # channel mixing keeps its Gemms
    graph = ir.load(rewritten).graph
    for matmul in (n for n in graph if n.op_type == "MatMul"):
        weight, activation = (v.producer() for v in matmul.inputs)
        assert weight.op_type == activation.op_type == "DequantizeLinear"
        assert weight.inputs[0].const_value.dtype == ir.DataType.INT8 and weight.inputs[1].const_value.size == 1
        # OpenVINO runs the MatMul in INT8 only with a signed activation at zero point 0
        zero = activation.inputs[2].const_value
        assert zero.dtype == ir.DataType.INT8 and not zero.numpy().any()


def test_only_the_requantized_inputs_change_the_logits(openvino_qdq: Path, images, tmp_path: Path) -> None:
    """With the token-mixing inputs already on s8 grids at zero point 0, the rewrite is exact (the same logits
    from ONNX Runtime's plain operators); the grids are then the only change, and they cost the logits little."""
    symmetric = ir.load(openvino_qdq)
    _symmetric_token_mixing_inputs(symmetric)
    ir.save(symmetric, tmp_path / "symmetric.onnx")
    exact, _ = _rewritten(tmp_path / "symmetric.onnx", tmp_path / "exact.onnx")
    expected = _reference_ops(tmp_path / "symmetric.onnx", images)
    found = _reference_ops(exact, images)
    np.testing.assert_allclose(found, expected, atol=1e-4 * np.abs(expected).max())

    rewritten, _ = _rewritten(openvino_qdq, tmp_path / "left.onnx")
    reference, found = onnxruntime_logits(openvino_qdq, images), onnxruntime_logits(rewritten, images)
    assert (found.argmax(-1) == reference.argmax(-1)).mean() >= 0.95
    assert np.abs(found - reference).mean() < 0.05 * np.abs(reference).mean()


def _reference_ops(path: Path, images: np.ndarray) -> np.ndarray:
    """Logits from ONNX Runtime's plain operators: no fused integer kernels, whose rounding differs by graph."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})[0]


def _symmetric_token_mixing_inputs(model: ir.Model) -> None:
    """Put every Q/DQ pair that feeds a token-mixing Dense on the s8 grid the rewrite would choose."""
    # the token-mixing Dense layers read the tokens and GELU's output; channel mixing reads wider rows
    token_mixing = {MIXER.num_tokens, MIXER.tokens_mlp_dim}
    for node in list(model.graph):
        readers = [use.node for use in node.outputs[0].uses()] if node.op_type == "QuantizeLinear" else []
        dense = [use.node for r in readers for use in r.outputs[0].uses()]
        if not dense or any(d.op_type != "Gemm" or _fan_in(d) not in token_mixing for d in dense):
            continue
        scale, zero = (float(v.const_value.numpy()) for v in node.inputs[1:3])
        s8_scale = np.float32(max(zero, 255 - zero) * scale / 127)
        grid = [
            ir.Value(name=f"{node.name}_s8_scale", const_value=ir.tensor(s8_scale)),
            ir.Value(name=f"{node.name}_s8_zero", const_value=ir.tensor(np.int8(0))),
        ]
        for value in grid:
            model.graph.register_initializer(value)
        for user in [node, *readers]:
            user.replace_input_with(1, grid[0])
            user.replace_input_with(2, grid[1])
    RemoveUnusedNodesPass()(model)  # the u8 grids' initializers


def _fan_in(gemm: ir.Node) -> int:
    return gemm.inputs[1].producer().inputs[0].const_value.shape[0]  # the INT8 weight under its DequantizeLinear


@pytest.mark.parametrize("target", ["cpu", "cpu-bf16"])
def test_openvino_runs_the_rewritten_graph_at_every_batch_size(
    openvino_qdq: Path, images, tmp_path: Path, target: str
) -> None:
    rewritten, _ = _rewritten(openvino_qdq, tmp_path / "left.onnx")
    expected = onnxruntime_logits(rewritten, images[:8])
    engine = OpenVINOEngine(rewritten, target, 8)
    try:
        for n in (1, 3, 8):
            found = engine.run(images[:n])
            assert (found.argmax(-1) == expected[:n].argmax(-1)).mean() >= 0.85
            np.testing.assert_allclose(found, expected[:n], atol=0.1 * np.abs(expected).max())
    finally:
        engine.close()


def test_a_vit_is_left_as_it_is(demo_exports, images, tmp_path: Path) -> None:
    qdq = quantize_static_int8(demo_exports["vit-digits"] / "model.onnx", tmp_path / "qdq.onnx", images)
    model = ir.load(qdq)
    float_dense_outputs(model)
    before = _op_counts_of(model)
    assert left_weight_token_mixing(model) == 0 and _op_counts_of(model) == before


def _op_counts_of(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]
