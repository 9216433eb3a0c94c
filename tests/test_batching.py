"""The batch policy and the latest-frame queue, as plain objects with real threads and clocks."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.engine.bundle import verify_bundle
from agent.stream.batching import BatchPolicy
from agent.stream.frames import FrameInfo, FrameQueue
from agent.stream.pipeline import PassportLatency

# an engine whose batch costs 4 ms + 2 ms per image (p99)
PROFILE = {b: 0.004 + 0.002 * b for b in range(1, 9)}


def policy(budget_ms: float = 100, **kw) -> BatchPolicy:
    return BatchPolicy(budget_ms / 1e3, PROFILE, 8, **kw)


def test_light_load_gets_batch_one_and_no_wait() -> None:
    decision = policy().decide(arrival_rate=10, sources=8)
    assert decision.batch == 1 and decision.max_wait == 0.0


def test_heavy_load_gets_the_smallest_batch_that_keeps_up() -> None:
    decision = policy().decide(arrival_rate=300, sources=8)  # batch b serves b / (4 + 2b) ms
    b = decision.batch
    assert b / PROFILE[b] >= 1.1 * 300 and (b == 1 or (b - 1) / PROFILE[b - 1] < 1.1 * 300)
    assert decision.predicted_worst <= 0.1


def test_overload_takes_the_fastest_batch_within_budget() -> None:
    p = policy(budget_ms=30)
    decision = p.decide(arrival_rate=5000, sources=8)
    assert decision.predicted_worst <= 0.03
    assert all(
        p.worst(b, 5000, 8) > 0.03 or b / PROFILE[b] <= decision.batch / PROFILE[decision.batch] for b in PROFILE
    )


@settings(max_examples=200, deadline=None)
@given(st.floats(1, 100_000), st.floats(10, 1000), st.integers(1, 16))
def test_decisions_stay_inside_budget_and_range(rate: float, budget_ms: float, sources: int) -> None:
    p = policy(budget_ms)
    decision = p.decide(rate, sources=sources)
    assert 1 <= decision.batch <= min(8, sources) and decision.max_wait >= 0
    if any(p.worst(b, rate, sources) <= budget_ms / 1e3 for b in PROFILE):
        assert decision.predicted_worst <= budget_ms / 1e3 + 1e-9
    assert decision.predicted_worst + 1e-9 >= PROFILE[decision.batch] + decision.max_wait


# an engine that runs a batch of 8 in two chunks of 4 at once, and pads every smaller batch but one image:
# what a 2-core device serves with 4 images per stream
CHUNKED = {1: 0.010, **{b: 0.050 for b in range(2, 9)}}


def test_under_overload_a_frame_waits_one_camera_interval_at_most() -> None:
    """8 cameras at 30 fps offer 240 frames/s to an engine that serves 160 at batch 8. A frame pending when
    its camera's next arrives is replaced, so the frame served waited 1/30 s at most: batch 8's worst is
    50 + 33 ms, inside a 100 ms budget that two batch latencies and the fill (129 ms) would break."""
    p = BatchPolicy(0.1, CHUNKED, 8)
    assert abs(p.worst(8, 240, 8) - (0.050 + 1 / 30)) < 1e-9
    assert p.decide(arrival_rate=240, sources=8).batch == 8


def test_a_batch_that_leaves_cameras_waiting_is_charged_their_interval() -> None:
    """Batch 1 at 8 cameras serves one camera in eight: a frame waits while the others are served, until its
    camera's next frame replaces it, not just for the batch in flight."""
    p = BatchPolicy(0.1, CHUNKED, 8)
    assert abs(p.worst(1, 240, 8) - (0.010 + 1 / 30)) < 1e-9
    assert abs(p.worst(1, 50, 8) - 2 * 0.010) < 1e-9  # keeps up: one batch in flight at most


def test_measured_latency_moves_the_decision() -> None:
    p = policy()
    before = p.decide(arrival_rate=300, sources=8).batch
    for _ in range(20):
        p.observe(before, PROFILE[before] * 3)  # the device is slower than the passport said
    assert p.latency(before) > 2 * PROFILE[before]
    assert p.decide(arrival_rate=300, sources=8).batch != before


def test_a_slow_batch_does_not_keep_its_size_out_for_good() -> None:
    """One slow batch of the size in use, then the smaller size it stepped down to runs at the passport's
    speed: the larger size is tried again, though nothing measured it since."""
    p = policy(budget_ms=40)
    chosen = p.decide(arrival_rate=5000, sources=8).batch
    p.observe(chosen, PROFILE[chosen] * 3)  # a preempted thread
    smaller = p.decide(arrival_rate=5000, sources=8).batch
    assert smaller < chosen
    for _ in range(1000):
        p.observe(smaller, PROFILE[smaller])
    assert p.decide(arrival_rate=5000, sources=8).batch == chosen


