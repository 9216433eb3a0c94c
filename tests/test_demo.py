"""The committed demo checkpoints: real accuracy after export, recorded split, reproducible training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from builder.demo.digits import digit_images, split_indices
from builder.demo.evaluate import held_out_indices, held_out_top1
from builder.demo.train import CHECKPOINT_DIR, DEMO_MODELS, TrainSettings, train
from builder.export.checkpoint import read_checkpoint
from builder.export.job import ExportOptions, export_checkpoint

REQUIRED_TOP1 = 0.95  # what the issue asks of the demo models, not a measured figure


@pytest.mark.parametrize("name", DEMO_MODELS)
def test_demo_checkpoint_is_the_published_layout(name: str) -> None:
    assert read_checkpoint(CHECKPOINT_DIR / f"{name}.npz").config == DEMO_MODELS[name]


@pytest.mark.parametrize("name", DEMO_MODELS)
def test_recorded_split_is_the_reproducible_one(name: str) -> None:
    card = json.loads((CHECKPOINT_DIR / f"{name}.json").read_text())
    labels = np.arange(len(card["labels"]))
    _, expected = split_indices(digit_images(8)[1])
    np.testing.assert_array_equal(held_out_indices(CHECKPOINT_DIR / f"{name}.npz"), expected)
    assert [str(i) for i in labels] == card["labels"]


@pytest.mark.slow
@pytest.mark.parametrize("name", DEMO_MODELS)
def test_held_out_accuracy_after_export(name: str, tmp_path: Path) -> None:
    checkpoint = CHECKPOINT_DIR / f"{name}.npz"
    result = export_checkpoint(checkpoint, tmp_path, ExportOptions())
    top1, count = held_out_top1(checkpoint, result.model_path)
    assert count == len(held_out_indices(checkpoint)) > 400
    assert top1 >= REQUIRED_TOP1, f"{name}: held-out top-1 {top1:.2%} after export"


@pytest.mark.slow
def test_vit_demo_still_classifies_at_another_resolution(tmp_path: Path) -> None:
    """Without fine-tuning a resolution change costs accuracy (the original fine-tunes after
    resizing), but a correctly zoomed position embedding keeps the model far above chance."""
    checkpoint = CHECKPOINT_DIR / "vit-digits.npz"
    result = export_checkpoint(checkpoint, tmp_path, ExportOptions(resolution=80))
    top1, _ = held_out_top1(checkpoint, result.model_path)
    assert result.input_spec.height == 80 and top1 > 0.5


@pytest.mark.slow
def test_training_is_reproducible() -> None:
    images, labels = digit_images(64)
    settings = TrainSettings(epochs=1, batch_size=32)
    cfg = DEMO_MODELS["mixer-digits"]
    first = train(cfg, images[:96], labels[:96], settings)
    second = train(cfg, images[:96], labels[:96], settings)
    assert first.keys() == second.keys()
    assert all(np.array_equal(first[k], second[k]) for k in first)
