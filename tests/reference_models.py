"""An independent reference: the original google-research/vision_transformer models in flax.linen.

Written after ``vit_jax/models_vit.py``, ``models_resnet.py``, ``models_mixer.py`` and
big_vision's ``models/vit.py``
(inference path, dropout omitted), using flax.linen's own Conv, GroupNorm, max_pool,
LayerNorm, MultiHeadDotProductAttention and gelu, with weight standardization applied
to the kernel at every call as the original StdConv does, so the builder's hand-written
forward pass is checked against the library the checkpoints were trained with rather than
against itself.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from builder.export.architecture import MixerConfig, ModelConfig, ResNetConfig, ViTConfig
from builder.export.models import unflatten

PUBLISHED_TO_LINEN = {
    "MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
    "LayerNorm_2": "LayerNorm_1",
    "MlpBlock_3": "MlpBlock_0",
}


class MlpBlock(nn.Module):
    mlp_dim: int

    @nn.compact
    def __call__(self, x):
        y = nn.gelu(nn.Dense(self.mlp_dim)(x))
        return nn.Dense(x.shape[-1])(y)


class Encoder1DBlock(nn.Module):
    mlp_dim: int
    num_heads: int

    @nn.compact
    def __call__(self, inputs):
        x = nn.LayerNorm()(inputs)
        x = nn.MultiHeadDotProductAttention(num_heads=self.num_heads)(x, x)
        x = x + inputs
        y = MlpBlock(self.mlp_dim)(nn.LayerNorm()(x))
        return x + y


class AddPositionEmbs(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x + self.param("pos_embedding", nn.initializers.zeros, (1, x.shape[1], x.shape[2]))


class Encoder(nn.Module):
    num_layers: int
    mlp_dim: int
    num_heads: int
    add_position_embedding: bool = True  # big_vision adds it before the class token, outside

    @nn.compact
    def __call__(self, x):
        if self.add_position_embedding:
            x = AddPositionEmbs(name="posembed_input")(x)
        for i in range(self.num_layers):
            x = Encoder1DBlock(self.mlp_dim, self.num_heads, name=f"encoderblock_{i}")(x)
        return nn.LayerNorm(name="encoder_norm")(x)


class StdConv(nn.Conv):
    def param(self, name, *args, **kwargs):
        param = super().param(name, *args, **kwargs)
        if name == "kernel":
            param = param - jnp.mean(param, axis=[0, 1, 2])
            param = param / (jnp.std(param, axis=[0, 1, 2]) + 1e-5)
        return param


class ResidualUnit(nn.Module):
    features: int
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x):
        residual = x
        if x.shape[-1] != self.features * 4 or self.strides != (1, 1):
            residual = StdConv(self.features * 4, (1, 1), self.strides, use_bias=False, name="conv_proj")(x)
            residual = nn.GroupNorm(name="gn_proj")(residual)
        y = nn.relu(nn.GroupNorm(name="gn1")(StdConv(self.features, (1, 1), use_bias=False, name="conv1")(x)))
        y = StdConv(self.features, (3, 3), self.strides, use_bias=False, name="conv2")(y)
        y = nn.relu(nn.GroupNorm(name="gn2")(y))
        y = nn.GroupNorm(name="gn3")(StdConv(self.features * 4, (1, 1), use_bias=False, name="conv3")(y))
        return nn.relu(residual + y)


class ResNetStage(nn.Module):
    block_size: int
    nout: int
    first_stride: tuple[int, int]

    @nn.compact
    def __call__(self, x):
        x = ResidualUnit(self.nout, self.first_stride, name="unit1")(x)
        for i in range(1, self.block_size):
            x = ResidualUnit(self.nout, name=f"unit{i + 1}")(x)
        return x


class ResNetRoot(nn.Module):
    """The root and stages models_vit.VisionTransformer runs before a hybrid's patch embedding."""

    cfg: ResNetConfig

    @nn.compact
    def __call__(self, x):
        width = int(64 * self.cfg.width_factor)
        x = StdConv(width, (7, 7), (2, 2), use_bias=False, name="conv_root")(x)
        x = nn.max_pool(nn.relu(nn.GroupNorm(name="gn_root")(x)), (3, 3), strides=(2, 2), padding="SAME")
        for stage, units in enumerate(self.cfg.num_layers):
            first_stride = (2, 2) if stage else (1, 1)
            x = ResNetStage(units, width * 2**stage, first_stride, name=f"block{stage + 1}")(x)
        return x


class VisionTransformer(nn.Module):
    cfg: ViTConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        p = (c.patch_size, c.patch_size)
        if c.resnet:
            x = ResNetRoot(c.resnet, name="resnet")(x)
        x = nn.Conv(c.hidden_size, p, strides=p, padding="VALID", name="embedding")(x)
        n, h, w, d = x.shape
        x = jnp.reshape(x, [n, h * w, d])
        if c.classifier == "token":
            cls = self.param("cls", nn.initializers.zeros, (1, 1, d))
            x = jnp.concatenate([jnp.tile(cls, [n, 1, 1]), x], axis=1)
        x = Encoder(c.num_layers, c.mlp_dim, c.num_heads, name="Transformer")(x)
        x = x[:, 0] if c.classifier == "token" else jnp.mean(x, axis=1)
        if c.representation_size:
            x = nn.tanh(nn.Dense(c.representation_size, name="pre_logits")(x))
        return nn.Dense(c.num_classes, name="head")(x) if c.num_classes else x


