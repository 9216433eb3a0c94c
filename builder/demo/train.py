"""Train the demo ViT, hybrid ResNet+ViT and Mixer on digits and save them in the published layout.

Reproducible: fixed seeds for init, split, shuffling and augmentation; XLA on CPU is
deterministic for these ops. Run ``python -m builder.demo train`` to regenerate the
committed checkpoints (about a minute each on two cores).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from builder.demo.digits import HELD_OUT_FRACTION, LABELS, SPLIT_SEED, digit_images, split_indices
from builder.export.architecture import MixerConfig, ModelConfig, ResNetConfig, ViTConfig, config_to_dict
from builder.export.checkpoint import save_checkpoint
from builder.export.models import apply, flatten, init_params, jax_forward, prepare, prepared_params, unflatten

IMAGE_SIZE = 64
CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"
VIT_DIGITS = ViTConfig(
    patch_size=16,
    hidden_size=64,
    mlp_dim=128,
    num_heads=4,
    num_layers=4,
    num_classes=len(LABELS),
    image_size=IMAGE_SIZE,
)
DEMO_MODELS: dict[str, ModelConfig] = {
    "vit-digits": VIT_DIGITS,
    # R50+ViT-B_16's structure in small: two bottleneck stages (the second halves the resolution), then
    # 2x2 patches on the feature map, the same 4x4 token grid as the ViT's
    "hybrid-digits": replace(VIT_DIGITS, patch_size=2, num_layers=2, resnet=ResNetConfig((1, 1), width_factor=0.5)),
    "mixer-digits": MixerConfig(
        patch_size=16,
        hidden_dim=64,
        tokens_mlp_dim=32,
        channels_mlp_dim=128,
        num_blocks=4,
        num_classes=len(LABELS),
        image_size=IMAGE_SIZE,
    ),
}


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 60
    batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    max_shift: int = 6  # pixels of random translation, the only augmentation
    seed: int = 0


def _shift(images: np.ndarray, rng: np.random.Generator, max_shift: int) -> np.ndarray:
    """Random translation with black fill: digits in the data set are not all centred either."""
    out = np.zeros_like(images)
    size = images.shape[1]
    for i, (dy, dx) in enumerate(rng.integers(-max_shift, max_shift + 1, (len(images), 2))):
        ys, yd = (slice(0, size - dy), slice(dy, size)) if dy >= 0 else (slice(-dy, size), slice(0, size + dy))
        xs, xd = (slice(0, size - dx), slice(dx, size)) if dx >= 0 else (slice(-dx, size), slice(0, size + dx))
        out[i, yd, xd] = images[i, ys, xs]
    return out


def train(cfg: ModelConfig, images: np.ndarray, labels: np.ndarray, settings: TrainSettings) -> dict[str, np.ndarray]:
    """Cross-entropy with AdamW and a cosine schedule; returns flat published-layout params."""
    steps_per_epoch = len(images) // settings.batch_size
    total_steps = steps_per_epoch * settings.epochs
    schedule = optax.warmup_cosine_decay_schedule(0.0, settings.learning_rate, max(1, total_steps // 30), total_steps)
    optimizer = optax.adamw(schedule, weight_decay=settings.weight_decay)
    params = jax.tree_util.tree_map(jnp.asarray, unflatten(init_params(cfg, settings.seed)))
    state = optimizer.init(params)

    def loss_fn(p: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        logits = apply(cfg, prepare(cfg, p), x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(p: Any, s: Any, x: jax.Array, y: jax.Array) -> tuple[Any, Any, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
        updates, s = optimizer.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    rng = np.random.default_rng(settings.seed)
    for epoch in range(settings.epochs):
        order = rng.permutation(len(images))
        losses = []
        for b in range(steps_per_epoch):
            idx = order[b * settings.batch_size : (b + 1) * settings.batch_size]
            params, state, loss = step(params, state, _shift(images[idx], rng, settings.max_shift), labels[idx])
            losses.append(float(loss))
        if epoch % 10 == 9 or epoch == settings.epochs - 1:
            print(f"  epoch {epoch + 1}/{settings.epochs}: loss {np.mean(losses):.4f}", flush=True)
    return {k: np.asarray(v) for k, v in flatten(params).items()}


def accuracy(cfg: ModelConfig, params: dict[str, np.ndarray], images: np.ndarray, labels: np.ndarray) -> float:
    logits = jax_forward(cfg, prepared_params(cfg, params))(images)
    return float((logits.argmax(-1) == labels).mean())


def train_demo(name: str, out_dir: Path = CHECKPOINT_DIR, settings: TrainSettings = TrainSettings()) -> Path:
    """Train one demo model; write ``<name>.npz`` and ``<name>.json`` (split, labels, held-out top-1)."""
    cfg = DEMO_MODELS[name]
    images, labels = digit_images(cfg.image_size)
    train_idx, held_out_idx = split_indices(labels)
    print(f"training {name} ({cfg.name}) on {len(train_idx)} digits", flush=True)
    params = train(cfg, images[train_idx], labels[train_idx], settings)
    top1 = accuracy(cfg, params, images[held_out_idx], labels[held_out_idx])
    print(f"  held-out top-1 {top1:.2%} on {len(held_out_idx)} digits", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.npz"
    save_checkpoint(path, params)
    card = {
        "architecture": config_to_dict(cfg),
        "labels": LABELS,
        "dataset": "sklearn.datasets.load_digits, 8x8 scans upscaled to "
        f"{cfg.image_size}px by agent.engine.preprocess (stretch, linear)",
        "split": {
            "held_out_fraction": HELD_OUT_FRACTION,
            "seed": SPLIT_SEED,
            "held_out_indices": held_out_idx.tolist(),
        },
        "training": {
            "epochs": settings.epochs,
            "batch_size": settings.batch_size,
            "learning_rate": settings.learning_rate,
            "weight_decay": settings.weight_decay,
            "max_shift": settings.max_shift,
            "seed": settings.seed,
        },
        "held_out_top1_jax": top1,
    }
    path.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    return path
