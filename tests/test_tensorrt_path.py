"""The Jetson/TensorRT path, as far as a CPU can test it: provider options, load timeouts, the start-up check."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from agent.engine import worker as worker_module
from agent.engine.bundle import verify_bundle
from agent.engine.runtimes import EngineError, open_engine
from agent.engine.runtimes.onnxruntime import tensorrt_provider_options
from agent.engine.worker import WorkerEngine, WorkerSpec


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
