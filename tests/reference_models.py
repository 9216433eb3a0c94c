"""An independent reference: the original google-research/vision_transformer models in flax.linen.

Written after ``vit_jax/models_vit.py`` and ``models_mixer.py`` (inference path,
dropout omitted), using flax.linen's own Conv, LayerNorm, MultiHeadDotProductAttention
and gelu, so the builder's hand-written forward pass is checked against the library
the checkpoints were trained with rather than against itself.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from builder.export.architecture import MixerConfig, ModelConfig, ViTConfig
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

    @nn.compact
    def __call__(self, x):
        x = AddPositionEmbs(name="posembed_input")(x)
        for i in range(self.num_layers):
            x = Encoder1DBlock(self.mlp_dim, self.num_heads, name=f"encoderblock_{i}")(x)
        return nn.LayerNorm(name="encoder_norm")(x)


class VisionTransformer(nn.Module):
    cfg: ViTConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        p = (c.patch_size, c.patch_size)
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
        return nn.Dense(c.num_classes, name="head")(x)


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
    """Logits of the linen reference for uint8 images (scaled as the original input pipeline does)."""
    linen = {"/".join(PUBLISHED_TO_LINEN.get(part, part) for part in k.split("/")): v for k, v in params.items()}
    module = VisionTransformer(cfg) if isinstance(cfg, ViTConfig) else MlpMixer(cfg)
    x = images.astype(np.float32) / 127.5 - 1.0
    return np.asarray(module.apply({"params": unflatten(linen)}, x))
