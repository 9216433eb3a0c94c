"""INT8 on ViTs/Mixers with the outlier channels of real pretrained models (issue 10).

The test models are the demo checkpoints with a few LayerNorm channels made 32-128x wider by
an exact FP32 identity (:mod:`builder.demo.outliers`). Naive per-tensor INT8 loses them;
SmoothQuant folded into the export, and mixed precision where that is not enough, must ship
within the default gate.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnxruntime.quantization.calibrate import load_tensors_data
from rich.console import Console

from builder.bundle.build import build_engine_bundle
from builder.bundle.document import TENSORRT_RECIPE_MODEL, TENSORRT_RECIPE_REPORT
from builder.bundle.options import EngineOptions
from builder.bundle.view import candidate_table
from builder.demo.outliers import OUTLIER_CHANNELS, write_outlier_checkpoint
from builder.demo.train import CHECKPOINT_DIR
from builder.errors import BuildError, GateError
from builder.evaluate.datasets import calibration_set
from builder.evaluate.measure import Gate
from builder.export.job import export_checkpoint
from builder.export.onnx_export import read_metadata
from builder.quantize.calibration import channel_absmax, observe
from builder.quantize.int8_recipe import ALPHAS, Int8Search, Recipe, Score, smoothed_enough
from builder.quantize.precision import float_weight_ops, quantize_static_int8
from builder.quantize.smoothing import find_targets, smooth, smoothing_factors
from builder.rewrites.class_token import class_token_only

pytestmark = pytest.mark.slow  # INT8 builds of outlier models: seconds each

# edgevit's own recipes (ONNX Runtime); OpenVINO's candidates are tested in test_openvino.py
FAST = {"profile_seconds": 0.05, "calibration_images": 128, "eval": "demo", "calib": "demo", "runtime": "onnxruntime"}


@pytest.fixture(scope="module")
def outlier_exports(tmp_path_factory) -> dict[tuple[str, int], Path]:
    root = tmp_path_factory.mktemp("outliers")
    found = {}
    for name, strength in [("vit-digits", 32), ("vit-digits", 64), ("vit-digits", 128), ("mixer-digits", 128)]:
        checkpoint = write_outlier_checkpoint(CHECKPOINT_DIR / f"{name}.npz", strength, root / f"{name}.npz")
        # the derived checkpoint keeps the demo's name so that 'demo' finds its splits
        found[name, strength] = export_checkpoint(checkpoint, root / f"{name}-x{strength}").model_path.parent
        checkpoint.unlink()
    return found


def options(**changes) -> EngineOptions:
    return EngineOptions(**{"precision": "int8", **FAST, **changes})


def calibration(name: str) -> np.ndarray:
    from agent.engine.preprocess import InputSpec

    return calibration_set("demo", f"{name}.npz").subset(64).preprocessed(InputSpec(64, 64))


@pytest.mark.parametrize("name", ["vit-digits", "mixer-digits"])
def test_outlier_checkpoints_compute_the_same_logits(demo_exports, outlier_exports, name: str) -> None:
    images = calibration(name)
    original = observe(onnx.load(str(demo_exports[name] / "model.onnx")), images, [], lambda *_: None)
    changed = outlier_exports[name, 128] / "model.onnx"
    np.testing.assert_allclose(observe(onnx.load(str(changed)), images, [], lambda *_: None), original, atol=1e-5)
    norms = [t.norm for t in find_targets(onnx.load(str(changed)))]
    absmax = channel_absmax(onnx.load(str(changed)), images, norms)
    for peak in absmax.values():  # the chosen channels now dwarf the rest
        others = np.delete(peak, OUTLIER_CHANNELS)
        assert peak[list(OUTLIER_CHANNELS)].min() > 10 * np.median(others)


def test_smoothing_targets_and_exact_fold(outlier_exports) -> None:
    vit = onnx.load(str(outlier_exports["vit-digits", 64] / "model.onnx"))
    targets = find_targets(vit)
    assert len(targets) == 2 * 4  # pre-attention and pre-MLP norm of each of the 4 blocks, not the final norm
    mixer = find_targets(onnx.load(str(outlier_exports["mixer-digits", 128] / "model.onnx")))
    assert len(mixer) == 4  # channel mixing only: token mixing reads the norm transposed
    images = calibration("vit-digits")
    absmax = channel_absmax(vit, images, [t.norm for t in targets])
    factors = smoothing_factors(vit, targets, absmax, 0.8)
    assert all(np.all(np.log2(f) == np.round(np.log2(f))) for f in factors.values()), "powers of two"
    smoothed = smooth(vit, targets, factors)
    before, after = (observe(m, images, [], lambda *_: None) for m in (vit, smoothed))
    np.testing.assert_array_equal(after, before)  # bit for bit: power-of-two factors are exact
    assert len(smoothed.graph.node) == len(vit.graph.node)  # nothing added to the run-time graph
    flattened = channel_absmax(smoothed, images, [t.norm for t in targets])
    for norm, peak in flattened.items():
        assert peak.max() / np.median(peak) < absmax[norm].max() / np.median(absmax[norm]) / 4


def test_one_calibration_serves_every_smoothing_strength(outlier_exports, tmp_path) -> None:
    """The search runs the calibrator once: a smoothed graph's ranges are worked out from the unsmoothed
    graph's and match what the calibrator measures on the smoothed graph itself; smoothing after the shared
    pre-quantization pass quantizes to the same engine as smoothing before it."""
    export = outlier_exports["vit-digits", 64]
    architecture = json.loads(read_metadata(export / "model.onnx")["edgevit.architecture"])
    images = calibration("vit-digits")
    rewritten = class_token_only(export / "model.onnx", tmp_path / "rewritten.onnx", architecture, images[:4])
    assert rewritten is not None  # the last block's class-token Gather: a pass-through smoothing rescales
    work = tmp_path / "search"
    work.mkdir()
    search = Int8Search(rewritten[0], images, work)
    assert search.prepared is not None
    search.build(Recipe("static"))  # the one calibration
    ranges = search._ranges("minmax", 0.5)
    assert ranges.is_file(), "worked out, before any recipe of that strength ran the calibrator"
    worked_out = load_tensors_data(ranges)
    smoothed = search.build(Recipe("static", alpha=0.5))
    source = work / "smoothed.onnx"
    onnx.save(smooth(onnx.load(str(search.prepared)), search.targets, search._factors(0.5)), str(source))
    quantize_static_int8(source, tmp_path / "q.onnx", search.ranges, prepared=True, ranges=tmp_path / "measured.json")
    measured = load_tensors_data(tmp_path / "measured.json")
    assert set(worked_out.keys()) == set(measured.keys())
    scaled = {name for t in search.targets for name in t.scaled}
    assert scaled & set(measured.keys()), "the ranges the smoothing changes are among those calibrated"
    for name, value in measured.items():
        np.testing.assert_allclose(worked_out[name].range_value, value.range_value, rtol=1e-5, err_msg=name)
    dynamic = search.build(Recipe("dynamic", alpha=0.5))
    assert search.prepared_dynamic is not None
    search.prepared = search.prepared_dynamic = None  # the fallback: smooth the export, then prepare it alone
    alone = [search.build(Recipe(method, alpha=0.5)) for method in ("static", "dynamic")]
    for shared, own in zip((smoothed, dynamic), alone, strict=True):
        weights = [
            {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(p)).graph.initializer} for p in (shared, own)
        ]
        assert weights[0].keys() == weights[1].keys()
        for name, value in weights[0].items():
            np.testing.assert_array_equal(value, weights[1][name], err_msg=name)


@pytest.mark.parametrize(("name", "strength"), [("vit-digits", 32), ("vit-digits", 128), ("mixer-digits", 128)])
def test_int8_ships_within_the_default_gate(outlier_exports, signing_key, tmp_path, name, strength) -> None:
    result = build_engine_bundle(outlier_exports[name, strength], tmp_path / "b", signing_key[0], options())
    passport = result.passport
    assert passport["gate"]["passed"] and not passport["gate"]["accepted_accuracy_loss"]
    assert passport["accuracy"]["top1_agreement"] >= 0.99
    for candidate in passport["candidates"]:
        recipe = candidate["quantization"]
        assert recipe["smoothing_alpha"] is not None, "the outliers are smoothed"
        naive = next(s for s in recipe["searched"] if s["alpha"] is None)
        assert recipe["holdout"]["mean_rel_logit_error"] < naive["mean_rel_logit_error"] / 3
        scores = [Score(s["images"], s["agreement"], s["mean_rel_logit_error"]) for s in recipe["searched"]]
        assert [s["alpha"] for s in recipe["searched"]] == list(ALPHAS[: len(scores)])  # weakest first
        assert not any(smoothed_enough(scores[:k]) for k in range(len(scores)))  # stopped at the first chance
        assert len(scores) == len(ALPHAS) or smoothed_enough(scores)


def test_the_smoothing_search_stops_at_the_first_strength_that_does_not_help() -> None:
    def scores(*errors: float) -> list[Score]:
        return [Score(64, 1.0, e) for e in errors]

    assert not smoothed_enough([])
    assert not smoothed_enough(scores(0.3))
    assert not smoothed_enough(scores(0.3, 0.1))  # smoothing helped: a stronger one may help more
    assert smoothed_enough(scores(0.3, 0.1, 0.2))  # past the best strength
    assert smoothed_enough(scores(0.1, 0.1))  # no better is not worth another
    assert not smoothed_enough([Score(64, 0.9, 0.1), Score(64, 0.95, 0.2)])  # agreement first
    assert smoothed_enough([Score(64, 0.95, 0.1), Score(64, 0.9, 0.05)])


def test_naive_int8_misses_where_smoothing_ships(outlier_exports, signing_key, tmp_path) -> None:
    """The same strong-outlier model with smoothing off: today's builder, refused by the gate."""
    with pytest.raises(GateError, match="agreement with FP32 is [0-9.]+%") as refused:
        build_engine_bundle(
            outlier_exports["vit-digits", 128],
            tmp_path / "b",
            signing_key[0],
            options(smoothing="off", gate=Gate(1.0, 0.999), int8_cpu="vnni"),  # 8-bit weights, on any CPU
        )
    assert "mixed precision" in str(refused.value) and "not smoothed" in str(refused.value)
    assert not (tmp_path / "b").exists()


