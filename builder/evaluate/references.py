"""The reference embeddings an embedding model's bundle ships (:mod:`agent.engine.similarity`).

Either the user's (``--references FILE.npz``: ``names`` and ``vectors``, for example a SigLIP text
tower's embeddings of prompts, made offline in the model's own embedding space), or one prototype per
class of the labelled evaluation set: the mean of its frames' unit FP32 embeddings, made unit again.
Prototypes come from the model being built, so a retrained model's bundle brings its own and its
top-1 stays comparable with its predecessor's, class for class.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.engine.similarity import MAX_REFERENCES
from builder.evaluate.datasets import DatasetError


@dataclass(frozen=True)
class References:
    names: list[str]
    vectors: np.ndarray  # [len(names), width], unit rows, float32
    origin: str


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit: np.ndarray = (vectors / np.maximum(norms, 1e-12)).astype(np.float32)
    return unit


def prototypes(embeddings: np.ndarray, targets: np.ndarray, names: list[str], origin: str) -> References:
    """One unit vector per class: the mean direction of its frames' embeddings."""
    unit = _unit(embeddings)
    missing = [names[c] for c in range(len(names)) if not (targets == c).any()]
    if missing:
        raise DatasetError(f"no frame of class {missing[0]!r} in {origin} to make its reference embedding from")
    vectors = np.stack([unit[targets == c].mean(axis=0) for c in range(len(names))])
    return References(names, _unit(vectors), f"class prototypes of {origin}")


def read_references(path: Path, width: int) -> References:
    """``names`` (strings) and ``vectors`` ([names, width] floats) from an ``.npz``; rows are made unit."""
    try:
        with np.load(path, allow_pickle=False) as data:
            names, vectors = [str(n) for n in data["names"]], np.asarray(data["vectors"], np.float64)
    except (OSError, ValueError, KeyError) as exc:
        raise DatasetError(f"--references {path}: an .npz with 'names' and 'vectors' is needed ({exc})") from None
    if vectors.ndim != 2 or vectors.shape != (len(names), width) or not 0 < len(names) <= MAX_REFERENCES:
        raise DatasetError(
            f"--references {path}: vectors {list(vectors.shape)} for {len(names)} names; the model's embeddings "
            f"are {width} wide"
        )
    if not np.isfinite(vectors).all() or (np.linalg.norm(vectors, axis=1) == 0).any():
        raise DatasetError(f"--references {path}: every vector must be finite and non-zero")
    if len(set(names)) != len(names):
        raise DatasetError(f"--references {path}: names must be unique")
    return References(names, _unit(vectors), str(path))
