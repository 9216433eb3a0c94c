"""What a build leaves out because of its machine is said, with what would add it (never a silent
narrowing to a slower bundle)."""

from __future__ import annotations

import pytest

from agent.engine.device import DeviceInfo
from builder.bundle.options import EngineOptions, not_tried
from builder.targets import openvino as openvino_engines

AVX2_ONLY = DeviceInfo("x86_64", frozenset({"avx2", "fma"}))
SAPPHIRE_RAPIDS = DeviceInfo("x86_64", frozenset({"avx2", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16"}))


def test_a_builder_without_openvino_says_so_and_how_to_add_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openvino_engines, "available", lambda: False)  # as `pip install -e '.[builder]'` leaves it
    lines = not_tried(EngineOptions(precision="int8", calib="demo"), SAPPHIRE_RAPIDS)
    assert [(e["what"], e["add"]) for e in lines] == [("OpenVINO candidates", "pip install 'edgevit[openvino]'")]
    assert not not_tried(EngineOptions(precision="int8", calib="demo", runtime="onnxruntime"), SAPPHIRE_RAPIDS)


def test_missing_cpu_features_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openvino_engines, "available", lambda: True)
    what = [e["what"] for e in not_tried(EngineOptions(precision="int8", calib="demo"), AVX2_ONLY)]
    assert what == ["INT8 with full 8-bit weights", "OpenVINO with BF16 float parts"]
    assert not not_tried(EngineOptions(precision="int8", calib="demo"), SAPPHIRE_RAPIDS)
    assert not not_tried(EngineOptions(precision="int8", calib="demo", int8_cpu="any"), AVX2_ONLY)[:-1]
    assert not not_tried(EngineOptions(target="cuda", precision="fp16"), AVX2_ONLY)