def test_a_model_without_outliers_is_not_made_worse(demo_exports, signing_key, tmp_path) -> None:
    result = build_engine_bundle(demo_exports["vit-digits"], tmp_path / "b", signing_key[0], options())
    for candidate in result.passport["candidates"]:
        recipe = candidate["quantization"]
        naive = next(s for s in recipe["searched"] if s["alpha"] is None)
        # the unsmoothed recipe competes; whatever wins scores at least as well held aside
        assert (recipe["holdout"]["agreement"], -recipe["holdout"]["mean_rel_logit_error"]) >= (
            naive["agreement"],
            -naive["mean_rel_logit_error"],
        )
    assert result.passport["gate"]["passed"] and result.passport["accuracy"]["top1_agreement"] >= 0.99


def test_mixed_precision_keeps_the_fewest_sensitive_layers_in_float(outlier_exports, signing_key, tmp_path) -> None:
    """Smoothing off, so the outliers stay: INT8 misses, and the layers that read them go back to float."""
    export = outlier_exports["vit-digits", 64]
    result = build_engine_bundle(export, tmp_path / "b", signing_key[0], options(smoothing="off"))
    passport = result.passport
    recipe = passport["engine"]["quantization"]
    assert passport["gate"]["passed"] and recipe["float_layers"], passport["engine"]
    assert [c["gate_misses"] != [] for c in passport["candidates"]][:2] == [True, True]
    # the layers kept float are ones that read an outlier LayerNorm (directly, or through a Reshape or the
    # class-token Gather), in the graph the build quantized: the export with its last block rewritten
    assert passport["engine"]["rewrites"] == ["class-token-only last block"]
    architecture = json.loads(read_metadata(export / "model.onnx")["edgevit.architecture"])
    frames = calibration("vit-digits")[:4]
    rewritten = class_token_only(export / "model.onnx", tmp_path / "rewritten.onnx", architecture, frames)
    model = onnx.load(str(rewritten[0]))
    readers = {n.name: n.input[0] for n in model.graph.node}
    producers = {o: n for n in model.graph.node for o in n.output}

    def reads_norm(name: str) -> bool:
        node = producers[readers[name]]
        return node.op_type == "LayerNormalization" or producers.get(node.input[0], node).op_type == (
            "LayerNormalization"
        )

    assert all(reads_norm(name) for name in recipe["float_layers"])
    assert len(recipe["float_layers"]) <= 8 and recipe["speed_vs_all_int8"] > 0
    searched = recipe["searched"]
    assert searched[0]["float_layers"] == 0 and searched[0]["misses"]
    assert any(s["float_layers"] == len(recipe["float_layers"]) and s["misses"] is None for s in searched)
    engine = next((result.path / "engine").iterdir())
    dense = [name for op, name in float_weight_ops(engine) if op != "Conv"]  # dynamic INT8 leaves the Conv
    assert len(dense) == len(recipe["float_layers"]), "exactly those layers stayed float"


