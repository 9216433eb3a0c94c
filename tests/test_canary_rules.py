"""The canary's rules as pure functions: error rates, detection, units, expectations, verdicts.

No agent, engine or clock: streams are generated here (independent frames, and runs of
disagreeing frames as a camera sees one hard object for seconds), and the functions the
agent calls are called on them. The false-revert checks use a few hundred canaries each;
bench/canary_bench.py runs thousands per row.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import CanaryConfig
from agent.lifecycle import canary as rules


def runs_stream(rng: np.random.Generator, frames: int, rate: float, run_frames: float) -> np.ndarray:
    """Per-frame disagreement (1) with long-run rate ``rate`` in runs of ``run_frames`` frames on average."""
    if run_frames <= 1:
        return (rng.random(frames) < rate).astype(np.int8)
    out, i, state = np.empty(frames, np.int8), 0, rng.random() < rate
    while i < frames:
        length = rng.geometric(1 / run_frames if state else rate / ((1 - rate) * run_frames))
        out[i : i + length] = state
        i, state = i + length, not state
    return out


def blocks_of(stream: np.ndarray, fps: float = 30.0, every: int = 4) -> list[rules.Block]:
    """Every ``every``-th frame through :class:`rules.Blocks`, as the shadow feeds it."""
    blocks = rules.Blocks(10, 2.0, 60.0)
    zero, classes = np.zeros(1, np.float32), np.zeros(1, np.int64)
    for f in range(0, len(stream), every):
        blocks.add(f / fps, ["cam"], np.array([not stream[f]]), zero, zero, classes, classes)
    return blocks.closed


def reverted(blocks: list[rules.Block], limit: float, alpha: float = 0.01) -> bool:
    disagreement = [1 - b.agreement for b in blocks]
    return rules.exceeds(disagreement, 0.0, 1.0, 1 - limit, alpha).rejected


@pytest.mark.slow
@pytest.mark.parametrize("run_s", [0, 1.0, 10.0])
def test_a_good_bundle_at_the_limit_is_rarely_reverted_even_on_correlated_frames(run_s: float) -> None:
    """The hardest case for the test: true agreement exactly at the limit, for 300 s at 30 fps."""
    rng = np.random.default_rng(int(run_s * 10))
    limit = 0.976
    falses = sum(reverted(blocks_of(runs_stream(rng, 9000, 1 - limit, run_s * 30)), limit) for _ in range(150))
    assert falses <= 3, f"{falses} of 150 good canaries reverted (alpha 1 %)"


def test_a_ten_point_drop_on_independent_frames_is_reverted_within_the_window() -> None:
    rng = np.random.default_rng(3)
    hits = [reverted(blocks_of(runs_stream(rng, 9000, 0.124, 0)), 0.976) for _ in range(30)]
    assert all(hits)


def test_blocks_lengthen_with_runs_of_disagreement() -> None:
    """One hard object in view for 10 s is one unit of evidence, not five."""
    blocks = rules.Blocks(10, 2.0, 60.0)
    zero, classes = np.zeros(1, np.float32), np.zeros(1, np.int64)
    for i in range(600):  # 60 s at 10 samples/s: disagreeing from 10 s to 20 s
        t = i / 10
        blocks.add(t, ["cam"], np.array([not 10 <= t < 20]), zero, zero, classes, classes)
    lengths = [b.length_s for b in blocks.closed]
    assert lengths[0] == 2.0
    assert max(lengths) >= 19.0, lengths
    assert rules.Blocks(10, 2.0, 60.0).run_estimate(0.0) == 0.0


def test_blocks_count_frames_classes_and_confidence() -> None:
    blocks = rules.Blocks(3, 1.0, 10.0)
    blocks.add(
        0.0,
        ["a", "b"],
        np.array([True, False]),
        np.array([0.9, 0.5]),
        np.array([0.8, 0.7]),
        np.array([0, 1]),
        np.array([0, 2]),
    )
    blocks.add(1.5, ["a"], np.array([True]), np.array([1.0]), np.array([1.0]), np.array([2]), np.array([2]))
    (block,) = blocks.closed
    assert (block.frames, block.agreeing) == (2, 1)
    assert block.confidence_new == pytest.approx(1.4) and block.confidence_old == pytest.approx(1.5)
    assert block.mix_new.tolist() == [1, 1, 0] and block.mix_old.tolist() == [1, 0, 1]


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3000), st.sampled_from([0.5, 0.9, 0.99]))
def test_quantile_count_bounds_contain_the_expected_count(n: int, q: float) -> None:
    low, high = rules.count_bounds(n, q, 0.01)
    assert 0 <= low <= n * q + 1 and n * q - 1 <= high <= n
    if n >= 400:
        assert high - low < n / 2


def test_quantile_interval_covers_the_true_quantile() -> None:
    """Anytime coverage, checked at every n of 300 samples, over 200 sequences."""
    rng = np.random.default_rng(5)
    true_p90 = math.exp(1.2815515655446004 * 0.3)  # lognormal(0, 0.3)
    misses = 0
    for _ in range(200):
        samples = np.exp(rng.normal(0, 0.3, 300))
        for n in range(1, 301, 7):
            low, high = rules.quantile_interval(sorted(samples[:n]), 0.9, 0.05)
            if not low <= true_p90 <= high:
                misses += 1
                break
    assert misses <= 10, f"{misses} of 200 sequences left the 95 % interval at some n"


def timings(rng: np.random.Generator, n: int, scale: float) -> list[float]:
    return sorted(0.010 * scale * np.exp(rng.normal(0, 0.15, n)))


def test_latency_rule_reverts_a_slower_engine_and_passes_an_equal_one() -> None:
    rng = np.random.default_rng(1)
    slow = rules.latency_rule(timings(rng, 400, 2.0), timings(rng, 400, 1.0), 0.9, 1.2, 0.001, 0.005)
    assert slow.verdict == rules.REGRESSION and slow.estimate == pytest.approx(2.0, rel=0.15)
    assert "p90" in slow.detail and slow.bound > slow.limit
    same = rules.latency_rule(timings(rng, 400, 1.0), timings(rng, 400, 1.0), 0.9, 1.2, 0.001, 0.005)
    assert same.verdict == rules.OK
    few = rules.latency_rule(timings(rng, 3, 1.0), timings(rng, 3, 1.0), 0.9, 1.2, 0.001, 0.005)
    assert few.verdict == rules.UNDECIDED and few.bound is None


def test_latency_ratios_are_reciprocal() -> None:
    """A -> B and B -> A: the estimates are each other's inverse; neither direction favours the new engine."""
    rng = np.random.default_rng(2)
    a, b = timings(rng, 500, 1.0), timings(rng, 500, 1.5)
    there = rules.latency_rule(b, a, 0.9, 1.2, 0.0, 0.01).estimate
    back = rules.latency_rule(a, b, 0.9, 1.2, 0.0, 0.01).estimate
    assert there * back == pytest.approx(1.0, rel=1e-9)


