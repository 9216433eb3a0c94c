"""Embedding models on the device: their output, compared with the references the bundle ships.

A headless ViT or a two-tower image encoder (SigLIP's) outputs an embedding, not class scores. The
bundle of such a model carries reference embeddings (``references.npz``: a unit vector per entry of
``labels.json`` — class prototypes, or a text tower's embeddings of prompts) and the worker turns each
frame's embedding into its cosine similarity to every reference, times :data:`SCALE`. From there on the
frame is handled as a classifier's: results carry the top-k references by similarity, and the canary,
drift and golden checks read the same scores.

Why similarities and not the embedding itself in the results: a ViT-B embedding is 768 floats, about
6 KB of JSON per frame, which at 30 fps per camera is more than the MQTT link of an edge box should
carry; what a deployment asks of an image tower on the device is which known thing a frame looks like.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agent.engine.runtimes import Engine, EngineError

# Scores are softmax(SCALE * cosine): CLIP's and SigLIP's learned temperatures are near 100, so the scores
# of the top-k read like a classifier's confidences.
SCALE = 100.0
MAX_REFERENCES = 100_000


class SimilarityHead:
    """Unit reference vectors [references, width]; :meth:`scores` turns a batch of embeddings into scores."""

    def __init__(self, vectors: np.ndarray) -> None:
        self.vectors = np.ascontiguousarray(vectors, np.float32)

    @classmethod
    def load(cls, path: Path, width: int | None = None) -> SimilarityHead:
        """The references a bundle ships, checked: a finite float matrix of unit rows, ``width`` wide."""
        try:
            with np.load(path, allow_pickle=False) as data:
                vectors = np.asarray(data["vectors"])
        except (OSError, ValueError, KeyError) as exc:
            raise EngineError(f"{path.name} holds no reference vectors: {exc}") from None
        if vectors.ndim != 2 or not 0 < len(vectors) <= MAX_REFERENCES or vectors.dtype != np.float32:
            raise EngineError(f"{path.name}: references must be a float32 [count, width] matrix, got {vectors.shape}")
        if width is not None and vectors.shape[1] != width:
            raise EngineError(f"{path.name}: references are {vectors.shape[1]} wide, the engine's output {width}")
        if not np.isfinite(vectors).all() or not np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3):
            raise EngineError(f"{path.name}: references must be finite unit vectors")
        return cls(vectors)

    def scores(self, embeddings: np.ndarray) -> np.ndarray:
        """``SCALE`` x cosine similarity of each row of ``embeddings`` to each reference: a new array, as every
        engine's output is."""
        embeddings = embeddings.astype(np.float32, copy=False)
        norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
        out: np.ndarray = embeddings @ self.vectors.T
        out *= SCALE / np.maximum(norms, 1e-12)
        return out


class HeadedEngine:
    """An :class:`Engine` that outputs similarity scores to the references instead of the embedding."""

    def __init__(self, engine: Engine, head: SimilarityHead) -> None:
        self.engine, self.head = engine, head

    def run(self, images: np.ndarray) -> np.ndarray:
        return self.head.scores(self.engine.run(images))

    def close(self) -> None:
        self.engine.close()


def with_references(engine: Engine, references: Path | None) -> Engine:
    """``engine`` as a bundle serves it: through its references when it has some."""
    return engine if references is None else HeadedEngine(engine, SimilarityHead.load(references))