def test_tensorrt_int8_recipe_is_gated_without_tensorrt(outlier_exports, signing_key, tmp_path) -> None:
    from agent.engine.device import DeviceInfo

    if DeviceInfo.probe().tensorrt:
        pytest.skip("TensorRT is installed here: the plan itself is built (test_engine_build.test_tensorrt_plans)")
    out = tmp_path / "recipe"
    result = build_engine_bundle(outlier_exports["vit-digits", 128], out, signing_key[0], options(target="tensorrt"))
    assert not result.bundle and sorted(p.name for p in out.iterdir()) == sorted(
        [TENSORRT_RECIPE_MODEL, TENSORRT_RECIPE_REPORT]
    )
    report = json.loads((out / TENSORRT_RECIPE_REPORT).read_text())
    assert report["gate"]["passed"] and report["engine"]["quantization"]["method"] == "static-qdq-s8s8"
    assert report["engine"]["quantization"]["smoothing_alpha"] is not None
    assert "simulated" in report["accuracy_measured_with"] and "built on the device" in report["plan"]
    model = onnx.load(str(out / TENSORRT_RECIPE_MODEL))
    zero_points = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith("zero_point")]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    with pytest.raises(BuildError, match="dynamic cannot target TensorRT"):
        build_engine_bundle(
            outlier_exports["vit-digits", 128],
            tmp_path / "d",
            signing_key[0],
            options(target="tensorrt", quantization="dynamic"),
        )


