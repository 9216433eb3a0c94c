"""Vision Transformer forward pass (google-research/vision_transformer ``models_vit``)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from builder.export.architecture import ViTConfig
from builder.export.models.layers import dense, layer_norm, mlp_block, patch_embed

ATTENTION = "MultiHeadDotProductAttention_1"


def _blocks(cfg: ViTConfig) -> list[str]:
    return [f"encoderblock_{i}" for i in range(cfg.num_layers)]


def prepare(cfg: ViTConfig, params: dict[str, Any]) -> dict[str, Any]:
    """Fuse q/k/v into one [hidden, 3*hidden] Dense and flatten the output projection."""
    d = cfg.hidden_size
    transformer = dict(params["Transformer"])
    for name in _blocks(cfg):
        block = dict(transformer[name])
        attn = block.pop(ATTENTION)
        block["qkv"] = {
            "kernel": jnp.concatenate([attn[k]["kernel"].reshape(d, d) for k in ("query", "key", "value")], axis=1),
            "bias": jnp.concatenate([attn[k]["bias"].reshape(d) for k in ("query", "key", "value")]),
        }
        block["out"] = {"kernel": attn["out"]["kernel"].reshape(d, d), "bias": attn["out"]["bias"]}
        transformer[name] = block
    return {**params, "Transformer": transformer}


def attention(x: jax.Array, block: dict[str, Any], heads: int) -> jax.Array:
    batch, tokens, d = x.shape
    qkv = dense(x, block["qkv"]).reshape(batch, tokens, 3, heads, d // heads)
    q, k, v = jnp.transpose(qkv, (2, 0, 3, 1, 4))  # each [batch, heads, tokens, head_dim]
    weights = jax.nn.softmax(jnp.matmul(q * (d // heads) ** -0.5, jnp.swapaxes(k, -1, -2)), axis=-1)
    out = jnp.swapaxes(jnp.matmul(weights, v), 1, 2).reshape(batch, tokens, d)
    return dense(out, block["out"])


def apply(cfg: ViTConfig, p: dict[str, Any], images: jax.Array) -> jax.Array:
    x = patch_embed(images, p["embedding"], cfg.patch_size)
    if cfg.classifier == "token":
        cls = jnp.broadcast_to(p["cls"], (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)
    t = p["Transformer"]
    x = x + t["posembed_input"]["pos_embedding"]
    for name in _blocks(cfg):
        block = t[name]
        x = x + attention(layer_norm(x, block["LayerNorm_0"]), block, cfg.num_heads)
        x = x + mlp_block(layer_norm(x, block["LayerNorm_2"]), block["MlpBlock_3"])
    x = layer_norm(x, t["encoder_norm"])
    x = x[:, 0] if cfg.classifier == "token" else jnp.mean(x, axis=1)
    if cfg.representation_size:
        x = jnp.tanh(dense(x, p["pre_logits"]))
    return dense(x, p["head"])
