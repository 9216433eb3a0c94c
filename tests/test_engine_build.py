"""Engines from the demo exports: INT8 that passes the gate, builds the gate refuses, the passport's figures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from agent_helpers import blank_image_folder

from agent.engine.bundle import verify_bundle
from agent.engine.device import X86_INT8_FEATURES, DeviceInfo
from agent.engine.golden import check_golden
from agent.engine.preprocess import preprocess_into
from agent.engine.runtimes import open_bundle_engine
from agent.engine.signing import load_public_key
from builder.bundle.build import build_engine_bundle
from builder.bundle.candidates import Candidate
from builder.bundle.document import engine_requirements
from builder.bundle.options import EngineOptions, cpu_flavour
from builder.demo.digits import raw_digits
from builder.demo.evaluate import held_out_indices
from builder.demo.train import CHECKPOINT_DIR
from builder.errors import BuildError, GateError
from builder.evaluate.datasets import DatasetError
from builder.evaluate.runoff import MIN_ROUNDS, relative_speeds, time_head_to_head

FAST = {"profile_seconds": 0.05, "calibration_images": 64}


@pytest.fixture(scope="module")
def int8_bundles(demo_run: tuple[Path, Any]) -> dict[str, Path]:
    """The demo's INT8 CPU bundles as ``edgevit-build demo`` builds them (once per suite), and their key."""
    demo, _ = demo_run
    return {
        "key": demo / "keys" / "edgevit.pub",
        **{name: demo / "bundles" / f"{name}-cpu-int8" for name in ("vit-digits", "hybrid-digits", "mixer-digits")},
    }


@pytest.mark.parametrize("name", ["vit-digits", "hybrid-digits", "mixer-digits"])
def test_int8_bundle_passes_gate_with_measured_drop(int8_bundles: dict[str, Path], name: str) -> None:
    bundle = verify_bundle(int8_bundles[name], [load_public_key(int8_bundles["key"])], DeviceInfo.probe())
    passport = bundle.passport
    accuracy = passport["accuracy"]
    assert passport["gate"]["passed"] and not bundle.manifest["accepted_accuracy_loss"]
    drop = (accuracy["reference_top1"] - accuracy["engine_top1"]) * 100
    assert accuracy["top1_drop_points"] == pytest.approx(drop, abs=1e-4)  # the passport rounds to 6 digits
    assert accuracy["top1_drop_points"] <= 1.0 and accuracy["top1_agreement"] >= 0.99
    assert {c["label"] for c in passport["candidates"]} == {
        "int8 static (minmax)",
        "int8 dynamic",
        "openvino int8 static (minmax)",  # the same Q/DQ graph, run by OpenVINO
        "openvino int8 (NNCF)",
    }
    openvino = next(c for c in passport["candidates"] if c["label"] == "openvino int8 static (minmax)")
    # OpenVINO's copy runs a Mixer's token mixing with the weights on the left (a ViT has none), and GELU
    # in its erf form in both
    assert ("token_mixing" in openvino["quantization"]) == (name == "mixer-digits")
    assert openvino["quantization"]["gelu"].startswith("erf form")
    # the one that ships is profiled at every size (the batcher's table); the others where the choice looks
    assert [row["batch"] for row in passport["latency"]] == list(range(1, 9))
    others = [c for c in passport["candidates"] if c["label"] != passport["engine"]["chosen"]]
    assert all([row["batch"] for row in c["latency"]] == [1, 8] for c in others)
    assert all(row["p99_ms"] >= row["p50_ms"] > 0 and row["images_per_s"] > 0 for row in passport["latency"])
    assert passport["peak_rss_mib"] > 0
    assert bundle.manifest["engine"]["precision"] == "int8" and bundle.manifest["engine"]["quantization"]
    # close candidates are timed head to head, two or more at once; where they were, the one that ships led or tied
    timed = [c for c in passport["candidates"] if c["head_to_head"]]
    assert len(timed) != 1
    if timed:
        assert all(not c["gate_misses"] and c["head_to_head"]["rounds"] >= MIN_ROUNDS for c in timed)
        assert max(c["head_to_head"]["speed_vs_fastest"] for c in timed) == 1.0
        shipped = next(c for c in timed if c["label"] == passport["engine"]["chosen"])
        assert shipped["head_to_head"]["interval"][1] >= 1.0


