"""Architecture inference from names and shapes, for every configuration of the original repository.

Full-size models are checked through their shapes alone (a ViT-H file is 2.5 GB);
real exports of each structural variant are in test_export.py.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from builder.errors import CheckpointError
from builder.export.architecture import HYBRIDS as PUBLISHED_HYBRIDS
from builder.export.architecture import (
    MIXER_SIZES,
    VIT_SIZES,
    MixerConfig,
    ModelConfig,
    ModelName,
    ResNetConfig,
    ViTConfig,
    infer_config,
    param_shapes,
    parse_model_name,
    published_config,
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
HYBRIDS = {name: published_config(name) for name in PUBLISHED_HYBRIDS}
# big_vision B/16 in its pooling forms, learned and sincos2d, headless, and SigLIP So400m/14's shape
BIG_VISION = [
    vit("B", 16, layout="big_vision", classifier=pool, posemb=posemb)
    for pool, posemb in itertools.product(["gap", "map", "token"], ["learn", "sincos2d"])
]
BIG_VISION += [
    vit("B", 16, layout="big_vision", classifier="map", num_classes=0, output="embeddings"),
    vit("B", 16, layout="big_vision", classifier="gap", representation_size=768, image_size=384),
    ViTConfig(14, 1152, 4304, 16, 27, 0, 224, "map", layout="big_vision", output="embeddings"),
]
CONFIGS += BIG_VISION
CONFIGS.append(ViTConfig(16, 10, 10, 2, 1, 1000, 224))  # vit_jax's "testing" configuration
CONFIGS += [*HYBRIDS.values(), vit("B", 1, image_size=384, resnet=ResNetConfig((3, 4, 9), 2.0))]


@pytest.mark.parametrize(
    "cfg", CONFIGS, ids=lambda c: f"{c.name}-{c.image_size}-{getattr(c, 'representation_size', '')}"
)
def test_inferred_from_shapes(cfg: ModelConfig) -> None:
    assert infer_config(param_shapes(cfg)) == cfg


@pytest.mark.parametrize("cfg", [vit("B", 16), vit("H", 14, classifier="gap"), mixer("L", 16)], ids=lambda c: c.name)
def test_named_model_override_matches(cfg: ModelConfig) -> None:
    assert infer_config(param_shapes(cfg), model=cfg.name) == cfg


@pytest.mark.parametrize("published", HYBRIDS)
def test_hybrids_by_their_published_names(published: str) -> None:
    cfg = HYBRIDS[published]
    assert infer_config(param_shapes(cfg), model=published) == cfg
    assert cfg.grid == 224 // 32 if published.startswith(("R+", "R26", "R50+ViT-L")) else cfg.grid == 14


def test_a_hybrid_name_is_checked_against_the_file() -> None:
    r50 = param_shapes(HYBRIDS["R50+ViT-B_16"])
    with pytest.raises(CheckpointError, match=r"names a ResNet-26; the checkpoint holds ResNet-50 stages of 3\+4\+9"):
        infer_config(r50, model="R26+ViT-B_16")
    with pytest.raises(CheckpointError, match="names a plain ViT; the checkpoint holds a hybrid"):
        infer_config(r50, model="ViT-B_16")
    with pytest.raises(CheckpointError, match="names a hybrid; the checkpoint holds a plain ViT"):
        infer_config(param_shapes(vit("B", 16)), model="R50+ViT-B_16")


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
        ("ViT-B_16", ModelName("vit", "B", 16, False)),
        ("B_16", ModelName("vit", "B", 16, False)),
        ("ViT-B_16-gap-norep", ModelName("vit", "B", 16, True)),
        ("Mixer-L_16", ModelName("mixer", "L", 16, False)),
        ("ViT-H/14", ModelName("vit", "H", 14, False)),
        ("R50+ViT-B_16", ModelName("vit", "B", 16, False, 50)),
        ("R+ViT-Ti_16", ModelName("vit", "Ti", 16, False, 0)),
    ],
)
def test_parse_model_name(name: str, expected: ModelName) -> None:
    assert parse_model_name(name) == expected


@pytest.mark.parametrize(
    "name, message",
    [
        ("ResNet50", "not a known model name"),
        ("Mixer-Ti_16", "not a known model name"),
        ("R50+Mixer-B_16", "not a known model name"),
    ],
)
def test_bad_model_names(name: str, message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        parse_model_name(name)


def test_a_hybrid_missing_a_unit_names_it() -> None:
    shapes = {k: v for k, v in param_shapes(HYBRIDS["R50+ViT-B_16"]).items() if not k.startswith("block3/unit5/")}
    with pytest.raises(
        CheckpointError, match=r"match R50\+ViT-B_16 \(vision_transformer layout: ResNet-50 stages of 3\+4\+9 units"
    ) as err:
        infer_config(shapes)
    assert "missing key block3/unit5/conv1/kernel (expected shape [1, 1, 1024, 256])" in str(err.value)


def test_resnet_tensors_without_a_vit_are_named() -> None:
    with pytest.raises(CheckpointError, match="ResNet tensors such as conv_root/kernel, but no ViT after them"):
        infer_config({"conv_root/kernel": (7, 7, 3, 64), "block1/unit1/conv1/kernel": (1, 1, 64, 64)})


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
