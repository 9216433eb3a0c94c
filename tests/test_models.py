"""The builder's JAX forward pass equals the original flax.linen models on the same weights."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from builder.export.architecture import ModelConfig
from builder.export.models import init_params, jax_forward, prepared_params
from builder.export.verify import sample_images

from conftest import SMALL_MIXER, SMALL_VIT
from reference_models import reference_logits

VARIANTS = {
    "vit-token": SMALL_VIT,
    "vit-gap": dataclasses.replace(SMALL_VIT, classifier="gap"),
    "vit-pre_logits": dataclasses.replace(SMALL_VIT, representation_size=24),
    "vit-patch8": dataclasses.replace(SMALL_VIT, patch_size=8, image_size=32),
    "vit-patch14": dataclasses.replace(SMALL_VIT, patch_size=14, image_size=42),
    "vit-patch32": dataclasses.replace(SMALL_VIT, patch_size=32, image_size=64),
    "mixer": SMALL_MIXER,
}


@pytest.mark.parametrize("cfg", VARIANTS.values(), ids=VARIANTS.keys())
def test_forward_matches_linen_reference(cfg: ModelConfig) -> None:
    params = init_params(cfg, seed=3)
    images = sample_images(4, cfg.image_size, seed=1)
    ours = jax_forward(cfg, prepared_params(cfg, params))(images)
    reference = reference_logits(cfg, params, images)
    assert ours.shape == (4, cfg.num_classes)
    np.testing.assert_allclose(ours, reference, atol=1e-4 * max(1.0, np.abs(reference).max()))
