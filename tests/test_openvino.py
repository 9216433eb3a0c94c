"""OpenVINO as a CPU runtime: built and gated beside ONNX Runtime, served by the worker, swapped in live,
and refused by a device that lacks what the engine needs (issue 11). Real OpenVINO throughout."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from agent_helpers import NO_SWAP_LATENCY_GATE, device_over_mqtt

from agent.engine.bundle import BundleError, verify_bundle
from agent.engine.device import BF16_FEATURES, X86_INT8_FEATURES, DeviceInfo, full_range_int8_exact
from agent.engine.golden import check_golden
from agent.engine.preprocess import InputSpec
from agent.engine.runtimes import EngineError
from agent.engine.runtimes.openvino import OpenVINOEngine
from agent.engine.signing import load_public_key
from agent.engine.worker import WorkerEngine, WorkerSpec
from builder.bundle.build import build_engine_bundle
from builder.bundle.options import EngineOptions
from builder.demo.digits import digit_images
from builder.errors import BuildError

FAST = {"profile_seconds": 0.05, "calibration_images": 64, "eval": "demo", "calib": "demo"}
CANARY = {"window_s": 3, "min_frames": 30, "shadow_every": 1, "latency_slack_ms": 5.0}


@pytest.fixture(scope="module")
def openvino_bundle(demo_exports, signing_key, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("openvino") / "vit-ov-int8"
    options = EngineOptions(precision="int8", runtime="openvino", name="vit-ov", **FAST)
    return build_engine_bundle(demo_exports["vit-digits"], out, signing_key[0], options).path


def test_openvino_int8_candidates_are_built_and_gated(openvino_bundle: Path, signing_key) -> None:
    bundle = verify_bundle(openvino_bundle, [load_public_key(signing_key[1])], DeviceInfo.probe())
    passport = bundle.passport
    labels = {c["label"]: c for c in passport["candidates"]}
    assert set(labels) == {"openvino int8 static (minmax)", "openvino int8 (NNCF)"}  # --runtime openvino only
    assert all(c["runtime"] == "openvino" and c["accuracy"]["top1_agreement"] >= 0.99 for c in labels.values())
    assert labels["openvino int8 (NNCF)"]["quantization"]["method"] == "nncf-transformer"
    assert labels["openvino int8 static (minmax)"]["quantization"]["dense_outputs"] == "float"
    assert passport["engine"]["rewrites"] == ["class-token-only last block"]  # every candidate was built from it
    assert bundle.backend == "openvino" and passport["gate"]["passed"]
    chosen = labels[passport["engine"]["chosen"]]  # its serving layout timed at the batch served (8)
    layouts = chosen["serving_layouts"]
    assert set(layouts["timed"]) == {"1", "2", "4"} and layouts["timed"][str(layouts["kept"])]["interval"][1] >= 1
    assert layouts["kept"] == chosen["images_per_stream"] == bundle.images_per_stream
    requires = bundle.manifest["requires"]
    assert requires["openvino"].startswith(">=")
    if full_range_int8_exact(DeviceInfo.probe()):  # built as this CPU runs it best: 8-bit weights, VNNI needed
        assert set(requires["cpu_features_any"]) == X86_INT8_FEATURES
    else:  # 7-bit weights, which any x86 multiplies exactly
        assert "cpu_features_any" not in requires
        assert "u8s7" in labels["openvino int8 static (minmax)"]["quantization"]["method"]
    if DeviceInfo.probe().cpu_features & BF16_FEATURES:  # the float parts run in BF16 where the CPU has it
        assert bundle.target == "cpu-bf16" and set(requires["bf16_features_any"]) == BF16_FEATURES


def test_openvino_engine_in_the_worker_with_its_compile_cache(openvino_bundle: Path, tmp_path: Path) -> None:
    bundle = verify_bundle(openvino_bundle, None)
    cache = tmp_path / "cache"
    for _ in range(2):  # the second load finds the compiled models in the cache
        worker = WorkerEngine(WorkerSpec.of(bundle, bundle.target, 1, cache_dir=cache), timeout_s=60)
        try:
            check = check_golden(worker, bundle.golden_path, bundle.batch_range[1])
            assert check.passed, check.summary()
            for n in (1, 3, 8):  # sizes between the compiled ones run padded
                assert worker.run(_frames(bundle, n)).shape == (n, 10)
        finally:
            worker.close()
    assert any(cache.iterdir()), "OpenVINO's model cache is written under the state dir"
    chunked = dataclasses.replace(WorkerSpec.of(bundle, bundle.target, None), images_per_stream=4)
    worker = WorkerEngine(chunked, timeout_s=60)  # whichever layout the build kept, the agent serves 4 alike
    try:
        check = check_golden(worker, bundle.golden_path, bundle.batch_range[1])
        assert check.passed, check.summary()
    finally:
        worker.close()


def _frames(bundle, n: int):
    with np.load(bundle.golden_path) as golden:
        images = golden["images"]
    return np.resize(images, (n, *images.shape[1:]))


def test_a_device_without_the_cpu_features_refuses_the_bundle(openvino_bundle: Path, signing_key) -> None:
    """The device's own probe, with the features this engine needs taken away: no mock of OpenVINO."""
    keys = [load_public_key(signing_key[1])]
    here = DeviceInfo.probe()
    older = dataclasses.replace(here, cpu_features=here.cpu_features - X86_INT8_FEATURES - BF16_FEATURES)
    if "cpu_features_any" in verify_bundle(openvino_bundle, None).manifest["requires"]:
        with pytest.raises(BundleError) as refused:
            verify_bundle(openvino_bundle, keys, older)
        assert "for its INT8 kernels, this CPU has none" in str(refused.value)
        if verify_bundle(openvino_bundle, None).target == "cpu-bf16":
            assert "amx_bf16, avx512_bf16 for BF16, this CPU has none" in str(refused.value)
    else:  # built on a CPU without VNNI: 7-bit weights run on any x86
        assert verify_bundle(openvino_bundle, keys, older).backend == "openvino"
    without = dataclasses.replace(here, openvino=None)
    with pytest.raises(BundleError, match=r"needs OpenVINO >=\d+\.0,<\d+, which is not installed"):
        verify_bundle(openvino_bundle, keys, without)


