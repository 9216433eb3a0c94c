"""Model configurations, the published parameter layouts they imply, and inference.

A configuration fully determines every tensor name and shape of a checkpoint in the
google-research/vision_transformer ``.npz`` layout (pre-Linen numbering, which the
published files use), hybrids' ResNetV2 root and stages (``vit_jax/models_resnet.py``)
included, or in google-research/big_vision's ``models/vit.py`` layout (``layout="big_vision"``:
the position embedding at the top level and added before the class token, learned or
``sincos2d``, ``gap``/``map``/``token``/``0`` pooling, an optional head).
:func:`infer_config` goes the other way, from a file's names and shapes to a
configuration, so a user can pass just the file; the result is then checked tensor by
tensor against :func:`param_shapes`, which is what turns a damaged or foreign file into
a message naming the key and shape at fault.
"""

from __future__ import annotations

import json
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
# vit_jax/configs/models.py's hybrids: name -> (ViT size, patch on the feature map, units per ResNet stage)
HYBRIDS: dict[str, tuple[str, int, tuple[int, ...]]] = {
    "R+ViT-Ti_16": ("Ti", 8, ()),
    "R50+ViT-B_16": ("B", 1, (3, 4, 9)),
    "R26+ViT-B_32": ("B", 1, (2, 2, 2, 2)),
    "R26+ViT-S_32": ("S", 1, (2, 2, 2, 2)),
    "R50+ViT-L_32": ("L", 1, (3, 4, 6, 3)),
}
# name -> (hidden, tokens_mlp, channels_mlp, blocks)
MIXER_SIZES: dict[str, tuple[int, int, int, int]] = {
    "S": (512, 256, 2048, 8),
    "B": (768, 384, 3072, 12),
    "L": (1024, 512, 4096, 24),
}


@dataclass(frozen=True)
class ResNetConfig:
    """A hybrid's ResNetV2 before the patch embedding: a 7x7/2 root convolution and a 3x3/2 max pool,
    then bottleneck stages of ``num_layers`` units (``()``: the root alone); the first stage keeps the
    resolution, each later one halves it."""

    num_layers: tuple[int, ...]
    width_factor: float = 1.0

    @property
    def width(self) -> int:
        return int(64 * self.width_factor)

    @property
    def stride(self) -> int:
        """Image pixels per feature-map pixel: 4 from the root, 2 per stage after the first."""
        return int(4 * 2 ** max(len(self.num_layers) - 1, 0))

    @property
    def depth(self) -> int:
        """The layer count its name carries (R50, R26): three convolutions per unit, the root and the head."""
        return 3 * sum(self.num_layers) + 2

    @property
    def channels(self) -> int:
        """Channels of the feature map the patch embedding reads."""
        return self.width * 2 ** (len(self.num_layers) - 1) * 4 if self.num_layers else self.width


@dataclass(frozen=True)
class ViTConfig:
    patch_size: int
    hidden_size: int
    mlp_dim: int
    num_heads: int
    num_layers: int
    num_classes: int
    image_size: int
    classifier: Literal["token", "gap", "map", "0"] = "token"  # big_vision's pool_type ("tok" is "token")
    representation_size: int | None = None
    resnet: ResNetConfig | None = None  # a hybrid's ResNet before the patch embedding
    layout: Literal["vision_transformer", "big_vision"] = "vision_transformer"
    posemb: Literal["learn", "sincos2d"] = "learn"  # big_vision's sincos2d has no parameter
    output: Literal["logits", "embeddings"] = "logits"  # embeddings: headless, or a two-tower image encoder
    family: Literal["vit"] = "vit"

    @property
    def out_dim(self) -> int:
        """Width of the output: classes, or the embedding of a headless model."""
        return self.num_classes or self.representation_size or self.hidden_size

    @property
    def pixels_per_patch(self) -> int:
        """Image pixels per token side: the patch on the ResNet's feature map of a hybrid."""
        return self.patch_size * (self.resnet.stride if self.resnet else 1)

    @property
    def grid(self) -> int:
        return self.image_size // self.pixels_per_patch

    @property
    def num_tokens(self) -> int:
        """Rows of the position embedding: vision_transformer's has one for the class token too."""
        token = self.classifier == "token" and self.layout == "vision_transformer"
        return self.grid**2 + (1 if token else 0)

    @property
    def name(self) -> str:
        """vit_jax's naming (``ViT-B_16``, ``R50+ViT-B_16``); the number is image pixels per patch. Its
        root-only ``R+ViT-Ti_16`` downsamples 4x before 8x8 patches, so it is named ``R+ViT-Ti_32`` here."""
        size = (self.hidden_size, self.mlp_dim, self.num_heads, self.num_layers)
        label = next((k for k, v in VIT_SIZES.items() if v == size), None)
        patch = self.pixels_per_patch
        base = (
            f"ViT-{label}_{patch}"
            if label
            else f"ViT-h{self.hidden_size}-d{self.num_layers}-heads{self.num_heads}_{patch}"
        )
        hybrid = "" if self.resnet is None else f"R{self.resnet.depth}+" if self.resnet.num_layers else "R+"
        if self.layout == "vision_transformer":
            return hybrid + base + ("-gap" if self.classifier == "gap" else "")
        suffix = f"-{'tok' if self.classifier == 'token' else self.classifier}" + (
            "-sincos2d" if self.posemb == "sincos2d" else ""
        )
        return hybrid + base + suffix + ("-embeddings" if self.output == "embeddings" else "")


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
    def pixels_per_patch(self) -> int:
        return self.patch_size

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
    """The configuration as the export's metadata holds it: JSON's types (a hybrid's stages as a list)."""
    as_json: dict = json.loads(json.dumps({"name": cfg.name, **asdict(cfg)}))
    return as_json


