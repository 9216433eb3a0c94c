"""The newer model families from checkpoint to camera, through the real agent: a hybrid ResNet+ViT, and an
embedding model built, gated by cosine similarity and served.

The embedding model is the demo ViT trained on digits with its classifier head removed (an exact
transformation: its output is then the pre-head embedding the classifier was trained on), the shape of
a headless big_vision ViT or a SigLIP image tower on the device. The hybrid is the demo's, trained on
digits (``builder/demo/train.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from agent_helpers import read_results, run_agent, summary, write_config

from agent.engine.bundle import REFERENCES, verify_bundle
from agent.engine.runtimes import EngineError
from agent.engine.signing import load_public_key
from agent.engine.similarity import SCALE, HeadedEngine, SimilarityHead
from builder.bundle.build import build_engine_bundle
from builder.bundle.options import EngineOptions
from builder.demo.train import CHECKPOINT_DIR
from builder.errors import GateError
from builder.evaluate.measure import Gate
from builder.export.checkpoint import read_checkpoint, save_checkpoint
from builder.export.job import export_checkpoint

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def headless_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("headless")
    params = read_checkpoint(CHECKPOINT_DIR / "vit-digits.npz").params
    save_checkpoint(work / "vit-digits-headless.npz", {k: v for k, v in params.items() if not k.startswith("head/")})
    result = export_checkpoint(work / "vit-digits-headless.npz", work / "export")
    assert result.config.output == "embeddings" and result.config.out_dim == 64
    return result.model_path.parent


def dynamic_int8(**changes: Any) -> EngineOptions:
    """ONNX Runtime's dynamic INT8 of the headless demo ViT, measured briefly: the quickest gated build."""
    base = {"calibration_images": 64, "profile_seconds": 0.2}
    return EngineOptions(
        precision="int8",
        eval="demo:vit-digits",
        calib="demo:vit-digits",
        runtime="onnxruntime",
        quantization="dynamic",
        **{**base, **changes},
    )


@pytest.fixture(scope="module")
def embedding_bundle(headless_export: Path, signing_key, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("embedding-bundle") / "bundle"
    return build_engine_bundle(headless_export, out, signing_key[0], dynamic_int8()).path


def test_the_bundle_is_gated_on_cosine_and_ships_its_references(embedding_bundle: Path, signing_key) -> None:
    bundle = verify_bundle(embedding_bundle, [load_public_key(signing_key[1])])
    assert bundle.manifest["schema"] == 2 and bundle.manifest["output"] == {
        "kind": "embeddings",
        "width": 64,
        "references": 10,
    }
    assert bundle.references_path == embedding_bundle / REFERENCES and bundle.labels == [str(d) for d in range(10)]
    passport = bundle.passport
    accuracy = passport["accuracy"]
    assert accuracy["mean_cosine"] >= passport["gate"]["min_cosine"] == 0.99 and accuracy["min_cosine"] > 0.9
    assert accuracy["reference_top1"] > 0.9, "the digits' class prototypes classify held-out digits"
    assert passport["output"]["references_from"].startswith("class prototypes of")
    head = SimilarityHead.load(bundle.references_path, width=64)
    assert np.allclose(np.linalg.norm(head.vectors, axis=1), 1, atol=1e-5)


def test_the_agent_serves_the_embedding_model(
    embedding_bundle: Path, signing_key, digits_video: Path, tmp_path: Path
) -> None:
    """Each frame's result: the references nearest its embedding, by softmax(SCALE x cosine)."""
    config = write_config(
        tmp_path / "agent.yaml",
        embedding_bundle,
        signing_key[1],
        [{"name": "digits", "source": str(digits_video), "fps": 30}],
        exit_when_sources_end=True,
    )
    proc = run_agent(config)
    assert proc.returncode == 0, proc.stderr
    results = read_results(tmp_path / "results.jsonl")
    labels = json.loads(digits_video.with_suffix(".json").read_text())["labels"]
    assert len(results) >= 0.9 * len(labels)
    top1 = [int(r["top"][0]["label"]) == labels[r["seq"] - 1] for r in results]
    assert np.mean(top1) >= 0.9 and all(0 < r["top"][0]["score"] <= 1 for r in results)
    drift = summary(proc.stdout)["drift"]
    assert drift["frames"] == len(results) and drift["class_mix_distance"] < 0.25


def test_the_agent_serves_a_hybrid(demo_run, digits_video: Path, tmp_path: Path) -> None:
    """The demo hybrid's INT8 bundle, as ``edgevit-build demo`` builds it, classifies the held-out digits on the
    agent (its gate and candidates are checked with the others' in test_engine_build.py)."""
    bundle, key = demo_run[0] / "bundles" / "hybrid-digits-cpu-int8", demo_run[0] / "keys" / "edgevit.pub"
    config = write_config(
        tmp_path / "agent.yaml",
        bundle,
        key,
        [{"name": "digits", "source": str(digits_video), "fps": 30}],
        exit_when_sources_end=True,
    )
    proc = run_agent(config)
    assert proc.returncode == 0, proc.stderr
    results = read_results(tmp_path / "results.jsonl")
    labels = json.loads(digits_video.with_suffix(".json").read_text())["labels"]
    assert len(results) >= 0.9 * len(labels) and results[0]["engine"].startswith("hybrid-digits")
    assert np.mean([int(r["top"][0]["label"]) == labels[r["seq"] - 1] for r in results]) >= 0.95


def test_a_cosine_budget_the_engine_misses_refuses_the_build(headless_export: Path, signing_key, tmp_path) -> None:
    options = dynamic_int8(calibration_images=16, profile_seconds=0.1, gate=Gate(min_cosine=0.999999))
    with pytest.raises(GateError, match="mean cosine similarity to FP32's embeddings is 0.9"):
        build_engine_bundle(headless_export, tmp_path / "bundle", signing_key[0], options)


@pytest.mark.parametrize(
    ("vectors", "width", "message"),
    [
        (np.ones((3, 4), np.float32), 4, "finite unit vectors"),
        (np.eye(3, 4, dtype=np.float32), 8, "references are 4 wide, the engine's output 8"),
        (np.eye(3, 4, dtype=np.float64), 4, "float32"),
        (np.full((2, 4), np.nan, np.float32), 4, "finite unit vectors"),
    ],
)
def test_references_a_device_cannot_honour_are_refused(
    tmp_path: Path, vectors: np.ndarray, width: int, message: str
) -> None:
    path = tmp_path / "references.npz"
    np.savez(path, vectors=vectors)
    with pytest.raises(EngineError, match=message):
        SimilarityHead.load(path, width)


def test_scores_are_scaled_cosine_similarities() -> None:
    vectors = np.eye(3, 4, dtype=np.float32)
    head = SimilarityHead(vectors)
    embeddings = np.array([[2, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 5]], np.float32)
    expected = SCALE * np.array([[1, 0, 0], [0.5**0.5, 0.5**0.5, 0], [0, 0, 0]], np.float32)
    engine = HeadedEngine(SimpleNamespace(run=lambda images: embeddings, close=lambda: None), head)
    np.testing.assert_allclose(engine.run(np.zeros((3, 8, 8, 3), np.uint8)), expected, atol=1e-4)
    np.testing.assert_allclose(head.scores(embeddings), expected, atol=1e-4)
