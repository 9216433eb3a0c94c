"""The shadow on a real engine: agreement blocks off the serving path, holdback latency pairs."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.engine.bundle import verify_bundle
from agent.engine.runtimes import open_engine
from agent.engine.shadow import Shadow
from agent.lifecycle.canary import Blocks


@pytest.fixture
def engine_and_images(demo_bundle: Path) -> Iterator[tuple]:
    bundle = verify_bundle(demo_bundle, None)
    engine = open_engine(bundle.backend, bundle.target, bundle.engine_path, 2, threads=1)
    with np.load(bundle.golden_path) as golden:
        images = golden["images"][:2]
    yield engine, images
    engine.close()


def serve(shadow: Shadow, engine, images: np.ndarray, batches: int, sizes: list[int] | None = None) -> list[str]:
    """What the inference thread does: each batch on the previous engine when a holdback is due, else offered."""
    served_by = []
    for i in range(batches):
        n = sizes[i % len(sizes)] if sizes else len(images)
        held = shadow.holdback_due()
        started = time.monotonic()
        logits = engine.run(images[:n])
        took = time.monotonic() - started
        if held:
            shadow.record_holdback(n, took)
        else:
            probs = np.exp(logits - logits.max(1, keepdims=True))
            confidence = 1 / probs.sum(1)
            shadow.offer(images[:n], logits.argmax(1), confidence, ["door", "yard"][:n], took)
        served_by.append("previous" if held else "new")
        time.sleep(0.01)  # frames arrive; the shadow catches up
    return served_by


def test_holdbacks_pair_timings_and_the_shadow_records_agreement(engine_and_images) -> None:
    engine, images = engine_and_images
    shadow = Shadow(engine, "old-id", ["0"] * 10, 2, 4, (2, *images.shape[1:]), Blocks(10, 0.05, 1.0))
    try:
        served_by = serve(shadow, engine, images, 60)
        time.sleep(0.2)
        figures = shadow.figures()
        blocks, new_s, previous_s = shadow.evidence()
    finally:
        shadow.close()
    assert served_by.count("previous") == figures["holdbacks"] >= 8
    assert "previous" not in served_by[:4], "a holdback comes only after latency_every new batches"
    assert all(a != b or a == "new" for a, b in zip(served_by, served_by[1:], strict=False)), "never two in a row"
    assert len(new_s) == len(previous_s) == figures["latency_pairs"] >= 8
    assert new_s == sorted(new_s) and previous_s == sorted(previous_s)
    assert figures["agreement"] == 1.0 and figures["shadow_frames"] >= 20, "same engine: it always agrees"
    assert blocks and all(b.agreeing == b.frames for b in blocks)
    assert sum(b.mix_new.sum() for b in blocks) == sum(b.frames for b in blocks)


def test_a_holdback_pairs_only_with_a_batch_of_its_size(engine_and_images) -> None:
    engine, images = engine_and_images
    shadow = Shadow(engine, "old-id", ["0"] * 10, 1000, 2, (2, *images.shape[1:]), Blocks(10, 1.0, 1.0))
    try:
        serve(shadow, engine, images, 40, sizes=[1, 1, 1, 2])  # a holdback of 1 is followed by a 1 or a 2
        pairs, holdbacks = shadow.figures()["latency_pairs"], shadow.figures()["holdbacks"]
    finally:
        shadow.close()
    assert 0 < pairs < holdbacks


def test_no_holdback_while_the_shadow_runs(engine_and_images) -> None:
    engine, images = engine_and_images
    shadow = Shadow(engine, "old-id", ["0"] * 10, 1, 1, (2, *images.shape[1:]), Blocks(10, 1.0, 1.0))
    try:
        logits = engine.run(images)
        shadow.offer(images, logits.argmax(1), np.ones(2, np.float32), ["door", "yard"], 0.001)
        busy = shadow._ready.is_set()
        due = shadow.holdback_due()
    finally:
        shadow.close()
    assert not (busy and due), "the previous engine's worker is the shadow's while it runs"
