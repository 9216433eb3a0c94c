"""Which candidate ships: the fastest inside the gate, and of candidates whose speeds are within the
measured noise of each other, the more accurate (issue 11's 22.6 against 22.5 img/s shipped a logit
error 10x the other's)."""

from __future__ import annotations

from pathlib import Path

from builder.bundle.candidates import Candidate, choose
from builder.bundle.options import EngineOptions
from builder.evaluate.measure import Accuracy


def candidate(label: str, images_per_s: float, rel_ci95: float, agreement: float, logit_error: float) -> Candidate:
    accuracy = Accuracy(256, 0.99, 0.99, 0.0, agreement, logit_error, logit_error / 10)
    profile = {"latency": [{"batch": 8, "images_per_s": images_per_s, "rel_ci95": rel_ci95}], "peak_rss_mib": 100}
    return Candidate(label, "onnxruntime", [Path(label)], accuracy=accuracy, profile=profile)


def test_within_the_noise_the_more_accurate_ships() -> None:
    fast = candidate("int8 static", 22.6, 0.01, 0.996, 0.9)
    exact = candidate("openvino int8", 22.5, 0.01, 0.996, 0.09)
    chosen = choose([fast, exact], EngineOptions())
    assert chosen is exact and chosen.choice is not None and chosen.choice["ties"] == ["int8 static"]
    assert "more accurate ships" in chosen.choice["rule"]


def test_beyond_the_noise_the_faster_ships() -> None:
    fast = candidate("int8 static", 30.0, 0.01, 0.991, 0.9)
    exact = candidate("openvino int8", 22.5, 0.01, 1.0, 0.09)
    chosen = choose([fast, exact], EngineOptions())
    assert chosen is fast and chosen.choice is not None and chosen.choice["ties"] == []
    assert chosen.choice["batches"] == [8]


def test_agreement_decides_before_logit_error_and_misses_never_ship() -> None:
    a = candidate("a", 20.0, 0.05, 0.995, 0.5)
    b = candidate("b", 20.5, 0.05, 0.999, 0.8)
    outside = candidate("c", 40.0, 0.01, 0.95, 2.0)
    outside.misses = ["top-1 agreement 95.0 % < 99 %"]
    assert choose([a, b, outside], EngineOptions()) is b


def test_max_memory_rules_out_what_it_measures_over() -> None:
    import pytest

    from builder.errors import BuildError

    lean = candidate("onnxruntime int8", 20.0, 0.01, 0.996, 0.5)
    hungry = candidate("openvino int8", 30.0, 0.01, 0.996, 0.5)
    hungry.over_memory = "peak RSS 894 MiB > --max-memory 600 MiB"
    assert choose([lean, hungry], EngineOptions(max_memory=600)) is lean
    with pytest.raises(BuildError, match="needs more memory .openvino int8: peak RSS 894 MiB"):
        choose([hungry], EngineOptions(max_memory=600))


def test_a_one_camera_device_is_served_by_the_fastest_at_batch_1() -> None:
    """`--batches 1`: the candidate fastest at 8 is not the one a single camera needs."""
    wide = candidate("openvino int8", 30.0, 0.01, 0.996, 0.5)
    narrow = candidate("onnxruntime int8", 20.0, 0.01, 0.996, 0.5)
    wide.profile["latency"].insert(0, {"batch": 1, "images_per_s": 9.0, "rel_ci95": 0.01})  # type: ignore[index]
    narrow.profile["latency"].insert(0, {"batch": 1, "images_per_s": 12.0, "rel_ci95": 0.01})  # type: ignore[index]
    assert choose([wide, narrow], EngineOptions()) is wide
    for c in (wide, narrow):
        c.served = (1,)
    chosen = choose([wide, narrow], EngineOptions(batches=(1,)))
    assert chosen is narrow and chosen.choice is not None and chosen.choice["batches"] == [1]
