"""Changing a model's input resolution, as the original fine-tuning code does (both repositories zoom the
learned grid bilinearly; a sincos2d embedding is computed for the new grid)."""

from __future__ import annotations

import numpy as np
import scipy.ndimage

from builder.errors import ResolutionError
from builder.export.architecture import (
    BIG_VISION_POSEMB,
    VIT_POSEMB,
    MixerConfig,
    ModelConfig,
    ViTConfig,
    with_image_size,
)

POSEMB = VIT_POSEMB


def resize_posemb(posemb: np.ndarray, new_grid: int, has_class_token: bool) -> np.ndarray:
    """vision_transformer's ``resize_posemb``: keep the class-token row, zoom the grid bilinearly."""
    start = 1 if has_class_token else 0
    tok, grid = posemb[:, :start], posemb[0, start:]
    old_grid = int(np.sqrt(len(grid)))
    grid = grid.reshape(old_grid, old_grid, -1)
    zoom = (new_grid / old_grid, new_grid / old_grid, 1)
    grid = scipy.ndimage.zoom(grid, zoom, order=1).reshape(1, new_grid * new_grid, -1)
    return np.concatenate([tok, grid], axis=1).astype(posemb.dtype)


def at_resolution(
    cfg: ModelConfig, params: dict[str, np.ndarray], image_size: int
) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Config and params for ``image_size``; raises :class:`ResolutionError` when impossible."""
    if image_size == cfg.image_size:
        return cfg, params
    if image_size <= 0 or image_size % cfg.pixels_per_patch:
        raise ResolutionError(
            f"resolution {image_size} is not a positive multiple of the patch size {cfg.pixels_per_patch}"
        )
    if isinstance(cfg, MixerConfig):
        raise ResolutionError(
            f"{cfg.name} cannot change resolution: its token-mixing weights are tied to {cfg.num_tokens} tokens "
            f"({cfg.grid}x{cfg.grid} patches at {cfg.image_size}px); export it at {cfg.image_size}"
        )
    assert isinstance(cfg, ViTConfig)
    new = with_image_size(cfg, image_size)
    if cfg.posemb == "sincos2d":  # computed for the new grid at export
        return new, params
    if cfg.layout == "big_vision":  # big_vision's resample_posemb: the same zoom, no class-token row
        return new, {**params, BIG_VISION_POSEMB: resize_posemb(params[BIG_VISION_POSEMB], new.grid, False)}
    posemb = resize_posemb(params[POSEMB], new.grid, cfg.classifier == "token")
    return new, {**params, POSEMB: posemb}