def facts(
    bundle_id: str, checkpoint: str, agreement: float = 0.996, images: int = 450, **passport
) -> rules.BundleFacts:
    return rules.BundleFacts(
        bundle_id,
        checkpoint,
        {
            "accuracy": {"top1_agreement": agreement, "images": images},
            "gate": {"max_top1_drop_points": 1.0},
            **passport,
        },
    )


def baseline(bundle_id: str | None, source: str, agreement: float, change: float = 0.0) -> dict:
    low, high = rules.wilson(agreement, 450)
    return {
        "baseline": {
            "bundle_id": bundle_id,
            "source_sha256": source,
            "fp32_agreement": 1.0,
            "top1_agreement": agreement,
            "interval": [low, high],
            "images": 450,
            "top1_change_points": change,
        }
    }


def test_expectation_of_two_engines_of_one_checkpoint() -> None:
    expected = rules.expectation_for(facts("int8", "ckpt", 0.996), facts("fp32", "ckpt", 1.0))
    assert expected is not None and expected.agreement == pytest.approx(0.996)
    assert expected.low < expected.agreement and "same checkpoint" in expected.source
    assert rules.expectation_for(facts("a", "one"), facts("b", "other")) is None, "unrelated: no expectation"


def test_expectation_from_a_build_against_the_previous_bundle_either_way() -> None:
    v2 = facts("v2", "ckpt-2", 1.0, **baseline("v1", "ckpt-1", 0.907, change=8.6))
    v1 = facts("v1", "ckpt-1", 1.0)
    forward = rules.expectation_for(v2, v1)
    backward = rules.expectation_for(v1, v2)
    assert forward is not None and forward.agreement == pytest.approx(0.907)
    assert backward is not None and backward.agreement == pytest.approx(0.907)
    # the limit: the interval's lower half-width (2.8 points on 450 images) exceeds the 2-point tolerance
    assert forward.limit(0.02) == pytest.approx(forward.low)