@pytest.mark.parametrize("name", ["vit-digits", "mixer-digits"])
def test_passport_top1_is_what_the_engine_scores(int8_bundles: dict[str, Path], name: str) -> None:
    """Recomputed independently: the shipped engine on the held-out scans through the agent's preprocessing."""
    bundle = verify_bundle(int8_bundles[name], [load_public_key(int8_bundles["key"])])
    scans, labels = raw_digits()
    idx = held_out_indices(CHECKPOINT_DIR / f"{name}.npz")
    spec = bundle.input_spec
    frames = np.empty((len(idx), spec.height, spec.width, 3), np.uint8)
    for slot, i in zip(frames, idx, strict=True):
        preprocess_into(scans[i], spec, slot, "RGB")
    engine = open_bundle_engine(bundle, 8)  # whichever runtime shipped, as the agent serves it
    predicted = np.concatenate([engine.run(frames[i : i + 8]) for i in range(0, len(frames), 8)]).argmax(-1)
    engine.close()
    assert float((predicted == labels[idx]).mean()) == pytest.approx(bundle.passport["accuracy"]["engine_top1"])


def test_head_to_head_timing_runs_in_a_process_of_its_own(int8_bundles: dict[str, Path], tmp_path: Path) -> None:
    """The builder's runoff on real engine files, at a batch mix: the same engine under two labels, each
    round timing both; a file that is no engine fails the build, naming what was being timed."""
    bundle = verify_bundle(int8_bundles["vit-digits"], [load_public_key(int8_bundles["key"])])
    engine = (bundle.backend, bundle.target, bundle.engine_path, bundle.images_per_stream)
    times = time_head_to_head({"a": engine, "b": engine}, bundle.input_spec.height, {1: 0.5, 8: 0.5}, 0.2, None)
    assert len(times["a"]) == len(times["b"]) >= MIN_ROUNDS and min(times["a"] + times["b"]) > 0
    speeds = relative_speeds(times)
    assert max(s.ratio for s in speeds.values()) == 1.0 and min(s.ratio for s in speeds.values()) > 0.5
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an engine")
    with pytest.raises(BuildError, match="timing a, broken head to head failed"):
        time_head_to_head({"a": engine, "broken": ("onnxruntime", "cpu", broken, 1)}, 64, {8: 1.0}, 0.2, None)


def test_golden_set_reproduces(int8_bundles: dict[str, Path]) -> None:
    bundle = verify_bundle(int8_bundles["vit-digits"], [load_public_key(int8_bundles["key"])])
    engine = open_bundle_engine(bundle, 8)
    check = check_golden(engine, bundle.golden_path, 8)
    assert check.passed and check.top1_agreement == 1.0
    with np.load(bundle.golden_path) as golden:
        assert golden["images"].shape == (8, 64, 64, 3) and golden["images"].dtype == np.uint8


def test_blank_calibration_is_refused(demo_exports, signing_key, tmp_path: Path) -> None:
    options = EngineOptions(
        precision="int8",
        quantization="static",
        calib=str(blank_image_folder(tmp_path / "blank")),
        runtime="onnxruntime",
        **FAST,
    )
    with pytest.raises(GateError, match=r"top-1 dropped [\d.]+ points, [\d.]+ over the budget of 1"):
        build_engine_bundle(demo_exports["vit-digits"], tmp_path / "bundle", signing_key[0], options)
    assert not (tmp_path / "bundle").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle")], "no partial bundle left behind"


def test_accepting_the_loss_is_recorded(demo_exports, signing_key, tmp_path: Path) -> None:
    options = EngineOptions(
        precision="int8",
        quantization="static",
        calib=str(blank_image_folder(tmp_path / "blank")),
        accept_accuracy_loss=True,
        runtime="onnxruntime",
        **FAST,
    )
    result = build_engine_bundle(demo_exports["mixer-digits"], tmp_path / "bundle", signing_key[0], options)
    manifest = json.loads((result.path / "manifest.json").read_text())
    assert manifest["accepted_accuracy_loss"] is True
    assert result.passport["gate"]["accepted_accuracy_loss"] and result.passport["gate"]["misses"]


