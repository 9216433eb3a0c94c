"""Vision Transformer forward pass: google-research/vision_transformer's ``models_vit`` (hybrids included)
and big_vision's ``models/vit.py`` (position embedding before the class token, sincos2d, MAP head)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from builder.errors import CheckpointError
from builder.export.architecture import MAP_HEAD, ViTConfig
from builder.export.models import resnet
from builder.export.models.layers import dense, layer_norm, mlp_block, patch_embed, scale_pixels

ATTENTION = "MultiHeadDotProductAttention_1"


def _blocks(cfg: ViTConfig) -> list[str]:
    return [f"encoderblock_{i}" for i in range(cfg.num_layers)]


def _heads(kernel: jax.Array, d: int) -> jax.Array:
    """[hidden, heads, head_dim] -> [hidden, hidden]."""
    return kernel.reshape(d, d)


def posemb_sincos_2d(grid: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
    """big_vision's ``posemb_sincos_2d``: sines and cosines of x and y over ``width // 4`` frequencies each."""
    if width % 4:
        raise CheckpointError(f"a sincos2d position embedding needs a width divisible by 4, the model's is {width}")
    y, x = np.mgrid[:grid, :grid]
    omega = 1.0 / temperature ** (np.arange(width // 4) / (width // 4 - 1))
    y, x = np.einsum("m,d->md", y.flatten(), omega), np.einsum("m,d->md", x.flatten(), omega)
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)[None].astype(np.float32)


def _map_head(cfg: ViTConfig, head: dict[str, Any]) -> dict[str, Any]:
    """The probe's query does not depend on the image: it is computed here, scaled, as [heads, 1, head_dim]."""
    d, heads = cfg.hidden_size, cfg.num_heads
    attn = head["MultiHeadDotProductAttention_0"]
    query = head["probe"].reshape(1, d) @ _heads(attn["query"]["kernel"], d) + attn["query"]["bias"].reshape(d)
    return {
        "query": (query * (d // heads) ** -0.5).reshape(heads, d // heads)[:, None, :],
        "kv": {
            "kernel": jnp.concatenate([_heads(attn[k]["kernel"], d) for k in ("key", "value")], axis=1),
            "bias": jnp.concatenate([attn[k]["bias"].reshape(d) for k in ("key", "value")]),
        },
        "out": {"kernel": attn["out"]["kernel"].reshape(d, d), "bias": attn["out"]["bias"]},
        "LayerNorm_0": head["LayerNorm_0"],
        "MlpBlock_0": head["MlpBlock_0"],
    }


def prepare(cfg: ViTConfig, params: dict[str, Any]) -> dict[str, Any]:
    """Fuse q/k/v into one [hidden, 3*hidden] Dense and flatten the output projection; a hybrid's ResNet
    and patch embedding as :mod:`resnet` computes them; a sincos2d position embedding for the export's
    resolution; the MAP head's constant query."""
    d = cfg.hidden_size
    transformer = dict(params["Transformer"])
    for name in _blocks(cfg):
        block = dict(transformer[name])
        attn = block.pop(ATTENTION)
        block["qkv"] = {
            "kernel": jnp.concatenate([_heads(attn[k]["kernel"], d) for k in ("query", "key", "value")], axis=1),
            "bias": jnp.concatenate([attn[k]["bias"].reshape(d) for k in ("query", "key", "value")]),
        }
        block["out"] = {"kernel": attn["out"]["kernel"].reshape(d, d), "bias": attn["out"]["bias"]}
        transformer[name] = block
    prepared = {**params, "Transformer": transformer}
    if cfg.resnet:
        stem = {k: v for k, v in params.items() if k.startswith(("conv_root", "gn_root", "block"))}
        embedding = params["embedding"]
        prepared |= resnet.prepare(stem)
        prepared["embedding"] = {"kernel": jnp.transpose(embedding["kernel"], (3, 2, 0, 1)), "bias": embedding["bias"]}
    if cfg.posemb == "sincos2d":
        prepared["pos_embedding"] = posemb_sincos_2d(cfg.grid, d)
    if cfg.classifier == "map":
        prepared[MAP_HEAD] = _map_head(cfg, params[MAP_HEAD])
    return prepared


def attention(x: jax.Array, block: dict[str, Any], heads: int) -> jax.Array:
    batch, tokens, d = x.shape
    qkv = dense(x, block["qkv"]).reshape(batch, tokens, 3, heads, d // heads)
    q, k, v = jnp.transpose(qkv, (2, 0, 3, 1, 4))  # each [batch, heads, tokens, head_dim]
    weights = jax.nn.softmax(jnp.matmul(q * (d // heads) ** -0.5, jnp.swapaxes(k, -1, -2)), axis=-1)
    out = jnp.swapaxes(jnp.matmul(weights, v), 1, 2).reshape(batch, tokens, d)
    return dense(out, block["out"])


def map_head(x: jax.Array, head: dict[str, Any], heads: int) -> jax.Array:
    """big_vision's ``MAPHead``: the probe attends over every token, then a residual MLP; [batch, hidden]."""
    batch, tokens, d = x.shape
    kv = dense(x, head["kv"]).reshape(batch, tokens, 2, heads, d // heads)
    k, v = jnp.transpose(kv, (2, 0, 3, 1, 4))  # each [batch, heads, tokens, head_dim]
    weights = jax.nn.softmax(jnp.matmul(head["query"], jnp.swapaxes(k, -1, -2)), axis=-1)  # [batch, heads, 1, tokens]
    y = dense(jnp.matmul(weights, v).reshape(batch, d), head["out"])
    return y + mlp_block(layer_norm(y, head["LayerNorm_0"]), head["MlpBlock_0"])


def _pool(cfg: ViTConfig, p: dict[str, Any], x: jax.Array) -> jax.Array:
    if cfg.classifier in ("token", "0"):
        return x[:, 0]
    if cfg.classifier == "map":
        return map_head(x, p[MAP_HEAD], cfg.num_heads)
    return jnp.mean(x, axis=1)


def apply(cfg: ViTConfig, p: dict[str, Any], images: jax.Array) -> jax.Array:
    """uint8 RGB NHWC images -> logits, or the embedding of a headless model or an image tower."""
    if cfg.resnet:
        features = resnet.features(cfg.resnet, p, scale_pixels(images))
        x = resnet.embed(features, p["embedding"], cfg.patch_size)
    else:
        x = patch_embed(images, p["embedding"], cfg.patch_size)
    if cfg.layout == "big_vision":  # the position embedding is added before the class token
        x = x + p["pos_embedding"]
    if cfg.classifier == "token":
        cls = jnp.broadcast_to(p["cls"], (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)
    t = p["Transformer"]
    if cfg.layout == "vision_transformer":
        x = x + t["posembed_input"]["pos_embedding"]
    for name in _blocks(cfg):
        block = t[name]
        x = x + attention(layer_norm(x, block["LayerNorm_0"]), block, cfg.num_heads)
        x = x + mlp_block(layer_norm(x, block["LayerNorm_2"]), block["MlpBlock_3"])
    x = _pool(cfg, p, layer_norm(x, t["encoder_norm"]))
    if cfg.representation_size:
        x = jnp.tanh(dense(x, p["pre_logits"]))
    return dense(x, p["head"]) if cfg.num_classes else x
