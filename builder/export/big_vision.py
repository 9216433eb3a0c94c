"""google-research/big_vision checkpoints to the canonical naming the rest of the builder reads.

big_vision's ``.npz`` files keep their parameters under ``params/`` (a two-tower model such as
SigLIP: the image tower under ``params/img/``, beside the text tower and the temperature and
bias, which an image engine does not use). Its ``models/vit.py`` ``load()`` also fixes layouts
of older checkpoints, and so does this module, with the same arithmetic:

- the position embedding inside the encoder (``Transformer/pos_embedding``) moves to the top;
- a position embedding with a row for the class token (older code added it after the
  concatenation) is split: that row is added into ``cls``, which is the same function;
- a MAP head inlined at the top level (``probe``, ``MultiHeadDotProductAttention_0`` ...)
  moves under ``MAPHead_0``;
- encoder blocks stored scanned (``Transformer/encoderblock/...``, one leading axis over the
  layers) are split into ``encoderblock_<i>``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from builder.errors import CheckpointError

PARAMS, IMAGE_TOWER = "params/", "params/img/"
_INLINED_MAP_HEAD = ("probe", "MultiHeadDotProductAttention_0", "LayerNorm_0", "MlpBlock_0")
_SCANNED = re.compile(r"^Transformer/encoderblock/(.+)$")


@dataclass
class Layout:
    """What the file was found to hold beyond the canonical names: for the user, and for inference."""

    image_tower: bool = False  # a two-tower model's image encoder: its output is an embedding
    fixes: list[str] = field(default_factory=list)


def strip_prefix(names: list[str]) -> tuple[dict[str, str], list[str], Layout]:
    """File name -> name without big_vision's ``params/`` (or ``params/img/``) prefix; names left out."""
    layout = Layout()
    if not names or not all(n.startswith(PARAMS) for n in names):
        return {n: n for n in names}, [], layout
    prefix = PARAMS
    if any(n.startswith(IMAGE_TOWER) for n in names):
        prefix, layout.image_tower = IMAGE_TOWER, True
    kept = {n: n.removeprefix(prefix) for n in names if n.startswith(prefix)}
    return kept, [n for n in names if n not in kept], layout


def _square(rows: int) -> bool:
    return math.isqrt(rows) ** 2 == rows


def fix_old_layouts(params: dict[str, np.ndarray], layout: Layout) -> dict[str, np.ndarray]:
    """The fixes of big_vision's ``fix_old_checkpoints`` and ``scan_to_pyloop`` (module docstring)."""
    params = dict(params)
    if "Transformer/pos_embedding" in params:
        params["pos_embedding"] = params.pop("Transformer/pos_embedding")
        layout.fixes.append("position embedding moved out of the encoder")
    posemb = params.get("pos_embedding")
    if posemb is not None and posemb.ndim == 3 and "cls" in params:
        rows = posemb.shape[1]
        if not _square(rows) and _square(rows - 1):
            params["cls"] = params["cls"] + posemb[:, :1]
            params["pos_embedding"] = posemb[:, 1:]
            layout.fixes.append("class token's position embedding added into cls")
    if f"{_INLINED_MAP_HEAD[0]}" in params:
        for key in [k for k in params if k.split("/")[0] in _INLINED_MAP_HEAD]:
            params[f"MAPHead_0/{key}"] = params.pop(key)
        layout.fixes.append("inlined MAP head moved under MAPHead_0")
    scanned = {k: m.group(1) for k in params if (m := _SCANNED.match(k))}
    if scanned:
        depths = {params[k].shape[0] if params[k].ndim else 0 for k in scanned}
        if len(depths) != 1 or 0 in depths:
            raise CheckpointError(
                f"scanned encoder blocks (Transformer/encoderblock/...) disagree on the layer count: {sorted(depths)}"
            )
        for key, rest in scanned.items():
            stacked = params.pop(key)
            for i in range(stacked.shape[0]):
                params[f"Transformer/encoderblock_{i}/{rest}"] = stacked[i]
        layout.fixes.append(f"{depths.pop()} scanned encoder blocks split")
    return params