def test_eval_folder_of_images(demo_exports, signing_key, tmp_path: Path) -> None:
    """A labelled folder of real image files (PNG, BGR on disk), labels from the folder names."""
    scans, labels = raw_digits()
    for i in held_out_indices(CHECKPOINT_DIR / "vit-digits.npz")[:200]:
        folder = tmp_path / "eval" / str(labels[i])
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"{i}.png"), cv2.cvtColor(scans[i], cv2.COLOR_RGB2BGR))
    result = build_engine_bundle(
        demo_exports["vit-digits"],
        tmp_path / "bundle",
        signing_key[0],
        EngineOptions(eval=str(tmp_path / "eval"), **FAST),
    )
    assert result.passport["accuracy"]["images"] == 200
    assert result.passport["accuracy"]["top1_agreement"] == 1.0  # FP32 engine == FP32 reference
    assert json.loads((result.path / "labels.json").read_text()) == [str(d) for d in range(10)]


def test_eval_folder_with_unknown_class(demo_exports, signing_key, tmp_path: Path) -> None:
    (tmp_path / "eval" / "cat").mkdir(parents=True)
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(str(d) for d in range(10)))
    with pytest.raises(DatasetError, match=r"eval/cat is not one of the model's labels"):
        build_engine_bundle(
            demo_exports["vit-digits"],
            tmp_path / "b",
            signing_key[0],
            EngineOptions(eval=str(tmp_path / "eval"), labels=labels),
        )


def test_cuda_fp16_accuracy_is_measured_on_cpu(demo_exports, signing_key, tmp_path: Path) -> None:
    result = build_engine_bundle(
        demo_exports["vit-digits"],
        tmp_path / "bundle",
        signing_key[0],
        EngineOptions(target="cuda", precision="fp16", **FAST),
    )
    passport = result.passport
    assert passport["gate"]["passed"] and passport["accuracy"]["max_abs_logit_error"] > 0
    cuda_here = "CUDAExecutionProvider" in DeviceInfo.probe().providers
    assert passport["candidates"][0]["measured_with"] == ("onnxruntime-cuda" if cuda_here else "onnxruntime-cpu")
    assert (passport["latency"] is None) != cuda_here
    assert json.loads((result.path / "manifest.json").read_text())["requires"]["providers"] == ["CUDAExecutionProvider"]


@pytest.mark.parametrize(
    "target, precision, message",
    [
        ("cpu", "fp16", "--precision fp16 is not offered for --target cpu"),
        ("cuda", "int8", "--precision int8 is not offered for --target cuda"),
    ],
)
def test_unsupported_combinations(demo_exports, signing_key, tmp_path, target, precision, message) -> None:
    with pytest.raises(BuildError, match=message):
        build_engine_bundle(
            demo_exports["vit-digits"], tmp_path / "b", signing_key[0], EngineOptions(target, precision)
        )


def test_static_int8_needs_calibration(demo_exports, signing_key, tmp_path) -> None:
    with pytest.raises(BuildError, match="static INT8 needs --calib"):
        build_engine_bundle(
            demo_exports["vit-digits"],
            tmp_path / "b",
            signing_key[0],
            EngineOptions(precision="int8", quantization="static"),
        )


def test_unverified_export_is_refused(demo_exports, signing_key, tmp_path: Path) -> None:
    export = shutil.copytree(demo_exports["mixer-digits"], tmp_path / "export")
    report = json.loads((export / "verification.json").read_text())
    (export / "verification.json").write_text(json.dumps({**report, "passed": False}))
    with pytest.raises(BuildError, match="no passing verification.json: only verified exports become engines"):
        build_engine_bundle(export, tmp_path / "b", signing_key[0], EngineOptions())
    for damaged, why in [(b"[" * 100_000, "cannot be read"), (b'["passed"]', "no passing verification.json")]:
        (export / "verification.json").write_bytes(damaged)
        with pytest.raises(BuildError, match=why):
            build_engine_bundle(export, tmp_path / "b", signing_key[0], EngineOptions())


