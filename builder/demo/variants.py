"""Variants of the demo ViT for the canary's tests and bench: a weaker predecessor and damaged engines.

- :func:`weaker_checkpoint`: the same architecture and data, trained for 20 epochs instead of
  60 (about 91 % held-out top-1 against 99 %). The committed checkpoint is then a retrained,
  better model of it: it disagrees with the weaker one on the frames it now gets right.
- :func:`damaged_checkpoint`: Gaussian noise on every kernel, a few points less accurate.
- :func:`misdescribed_bundle`: a bundle that carries another bundle's manifest and passport
  around a different engine. It is what a device's canary meets when the engine it runs does
  not compute what its build measured (a conversion or runtime fault the golden set's few
  frames miss, or live frames unlike the evaluation set): the passport promises one agreement
  and the live frames show another. Its golden set is recorded from the engine it carries.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from agent.engine.bundle import verify_bundle
from agent.engine.runtimes import open_engine
from agent.engine.signing import load_private_key
from builder.bundle.writer import write_bundle
from builder.demo.train import TrainSettings, train_demo
from builder.export.checkpoint import read_checkpoint, save_checkpoint

WEAKER_EPOCHS = 20


def weaker_checkpoint(out_dir: Path) -> Path:
    """``out_dir/vit-digits.npz`` (and its card): the demo ViT trained for :data:`WEAKER_EPOCHS` epochs."""
    return train_demo("vit-digits", out_dir, TrainSettings(epochs=WEAKER_EPOCHS))


def damaged_checkpoint(checkpoint: Path, out: Path, scale: float, seed: int = 0) -> Path:
    """``checkpoint`` with noise of ``scale`` times each kernel's own spread added to every kernel (its
    demo card, when it has one, copied beside it: same labels and held-out split)."""
    rng = np.random.default_rng(seed)
    params = read_checkpoint(checkpoint).params
    damaged = {
        k: (v + rng.normal(0, scale * float(v.std()), v.shape)).astype(v.dtype) if k.endswith("kernel") else v
        for k, v in params.items()
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, damaged)
    card = checkpoint.with_suffix(".json")  # the demo split and labels stay the original's
    if card.is_file():
        shutil.copyfile(card, out.with_suffix(".json"))
    return out


def misdescribed_bundle(described: Path, engine: Path, out: Path, key: Path, bundle_id: str) -> Path:
    """A bundle with ``described``'s manifest and passport whose engine is the ONNX model ``engine``."""
    bundle = verify_bundle(described, None)
    runner = open_engine("onnxruntime", "cpu", engine, bundle.batch_range[1])
    with np.load(bundle.golden_path) as golden:
        images, allowed = golden["images"], golden["allowed_error"]
    reference = runner.run(images)
    runner.close()
    manifest = {k: v for k, v in bundle.manifest.items() if k != "files"}
    manifest["bundle_id"] = bundle_id
    manifest["engine"] = {**manifest["engine"], "backend": "onnxruntime", "target": "cpu"}
    passport = {**bundle.passport, "bundle_id": bundle_id}
    golden_set = {"images": images, "reference": reference, "allowed_error": allowed}
    return write_bundle(out, [engine], bundle.labels, passport, golden_set, manifest, load_private_key(key))
