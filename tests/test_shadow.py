"""Shadow runs on a real engine: paired agreement, and a tail-latency figure that one hiccup cannot sway."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.engine.bundle import verify_bundle
from agent.engine.profile import TAIL_SAMPLES, tail_quantile
from agent.engine.runtimes import open_engine
from agent.engine.shadow import Shadow


@given(st.integers(1, 100_000))
def test_the_compared_quantile_leaves_enough_timings_beyond_it(samples: int) -> None:
    q = tail_quantile(samples)
    assert 0.5 <= q <= 0.99
    assert q in (0.5, 0.99) or samples * (1 - q) == pytest.approx(TAIL_SAMPLES)
    assert tail_quantile(samples + 1) >= q, "more timings never compare a lower quantile"


@pytest.fixture
def engine_and_images(demo_bundle: Path) -> Iterator[tuple]:
    bundle = verify_bundle(demo_bundle, None)
    engine = open_engine(bundle.backend, bundle.target, bundle.engine_path, 1, threads=1)
    with np.load(bundle.golden_path) as golden:
        images = golden["images"][:1]
    yield engine, images
    engine.close()


def shadow_pairs(engine, images: np.ndarray, serving_s: list[float]) -> dict:
    """Offers one batch per serving time, each once the shadow is idle, and returns the figures."""
    shadow = Shadow(engine, 1, images.shape)
    top1 = engine.run(images).argmax(-1)
    try:
        for took in serving_s:
            before = shadow.figures()["shadow_batches"]
            shadow.offer(images, top1, took)
            deadline = time.monotonic() + 10
            while shadow.figures()["shadow_batches"] == before and time.monotonic() < deadline:
                time.sleep(0.001)
        return shadow.figures()
    finally:
        shadow.close()


def measured(engine, images: np.ndarray, n: int) -> list[float]:
    times = []
    for _ in range(n):
        started = time.monotonic()
        engine.run(images)
        times.append(time.monotonic() - started)
    return times


def test_one_hiccup_among_the_pairs_does_not_sway_the_tail(engine_and_images) -> None:
    engine, images = engine_and_images
    serving = measured(engine, images, 25)
    serving[7] += 0.2  # the serving engine's process was descheduled once, for 200 ms
    figures = shadow_pairs(engine, images, serving)
    assert figures["shadow_batches"] == 25 and figures["agreement"] == 1.0
    assert figures["tail_quantile"] == tail_quantile(25)
    assert figures["tail_ms"] < 100, "the 200 ms hiccup is beyond the compared quantile"


def test_a_consistently_slower_engine_shows_in_the_tail(engine_and_images) -> None:
    engine, images = engine_and_images
    serving = [t + 0.05 for t in measured(engine, images, 25)]  # 50 ms more on every batch
    figures = shadow_pairs(engine, images, serving)
    assert figures["tail_ms"] > 50 and figures["latency_ratio"] > 2