def test_a_labels_file_is_read_with_limits(tmp_path: Path) -> None:
    from builder.evaluate.datasets import DatasetError, load_labels

    labels = tmp_path / "labels.json"
    labels.write_text('["cat", "dog"]')
    assert load_labels(labels, "x.npz", "folder", 2) == ["cat", "dog"]
    for text, why in [
        ('[{"a": 1}]', "a JSON list of label strings"),
        ("[" * 100_000, "nested deeper than"),
        ('["cat", ', "--labels"),
        (b"\xff\xfe".decode("latin-1"), "--labels"),
    ]:
        labels.write_text(text, encoding="latin-1")
        with pytest.raises(DatasetError, match=why):
            load_labels(labels, "x.npz", "folder", None)


def test_tensorrt_without_tensorrt(demo_exports, signing_key, tmp_path: Path) -> None:
    if DeviceInfo.probe().tensorrt:
        pytest.skip("TensorRT is installed here: the plan is built by test_tensorrt_plans")
    with pytest.raises(BuildError, match="TensorRT plans are built on the target device, and this machine has no"):
        build_engine_bundle(
            demo_exports["vit-digits"],
            tmp_path / "b",
            signing_key[0],
            EngineOptions(target="tensorrt", precision="fp16"),
        )


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tensorrt_plans(demo_exports, signing_key, tmp_path: Path, precision: str) -> None:
    device = DeviceInfo.probe()
    if not (device.tensorrt and device.compute_capability):
        pytest.skip("needs TensorRT 10 and a CUDA GPU")
    result = build_engine_bundle(
        demo_exports["vit-digits"],
        tmp_path / "b",
        signing_key[0],
        EngineOptions(target="tensorrt", precision=precision, calib="demo", **FAST),
    )
    bundle = verify_bundle(result.path, [load_public_key(signing_key[1])], device)
    engine = open_bundle_engine(bundle, 8)
    assert check_golden(engine, bundle.golden_path, 8).passed


AVX2_BOX = DeviceInfo(arch="x86_64", cpu_features=frozenset({"avx2"}), onnxruntime="1.20.0", openvino="2025.1.0")
VNNI_BOX = DeviceInfo(arch="x86_64", cpu_features=frozenset({"avx2", "avx512_vnni"}), onnxruntime="1.20.0")
JETSON = DeviceInfo(arch="aarch64", cpu_features=frozenset({"asimd"}), onnxruntime="1.20.0")


@pytest.mark.parametrize(
    ("wanted", "device", "flavour"),
    [
        ("auto", AVX2_BOX, "cpu-portable"),
        ("auto", VNNI_BOX, "cpu"),
        ("auto", JETSON, "cpu"),
        ("vnni", AVX2_BOX, "cpu"),
        ("any", VNNI_BOX, "cpu-portable"),
    ],
)
def test_int8_cpu_picks_the_weight_range(wanted: str, device: DeviceInfo, flavour: str) -> None:
    assert cpu_flavour(EngineOptions(precision="int8", int8_cpu=wanted), device) == flavour


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_only_full_range_int8_needs_vnni(demo_exports, backend: str) -> None:
    """A device without VNNI refuses 8-bit weights (AVX2 can saturate on them) and runs 7-bit ones."""
    chosen = Candidate("int8", backend, [demo_exports["vit-digits"] / "model.onnx"])
    for wanted, needs in (("vnni", sorted(X86_INT8_FEATURES)), ("any", None)):
        requires = engine_requirements(EngineOptions(precision="int8", int8_cpu=wanted), chosen, AVX2_BOX)
        assert requires.get("cpu_features_any") == needs
    fp32 = engine_requirements(EngineOptions(precision="fp32", int8_cpu="vnni"), chosen, AVX2_BOX)
    assert "cpu_features_any" not in fp32