def test_openvino_float_candidates(demo_exports, signing_key, tmp_path: Path) -> None:
    fp32 = build_engine_bundle(
        demo_exports["mixer-digits"], tmp_path / "fp32", signing_key[0], EngineOptions(precision="fp32", **FAST)
    )
    assert {c.label for c in fp32.candidates} == {"fp32", "openvino fp32"}
    assert all(c.accuracy.top1_agreement == 1.0 for c in fp32.candidates)
    if DeviceInfo.probe().cpu_features & BF16_FEATURES:
        bf16 = build_engine_bundle(
            demo_exports["mixer-digits"], tmp_path / "bf16", signing_key[0], EngineOptions(precision="bf16", **FAST)
        )
        assert bf16.chosen.label == "openvino bf16" and bf16.passport["gate"]["passed"]
        assert 0 < bf16.chosen.accuracy.max_abs_logit_error  # BF16 is not FP32
    with pytest.raises(BuildError, match="--runtime openvino is a CPU runtime; --target cuda has its own"):
        build_engine_bundle(
            demo_exports["mixer-digits"],
            tmp_path / "x",
            signing_key[0],
            EngineOptions(target="cuda", precision="fp16", runtime="openvino", **FAST),
        )


def test_hot_swap_from_onnxruntime_to_openvino_with_the_canary(
    demo_bundle: Path, openvino_bundle: Path, signing_key, digits_video: Path, tmp_path: Path
) -> None:
    new = verify_bundle(openvino_bundle, None).bundle_id
    with device_over_mqtt(
        tmp_path, demo_bundle, signing_key[1], digits_video, 15, canary=CANARY, swap=NO_SWAP_LATENCY_GATE
    ) as device:
        old = device.send({"id": "s0", "cmd": "status"})["result"]["engine"]
        reply = device.send({"id": "ov-1", "cmd": "deploy", "bundle": {"path": str(openvino_bundle)}})
        assert reply["ok"], reply
        swap = device.wait_event("swap", command_id="ov-1")
        assert (swap["from"], swap["to"]) == (old, new)
        commit = device.wait_event("commit", command_id="ov-1")
        assert commit["figures"]["agreement"] >= 0.95 and commit["figures"]["failed_batches"] == 0
        status = device.send({"id": "s1", "cmd": "status"})["result"]
        assert status["engine"] == new and status["lifecycle"]["previous"] == old
        assert any((tmp_path / "state" / "engine-cache").iterdir())


