"""The engine build's exact rewrites (issue 11): the class-token-only last block; and in OpenVINO's copy of the
Q/DQ graph, Dense outputs left float and GELU in its erf form where quantized. Real exports of the demo
checkpoints, real digit images, ONNX Runtime and OpenVINO."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graph_helpers import onnxruntime_logits

from agent.engine.preprocess import InputSpec
from agent.engine.runtimes.openvino import OpenVINOEngine
from builder.demo.digits import digit_images
from builder.demo.train import CHECKPOINT_DIR
from builder.errors import BuildError
from builder.export.job import ExportOptions, export_checkpoint
from builder.export.onnx_export import read_metadata
from builder.quantize.precision import quantize_static_int8
from builder.quantize.smoothing import find_targets
from builder.rewrites.class_token import _verify, class_token_only
from builder.rewrites.graph_passes import GELU_FORMS_GAP, exact_gelu_before_quantization, float_dense_outputs


def _export(folder: Path) -> tuple[Path, dict, np.ndarray]:
    model = folder / "model.onnx"
    meta = read_metadata(model)
    spec = InputSpec.from_json(meta["edgevit.input_spec"])
    images = digit_images(spec.height)[0][:16]
    return model, json.loads(meta["edgevit.architecture"]), images


def test_the_last_block_runs_for_the_class_token_only(demo_exports, tmp_path: Path) -> None:
    model, architecture, images = _export(demo_exports["vit-digits"])
    files = class_token_only(model, tmp_path / "ct.onnx", architecture, images[:4])
    assert files == [tmp_path / "ct.onnx"]  # small weights stay in the one file
    rewritten = files[0]
    expected, found = onnxruntime_logits(model, images), onnxruntime_logits(rewritten, images)
    np.testing.assert_allclose(found, expected, atol=1e-4 * np.abs(expected).max())
    assert (found.argmax(-1) == expected.argmax(-1)).all()
    # the last block's Dense layers now read one row per image, and the all-token ones are gone
    graph = onnx.load(str(rewritten)).graph
    for name in ("q", "out", "fc1", "fc2"):
        weight = next(n for n in graph.node if n.name == f"class_token/{name}").input[1]
        assert [n.name for n in graph.node if weight in n.input] == [f"class_token/{name}"]
    # SmoothQuant still folds into the last block's first norm: it feeds k/v, and q through the token Gather
    targets = {t.norm: t for t in find_targets(onnx.load(str(rewritten)))}
    assert len(targets) == 2 * architecture["num_layers"] + 1  # and the final norm, which now feeds the head
    assert sorted(len(t.weights) for t in targets.values())[-1] == 2


@pytest.mark.parametrize("target", ["cpu", "cpu-bf16"])
def test_openvino_compiles_and_runs_the_rewritten_graph_at_every_batch_size(
    demo_exports, tmp_path: Path, target: str
) -> None:
    """OpenVINO 2026.4 crashed compiling the first form of the rewrite in FP32 at batch 4; every size runs now."""
    model, architecture, images = _export(demo_exports["vit-digits"])
    rewritten = class_token_only(model, tmp_path / "ct.onnx", architecture, images[:4])[0]
    engine = OpenVINOEngine(rewritten, target, 8)
    expected = onnxruntime_logits(model, images[:8])
    try:
        for n in range(1, 9):
            found = engine.run(images[:n])
            assert (found.argmax(-1) == expected[:n].argmax(-1)).all()
            np.testing.assert_allclose(found, expected[:n], atol=0.05 * np.abs(expected).max())
    finally:
        engine.close()


def test_what_the_rewrite_does_not_apply_to_is_left_alone(demo_exports, tmp_path: Path) -> None:
    model, architecture, images = _export(demo_exports["mixer-digits"])
    assert class_token_only(model, tmp_path / "mixer.onnx", architecture, images[:4]) is None
    vit, vit_architecture, _ = _export(demo_exports["vit-digits"])
    gap = {**vit_architecture, "classifier": "gap"}  # mean-pooled ViTs read every token
    assert class_token_only(vit, tmp_path / "gap.onnx", gap, images[:4]) is None
    assert not (tmp_path / "mixer.onnx").exists() and not (tmp_path / "gap.onnx").exists()


def test_a_rewrite_that_changed_the_logits_fails_the_build(demo_exports) -> None:
    """The check compares logits; two different models (both 10 classes) stand in for a wrong rewrite."""
    vit, _, images = _export(demo_exports["vit-digits"])
    with pytest.raises(BuildError, match="class-token rewrite changed the logits"):
        _verify(demo_exports["mixer-digits"] / "model.onnx", images[:4], onnxruntime_logits(vit, images[:4]))


def test_dense_outputs_left_float_for_openvino(demo_exports, tmp_path: Path) -> None:
    model, _, images = _export(demo_exports["vit-digits"])
    qdq = quantize_static_int8(model, tmp_path / "qdq.onnx", images)
    model_ir = ir.load(qdq)
    graph = model_ir.graph
    before = _quantized_dense_outputs(graph)
    assert before, "ONNX Runtime's quantizer quantizes Dense outputs"
    dropped = float_dense_outputs(model_ir)
    ir.save(model_ir, tmp_path / "float-outputs.onnx")
    left = _quantized_dense_outputs(graph)
    assert dropped == len(before) - len(left) > 0
    for kept in left:  # only a pair whose output is the logits stays
        assert any(use.node.outputs[0] in graph.outputs for use in kept.outputs[0].uses())
    reference = onnxruntime_logits(model, images)
    for path in (qdq, tmp_path / "float-outputs.onnx"):
        assert (onnxruntime_logits(path, images).argmax(-1) == reference.argmax(-1)).mean() >= 0.9
    engine = OpenVINOEngine(tmp_path / "float-outputs.onnx", "cpu", 8)
    try:
        assert (engine.run(images[:8]).argmax(-1) == reference[:8].argmax(-1)).mean() >= 0.85
    finally:
        engine.close()


def _quantized_dense_outputs(graph: ir.Graph) -> list[ir.Node]:
    return [
        node
        for node in graph
        if node.op_type == "QuantizeLinear"
        and node.inputs[0].producer() is not None
        and node.inputs[0].producer().op_type == "Gemm"
    ]


@pytest.mark.slow
def test_the_rewrite_follows_an_export_at_another_resolution(tmp_path: Path) -> None:
    """The token count comes from the graph, not the checkpoint: 96 px is 37 tokens, not the trained 17."""
    folder = export_checkpoint(CHECKPOINT_DIR / "vit-digits.npz", tmp_path / "96", ExportOptions(resolution=96))
    model, architecture, images = _export(folder.model_path.parent)
    assert images.shape[1] == 96
    files = class_token_only(model, tmp_path / "ct.onnx", architecture, images[:4])
    assert files is not None
    np.testing.assert_allclose(onnxruntime_logits(files[0], images), onnxruntime_logits(model, images), atol=1e-3)


def test_the_gelu_forms_differ_by_at_most_the_stated_gap() -> None:
    x = np.linspace(-12.0, 12.0, 480_001)
    tanh_form = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    exact = 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    assert 0.99 * GELU_FORMS_GAP < np.abs(tanh_form - exact).max() <= GELU_FORMS_GAP


def test_gelu_runs_in_its_erf_form_only_where_quantized(demo_exports, tmp_path: Path) -> None:
    model, architecture, images = _export(demo_exports["vit-digits"])
    export = ir.load(model)
    assert exact_gelu_before_quantization(export) is None  # the float export's GELUs feed a float Dense
    qdq = ir.load(quantize_static_int8(model, tmp_path / "qdq.onnx", images))
    float_dense_outputs(qdq)
    ir.save(qdq, tmp_path / "tanh.onnx")
    gap = exact_gelu_before_quantization(qdq)
    assert gap is not None and gap < 0.1  # of the step of the grid GELU's output is quantized to
    forms = [node.attributes.get_string("approximate", "none") for node in qdq.graph if node.op_type == "Gelu"]
    assert forms == ["none"] * architecture["num_layers"]
    ir.save(qdq, tmp_path / "erf.onnx")
    fine = ir.load(tmp_path / "tanh.onnx")  # a grid so fine that the forms' gap is a large share of its step
    quantize = next(use.node for n in fine.graph if n.op_type == "Gelu" for use in n.outputs[0].uses())
    finest = ir.Value(name="fine_scale", const_value=ir.tensor(np.float32(GELU_FORMS_GAP)))
    fine.graph.register_initializer(finest)
    quantize.replace_input_with(1, finest)
    exact_gelu_before_quantization(fine)
    forms = [node.attributes.get_string("approximate", "none") for node in fine.graph if node.op_type == "Gelu"]
    assert forms == ["tanh"] + ["none"] * (architecture["num_layers"] - 1)
    before = onnxruntime_logits(tmp_path / "tanh.onnx", images)
    after = onnxruntime_logits(tmp_path / "erf.onnx", images)
    assert (after.argmax(-1) == before.argmax(-1)).all()
    assert np.abs(after - before).max() < 0.05 * np.abs(before).max()