def test_the_typical_latency_is_each_sizes_own() -> None:
    """The pipeline times the next batch's take by the running size's own mean: a batch of another size, slowed
    more by the load, does not move it."""
    p = policy()
    for _ in range(50):
        p.observe(8, PROFILE[8])
    p.observe(1, PROFILE[1] * 10)
    assert abs(p.typical(8) - PROFILE[8]) < 1e-9
    assert p.typical(4) == p.latency(4)  # never run: the p99 estimate


def test_throughput_is_judged_by_the_mean_latency() -> None:
    """4 cameras offer 120 frames/s. One image over both cores runs in 6 ms on average, though its p99 is
    11 ms; a batch of 4 fills one stream's chunk and leaves the other core idle (40 ms on average). Batch 1
    keeps up by its mean and is taken; by its p99 (91 frames/s) it would lose to the padded batch."""
    p = BatchPolicy(0.1, CHUNKED | {1: 0.011}, 8, mean_by_batch={1: 0.006, **{b: 0.040 for b in range(2, 9)}})
    assert p.decide(arrival_rate=120, sources=4).batch == 1
    assert p.typical(1) == 0.006  # the pipeline times the next take by it before batch 1 has run


def test_a_size_slowed_once_is_ranked_by_its_passport_again() -> None:
    """The mean follows the device, and returns toward the passport's while another size runs."""
    p = BatchPolicy(0.1, CHUNKED, 8, mean_by_batch={1: 0.006, 8: 0.040})
    for _ in range(30):
        p.observe(1, 0.030)  # a burst of load slows batch 1
    assert p.typical(1) > 0.02
    for _ in range(1000):
        p.observe(8, 0.040)
    assert abs(p.typical(1) - 0.006) < 1e-3


# CHUNKED as the passport of a 4-images-per-stream bundle records it: 2 to 4 and 5 to 8 are each timed once
SHARED = {1: 0.010, **{b: 0.036 for b in range(2, 5)}, **{b: 0.041 for b in range(5, 9)}}
RUNS_AS = {**{b: 4 for b in range(2, 4)}, **{b: 8 for b in range(5, 8)}}


def test_sizes_that_run_the_same_requests_share_one_estimate() -> None:
    """8 cameras at 30 fps. One slow batch of 8 is a slow batch of 7 too (the same two chunks of 4, one
    padded): the policy does not step down to 7, which would run the same requests for fewer frames over
    the budget, but to a size that runs fewer."""
    p = BatchPolicy(0.1, SHARED, 8, mean_by_batch=SHARED, runs_as=RUNS_AS)
    assert p.decide(arrival_rate=240, sources=8).batch == 8
    p.observe(8, 0.100)  # a preempted thread
    assert p.latency(7) == p.latency(5) == p.latency(8) > 0.1 - 1 / 30
    assert p.decide(arrival_rate=240, sources=8).batch == 4
    for _ in range(100):
        p.observe(4, 0.036)  # relaxed while a size that runs other requests serves
    assert p.latency(7) == p.latency(8) and p.decide(arrival_rate=240, sources=8).batch == 8
    assert p.typical(6) == p.typical(8)


def test_without_shared_requests_each_size_keeps_its_own_estimate() -> None:
    p = BatchPolicy(0.1, SHARED, 8, mean_by_batch=SHARED)
    p.observe(8, 0.100)
    assert p.latency(7) == 0.041 and p.decide(arrival_rate=240, sources=8).batch == 7


def test_batch_never_exceeds_the_cameras_delivering() -> None:
    assert policy(budget_ms=30).decide(arrival_rate=5000, sources=2).batch <= 2
    assert policy().decide(arrival_rate=5000, sources=0).batch == 1


def test_fixed_mode() -> None:
    assert policy(mode="fixed", fixed_batch=4).decide(arrival_rate=10, sources=8).batch == 4


def frame(camera: str, seq: int) -> FrameInfo:
    return FrameInfo(camera, seq, time.time(), time.monotonic())


def test_latest_frame_wins_and_skips_are_counted() -> None:
    queue = FrameQueue(["a"], 2, 2)
    for seq in range(1, 6):
        queue.put(frame("a", seq), np.full((2, 2, 3), seq, np.uint8))
    batch = np.zeros((4, 2, 2, 3), np.uint8)
    taken = queue.take(4, 0.0, 10.0, batch, timeout=0.1)
    assert [i.seq for i in taken] == [5] and (batch[0] == 5).all()
    assert queue.counters["a"].skipped == 4 and queue.depth() == 0


