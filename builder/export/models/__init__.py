"""JAX forward passes over the published parameter trees.

``prepare`` turns the published tree into the inference tree (attention kernels
flattened to 2-D, q/k/v fused) with plain array ops: called eagerly before export it
yields constants, so every Dense becomes a Gemm on an initializer, which is what
quantizers and TensorRT need; called under ``jax.grad`` it is differentiable, so
training and export share one forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from builder.export.architecture import ModelConfig, ViTConfig, param_shapes
from builder.export.models import mixer, vit

Tree = dict[str, Any]


def unflatten(flat: Mapping[str, Any]) -> Tree:
    """'a/b/c' keys -> nested dicts."""
    tree: Tree = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> 'a/b/c' keys (the inverse of :func:`unflatten`)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat |= flatten(value, f"{prefix}{key}/")
        else:
            flat[prefix + key] = value
    return flat


def _module(cfg: ModelConfig):
    return vit if isinstance(cfg, ViTConfig) else mixer


def prepare(cfg: ModelConfig, params: Tree) -> Tree:
    """Published nested tree -> inference tree (see module docstring)."""
    return _module(cfg).prepare(cfg, params)


def apply(cfg: ModelConfig, prepared: Tree, images: jax.Array) -> jax.Array:
    """uint8 RGB NHWC images -> logits [batch, classes] (embeddings [batch, width] for a headless ViT)."""
    return _module(cfg).apply(cfg, prepared, images)


def prepared_params(cfg: ModelConfig, flat_params: Mapping[str, np.ndarray]) -> Tree:
    """The inference tree as NumPy arrays, computed eagerly (see module docstring)."""
    return jax.tree_util.tree_map(np.asarray, prepare(cfg, unflatten(flat_params)))


def inference_fn(cfg: ModelConfig, prepared: Tree) -> Callable[[jax.Array], jax.Array]:
    """A function of images alone with the weights closed over: what gets exported.

    For running the model in JAX prefer ``jax.jit(apply, static_argnums=0)`` with the
    weights as an argument: a jitted closure embeds its constants in the executable,
    a second full copy of the weights.
    """
    return lambda images: apply(cfg, prepared, images)


def jax_forward(cfg: ModelConfig, prepared: Tree) -> Callable[[np.ndarray], np.ndarray]:
    """The JAX reference: jitted, weights passed as arguments, NumPy out."""
    jitted = jax.jit(apply, static_argnums=0)
    return lambda images: np.asarray(jitted(cfg, prepared, images))


def _fan_in(key: str, shape: tuple[int, ...]) -> int:
    if key.endswith("out/kernel"):  # [heads, head_dim, hidden]
        return shape[0] * shape[1]
    if len(shape) == 4:  # HWIO conv
        return shape[0] * shape[1] * shape[2]
    return shape[0]


def init_params(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights in the published layout (tests, benchmarks, training start).

    Kernels are LeCun-normal, biases zero, LayerNorm scales one, embeddings
    N(0, 0.02): this keeps activations and logits of random models in a range
    where numeric comparisons mean something.
    """
    rng = np.random.default_rng(seed)
    params: dict[str, np.ndarray] = {}
    for key, shape in param_shapes(cfg).items():
        leaf = key.rsplit("/", 1)[-1]
        if leaf in ("scale", "bias"):
            value = np.full(shape, 1.0 if leaf == "scale" else 0.0)
        elif key in ("cls", "Transformer/posembed_input/pos_embedding", "pos_embedding", "MAPHead_0/probe"):
            value = 0.02 * rng.standard_normal(shape)
        else:
            value = rng.standard_normal(shape) / np.sqrt(_fan_in(key, shape))
        params[key] = value.astype(np.float32)
    return params
