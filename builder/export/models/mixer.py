"""MLP-Mixer forward pass (google-research/vision_transformer ``models_mixer``)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from builder.export.architecture import MixerConfig
from builder.export.models.layers import dense, layer_norm, mlp_block, patch_embed


def prepare(cfg: MixerConfig, params: dict[str, Any]) -> dict[str, Any]:
    """Mixer weights are used as published."""
    return params


def apply(cfg: MixerConfig, p: dict[str, Any], images: jax.Array) -> jax.Array:
    x = patch_embed(images, p["stem"], cfg.patch_size)
    for i in range(cfg.num_blocks):
        block = p[f"MixerBlock_{i}"]
        y = jnp.swapaxes(layer_norm(x, block["LayerNorm_0"]), 1, 2)
        x = x + jnp.swapaxes(mlp_block(y, block["token_mixing"]), 1, 2)
        x = x + mlp_block(layer_norm(x, block["LayerNorm_1"]), block["channel_mixing"])
    x = jnp.mean(layer_norm(x, p["pre_head_layer_norm"]), axis=1)
    return dense(x, p["head"])
