"""Demo checkpoints given the outlier channels of real pretrained ViTs, by an exact FP32 identity.

Pretrained ViTs carry a few hidden channels whose LayerNorm outputs span tens to hundreds
of times the range of the others (FQ-ViT, RepQ-ViT, SmoothQuant, "Massive Activations").
The demo models, trained briefly on digits, have none. This module moves the same property
into them without changing what they compute: for each chosen channel ``c`` of every
pre-attention and pre-MLP LayerNorm (ViT) or pre-channel-mixing LayerNorm (Mixer), the
LayerNorm's scale and bias are multiplied by ``k`` and row ``c`` of every Dense kernel that
reads that output is divided by ``k``. With ``k`` a power of two both operations are exact
in floating point, so the FP32 logits stay as they were (up to the summation order of the
runtime) while per-tensor activation quantization sees a range ``k`` times wider.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from builder.export.checkpoint import read_checkpoint, save_checkpoint

# The channels made into outliers: a fixed few, as in real models (the same dims in every block).
OUTLIER_CHANNELS = (3, 17, 42)
# LayerNorm -> the Dense kernels that read it, in the published layout (pre-Linen numbering).
_VIT_READERS = {
    "LayerNorm_0": (
        "MultiHeadDotProductAttention_1/query",
        "MultiHeadDotProductAttention_1/key",
        "MultiHeadDotProductAttention_1/value",
    ),
    "LayerNorm_2": ("MlpBlock_3/Dense_0",),
}
_MIXER_READERS = {"LayerNorm_1": ("channel_mixing/Dense_0",)}


def with_outlier_channels(
    params: Mapping[str, np.ndarray], strength: int, channels: tuple[int, ...] = OUTLIER_CHANNELS
) -> dict[str, np.ndarray]:
    """A copy of published-layout ``params`` whose ``channels`` are ``strength`` times wider.

    ``strength`` must be a power of two, which keeps the transformation exact.
    """
    if strength < 1 or strength & (strength - 1):
        raise ValueError(f"strength must be a power of two (exact in floating point), got {strength}")
    out = {k: np.array(v, np.float32) for k, v in params.items()}
    blocks = sorted({m.group(1) for k in out if (m := re.match(r"(.*(?:encoderblock|MixerBlock)_\d+)/", k))})
    if not blocks:
        raise ValueError("no ViT encoder or Mixer blocks in these parameters")
    readers = _VIT_READERS if "encoderblock" in blocks[0] else _MIXER_READERS
    idx = list(channels)
    for block in blocks:
        for norm, denses in readers.items():
            out[f"{block}/{norm}/scale"][idx] *= strength
            out[f"{block}/{norm}/bias"][idx] *= strength
            for dense in denses:
                out[f"{block}/{dense}/kernel"][idx] /= strength  # rows: the input features
    return out


def write_outlier_checkpoint(source: Path, strength: int, out: Path) -> Path:
    """``source`` with outlier channels of ``strength``, saved in the published layout at ``out``."""
    checkpoint = read_checkpoint(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, with_outlier_channels(checkpoint.params, strength))
    return out
