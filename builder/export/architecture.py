"""Model configurations, the published parameter layout they imply, and inference.

A configuration fully determines every tensor name and shape of a checkpoint in the
google-research/vision_transformer ``.npz`` layout (pre-Linen numbering, which the
published files use). :func:`infer_config` goes the other way, from a file's names
and shapes to a configuration, so a user can pass just the file; the result is then
checked tensor by tensor against :func:`param_shapes`, which is what turns a
damaged or foreign file into a message naming the key and shape at fault.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Literal

from builder.errors import CheckpointError

Shape = tuple[int, ...]

# name -> (hidden, mlp, heads, layers) of the original configs.py
VIT_SIZES: dict[str, tuple[int, int, int, int]] = {
    "Ti": (192, 768, 3, 12),
    "S": (384, 1536, 6, 12),
    "B": (768, 3072, 12, 12),
    "L": (1024, 4096, 16, 24),
    "H": (1280, 5120, 16, 32),
}
# name -> (hidden, tokens_mlp, channels_mlp, blocks)
MIXER_SIZES: dict[str, tuple[int, int, int, int]] = {
    "S": (512, 256, 2048, 8),
    "B": (768, 384, 3072, 12),
    "L": (1024, 512, 4096, 24),
}


@dataclass(frozen=True)
class ViTConfig:
    patch_size: int
    hidden_size: int
    mlp_dim: int
    num_heads: int
    num_layers: int
    num_classes: int
    image_size: int
    classifier: Literal["token", "gap"] = "token"
    representation_size: int | None = None
    family: Literal["vit"] = "vit"

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid**2 + (1 if self.classifier == "token" else 0)

    @property
    def name(self) -> str:
        size = (self.hidden_size, self.mlp_dim, self.num_heads, self.num_layers)
        label = next((k for k, v in VIT_SIZES.items() if v == size), None)
        base = (
            f"ViT-{label}_{self.patch_size}"
            if label
            else (f"ViT-h{self.hidden_size}-d{self.num_layers}-heads{self.num_heads}_{self.patch_size}")
        )
        return base + ("-gap" if self.classifier == "gap" else "")


@dataclass(frozen=True)
class MixerConfig:
    patch_size: int
    hidden_dim: int
    tokens_mlp_dim: int
    channels_mlp_dim: int
    num_blocks: int
    num_classes: int
    image_size: int
    family: Literal["mixer"] = "mixer"

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid**2

    @property
    def name(self) -> str:
        size = (self.hidden_dim, self.tokens_mlp_dim, self.channels_mlp_dim, self.num_blocks)
        label = next((k for k, v in MIXER_SIZES.items() if v == size), None)
        return (
            f"Mixer-{label}_{self.patch_size}"
            if label
            else f"Mixer-h{self.hidden_dim}-d{self.num_blocks}_{self.patch_size}"
        )


ModelConfig = ViTConfig | MixerConfig


def config_to_dict(cfg: ModelConfig) -> dict:
    return {"name": cfg.name, **asdict(cfg)}


def _dense(prefix: str, din: int, dout: int) -> dict[str, Shape]:
    return {f"{prefix}/kernel": (din, dout), f"{prefix}/bias": (dout,)}


def _norm(prefix: str, dim: int) -> dict[str, Shape]:
    return {f"{prefix}/scale": (dim,), f"{prefix}/bias": (dim,)}


def _conv(prefix: str, patch: int, dim: int) -> dict[str, Shape]:
    return {f"{prefix}/kernel": (patch, patch, 3, dim), f"{prefix}/bias": (dim,)}


def _mlp(prefix: str, dim: int, hidden: int) -> dict[str, Shape]:
    return {**_dense(f"{prefix}/Dense_0", dim, hidden), **_dense(f"{prefix}/Dense_1", hidden, dim)}


def param_shapes(cfg: ModelConfig) -> dict[str, Shape]:
    """Every tensor of ``cfg`` in the published layout, name -> shape."""
    shapes: dict[str, Shape] = {}
    if isinstance(cfg, ViTConfig):
        d, heads = cfg.hidden_size, cfg.num_heads
        shapes |= _conv("embedding", cfg.patch_size, d)
        if cfg.classifier == "token":
            shapes["cls"] = (1, 1, d)
        shapes["Transformer/posembed_input/pos_embedding"] = (1, cfg.num_tokens, d)
        for i in range(cfg.num_layers):
            block = f"Transformer/encoderblock_{i}"
            attn = f"{block}/MultiHeadDotProductAttention_1"
            shapes |= _norm(f"{block}/LayerNorm_0", d)
            for proj in ("query", "key", "value"):
                shapes[f"{attn}/{proj}/kernel"] = (d, heads, d // heads)
                shapes[f"{attn}/{proj}/bias"] = (heads, d // heads)
            shapes[f"{attn}/out/kernel"] = (heads, d // heads, d)
            shapes[f"{attn}/out/bias"] = (d,)
            shapes |= _norm(f"{block}/LayerNorm_2", d)
            shapes |= _mlp(f"{block}/MlpBlock_3", d, cfg.mlp_dim)
        shapes |= _norm("Transformer/encoder_norm", d)
        if cfg.representation_size:
            shapes |= _dense("pre_logits", d, cfg.representation_size)
        shapes |= _dense("head", cfg.representation_size or d, cfg.num_classes)
    else:
        d = cfg.hidden_dim
        shapes |= _conv("stem", cfg.patch_size, d)
        for i in range(cfg.num_blocks):
            block = f"MixerBlock_{i}"
            shapes |= _norm(f"{block}/LayerNorm_0", d)
            shapes |= _mlp(f"{block}/token_mixing", cfg.num_tokens, cfg.tokens_mlp_dim)
            shapes |= _norm(f"{block}/LayerNorm_1", d)
            shapes |= _mlp(f"{block}/channel_mixing", d, cfg.channels_mlp_dim)
        shapes |= _norm("pre_head_layer_norm", d)
        shapes |= _dense("head", d, cfg.num_classes)
    return shapes


_NAME = re.compile(r"^(?:(?P<fam>ViT|Mixer)-)?(?P<size>Ti|S|B|L|H)[_/](?P<patch>\d+)(?P<gap>-gap)?(?:-\w+)*$")


def parse_model_name(name: str) -> tuple[str, str, int, bool]:
    """'ViT-B_16' / 'B_16' / 'Mixer-L_16' / 'ViT-B_16-gap-norep' -> (family, size, patch, gap)."""
    if name.startswith(("R50+", "R26+", "R+")):
        raise CheckpointError(f"--model {name}: hybrid ResNet+ViT models are not supported yet")
    match = _NAME.match(name)
    family = (match.group("fam") or "ViT").lower() if match else None
    sizes = VIT_SIZES if family == "vit" else MIXER_SIZES
    if not match or match.group("size") not in sizes:
        vit = ", ".join(f"ViT-{s}_16" for s in VIT_SIZES)
        mixer = ", ".join(f"Mixer-{s}_16" for s in MIXER_SIZES)
        raise CheckpointError(
            f"--model {name!r} is not a known model name; use one like {vit}, {mixer} (any patch size)"
        )
    return family, match.group("size"), int(match.group("patch")), bool(match.group("gap"))


def _require(shapes: Mapping[str, Shape], key: str, rank: int) -> Shape:
    if key not in shapes:
        raise CheckpointError(f"missing key {key!r}")
    shape = shapes[key]
    if len(shape) != rank:
        raise CheckpointError(f"{key} has shape {list(shape)}, expected a rank-{rank} tensor")
    return shape


def _grid(key: str, shape: Shape, tokens: int) -> int:
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise CheckpointError(f"{key} has shape {list(shape)}: {tokens} patch tokens do not form a square grid")
    return grid


def _count_blocks(shapes: Mapping[str, Shape], pattern: str) -> int:
    indices = {int(m.group(1)) for key in shapes if (m := re.match(pattern, key))}
    return max(indices) + 1 if indices else 0


def _detect_family(shapes: Mapping[str, Shape]) -> str:
    groups = sorted({key.split("/")[0] for key in shapes})
    resnet = [k for k in shapes if k.startswith(("conv_root/", "gn_root/")) or re.match(r"block\d+/unit\d+/", k)]
    if resnet:
        raise CheckpointError(
            f"hybrid ResNet+ViT checkpoint (found {len(resnet)} ResNet tensors such as "
            f"{resnet[0]} {list(shapes[resnet[0]])}): hybrid models are not supported yet"
        )
    if "embedding/kernel" in shapes and any(k.startswith("Transformer/") for k in shapes):
        return "vit"
    if "stem/kernel" in shapes and any(k.startswith("MixerBlock_") for k in shapes):
        return "mixer"
    raise CheckpointError(
        f"unsupported model family: top-level groups {groups[:12]}; expected a ViT "
        "(embedding, Transformer/encoderblock_*) or an MLP-Mixer (stem, MixerBlock_*)"
    )


def _infer_vit(
    shapes: Mapping[str, Shape], sizes: tuple[int, int, int, int] | None, patch: int | None, gap: bool
) -> ViTConfig:
    p, _, _, hidden = _require(shapes, "embedding/kernel", 4)
    block0 = "Transformer/encoderblock_0/"
    if sizes is None:
        _, heads, _ = _require(shapes, block0 + "MultiHeadDotProductAttention_1/query/kernel", 3)
        _, mlp = _require(shapes, block0 + "MlpBlock_3/Dense_0/kernel", 2)
        layers = _count_blocks(shapes, r"Transformer/encoderblock_(\d+)/")
    else:
        hidden, mlp, heads, layers = sizes
    classifier = "gap" if gap or "cls" not in shapes else "token"
    representation = _require(shapes, "pre_logits/kernel", 2)[1] if "pre_logits/kernel" in shapes else None
    classes = _require(shapes, "head/kernel", 2)[1]
    posemb_key = "Transformer/posembed_input/pos_embedding"
    posemb = _require(shapes, posemb_key, 3)
    grid = _grid(posemb_key, posemb, posemb[1] - (1 if classifier == "token" else 0))
    patch = patch or p
    return ViTConfig(patch, hidden, mlp, heads, layers, classes, grid * patch, classifier, representation)


def _infer_mixer(
    shapes: Mapping[str, Shape], sizes: tuple[int, int, int, int] | None, patch: int | None
) -> MixerConfig:
    p, _, _, hidden = _require(shapes, "stem/kernel", 4)
    key = "MixerBlock_0/token_mixing/Dense_0/kernel"
    tokens, tokens_mlp = _require(shapes, key, 2)
    grid = _grid(key, shapes[key], tokens)
    if sizes is None:
        channels_mlp = _require(shapes, "MixerBlock_0/channel_mixing/Dense_0/kernel", 2)[1]
        blocks = _count_blocks(shapes, r"MixerBlock_(\d+)/")
    else:
        hidden, tokens_mlp, channels_mlp, blocks = sizes
    classes = _require(shapes, "head/kernel", 2)[1]
    patch = patch or p
    return MixerConfig(patch, hidden, tokens_mlp, channels_mlp, blocks, classes, grid * patch)


def check_shapes(shapes: Mapping[str, Shape], cfg: ModelConfig, limit: int = 12) -> None:
    """Raise a :class:`CheckpointError` listing every missing, extra or misshapen tensor."""
    expected = param_shapes(cfg)
    problems = [f"missing key {k} (expected shape {list(s)})" for k, s in expected.items() if k not in shapes]
    problems += [f"unexpected key {k} with shape {list(s)}" for k, s in shapes.items() if k not in expected]
    problems += [
        f"{k} has shape {list(shapes[k])}, expected {list(s)}"
        for k, s in expected.items()
        if k in shapes and tuple(shapes[k]) != s
    ]
    if problems:
        more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
        raise CheckpointError(
            f"checkpoint does not match {cfg.name} ({describe(cfg)}):\n  " + "\n  ".join(problems[:limit]) + more
        )


def infer_config(shapes: Mapping[str, Shape], model: str | None = None) -> ModelConfig:
    """The configuration of a checkpoint given its (canonical) names and shapes.

    With ``model`` (e.g. ``ViT-B_16``) the architecture is taken from the name and
    the file is checked against it; class count, resolution, classifier token and
    pre-logits still come from the file, as they vary between files of one name.
    """
    family = _detect_family(shapes)
    sizes, patch, gap = None, None, False
    if model is not None:
        named_family, size, patch, gap = parse_model_name(model)
        if named_family != family:
            raise CheckpointError(f"--model {model} names a {named_family} but the checkpoint holds a {family}")
        sizes = (VIT_SIZES if family == "vit" else MIXER_SIZES)[size]
    cfg = _infer_vit(shapes, sizes, patch, gap) if family == "vit" else _infer_mixer(shapes, sizes, patch)
    check_shapes(shapes, cfg)
    return cfg


def describe(cfg: ModelConfig) -> str:
    """One line for people: what was found in the file."""
    if isinstance(cfg, ViTConfig):
        extra = f", pre_logits {cfg.representation_size}" if cfg.representation_size else ""
        return (
            f"ViT hidden {cfg.hidden_size}, mlp {cfg.mlp_dim}, {cfg.num_heads} heads, {cfg.num_layers} layers, "
            f"patch {cfg.patch_size}, {cfg.classifier} classifier{extra}, "
            f"{cfg.num_classes} classes at {cfg.image_size}px"
        )
    return (
        f"Mixer hidden {cfg.hidden_dim}, tokens-mlp {cfg.tokens_mlp_dim}, channels-mlp {cfg.channels_mlp_dim}, "
        f"{cfg.num_blocks} blocks, patch {cfg.patch_size}, {cfg.num_classes} classes at {cfg.image_size}px"
    )


def with_image_size(cfg: ModelConfig, image_size: int) -> ModelConfig:
    return replace(cfg, image_size=image_size)
