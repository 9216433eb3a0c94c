"""Building blocks shared by ViT and Mixer, with the original numerics.

Dense layers flatten to 2-D so jax2onnx emits ``Gemm`` (a rank-3 ``dot_general``
would become ``Einsum``, which quantizers and TensorRT handle poorly). LayerNorm
goes through ``flax.nnx.LayerNorm`` because that is what jax2onnx lowers to the
native ``LayerNormalization`` op (``normalization_mode='prefer_native'``); its
statistics are those of the linen LayerNorm the checkpoints were trained with.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

LAYER_NORM_EPS = 1e-6


def dense(x: jax.Array, p: dict[str, Any]) -> jax.Array:
    kernel = p["kernel"]
    y = x.reshape(-1, kernel.shape[0]) @ kernel + p["bias"]
    return y.reshape(*x.shape[:-1], kernel.shape[1])


def layer_norm(x: jax.Array, p: dict[str, Any]) -> jax.Array:
    norm = nnx.LayerNorm(
        x.shape[-1],
        epsilon=LAYER_NORM_EPS,
        scale_init=lambda *_: p["scale"],
        bias_init=lambda *_: p["bias"],
        rngs=nnx.Rngs(0),
    )
    return norm(x)


def gelu(x: jax.Array) -> jax.Array:
    """tanh-approximate GELU (flax's default); exported as ONNX ``Gelu(approximate='tanh')``."""
    return jax.nn.gelu(x, approximate=True)


def mlp_block(x: jax.Array, p: dict[str, Any]) -> jax.Array:
    return dense(gelu(dense(x, p["Dense_0"])), p["Dense_1"])


def scale_pixels(images: jax.Array) -> jax.Array:
    """uint8 -> [-1, 1], as the original input pipeline does; it lives in the graph."""
    return images.astype(jnp.float32) / 127.5 - 1.0


def patch_embed(images: jax.Array, p: dict[str, Any], patch: int) -> jax.Array:
    """uint8 RGB NHWC -> [batch, tokens, hidden]."""
    x = scale_pixels(images)
    x = (
        jax.lax.conv_general_dilated(
            x, p["kernel"], (patch, patch), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        + p["bias"]
    )
    return x.reshape(x.shape[0], -1, x.shape[-1])
