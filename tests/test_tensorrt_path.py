"""The Jetson/TensorRT path, as far as a CPU can test it: provider options, load timeouts, the start-up check."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agent.engine import worker as worker_module
from agent.engine.bundle import incompatibilities, verify_bundle
from agent.engine.device import DeviceInfo, gpu_problems
from agent.engine.runtimes import EngineError, open_engine
from agent.engine.runtimes.onnxruntime import tensorrt_provider_options
from agent.engine.worker import WorkerEngine, WorkerSpec

ROOT = Path(__file__).resolve().parents[1]


def test_tensorrt_provider_caches_its_engines_and_covers_the_batch_range(tmp_path: Path) -> None:
    options = tensorrt_provider_options("images", (224, 224, 3), 8, "fp16", tmp_path / "engine-cache")
    assert options["trt_engine_cache_enable"] == "True" and options["trt_timing_cache_enable"] == "True"
    assert (
        options["trt_engine_cache_path"] == options["trt_timing_cache_path"] == str(tmp_path / "engine-cache/tensorrt")
    )
    assert (tmp_path / "engine-cache" / "tensorrt").is_dir()
    assert options["trt_profile_min_shapes"] == "images:1x224x224x3"  # every batch size inside one profile:
    assert options["trt_profile_max_shapes"] == options["trt_profile_opt_shapes"] == "images:8x224x224x3"  # no rebuild
    assert options["trt_fp16_enable"] == "True"
    fp32 = tensorrt_provider_options("images", (64, 64, 3), 4, "fp32", None)
    assert fp32["trt_fp16_enable"] == "False" and "trt_engine_cache_enable" not in fp32


def test_tensorrt_provider_missing_is_an_engine_error(demo_bundle: Path) -> None:
    bundle = verify_bundle(demo_bundle, None)
    with pytest.raises(EngineError, match="TensorrtExecutionProvider is not available"):
        open_engine("onnxruntime", "tensorrt-ep", bundle.engine_path, 8)


def test_tensorrt_plans_without_tensorrt_are_an_engine_error(tmp_path: Path) -> None:
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"not a plan")
    with pytest.raises(EngineError, match="TensorRT engines need"):
        open_engine("tensorrt", "tensorrt", plan, 8)


def test_a_slow_engine_load_extends_systemds_start_timeout(
    demo_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a worker loads (a first TensorRT build takes minutes), EXTEND_TIMEOUT_USEC keeps systemd waiting."""
    address = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(address)
    listener.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.setattr(worker_module, "LOAD_NOTIFY_S", 0.01)
    bundle = verify_bundle(demo_bundle, None)
    engine = WorkerEngine(WorkerSpec.of(bundle, bundle.target, 1))
    try:
        message = listener.recv(256).decode()
        assert message.startswith("EXTEND_TIMEOUT_USEC=") and int(message.split("=")[1]) > 0
    finally:
        engine.close()
        listener.close()
    with pytest.raises(EngineError, match=r"did not load .* within 0\.05 s"):
        WorkerEngine(WorkerSpec.of(bundle, bundle.target, 1), start_timeout_s=0.05)


ORIN = "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super"
TRT_10_PLAN = {"tensorrt": "10.3.0", "compute_capability": "8.7", "jetson_model": ORIN}


def test_a_tensorrt_10_plan_is_refused_on_jetpack_6_0_with_the_way_out() -> None:
    jetpack_60 = DeviceInfo("aarch64", tensorrt="8.6.2", compute_capability="8.7", jetson_model=ORIN)
    (problem,) = incompatibilities(TRT_10_PLAN, jetpack_60)
    assert "is a TensorRT 10.3.0 plan, this device has TensorRT 8.6.2" in problem
    assert "6.0 ships 8.6, 6.1 and 6.2 ship 10.3" in problem
    no_module = DeviceInfo("aarch64", compute_capability="8.7", jetson_model=ORIN)
    (problem,) = incompatibilities(TRT_10_PLAN, no_module)
    assert "not installed" in problem and "--system-site-packages" in problem and "python3-libnvinfer" in problem


def test_the_device_check_names_what_a_gpu_device_lacks() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "agent.engine.device", "--require-gpu"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1 and json.loads(done.stdout[: done.stdout.index("\nmissing:")])["arch"]
    missing = [line for line in done.stdout.splitlines() if line.startswith("missing: ")]
    assert any("python3-libnvinfer" in m for m in missing) and any("TensorrtExecutionProvider" in m for m in missing)
    assert gpu_problems(DeviceInfo("aarch64", providers=(), tensorrt="8.6.2"))[0].startswith("TensorRT 8.6.2: ")


TAIL = "EABI: aarch64, DATE: Wed Jan  8 01:49:37 UTC 2025"
RELEASES = {
    "36.4": f"# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, {TAIL}",
    "36.3": f"# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, {TAIL}",
    "35.4": f"# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, {TAIL}",
}


@pytest.mark.parametrize("release", [*RELEASES, None])
def test_jetson_install_steps_per_jetpack(release: str | None, tmp_path: Path) -> None:
    """The install script's plan (--dry-run) for each L4T release, read from an /etc/nv_tegra_release like JetPack's."""
    release_file = tmp_path / "nv_tegra_release"
    if release:
        release_file.write_text(RELEASES[release] + "\n")
    done = subprocess.run(
        [str(ROOT / "scripts" / "jetson-install"), "--dry-run", "--prefix", str(tmp_path / "edgevit")],
        capture_output=True, text=True, timeout=60, env={**os.environ, "NV_TEGRA_RELEASE": str(release_file)},
    )  # fmt: skip
    if release is None:
        assert done.returncode == 1 and "not a Jetson" in done.stderr
        return
    if release == "35.4":
        assert done.returncode == 1 and "Python >= 3.10 and JetPack 6.1+" in done.stderr
        return
    assert done.returncode == 0, done.stderr
    steps = [line[2:] for line in done.stdout.splitlines() if line.startswith("+ ")]
    assert steps[0] == f"python3 -m venv --system-site-packages {tmp_path}/edgevit/.venv"
    assert any("onnxruntime-gpu" in s and "jetson-ai-lab" in s for s in steps)
    assert any(s.startswith("env CUDA_ROOT=/usr/local/cuda") and "pycuda" in s for s in steps)
    assert steps[-1].endswith("-m agent.engine.device --require-gpu")
    if release == "36.3":
        assert "TensorRT 8.6 has no importer for Gelu" in done.stderr
    else:
        assert "JetPack 6.1/6.2: TensorRT 10.3, CUDA 12.6: supported" in done.stdout
