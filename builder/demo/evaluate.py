"""Held-out accuracy of an exported demo model, on the split recorded beside its checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from builder.demo.digits import raw_digits
from builder.evaluate.accuracy import top1_accuracy


def held_out_indices(checkpoint: Path) -> np.ndarray:
    card = json.loads(checkpoint.with_suffix(".json").read_text())
    return np.asarray(card["split"]["held_out_indices"])


def held_out_top1(checkpoint: Path, model_path: Path) -> tuple[float, int]:
    """(top-1, count) of ``model_path`` on the 8x8 held-out scans, resized by the model's own spec."""
    scans, labels = raw_digits()
    idx = held_out_indices(checkpoint)
    return top1_accuracy(model_path, scans[idx], labels[idx]), len(idx)
