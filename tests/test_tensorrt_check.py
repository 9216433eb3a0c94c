"""The CPU-side TensorRT parser check: it passes what edgevit sends TensorRT and refuses each broken rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builder.bundle.build import build_engine_bundle
from builder.bundle.options import EngineOptions
from builder.demo.digits import digit_images
from builder.quantize.precision import quantize_static_int8
from builder.targets.tensorrt_check import TensorRTCompatibilityError, check_graph

UINT8 = TensorProto.UINT8
ZERO, SCALE = np.int8(0), np.float32(0.05)


def _const(name: str, value: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(value, name)


def qdq_graph(
    opset: int = 20,
    act_zero: np.ndarray | None = ZERO,
    act_scale: np.ndarray = SCALE,
    weight_axis: int = 1,
    weight_scale: np.ndarray | None = None,
    bias_dtype: type = np.float32,
    input_to: str = "Cast",
    extra: list[onnx.NodeProto] = (),
) -> onnx.ModelProto:
    """uint8 [1, 4] -> Cast -> Q/DQ -> MatMul (per-channel INT8 weight) -> + bias: TensorRT's explicit INT8 shape."""
    inits = [
        _const("w_q", np.arange(12, dtype=np.int8).reshape(4, 3)),
        _const("w_scale", np.full(3, 0.01, np.float32) if weight_scale is None else weight_scale),
        _const("w_zero", np.zeros(3 if weight_scale is None or weight_scale.size > 1 else (), np.int8)),
        _const("a_scale", np.asarray(act_scale, np.float32)),
    ]
    q_inputs = ["x", "a_scale"]
    if act_zero is not None:
        inits.append(_const("a_zero", np.asarray(act_zero)))
        q_inputs.append("a_zero")
    nodes = [
        helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT, name="cast")
        if input_to == "Cast"
        else helper.make_node(input_to, ["images", "images"], ["x"], name="direct"),
        helper.make_node("QuantizeLinear", q_inputs, ["xq"], name="q_act"),
        helper.make_node("DequantizeLinear", ["xq", *q_inputs[1:]], ["xd"], name="dq_act"),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"], axis=weight_axis, name="dq_w"),
        helper.make_node("MatMul", ["xd", "w"], ["y"], name="matmul"),
    ]
    if bias_dtype is np.int32:
        inits += [_const("b_q", np.ones(3, np.int32)), _const("b_scale", np.float32(0.001))]
        nodes.append(helper.make_node("DequantizeLinear", ["b_q", "b_scale"], ["b"], name="dq_bias"))
    else:
        inits.append(_const("b", np.ones(3, np.float32)))
    nodes += [helper.make_node("Add", ["y", "b"], ["logits"], name="bias"), *extra]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("images", UINT8, [1, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def rules(model: onnx.ModelProto, version: str = "10.3") -> list[str]:
    return [str(p) for p in check_graph(model, version)]


def test_the_tensorrt_shape_of_int8_passes() -> None:
    assert rules(qdq_graph()) == []


@pytest.mark.parametrize(
    ("model", "version", "expected"),
    [
        (qdq_graph(opset=21), "10.3", "model: opset 21; TensorRT 10.3 reads opsets up to 20"),
        (qdq_graph(opset=20), "8.6", "model: opset 20; TensorRT 8.6 reads opsets up to 17"),
        (qdq_graph(act_zero=None), "10.3", "node q_act (QuantizeLinear): no zero point, so UINT8 output"),
        (qdq_graph(act_zero=np.uint8(128)), "10.3", "node q_act (QuantizeLinear): zero point of type UINT8"),
        (qdq_graph(act_zero=np.int8(3)), "10.3", "node q_act (QuantizeLinear): non-zero zero point"),
        (qdq_graph(act_scale=np.float32(0)), "10.3", "node q_act (QuantizeLinear): scale not positive and finite"),
        (qdq_graph(act_scale=np.full(4, 0.1, np.float32)), "10.3", "node q_act (QuantizeLinear): per-channel"),
        (qdq_graph(bias_dtype=np.int32), "10.3", "node dq_bias (DequantizeLinear): dequantizes INT32"),
        (qdq_graph(weight_axis=0, weight_scale=np.full(4, 0.01, np.float32)), "10.3",
         "node dq_w (DequantizeLinear): per-channel along axis 0; TensorRT quantizes weights per output"),
        (qdq_graph(input_to="Add"), "10.3", "input images: uint8 input read by Add direct"),
        (qdq_graph(extra=[helper.make_node("Cast", ["logits"], ["u8"], to=TensorProto.UINT8, name="to_u8")]), "10.3",
         "node to_u8 (Cast): casts to uint8"),
        (qdq_graph(extra=[helper.make_node("Gelu", ["logits"], ["g"], name="gelu")], opset=17), "8.6",
         "node gelu (Gelu): TensorRT 8.6's ONNX parser has no importer for Gelu"),
        (qdq_graph(extra=[helper.make_node("QGemm", ["logits"], ["g"], domain="com.microsoft", name="qgemm")]), "10.3",
         "node qgemm (QGemm): op of domain com.microsoft"),
        (qdq_graph(extra=[helper.make_node("NonMaxSuppression", ["logits", "logits"], ["g"], name="nms")]), "10.3",
         "node nms (NonMaxSuppression): TensorRT 10.3's ONNX parser has no importer"),
        (qdq_graph(extra=[helper.make_node("MaxPool", ["logits"], ["p", "i"], kernel_shape=[3], name="pool")]), "10.3",
         "node pool (MaxPool): MaxPool's indices output"),
        (qdq_graph(extra=[helper.make_node("GroupNormalization", ["logits", "b", "b"], ["n"], num_groups=3,
                                           name="gn")], opset=18), "10.3",
         "node gn (GroupNormalization): GroupNormalization at opset 18 scales per group"),
    ],
)  # fmt: skip
def test_each_broken_rule_is_named_with_its_node(model: onnx.ModelProto, version: str, expected: str) -> None:
    found = rules(model, version)
    assert any(p.startswith(expected) for p in found), found


@pytest.mark.parametrize("model", ["vit-digits", "hybrid-digits"])
def test_onnx_runtime_cpu_int8_is_refused_and_the_tensorrt_recipe_passes(
    demo_exports: dict[str, Path], tmp_path: Path, model: str
) -> None:
    """ONNX Runtime's default INT8 (uint8 activations, INT32 biases) would fail at flash time; the recipe does not,
    and a hybrid's ResNet (convolutions, GroupNorm as primitive ops, the root's MaxPool) parses in both forms."""
    export = demo_exports[model] / "model.onnx"
    calibration = digit_images(64)[0][:16]
    assert rules(onnx.load(export)) == []
    ops = {n.op_type for n in onnx.load(export).graph.node}
    assert model != "hybrid-digits" or {"Conv", "MaxPool"} <= ops and "GroupNormalization" not in ops
    trt = quantize_static_int8(export, tmp_path / "trt.onnx", calibration, flavour="tensorrt")
    assert rules(onnx.load(trt)) == []
    nodes = onnx.load(trt).graph.node
    made_by = {out: n.op_type for n in nodes for out in n.output}
    convs = [n for n in nodes if n.op_type == "Conv"]
    assert all(made_by.get(n.input[0]) == made_by.get(n.input[1]) == "DequantizeLinear" for n in convs), "INT8 convs"
    cpu = quantize_static_int8(export, tmp_path / "cpu.onnx", calibration, flavour="cpu")
    found = rules(onnx.load(cpu))
    assert any("zero point of type UINT8" in p for p in found) and any("dequantizes INT32" in p for p in found)


def test_the_builder_refuses_a_graph_the_device_tensorrt_cannot_parse(
    demo_exports: dict[str, Path], signing_key: tuple[Path, Path], tmp_path: Path
) -> None:
    """JetPack 6.0's TensorRT 8.6 has no Gelu importer: the build says so here, not on the Jetson."""
    options = EngineOptions(target="tensorrt", precision="fp16", tensorrt_version="8.6")
    with pytest.raises(
        TensorRTCompatibilityError, match=r"TensorRT 8\.6 would refuse model\.onnx: model: opset 20.*Gelu"
    ):
        build_engine_bundle(demo_exports["vit-digits"], tmp_path / "out", signing_key[0], options)
    assert not (tmp_path / "out").exists()
