"""Graph rewrites and precision lowering, each checked by running the result in ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnxruntime.quantization.calibrate import load_tensors_data
from test_export import FAMILIES, export

from agent.engine.preprocess import InputSpec
from agent.engine.runtimes import open_engine
from builder.evaluate.datasets import calibration_set
from builder.export.architecture import ViTConfig
from builder.export.verify import sample_images
from builder.quantize.calibration import channel_absmax, channel_ranges, observe
from builder.quantize.int8_recipe import Int8Search, Recipe
from builder.quantize.precision import (
    CALIBRATION_METHODS,
    WEIGHT_OPS,
    QuantizationError,
    float_weight_ops,
    quantize_dynamic_int8,
    quantize_static_int8,
    require_quantized,
    to_fp16,
)
from builder.quantize.smoothing import smooth, smoothing_factors
from builder.rewrites.graph_passes import gemm_to_matmul


def run(path: Path, images: np.ndarray) -> np.ndarray:
    return open_engine("onnxruntime", "cpu", path, len(images)).run(images)


def ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_exports_have_every_dense_as_gemm_with_its_bias(demo_exports) -> None:
    model = onnx.load(str(demo_exports["vit-digits"] / "model.onnx"))
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    assert len(gemms) == 4 * 4 + 1  # qkv, out, mlp x2 per layer, and the head
    assert all(len(n.input) == 3 for n in gemms)
    assert len(float_weight_ops(demo_exports["vit-digits"] / "model.onnx")) == len(gemms)


def test_gemm_to_matmul_keeps_outputs(demo_exports, tmp_path: Path) -> None:
    src = demo_exports["mixer-digits"] / "model.onnx"
    model = ir.load(src)
    assert gemm_to_matmul(model) > 0
    ir.save(model, tmp_path / "mm.onnx")
    assert "Gemm" not in ops(tmp_path / "mm.onnx")
    images = sample_images(3, 64)
    np.testing.assert_allclose(run(tmp_path / "mm.onnx", images), run(src, images), atol=1e-5)


@pytest.fixture(scope="module")
def calibration() -> np.ndarray:
    return calibration_set("demo", "vit-digits.npz").subset(32).preprocessed(InputSpec(64, 64))


@pytest.mark.parametrize("method", CALIBRATION_METHODS)
def test_static_int8_quantizes_every_weight_op(demo_exports, calibration, tmp_path: Path, method: str) -> None:
    src = demo_exports["vit-digits"] / "model.onnx"
    dst = quantize_static_int8(src, tmp_path / "q.onnx", calibration, method)
    require_quantized(dst, WEIGHT_OPS)
    assert {"QuantizeLinear", "DequantizeLinear", "LayerNormalization", "Softmax", "Gelu"} <= ops(dst)
    model = onnx.load(str(dst))
    activation_zero_points = [
        t for t in model.graph.initializer if t.name.endswith("_zero_point") and t.data_type == onnx.TensorProto.UINT8
    ]
    assert activation_zero_points, "CPU flavour quantizes activations to u8"
    assert run(dst, calibration[:4]).shape == (4, 10)


@pytest.mark.parametrize("name", ["vit-digits", "mixer-digits"])
def test_the_search_takes_the_ranges_the_calibrator_would(demo_exports, calibration, tmp_path: Path, name: str) -> None:
    """The search measures min/max ranges in its own pass over the calibration frames, in place of ONNX Runtime's
    calibrator: the same tensors, the same ranges to float rounding, and the same INT8 graph from them."""
    src = demo_exports[name] / "model.onnx"
    (tmp_path / "search").mkdir()
    search = Int8Search(src, calibration, tmp_path / "search")
    ours = tmp_path / "search" / "ranges-minmax-None.json"
    assert ours.exists() and search.prepared is not None
    theirs = tmp_path / "calibrator.json"
    quantize_static_int8(search.prepared, tmp_path / "theirs.onnx", search.ranges, prepared=True, ranges=theirs)
    mine, calibrated = load_tensors_data(ours), load_tensors_data(theirs)
    assert set(mine.keys()) == set(calibrated.keys()) and len(mine.keys()) > 4 * 4
    for tensor in calibrated.keys():
        np.testing.assert_allclose(mine[tensor].range_value, calibrated[tensor].range_value, rtol=1e-5, atol=1e-6)
    built = search.build(Recipe("static"))
    for a, b in zip(int8_weights(built), int8_weights(tmp_path / "theirs.onnx"), strict=True):
        assert np.abs(a.astype(int) - b).max() <= 1  # weights do not depend on the ranges; a rounding flip at most
    images = calibration[1::2]
    assert (run(built, images).argmax(-1) == run(tmp_path / "theirs.onnx", images).argmax(-1)).mean() >= 0.95


def int8_weights(path: Path) -> list[np.ndarray]:
    model = onnx.load(str(path))
    return [onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]


def test_portable_flavour_keeps_weights_where_avx2_cannot_saturate(demo_exports, calibration, tmp_path: Path) -> None:
    """Without VNNI, ONNX Runtime sums two u8 x s8 products in int16: |w| <= 64 keeps 2 x 255 x |w| <= 32767."""
    src = demo_exports["vit-digits"] / "model.onnx"
    full = int8_weights(quantize_static_int8(src, tmp_path / "full.onnx", calibration))
    static = int8_weights(quantize_static_int8(src, tmp_path / "s.onnx", calibration, flavour="cpu-portable"))
    dynamic = int8_weights(quantize_dynamic_int8(src, tmp_path / "d.onnx", flavour="cpu-portable"))
    assert max(int(np.abs(w.astype(int)).max()) for w in full) == 127
    for weights in (static, dynamic):
        assert weights and max(int(np.abs(w.astype(int)).max()) for w in weights) == 64
    with pytest.raises(QuantizationError, match="unknown INT8 flavour 'avx2'"):
        quantize_static_int8(src, tmp_path / "x.onnx", calibration, flavour="avx2")


def test_tensorrt_flavour_is_symmetric_s8(demo_exports, calibration, tmp_path: Path) -> None:
    dst = quantize_static_int8(
        demo_exports["vit-digits"] / "model.onnx", tmp_path / "q.onnx", calibration, flavour="tensorrt"
    )
    zero_points = [
        onnx.numpy_helper.to_array(t) for t in onnx.load(str(dst)).graph.initializer if t.name.endswith("_zero_point")
    ]
    assert zero_points and not any(z.any() for z in zero_points)  # symmetric: every zero point is 0
    assert {z.dtype for z in zero_points} == {np.dtype(np.int8)}  # s8 only: TensorRT's DQ takes no INT32
    model = onnx.load(str(dst))
    int8 = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8}
    dq_inputs = [n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"]
    produced = {o for n in model.graph.node if n.op_type == "QuantizeLinear" for o in n.output}
    assert dq_inputs and all(name in int8 or name in produced for name in dq_inputs), "every DQ reads INT8"
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    floats = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    assert all(n.input[2] in floats for n in gemms), "biases stay float"


def test_dynamic_int8(demo_exports, tmp_path: Path) -> None:
    dst = quantize_dynamic_int8(demo_exports["vit-digits"] / "model.onnx", tmp_path / "d.onnx")
    require_quantized(dst, ("Gemm", "MatMul"))
    assert "MatMulInteger" in ops(dst) or "DynamicQuantizeMatMul" in ops(dst)


def test_unquantized_layers_are_caught(demo_exports) -> None:
    with pytest.raises(QuantizationError, match=r"17 Gemm/Conv layers were left in float"):
        require_quantized(demo_exports["vit-digits"] / "model.onnx", WEIGHT_OPS)


def test_fp16_keeps_uint8_in_and_float_out(demo_exports, tmp_path: Path) -> None:
    dst = to_fp16(demo_exports["vit-digits"] / "model.onnx", tmp_path / "h.onnx")
    model = onnx.load(str(dst))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    images = sample_images(4, 64)
    reference = run(demo_exports["vit-digits"] / "model.onnx", images)
    half = run(dst, images)
    assert 0 < np.abs(half - reference).max() < 0.05 * np.abs(reference).max()
    # LayerNorm (kept FP32) reads its scale and bias as they were, not rounded through FP16
    original = {
        t.name: onnx.numpy_helper.to_array(t)
        for t in onnx.load(demo_exports["vit-digits"] / "model.onnx").graph.initializer
    }
    constants = {t.name: t for t in model.graph.initializer}
    norms = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    assert norms
    for node in norms:
        for name in node.input[1:]:
            assert constants[name].data_type == onnx.TensorProto.FLOAT, name
            np.testing.assert_array_equal(
                onnx.numpy_helper.to_array(constants[name]), original[name.removesuffix("_fp32")]
            )


@pytest.mark.parametrize("family", ["bv-map-sincos", "bv-headless", "hybrid-staged"])
def test_smoothing_and_mixed_precision_reach_the_new_families(family: str, tmp_path: Path) -> None:
    """big_vision's MAP head and the hybrids' convolutions go through the INT8 search a plain ViT goes through:
    smoothing folds into the MAP head's two norms (the encoder's, read by its key/value Dense, and its own, read
    by its MLP) bit for bit, and any layer, a convolution or the attention pooling's Dense, can stay in float."""
    cfg = FAMILIES[family]
    assert isinstance(cfg, ViTConfig)
    model_path = export(tmp_path, cfg).model_path
    model = onnx.load(str(model_path))
    images = sample_images(16, cfg.image_size, seed=3)
    (tmp_path / "search").mkdir()
    search = Int8Search(model_path, images, tmp_path / "search", embeddings=cfg.output == "embeddings")
    map_head = cfg.classifier == "map"
    assert len(search.targets) == 2 * cfg.num_layers + (2 if map_head else 0)
    # the ranges and the held-aside reference come from one session: the figures two sessions give
    np.testing.assert_array_equal(search.reference, observe(model, search.holdout, [], lambda *_: None))
    alone = channel_ranges(model, search.ranges, list(search.channels))
    assert all(np.array_equal(alone[n][i], search.channels[n][i]) for n in alone for i in (0, 1)) and alone
    absmax = channel_absmax(model, images, [t.norm for t in search.targets])
    smoothed = smooth(model, search.targets, smoothing_factors(model, search.targets, absmax, 0.8))
    before, after = (observe(m, images, [], lambda *_: None) for m in (model, smoothed))
    np.testing.assert_array_equal(after, before)

    kinds = {n.name: n.op_type for n in search.layers(model)}
    # a convolution of the hybrid's ResNet; the last two Dense of a MAP model (in its attention pooling's MLP)
    kept = (next(n for n, op in kinds.items() if op == "Conv"),) if cfg.resnet else tuple(list(kinds)[-2:])
    engine = search.build(Recipe("static", alpha=0.8, float_layers=kept))
    still_float = [name for _, name in float_weight_ops(engine)]
    assert all(any(name.startswith(k) for name in still_float) for k in kept) and len(still_float) == len(kept)
    convs = [sum(n.op_type == "Conv" for n in m.graph.node) for m in (model, onnx.load(str(engine)))]
    assert convs[0] == convs[1]  # the other convolutions are quantized, none dropped
    assert search.score(engine).agreement > 0.5