def test_a_batch_splits_across_openvino_streams_with_the_same_logits(demo_exports) -> None:
    """A batch runs in chunks, one per stream at once (a short last chunk padded); one thread means one
    stream. Every layout gives every batch size the logits of one image at a time."""
    model = demo_exports["vit-digits"] / "model.onnx"
    images = digit_images(64)[0][:8]
    whole = OpenVINOEngine(model, "cpu", 8, threads=1)
    layouts = {k: OpenVINOEngine(model, "cpu", 8, images_per_stream=k) for k in (1, 3, 4)}
    try:
        assert whole.streams == 1
        if (os.cpu_count() or 1) >= 2:
            assert all(engine.streams >= 2 for engine in layouts.values())
        for n in range(1, 9):
            expected = whole.run(images[:n])
            for engine in layouts.values():
                got = engine.run(images[:n])
                np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max(), err_msg=f"{n=}")
        with pytest.raises(EngineError, match="images per stream"):
            OpenVINOEngine(model, "cpu", 8, images_per_stream=9)
    finally:
        whole.close()
        for engine in layouts.values():
            engine.close()


def test_nncf_draws_nothing_of_its_own(demo_exports, tmp_path: Path, capfd) -> None:
    """NNCF's progress bars and info lines stay out of the builder's terminal and logs."""
    from builder.evaluate.datasets import calibration_set
    from builder.targets.openvino import nncf_int8

    calibration = calibration_set("demo", "vit-digits.npz").subset(8).preprocessed(InputSpec(64, 64))
    files = nncf_int8(demo_exports["vit-digits"] / "model.onnx", calibration, tmp_path)
    assert all(f.is_file() for f in files)
    out, err = capfd.readouterr()
    assert "Statistics collection" not in out + err and "━" not in out + err


def test_the_profile_times_once_the_sizes_that_run_the_same_requests(demo_exports) -> None:
    """The real profile of an engine serving 4 images per stream: 2 and 3 run the request 4 runs, 5 to 7 the two
    that 8 runs; their rows share those timings and say so, and every size up to 8 has its row."""
    model = demo_exports["vit-digits"] / "model.onnx"
    command = [sys.executable, "-m", "agent.engine.profile", str(model), "--backend", "openvino", "--size", "64"]
    command += ["--batches", *map(str, range(1, 9)), "--images-per-stream", "4", "--min-runs", "3"]
    command += ["--max-seconds", "0.05"]
    rows = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)["latency"]
    assert [r["batch"] for r in rows] == list(range(1, 9))
    assert {r["batch"]: r.get("timed_at") for r in rows} == {1: None, 2: 4, 3: 4, 4: None, 5: 8, 6: 8, 7: 8, 8: None}
    by_size = {r["batch"]: r for r in rows}
    assert by_size[6]["p99_ms"] == by_size[8]["p99_ms"] and by_size[6]["images_per_s"] * 8 == pytest.approx(
        by_size[8]["images_per_s"] * 6
    )