def _dense(prefix: str, din: int, dout: int) -> dict[str, Shape]:
    return {f"{prefix}/kernel": (din, dout), f"{prefix}/bias": (dout,)}


def _norm(prefix: str, dim: int) -> dict[str, Shape]:
    return {f"{prefix}/scale": (dim,), f"{prefix}/bias": (dim,)}


def _conv(prefix: str, patch: int, dim: int, channels: int = 3) -> dict[str, Shape]:
    return {f"{prefix}/kernel": (patch, patch, channels, dim), f"{prefix}/bias": (dim,)}


def resnet_shapes(cfg: ResNetConfig) -> dict[str, Shape]:
    """The root and the bottleneck units of ``models_resnet.py``; a stage's first unit projects its input."""
    width = cfg.width
    shapes = {"conv_root/kernel": (7, 7, 3, width), "gn_root/scale": (width,), "gn_root/bias": (width,)}
    cin = width
    for stage, units in enumerate(cfg.num_layers, 1):
        nout = width * 2 ** (stage - 1)
        for unit in range(1, units + 1):
            prefix = f"block{stage}/unit{unit}"
            if unit == 1:
                shapes |= {f"{prefix}/conv_proj/kernel": (1, 1, cin, 4 * nout)}
                shapes |= _norm(f"{prefix}/gn_proj", 4 * nout)
            for conv, size, c_in, c_out in [(1, 1, cin, nout), (2, 3, nout, nout), (3, 1, nout, 4 * nout)]:
                shapes[f"{prefix}/conv{conv}/kernel"] = (size, size, c_in, c_out)
                shapes |= _norm(f"{prefix}/gn{conv}", c_out)
            cin = 4 * nout
    return shapes


def _mlp(prefix: str, dim: int, hidden: int) -> dict[str, Shape]:
    return {**_dense(f"{prefix}/Dense_0", dim, hidden), **_dense(f"{prefix}/Dense_1", hidden, dim)}