def test_mixed_precision_is_searched_on_openvino_too(outlier_exports, signing_key, tmp_path) -> None:
    """The same search on OpenVINO's candidate, judged by OpenVINO's own accuracy: where its all-INT8
    graph misses the gate and nothing inside the gate (here NNCF's) is faster, OpenVINO keeps its
    sensitive layers in float rather than the build falling back to another runtime."""
    result = build_engine_bundle(
        outlier_exports["vit-digits", 64], tmp_path / "b", signing_key[0], options(smoothing="off", runtime="openvino")
    )
    candidates = {c["label"]: c for c in result.passport["candidates"]}
    speed = {label: c["latency"][-1]["images_per_s"] for label, c in candidates.items()}
    static = candidates["openvino int8 static (minmax)"]
    assert static["gate_misses"], speed
    first = {label for label, c in candidates.items() if not (c["quantization"] or {}).get("float_layers")}
    mixed = [c for label, c in candidates.items() if label not in first and c["measured_with"].startswith("openvino")]
    # the speeds the decision compared: the one that ships is profiled again afterwards
    decision = static["quantization"]["mixed_precision"]
    assert decision["searched"] == (decision["images_per_s"] > decision["fastest_inside_gate_images_per_s"]), speed
    if decision["searched"]:  # worth searching: it may win
        assert mixed and mixed[0]["quantization"]["searched"][0]["float_layers"] == 0, list(candidates)
    else:
        assert not mixed, "a runtime slower than one inside the gate is not searched"
    console = Console(width=200, record=True)
    console.print(candidate_table(result.passport["candidates"], result.chosen.label, "candidates"))
    said = "searched from here" if decision["searched"] else "not searched"
    assert f"mixed precision {said}" in console.export_text()
    assert result.passport["gate"]["passed"]
