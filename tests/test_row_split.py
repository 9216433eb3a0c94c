"""Dense layers split by rows for the CPU's threads, in OpenVINO's copy of the Q/DQ graph (issue 26).

The demo ViT's real export, quantized on real digit images, run in real OpenVINO. Its 17 rows per image
(16 patches and the class token) are fewer than one 32-row block per thread, so the tests split it at a
block of 4 rows: the same rewrite a ViT-B/16 gets at 32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import psutil
import pytest

from agent.engine.bundle import verify_bundle
from agent.engine.device import DeviceInfo
from agent.engine.runtimes.openvino import OpenVINOEngine
from agent.engine.signing import load_public_key
from builder.bundle.build import build_engine_bundle
from builder.bundle.options import EngineOptions, cpu_flavour
from builder.demo.digits import digit_images
from builder.quantize.precision import quantize_static_int8
from builder.rewrites import row_split
from builder.rewrites.row_split import balanced_rows, split_rows
from builder.targets.openvino import qdq_for_openvino

ROWS = 17  # the demo ViT's tokens per image


def test_the_first_part_is_whole_blocks_for_every_thread() -> None:
    assert balanced_rows(197, 2, 32) == 192  # ViT-B/16: three blocks per thread, five rows left
    assert balanced_rows(196, 2, 32) == 192  # Mixer-B/16
    assert balanced_rows(197, 4, 32) == 128
    assert balanced_rows(256, 2, 32) is None  # already even
    assert balanced_rows(50, 2, 32) is None  # under a block per thread: nothing to balance
    assert balanced_rows(ROWS, 2, 4) == 16


@pytest.fixture(scope="module")
def openvino_graph(demo_exports, tmp_path_factory) -> Path:
    """The demo ViT's static Q/DQ graph as the OpenVINO candidate serves it."""
    folder = tmp_path_factory.mktemp("row-split")
    flavour = cpu_flavour(EngineOptions(precision="int8"), DeviceInfo.probe())
    images = digit_images(64)[0][:32]
    qdq = quantize_static_int8(demo_exports["vit-digits"] / "model.onnx", folder / "qdq.onnx", images, flavour=flavour)
    return qdq_for_openvino(qdq)[0]


def _split(source: Path, out: Path) -> tuple[Path, int | None]:
    model = ir.load(source)
    first = split_rows(model, 2, block=4)
    ir.save(model, out)
    return out, first


def test_every_dense_chain_is_split_and_the_logits_stay_the_same(openvino_graph: Path, tmp_path: Path) -> None:
    split, first = _split(openvino_graph, tmp_path / "split.onnx")
    assert first == 16
    model = ir.load(openvino_graph)
    rows = row_split.image_rows(model)
    dense = [n for n in model.graph if n.op_type == "Gemm"]
    per_image = [n for n in dense if rows.get(n.inputs[0].name) == ROWS]  # not the head: it reads one row
    assert 0 < len(per_image) < len(dense)
    after = ir.load(split).graph
    assert sum(n.op_type == "Gemm" for n in after) == len(dense) + len(per_image)  # once per part
    mlps = [n for n in per_image if next(iter(n.outputs[0].uses())).node.op_type == "Gelu"]
    joins = [n for n in after if n.op_type == "Concat" and n.name.endswith("/rows")]
    assert len(joins) == len(per_image) - len(mlps)  # an MLP (Dense, GELU, quantize, Dense) is one chain
    frames = digit_images(64)[0][:8]
    for images_per_stream in (1, 4):  # batch 1 over every thread, larger ones in chunks per stream
        plain = OpenVINOEngine(openvino_graph, "cpu", 8, images_per_stream=images_per_stream)
        rows = OpenVINOEngine(split, "cpu", 8, images_per_stream=images_per_stream)
        for batch in (1, 3, 8):  # a part's rows are whole images or not: every row is its own
            np.testing.assert_array_equal(rows.run(frames[:batch]), plain.run(frames[:batch]))


def test_a_graph_with_too_few_rows_is_left_as_it_is(openvino_graph: Path) -> None:
    model = ir.load(openvino_graph)
    nodes = len(list(model.graph))
    assert split_rows(model, 2) is None  # 17 rows: under one 32-row block per thread
    assert len(list(model.graph)) == nodes


def test_the_build_times_the_split_and_keeps_it_only_when_faster(
    demo_exports, signing_key, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(row_split, "ROW_BLOCK", 4)  # the demo ViT's rows split as a ViT-B/16's are at 32
    options = EngineOptions(
        precision="int8", runtime="openvino", name="vit-rows", profile_seconds=0.05, eval="demo", calib="demo"
    )
    built = build_engine_bundle(demo_exports["vit-digits"], tmp_path / "bundle", signing_key[0], options)
    bundle = verify_bundle(built.path, [load_public_key(signing_key[1])], DeviceInfo.probe())
    candidates = {c["label"]: c for c in bundle.passport["candidates"]}
    assert candidates["openvino int8 (NNCF)"]["row_split"] is None  # OpenVINO IR: not a graph the builder edits
    split = candidates["openvino int8 static (minmax)"]["row_split"]
    assert split["first_rows"] == 16 and split["threads"] == (psutil.cpu_count(logical=False) or 1)
    assert split["same_outputs"]
    timed = split["timed_at_batch_1"]
    assert set(timed) == {"as built", "split"} and max(t["speed_vs_fastest"] for t in timed.values()) == 1.0
    assert split["kept"] == (timed["split"]["speed_vs_fastest"] > timed["as built"]["speed_vs_fastest"])
    if bundle.passport["engine"]["chosen"] == "openvino int8 static (minmax)":  # it ships as it was measured
        served = ir.load(bundle.engine_path)
        assert any(n.op_type == "Slice" and n.name.endswith("/rows0") for n in served.graph) == split["kept"]