def _attention(prefix: str, dim: int, heads: int) -> dict[str, Shape]:
    shapes: dict[str, Shape] = {}
    for proj in ("query", "key", "value"):
        shapes[f"{prefix}/{proj}/kernel"] = (dim, heads, dim // heads)
        shapes[f"{prefix}/{proj}/bias"] = (heads, dim // heads)
    return shapes | {f"{prefix}/out/kernel": (heads, dim // heads, dim), f"{prefix}/out/bias": (dim,)}


MAP_HEAD = "MAPHead_0"
BIG_VISION_POSEMB = "pos_embedding"


def map_head_shapes(dim: int, heads: int, mlp: int) -> dict[str, Shape]:
    """big_vision's ``MAPHead``: a learned probe attends over the tokens, then a residual MLP."""
    shapes = {f"{MAP_HEAD}/probe": (1, 1, dim)} | _attention(f"{MAP_HEAD}/MultiHeadDotProductAttention_0", dim, heads)
    return shapes | _norm(f"{MAP_HEAD}/LayerNorm_0", dim) | _mlp(f"{MAP_HEAD}/MlpBlock_0", dim, mlp)


def param_shapes(cfg: ModelConfig) -> dict[str, Shape]:
    """Every tensor of ``cfg`` in the published layout, name -> shape."""
    shapes: dict[str, Shape] = {}
    if isinstance(cfg, ViTConfig):
        d, heads = cfg.hidden_size, cfg.num_heads
        if cfg.resnet:
            shapes |= resnet_shapes(cfg.resnet)
        shapes |= _conv("embedding", cfg.patch_size, d, cfg.resnet.channels if cfg.resnet else 3)
        if cfg.classifier == "token":
            shapes["cls"] = (1, 1, d)
        if cfg.layout == "vision_transformer":
            shapes["Transformer/posembed_input/pos_embedding"] = (1, cfg.num_tokens, d)
        elif cfg.posemb == "learn":
            shapes[BIG_VISION_POSEMB] = (1, cfg.num_tokens, d)
        for i in range(cfg.num_layers):
            block = f"Transformer/encoderblock_{i}"
            shapes |= _norm(f"{block}/LayerNorm_0", d)
            shapes |= _attention(f"{block}/MultiHeadDotProductAttention_1", d, heads)
            shapes |= _norm(f"{block}/LayerNorm_2", d)
            shapes |= _mlp(f"{block}/MlpBlock_3", d, cfg.mlp_dim)
        shapes |= _norm("Transformer/encoder_norm", d)
        if cfg.classifier == "map":
            shapes |= map_head_shapes(d, heads, cfg.mlp_dim)
        if cfg.representation_size:
            shapes |= _dense("pre_logits", d, cfg.representation_size)
        if cfg.num_classes:
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


_NAME = re.compile(
    r"^(?:R(?P<depth>\d*)\+)?(?:(?P<fam>ViT|Mixer)-)?(?P<size>Ti|S|B|L|H)[_/](?P<patch>\d+)(?P<gap>-gap)?(?:-\w+)*$"
)


@dataclass(frozen=True)
class ModelName:
    """What a name like ``ViT-B_16``, ``R50+ViT-B_16`` or ``Mixer-L_16`` fixes of a model."""

    family: str
    size: str
    patch: int  # image pixels per patch
    gap: bool
    hybrid: int | None = None  # a hybrid's ResNet depth (50, 26); 0 for the root alone (``R+``)


def parse_model_name(name: str) -> ModelName:
    """'ViT-B_16' / 'B_16' / 'Mixer-L_16' / 'ViT-B_16-gap-norep' / 'R50+ViT-B_16' -> :class:`ModelName`."""
    match = _NAME.match(name)
    family = (match.group("fam") or "ViT").lower() if match else None
    sizes = VIT_SIZES if family == "vit" else MIXER_SIZES
    hybrid = match.group("depth") if match else None
    if not match or match.group("size") not in sizes or (hybrid is not None and family != "vit"):
        vit = ", ".join(f"ViT-{s}_16" for s in VIT_SIZES)
        mixer = ", ".join(f"Mixer-{s}_16" for s in MIXER_SIZES)
        raise CheckpointError(
            f"--model {name!r} is not a known model name; use one like {vit}, {mixer}, R50+ViT-B_16 (any patch size)"
        )
    return ModelName(
        family,
        match.group("size"),
        int(match.group("patch")),
        bool(match.group("gap")),
        None if hybrid is None else int(hybrid or 0),
    )


def published_config(name: str, num_classes: int = 1000, image_size: int = 224) -> ModelConfig:
    """The configuration a vit_jax model name stands for (``ViT-B_16``, ``R50+ViT-B_16``, ``Mixer-L_16``)."""
    if name in HYBRIDS:
        size, patch, units = HYBRIDS[name]
        return ViTConfig(patch, *VIT_SIZES[size], num_classes, image_size, resnet=ResNetConfig(units))
    named = parse_model_name(name)
    if named.hybrid is not None:
        raise CheckpointError(f"{name} is not one of vit_jax's hybrids ({', '.join(HYBRIDS)})")
    if named.family == "mixer":
        return MixerConfig(named.patch, *MIXER_SIZES[named.size], num_classes, image_size)
    return ViTConfig(named.patch, *VIT_SIZES[named.size], num_classes, image_size, "gap" if named.gap else "token")


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


def _resnet_keys(shapes: Mapping[str, Shape]) -> list[str]:
    return [k for k in shapes if k.startswith(("conv_root/", "gn_root/")) or re.match(r"block\d+/unit\d+/", k)]


def _detect_family(shapes: Mapping[str, Shape]) -> str:
    groups = sorted({key.split("/")[0] for key in shapes})
    if "embedding/kernel" in shapes and any(k.startswith("Transformer/") for k in shapes):
        return "vit"
    if "stem/kernel" in shapes and any(k.startswith("MixerBlock_") for k in shapes):
        return "mixer"
    resnet = _resnet_keys(shapes)
    found = f" (ResNet tensors such as {resnet[0]}, but no ViT after them)" if resnet else ""
    raise CheckpointError(
        f"unsupported model family: top-level groups {groups[:12]}{found}; expected a ViT "
        "(embedding, Transformer/encoderblock_*), a hybrid (conv_root, block*/unit*, then a ViT) "
        "or an MLP-Mixer (stem, MixerBlock_*)"
    )


def _infer_resnet(shapes: Mapping[str, Shape]) -> ResNetConfig | None:
    """A hybrid's ResNet from its tensors: width from the root, stages and units from the names."""
    if not _resnet_keys(shapes):
        return None
    width = _require(shapes, "conv_root/kernel", 4)[3]
    # blocks and units count from 1 (block1/unit1), so the highest index is the count
    stages = _count_blocks(shapes, r"block(\d+)/unit\d+/") - 1
    units = tuple(_count_blocks(shapes, rf"block{s}/unit(\d+)/") - 1 for s in range(1, stages + 1))
    if width % 32:
        raise CheckpointError(f"conv_root/kernel has {width} channels; GroupNorm's 32 groups need a multiple of 32")
    return ResNetConfig(units, width / 64)


SINCOS_DEFAULT_SIZE = 224  # a sincos2d file holds no resolution; big_vision's models are mostly trained at 224
VIT_POSEMB = "Transformer/posembed_input/pos_embedding"


def _big_vision_pool(shapes: Mapping[str, Shape], pool: str | None) -> Literal["token", "gap", "map", "0"]:
    """big_vision's pooling: the tensors show a class token or a MAP head; ``gap`` and ``0`` look alike."""
    found: Literal["token", "map"] | None = (
        "token" if "cls" in shapes else "map" if f"{MAP_HEAD}/probe" in shapes else None
    )
    if found and pool not in (None, found):
        raise CheckpointError(
            f"--pool {pool}: the checkpoint's {'cls' if found == 'token' else 'MAP head'} says {found}"
        )
    if found:
        return found
    if pool not in (None, "gap", "0"):
        raise CheckpointError(f"--pool {pool}: the checkpoint has no {'cls' if pool == 'token' else 'MAP head'}")
    return "0" if pool == "0" else "gap"


def _infer_vit(
    shapes: Mapping[str, Shape],
    sizes: tuple[int, int, int, int] | None,
    patch: int | None,
    gap: bool,
    pool: str | None = None,
    image_tower: bool = False,
) -> ViTConfig:
    p, _, _, hidden = _require(shapes, "embedding/kernel", 4)
    block0 = "Transformer/encoderblock_0/"
    if sizes is None:
        _, heads, _ = _require(shapes, block0 + "MultiHeadDotProductAttention_1/query/kernel", 3)
        _, mlp = _require(shapes, block0 + "MlpBlock_3/Dense_0/kernel", 2)
        layers = _count_blocks(shapes, r"Transformer/encoderblock_(\d+)/")
    else:
        hidden, mlp, heads, layers = sizes
    representation = _require(shapes, "pre_logits/kernel", 2)[1] if "pre_logits/kernel" in shapes else None
    classes = _require(shapes, "head/kernel", 2)[1] if "head/kernel" in shapes else 0
    resnet = _infer_resnet(shapes)
    patch = patch if patch and not resnet else p
    stride = patch * (resnet.stride if resnet else 1)
    output: Literal["logits", "embeddings"] = "embeddings" if image_tower or not classes else "logits"
    if VIT_POSEMB in shapes:  # vision_transformer: the class token's row is in the position embedding
        classifier: Literal["token", "gap", "map", "0"] = "gap" if gap or "cls" not in shapes else "token"
        posemb = _require(shapes, VIT_POSEMB, 3)
        grid = _grid(VIT_POSEMB, posemb, posemb[1] - (1 if classifier == "token" else 0))
        return ViTConfig(
            patch, hidden, mlp, heads, layers, classes, grid * stride, classifier, representation, resnet, output=output
        )
    classifier = _big_vision_pool(shapes, pool)
    if BIG_VISION_POSEMB in shapes:
        posemb = _require(shapes, BIG_VISION_POSEMB, 3)
        size, kind = _grid(BIG_VISION_POSEMB, posemb, posemb[1]) * stride, "learn"
    else:
        size, kind = SINCOS_DEFAULT_SIZE // stride * stride, "sincos2d"
    return ViTConfig(
        patch, hidden, mlp, heads, layers, classes, size, classifier, representation, resnet, "big_vision", kind, output
    )


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


def infer_config(
    shapes: Mapping[str, Shape], model: str | None = None, pool: str | None = None, image_tower: bool = False
) -> ModelConfig:
    """The configuration of a checkpoint given its (canonical) names and shapes.

    With ``model`` (e.g. ``ViT-B_16``) the architecture is taken from the name and
    the file is checked against it; class count, resolution, classifier token and
    pre-logits still come from the file, as they vary between files of one name.
    ``pool`` is big_vision's pooling where the file cannot show it; ``image_tower``
    marks a two-tower model's image encoder, whose output is an embedding.
    """
    family = _detect_family(shapes)
    named = parse_model_name(model) if model is not None else None
    sizes = None
    if named is not None:
        if named.family != family:
            raise CheckpointError(f"--model {model} names a {named.family} but the checkpoint holds a {family}")
        sizes = (VIT_SIZES if family == "vit" else MIXER_SIZES)[named.size]
    patch, gap = (named.patch, named.gap) if named else (None, False)
    if family == "vit":
        cfg: ModelConfig = _infer_vit(shapes, sizes, patch, gap, pool, image_tower)
    else:
        cfg = _infer_mixer(shapes, sizes, patch)
    if named is not None and isinstance(cfg, ViTConfig) and (named.hybrid is None) != (cfg.resnet is None):
        found = f"a hybrid ({describe_resnet(cfg.resnet)})" if cfg.resnet else "a plain ViT"
        raise CheckpointError(
            f"--model {model} names a {'plain ViT' if named.hybrid is None else 'hybrid'}; the checkpoint holds {found}"
        )
    if named and named.hybrid and isinstance(cfg, ViTConfig) and cfg.resnet and cfg.resnet.depth != named.hybrid:
        raise CheckpointError(
            f"--model {model} names a ResNet-{named.hybrid}; the checkpoint holds {describe_resnet(cfg.resnet)}"
        )
    check_shapes(shapes, cfg)
    return cfg


def describe(cfg: ModelConfig) -> str:
    """One line for people: what was found in the file, and in which repository's layout."""
    if isinstance(cfg, ViTConfig):
        extra = f", pre_logits {cfg.representation_size}" if cfg.representation_size else ""
        hybrid = f"{describe_resnet(cfg.resnet)}, then " if cfg.resnet else ""
        pooling = "MAP head" if cfg.classifier == "map" else f"{cfg.classifier} pooling"
        if cfg.layout == "big_vision":
            posemb = "sincos2d" if cfg.posemb == "sincos2d" else "learned"
            extra += f", {posemb} position embedding"
        head = f"{cfg.num_classes} classes" if cfg.output == "logits" else f"{cfg.out_dim}-d embeddings"
        return (
            f"{cfg.layout} layout: {hybrid}ViT hidden {cfg.hidden_size}, mlp {cfg.mlp_dim}, {cfg.num_heads} heads, "
            f"{cfg.num_layers} layers, patch {cfg.patch_size}, {pooling}{extra}, {head} at {cfg.image_size}px"
        )
    return (
        f"vision_transformer layout: Mixer hidden {cfg.hidden_dim}, tokens-mlp {cfg.tokens_mlp_dim}, "
        f"channels-mlp {cfg.channels_mlp_dim}, {cfg.num_blocks} blocks, patch {cfg.patch_size}, "
        f"{cfg.num_classes} classes at {cfg.image_size}px"
    )


def describe_resnet(cfg: ResNetConfig) -> str:
    units = f"stages of {'+'.join(map(str, cfg.num_layers))} units" if cfg.num_layers else "the root alone"
    return f"ResNet-{cfg.depth} {units}, width {cfg.width}" if cfg.num_layers else f"ResNet {units}, width {cfg.width}"


def with_image_size(cfg: ModelConfig, image_size: int) -> ModelConfig:
    return replace(cfg, image_size=image_size)
