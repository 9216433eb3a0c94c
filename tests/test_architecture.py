"""Architecture inference from names and shapes, for every configuration of the original repository.

Full-size models are checked through their shapes alone (a ViT-H file is 2.5 GB);
real exports of each structural variant are in test_export.py.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from builder.errors import CheckpointError
from builder.export.architecture import (
    MIXER_SIZES,
    VIT_SIZES,
    MixerConfig,
    ModelConfig,
    ViTConfig,
    infer_config,
    param_shapes,
    parse_model_name,
)


def vit(size: str, patch: int, **kw) -> ViTConfig:
    hidden, mlp, heads, layers = VIT_SIZES[size]
    return ViTConfig(patch, hidden, mlp, heads, layers, kw.pop("num_classes", 1000), kw.pop("image_size", 224), **kw)


def mixer(size: str, patch: int, **kw) -> MixerConfig:
    hidden, tokens, channels, blocks = MIXER_SIZES[size]
    return MixerConfig(patch, hidden, tokens, channels, blocks, kw.pop("num_classes", 1000), kw.pop("image_size", 224))


ORIGINAL_VITS = ["Ti_16", "S_16", "S_32", "B_8", "B_16", "B_32", "L_16", "L_32", "H_14"]
CONFIGS: list[ModelConfig] = []
for name, classifier, representation, size in itertools.product(
    ORIGINAL_VITS, ["token", "gap"], [None, "hidden"], [224, 384]
):
    s, patch = name.split("_")
    base = vit(s, int(patch), classifier=classifier, image_size=size // int(patch) * int(patch), num_classes=21843)
    CONFIGS.append(dataclasses.replace(base, representation_size=base.hidden_size if representation else None))
CONFIGS += [mixer(s, p, image_size=224) for s, p in itertools.product(MIXER_SIZES, [16, 32])]


@pytest.mark.parametrize(
    "cfg", CONFIGS, ids=lambda c: f"{c.name}-{c.image_size}-{getattr(c, 'representation_size', '')}"
)
def test_inferred_from_shapes(cfg: ModelConfig) -> None:
    assert infer_config(param_shapes(cfg)) == cfg


@pytest.mark.parametrize("cfg", [vit("B", 16), vit("H", 14, classifier="gap"), mixer("L", 16)], ids=lambda c: c.name)
def test_named_model_override_matches(cfg: ModelConfig) -> None:
    assert infer_config(param_shapes(cfg), model=cfg.name) == cfg


def test_named_model_override_reports_every_mismatch() -> None:
    with pytest.raises(CheckpointError) as err:
        infer_config(param_shapes(vit("Ti", 16)), model="ViT-B_16")
    message = str(err.value)
    assert "does not match ViT-B_16" in message
    assert "embedding/kernel has shape [16, 16, 3, 192], expected [16, 16, 3, 768]" in message
    assert "missing key" not in message.split("\n")[0]


def test_named_model_of_other_family() -> None:
    with pytest.raises(CheckpointError, match="names a mixer but the checkpoint holds a vit"):
        infer_config(param_shapes(vit("S", 16)), model="Mixer-B_16")


@pytest.mark.parametrize(
    "name, expected",
    [
        ("ViT-B_16", ("vit", "B", 16, False)),
        ("B_16", ("vit", "B", 16, False)),
        ("ViT-B_16-gap-norep", ("vit", "B", 16, True)),
        ("Mixer-L_16", ("mixer", "L", 16, False)),
        ("ViT-H/14", ("vit", "H", 14, False)),
    ],
)
def test_parse_model_name(name: str, expected: tuple) -> None:
    assert parse_model_name(name) == expected


@pytest.mark.parametrize(
    "name, message",
    [
        ("ResNet50", "not a known model name"),
        ("Mixer-Ti_16", "not a known model name"),
        ("R50+ViT-B_16", "hybrid ResNet\\+ViT models are not supported"),
    ],
)
def test_bad_model_names(name: str, message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        parse_model_name(name)


def test_hybrid_checkpoint_is_named() -> None:
    shapes = param_shapes(vit("B", 16)) | {
        "conv_root/kernel": (7, 7, 3, 64),
        "block1/unit1/conv1/kernel": (1, 1, 64, 64),
    }
    with pytest.raises(CheckpointError, match=r"hybrid ResNet\+ViT checkpoint \(found 2 ResNet tensors"):
        infer_config(shapes)


def test_unknown_family_lists_groups() -> None:
    with pytest.raises(CheckpointError, match=r"unsupported model family: top-level groups \['conv1', 'fc'\]"):
        infer_config({"conv1/kernel": (7, 7, 3, 64), "fc/kernel": (2048, 1000)})


def test_non_square_token_grid() -> None:
    shapes = param_shapes(vit("Ti", 16)) | {"Transformer/posembed_input/pos_embedding": (1, 190, 192)}
    with pytest.raises(CheckpointError, match=r"pos_embedding has shape \[1, 190, 192\]: 189 patch tokens"):
        infer_config(shapes)


def test_missing_block_is_reported_as_missing_keys() -> None:
    shapes = {k: s for k, s in param_shapes(vit("Ti", 16)).items() if "encoderblock_5/" not in k}
    with pytest.raises(CheckpointError, match="missing key Transformer/encoderblock_5/LayerNorm_0/scale"):
        infer_config(shapes)