def test_expectation_against_another_engine_of_the_previous_checkpoint_is_lowered() -> None:
    v2 = facts("v2-fp32", "ckpt-2", 1.0, **baseline("v1-fp32", "ckpt-1", 0.907))
    v1_int8 = facts("v1-int8", "ckpt-1", 0.99)
    expected = rules.expectation_for(v2, v1_int8)
    assert expected is not None and expected.agreement == pytest.approx(0.897)


def test_a_known_less_accurate_bundle_is_named() -> None:
    v2 = facts("v2", "ckpt-2", 1.0, **baseline("v1", "ckpt-1", 0.907, change=8.6))
    v1 = facts("v1", "ckpt-1", 1.0)
    reason = rules.known_regression(v1, v2)
    assert reason and "v1 is 8.60 points less accurate (top-1) than v2" in reason
    assert rules.known_regression(v2, v1) is None, "the better model is no regression"


def judge(cfg: CanaryConfig, **evidence) -> rules.Judgement:
    defaults = {"blocks": [], "new_s": [], "previous_s": [], "failed_batches": 0, "expectation": None, "outputs": None}
    return rules.judge(cfg, rules.CanaryEvidence(**{**defaults, **evidence}))


def block(frames: int, agreeing: int, confidence_new: float = 0.9, confidence_old: float = 0.9) -> rules.Block:
    mix = np.array([frames // 2, frames - frames // 2])
    return rules.Block(0.0, 2.0, frames, agreeing, confidence_new * frames, confidence_old * frames, mix, mix)


def test_the_verdict_names_the_rule_and_carries_its_evidence() -> None:
    cfg = CanaryConfig()
    expectation = rules.Expectation(0.996, 0.985, 1.0, "same checkpoint")
    bad = judge(cfg, blocks=[block(15, 12)] * 40, expectation=expectation)
    assert bad.regression is not None and bad.regression.name == "agreement"
    assert bad.reason.startswith("top-1 agreement with the previous engine is 80.00% over 600 frames in 40 blocks")
    public = bad.public()
    assert public["alpha"] == 0.01 and public["judged_by"] == ["agreement", "latency", "failed_batches"]
    rule = public["rules"]["agreement"]
    assert rule["alpha"] == 0.005 and rule["units"] == 40 and rule["frames"] == 600
    assert rule["bound"] < rule["limit"] == pytest.approx(0.976)
    good = judge(cfg, blocks=[block(15, 15)] * 40, expectation=expectation)
    assert good.regression is None and good.reason == ""


def test_without_an_expectation_the_label_free_rules_judge() -> None:
    cfg = CanaryConfig()
    outputs = rules.OutputReferences((0.9, 0.9), (np.array([0.5, 0.5]), np.array([0.5, 0.5])))
    calm = judge(cfg, blocks=[block(15, 10)] * 40, outputs=outputs)
    assert calm.regression is None, "different, not worse: agreement is not judged without an expectation"
    assert calm.public()["judged_by"] == ["confidence", "class_mix", "latency", "failed_batches"]
    assert calm.public()["rules"]["agreement"]["verdict"] == rules.OFF
    unsure = judge(cfg, blocks=[block(15, 10, confidence_new=0.5)] * 80, outputs=outputs)
    assert unsure.regression is not None and unsure.regression.name == "confidence"


def test_failed_batches_over_the_limit_are_a_regression() -> None:
    verdict = judge(CanaryConfig(max_errors=1), failed_batches=2)
    assert verdict.regression is not None and verdict.reason == "2 failed batches, more than canary.max_errors 1"


def test_pooled_devices_see_a_regression_no_single_device_can() -> None:
    """Ten devices each a point under their limit: few alone are sure within the window; together they are."""
    rng = np.random.default_rng(11)
    devices = []
    for _ in range(10):
        stream = blocks_of(runs_stream(rng, 9000, 0.034, 0))
        devices.append((0.976, [(b.frames, b.agreeing) for b in stream]))
    assert sum(reverted(blocks_of(runs_stream(rng, 9000, 0.034, 0)), 0.976, 0.005) for _ in range(10)) <= 3
    pooled = rules.pooled_agreement(devices, 0.01)
    assert pooled.verdict == rules.REGRESSION and pooled.units > 1000
    fine = [(0.976, [(15, 15)] * 100) for _ in range(10)]
    assert rules.pooled_agreement(fine, 0.01).verdict == rules.UNDECIDED