def posemb_sincos_2d(h, w, width, temperature=10_000.0):
    """big_vision's models/vit.py, in jnp as there."""
    y, x = jnp.mgrid[:h, :w]
    omega = jnp.arange(width // 4) / (width // 4 - 1)
    omega = 1.0 / (temperature**omega)
    y = jnp.einsum("m,d->md", y.flatten(), omega)
    x = jnp.einsum("m,d->md", x.flatten(), omega)
    return jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)[None]


class MAPHead(nn.Module):
    """big_vision's multi-head attention pooling."""

    mlp_dim: int
    num_heads: int

    @nn.compact
    def __call__(self, x):
        n, _, d = x.shape
        probe = jnp.tile(self.param("probe", nn.initializers.zeros, (1, 1, d)), [n, 1, 1])
        x = nn.MultiHeadDotProductAttention(num_heads=self.num_heads)(probe, x)
        y = nn.LayerNorm()(x)
        x = x + MlpBlock(self.mlp_dim)(y)
        return x[:, 0]


class BigVisionViT(nn.Module):
    """big_vision's models/vit.py ``_Model`` (inference path, no scan): posemb added before the class token."""

    cfg: ViTConfig

    @nn.compact
    def __call__(self, image):
        c = self.cfg
        p = (c.patch_size, c.patch_size)
        x = nn.Conv(c.hidden_size, p, strides=p, padding="VALID", name="embedding")(image)
        n, h, w, d = x.shape
        x = jnp.reshape(x, [n, h * w, d])
        if c.posemb == "learn":
            x = x + self.param("pos_embedding", nn.initializers.zeros, (1, h * w, d))
        else:
            x = x + posemb_sincos_2d(h, w, d)
        if c.classifier == "token":
            cls = self.param("cls", nn.initializers.zeros, (1, 1, d))
            x = jnp.concatenate([jnp.tile(cls, [n, 1, 1]), x], axis=1)
        x = Encoder(c.num_layers, c.mlp_dim, c.num_heads, add_position_embedding=False, name="Transformer")(x)
        if c.classifier == "map":
            x = MAPHead(c.mlp_dim, c.num_heads, name="MAPHead_0")(x)
        elif c.classifier == "gap":
            x = jnp.mean(x, axis=1)
        else:  # "0", and "tok" (the class token is first)
            x = x[:, 0]
        if c.representation_size:
            x = nn.tanh(nn.Dense(c.representation_size, name="pre_logits")(x))
        if c.num_classes:
            x = nn.Dense(c.num_classes, name="head")(x)
        return x


class MixerBlock(nn.Module):
    tokens_mlp_dim: int
    channels_mlp_dim: int

    @nn.compact
    def __call__(self, x):
        y = jnp.swapaxes(nn.LayerNorm()(x), 1, 2)
        y = jnp.swapaxes(MlpBlock(self.tokens_mlp_dim, name="token_mixing")(y), 1, 2)
        x = x + y
        return x + MlpBlock(self.channels_mlp_dim, name="channel_mixing")(nn.LayerNorm()(x))


class MlpMixer(nn.Module):
    cfg: MixerConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        p = (c.patch_size, c.patch_size)
        x = nn.Conv(c.hidden_dim, p, strides=p, name="stem")(x)
        x = jnp.reshape(x, (x.shape[0], -1, x.shape[-1]))
        for _ in range(c.num_blocks):
            x = MixerBlock(c.tokens_mlp_dim, c.channels_mlp_dim)(x)
        x = jnp.mean(nn.LayerNorm(name="pre_head_layer_norm")(x), axis=1)
        return nn.Dense(c.num_classes, name="head")(x)


def reference_logits(cfg: ModelConfig, params: dict[str, np.ndarray], images: np.ndarray) -> np.ndarray:
    """Logits (or embeddings) of the linen reference for uint8 images (scaled as the original input pipeline
    does)."""
    linen = {"/".join(PUBLISHED_TO_LINEN.get(part, part) for part in k.split("/")): v for k, v in params.items()}
    linen = {f"resnet/{k}" if k.startswith(("conv_root/", "gn_root/", "block")) else k: v for k, v in linen.items()}
    if isinstance(cfg, ViTConfig):
        module = BigVisionViT(cfg) if cfg.layout == "big_vision" else VisionTransformer(cfg)
    else:
        module = MlpMixer(cfg)
    x = images.astype(np.float32) / 127.5 - 1.0
    return np.asarray(module.apply({"params": unflatten(linen)}, x))