def test_batch_is_formed_across_cameras_oldest_first() -> None:
    queue = FrameQueue(["a", "b", "c"], 1, 1)
    for name in "cab":
        queue.put(frame(name, 1), np.full((1, 1, 3), ord(name), np.uint8))
        time.sleep(0.002)
    batch = np.zeros((2, 1, 1, 3), np.uint8)
    taken = queue.take(2, 0.0, 10.0, batch, timeout=0.1)
    assert [i.camera for i in taken] == ["c", "a"] and batch[:, 0, 0, 0].tolist() == [ord("c"), ord("a")]
    assert queue.depth() == 1


def test_stale_frames_are_shed_when_fresher_ones_wait() -> None:
    queue = FrameQueue(["old", "new"], 1, 1)
    queue.put(FrameInfo("old", 1, time.time(), time.monotonic() - 1.0), np.zeros((1, 1, 3), np.uint8))
    queue.put(frame("new", 1), np.zeros((1, 1, 3), np.uint8))
    taken = queue.take(1, 0.0, 0.2, np.zeros((1, 1, 1, 3), np.uint8), timeout=0.1)
    assert [i.camera for i in taken] == ["new"] and queue.counters["old"].shed == 1 and queue.depth() == 0


def test_take_waits_for_the_batch_to_fill_until_max_wait() -> None:
    queue = FrameQueue(["a", "b"], 1, 1)
    queue.put(frame("a", 1), np.zeros((1, 1, 3), np.uint8))
    threading.Timer(0.05, lambda: queue.put(frame("b", 1), np.zeros((1, 1, 3), np.uint8))).start()
    taken = queue.take(2, 0.5, 10.0, np.zeros((2, 1, 1, 3), np.uint8), timeout=0.1)
    assert len(taken) == 2
    start = time.monotonic()
    queue.put(frame("a", 2), np.zeros((1, 1, 3), np.uint8))
    assert len(queue.take(2, 0.1, 10.0, np.zeros((2, 1, 1, 3), np.uint8), timeout=0.1)) == 1
    assert 0.08 <= time.monotonic() - start < 0.5


def test_passport_latency_rows_the_policy_cannot_use_are_passed_over(demo_bundle: Path, tmp_path: Path) -> None:
    """The passport is signed but a builder wrote it: a row with a batch size outside the bundle's range or
    a figure that is not a finite positive number is passed over, and a passport with no usable row starts
    the policy from a neutral guess instead of stopping the pipeline's start."""
    root = tmp_path / "bundle"
    shutil.copytree(demo_bundle, root)
    bundle = verify_bundle(root, None)
    low, high = bundle.batch_range
    rows = [
        {"batch": low, "p99_ms": 4.0, "images_per_s": 500.0},
        {"batch": low + 1, "p99_ms": "fast", "images_per_s": float("nan")},
        {"batch": high, "p99_ms": 6.0, "images_per_s": -3},
        {"batch": high + 1, "p99_ms": 9.0, "images_per_s": 100.0},
        {"batch": True, "p99_ms": 1.0},
        {"batch": "2", "p99_ms": 1.0},
        {"batch": low + 1, "p99_ms": float("inf")},
        "a row",
        None,
    ]
    (root / "passport.json").write_text(json.dumps({**bundle.passport, "latency": rows}))
    latency = PassportLatency.of(bundle)
    assert latency.p99 == {low: 0.004, high: 0.006} and latency.mean == {low: low / 500.0}
    shared = [
        {"batch": low, "p99_ms": 4.0, "timed_at": high},
        {"batch": low + 1, "p99_ms": 4.0, "timed_at": high + 1},  # a size outside the bundle's
        {"batch": high, "p99_ms": 4.0, "timed_at": low},  # a smaller size: no batch runs as one
        {"batch": high - 1, "p99_ms": 4.0, "timed_at": True},
    ]
    (root / "passport.json").write_text(json.dumps({**bundle.passport, "latency": shared}))
    assert PassportLatency.of(bundle).runs_as == {low: high}
    for broken in ("fast", [], None, {"batch": 1}):
        (root / "passport.json").write_text(json.dumps({**bundle.passport, "latency": broken}))
        latency = PassportLatency.of(bundle)
        assert latency.p99 == latency.mean == {}
        decision = BatchPolicy(0.1, latency.p99, high, mean_by_batch=latency.mean).decide(arrival_rate=30, sources=1)
        assert decision.batch == 1
