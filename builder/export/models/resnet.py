"""A hybrid's ResNetV2 root and stages (google-research/vision_transformer ``models_resnet``).

Weight standardization (each output channel's kernel to zero mean and unit standard deviation,
eps 1e-5 on the deviation) depends on the weights alone, so :func:`prepare` folds it into plain
convolution kernels: the exported graph holds ordinary ``Conv`` nodes on constants, which is what
quantizers and TensorRT handle. The features are computed channels-first (kernels laid out OIHW in
:func:`prepare`): ONNX's ``Conv`` and ``MaxPool`` are NCHW, so the graph then needs one transpose at
the input instead of a pair around every convolution.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from builder.export.architecture import ResNetConfig

STD_CONV_EPS = 1e-5
GROUP_NORM_GROUPS, GROUP_NORM_EPS = 32, 1e-6  # flax.linen.GroupNorm's defaults, which the models used
_NCHW = ("NCHW", "OIHW", "NCHW")


def standardized(kernel: jax.Array) -> jax.Array:
    """HWIO kernel -> weight-standardized OIHW kernel."""
    w = kernel - jnp.mean(kernel, axis=(0, 1, 2))
    w = w / (jnp.std(w, axis=(0, 1, 2)) + STD_CONV_EPS)
    return jnp.transpose(w, (3, 2, 0, 1))


def prepare(params: dict[str, Any]) -> dict[str, Any]:
    """Every ``kernel`` under the root and the stages, standardized and laid out OIHW."""
    return {
        k: standardized(v) if k == "kernel" else prepare(v) if isinstance(v, dict) else v for k, v in params.items()
    }


def conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """NCHW convolution with flax's default SAME padding."""
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), "SAME", dimension_numbers=_NCHW)


def group_norm(x: jax.Array, p: dict[str, Any]) -> jax.Array:
    """flax.linen.GroupNorm on NCHW: statistics per sample and group of channels, over the group and space."""
    n, c, h, w = x.shape
    y = x.reshape(n, GROUP_NORM_GROUPS, c // GROUP_NORM_GROUPS, h, w)
    mean = jnp.mean(y, axis=(2, 3, 4), keepdims=True)
    var = jnp.mean(jnp.square(y - mean), axis=(2, 3, 4), keepdims=True)
    y = ((y - mean) / jnp.sqrt(var + GROUP_NORM_EPS)).reshape(n, c, h, w)
    out: jax.Array = y * p["scale"][:, None, None] + p["bias"][:, None, None]
    return out


def max_pool(x: jax.Array) -> jax.Array:
    """The root's 3x3/2 SAME max pool. Through NHWC because jax2onnx lowers ``nnx.max_pool`` to one ONNX
    ``MaxPool``; the transposes around it cancel against the ones it adds."""
    y = nnx.max_pool(  # type: ignore[no-untyped-call]  # flax leaves it unannotated
        jnp.transpose(x, (0, 2, 3, 1)), window_shape=(3, 3), strides=(2, 2), padding="SAME"
    )
    return jnp.transpose(y, (0, 3, 1, 2))


def unit(x: jax.Array, p: dict[str, Any], stride: int) -> jax.Array:
    """A bottleneck unit; the first of a stage projects its input (its kernel is in ``p``)."""
    residual = group_norm(conv(x, p["conv_proj"]["kernel"], stride), p["gn_proj"]) if "conv_proj" in p else x
    y = jax.nn.relu(group_norm(conv(x, p["conv1"]["kernel"], 1), p["gn1"]))
    y = jax.nn.relu(group_norm(conv(y, p["conv2"]["kernel"], stride), p["gn2"]))
    y = group_norm(conv(y, p["conv3"]["kernel"], 1), p["gn3"])
    return jax.nn.relu(residual + y)


def features(cfg: ResNetConfig, p: dict[str, Any], x: jax.Array) -> jax.Array:
    """Scaled NHWC images -> the NCHW feature map the patch embedding reads."""
    x = jnp.transpose(x, (0, 3, 1, 2))
    x = max_pool(jax.nn.relu(group_norm(conv(x, p["conv_root"]["kernel"], 2), p["gn_root"])))
    for stage, units in enumerate(cfg.num_layers, 1):
        for i in range(1, units + 1):
            x = unit(x, p[f"block{stage}"][f"unit{i}"], 2 if stage > 1 and i == 1 else 1)
    return x


def embed(x: jax.Array, p: dict[str, Any], patch: int) -> jax.Array:
    """NCHW features -> [batch, tokens, hidden] through the patch embedding (its kernel OIHW)."""
    y = jax.lax.conv_general_dilated(x, p["kernel"], (patch, patch), "VALID", dimension_numbers=_NCHW)
    y = y + p["bias"][:, None, None]
    return jnp.swapaxes(y.reshape(y.shape[0], y.shape[1], -1), 1, 2)
