"""scikit-learn's digits as RGB images, and the demo's recorded train/held-out split.

The 8x8 scans (17 grey levels) are upscaled to the model resolution through the
agent's own preprocessing, so the demo models see exactly what a device would
produce from an 8x8 frame.
"""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from agent.engine.preprocess import InputSpec, preprocess

LABELS = [str(d) for d in range(10)]
HELD_OUT_FRACTION = 0.25
SPLIT_SEED = 0


def raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """(N, 8, 8, 3) uint8 RGB scans (ink bright, as in the data set) and (N,) int labels."""
    digits = load_digits()
    grey = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1), digits.target.astype(np.int64)


def digit_images(size: int, interpolation: str = "linear") -> tuple[np.ndarray, np.ndarray]:
    """All digits at ``size`` x ``size`` RGB uint8, with labels."""
    scans, labels = raw_digits()
    spec = InputSpec(size, size, interpolation=interpolation)
    return np.stack([preprocess(scan, spec, source_order="RGB") for scan in scans]), labels


def split_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, held-out) index arrays; fixed seed, so the split is the same everywhere."""
    train, held_out = train_test_split(
        np.arange(len(labels)), test_size=HELD_OUT_FRACTION, random_state=SPLIT_SEED, stratify=labels
    )
    return np.sort(train), np.sort(held_out)
