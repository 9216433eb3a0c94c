"""Reading real .npz files: naming variants, and every kind of bad file with a precise message."""

from __future__ import annotations

import dataclasses
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from builder.errors import CheckpointError
from builder.export.architecture import ViTConfig, describe
from builder.export.checkpoint import canonical_names, read_checkpoint
from builder.export.models import init_params, jax_forward, prepared_params
from builder.export.verify import sample_images

from conftest import SMALL_MIXER, SMALL_VIT
from reference_models import PUBLISHED_TO_LINEN

Writer = Callable[..., Path]


def to_linen(key: str) -> str:
    return "/".join(PUBLISHED_TO_LINEN.get(part, part) for part in key.split("/"))


@pytest.mark.parametrize(
    "rename",
    [
        lambda k: k,
        to_linen,
        lambda k: "opt/target/" + k,
        lambda k: "opt/target/" + to_linen(k),
    ],
    ids=["published", "linen", "opt-target", "opt-target-linen"],
)
def test_naming_variants_load_identically(write_checkpoint: Writer, rename: Callable[[str], str]) -> None:
    expected = init_params(SMALL_VIT)
    ckpt = read_checkpoint(write_checkpoint(SMALL_VIT, rename=rename))
    assert ckpt.config == SMALL_VIT
    assert ckpt.params.keys() == expected.keys()
    assert all(np.array_equal(ckpt.params[k], v) for k, v in expected.items())


def test_optimizer_state_is_ignored(write_checkpoint: Writer) -> None:
    params = {"opt/target/" + k: v for k, v in init_params(SMALL_MIXER).items()}
    params["opt/state/step"] = np.zeros((), np.float32)
    ckpt = read_checkpoint(write_checkpoint(params))
    assert ckpt.config == SMALL_MIXER
    assert ckpt.ignored == ["opt/state/step"]


def test_mixed_numbering_is_refused() -> None:
    names = ["Transformer/encoderblock_0/LayerNorm_2/scale", "Transformer/encoderblock_0/LayerNorm_1/scale"]
    with pytest.raises(CheckpointError, match="mixes Linen and pre-Linen numbering"):
        canonical_names(names)


def test_float16_checkpoint_loads_as_float32(write_checkpoint: Writer) -> None:
    params = {k: v.astype(np.float16) for k, v in init_params(SMALL_VIT).items()}
    ckpt = read_checkpoint(write_checkpoint(params))
    assert {v.dtype for v in ckpt.params.values()} == {np.dtype(np.float32)}


def test_sha256_is_of_the_file(write_checkpoint: Writer) -> None:
    import hashlib

    path = write_checkpoint(SMALL_VIT)
    assert read_checkpoint(path).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_truncated_file(write_checkpoint: Writer) -> None:
    path = write_checkpoint(SMALL_VIT)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="is not a readable .npz archive .*truncated"):
        read_checkpoint(path)


def test_not_an_npz(tmp_path: Path) -> None:
    path = tmp_path / "weights.npz"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    with pytest.raises(CheckpointError, match="not a readable .npz archive"):
        read_checkpoint(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.npz")


def test_damaged_tensor_is_named(write_checkpoint: Writer) -> None:
    path = write_checkpoint(SMALL_VIT)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("head/kernel.npy")
    offset = info.header_offset + 30 + len(info.filename) + len(info.extra) + 200
    data[offset] ^= 0xFF  # flip one byte inside the stored array; the CRC no longer matches
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="tensor head/kernel cannot be read .*damaged"):
        read_checkpoint(path)


def test_missing_key(write_checkpoint: Writer) -> None:
    params = init_params(SMALL_VIT)
    del params["Transformer/encoderblock_1/MlpBlock_3/Dense_1/kernel"]
    with pytest.raises(
        CheckpointError,
        match=r"missing key Transformer/encoderblock_1/MlpBlock_3/Dense_1/kernel \(expected shape \[64, 32\]\)",
    ):
        read_checkpoint(write_checkpoint(params))


def test_extra_key(write_checkpoint: Writer) -> None:
    params = init_params(SMALL_VIT) | {"Transformer/encoderblock_0/extra/kernel": np.zeros((3, 3), np.float32)}
    with pytest.raises(
        CheckpointError, match=r"unexpected key Transformer/encoderblock_0/extra/kernel with shape \[3, 3\]"
    ):
        read_checkpoint(write_checkpoint(params))


def test_shape_mismatch(write_checkpoint: Writer) -> None:
    params = init_params(SMALL_VIT)
    params["Transformer/encoderblock_1/MultiHeadDotProductAttention_1/value/kernel"] = np.zeros((32, 2, 15), np.float32)
    with pytest.raises(
        CheckpointError,
        match=r"encoderblock_1/MultiHeadDotProductAttention_1/value/kernel has shape \[32, 2, 15\], "
        r"expected \[32, 2, 16\]",
    ):
        read_checkpoint(write_checkpoint(params))


def test_integer_tensor(tmp_path: Path) -> None:
    path = tmp_path / "int.npz"
    np.savez(path, **(init_params(SMALL_MIXER) | {"head/bias": np.zeros(7, np.int32)}))
    with pytest.raises(CheckpointError, match="tensor head/bias has dtype int32, expected floating point"):
        read_checkpoint(path)


def test_unsupported_family(write_checkpoint: Writer) -> None:
    params = {"conv1/kernel": np.zeros((7, 7, 3, 8), np.float32), "fc/kernel": np.zeros((8, 10), np.float32)}
    with pytest.raises(CheckpointError, match="unsupported model family"):
        read_checkpoint(write_checkpoint(params))


BIG_VISION_TOK = dataclasses.replace(SMALL_VIT, layout="big_vision", classifier="token")
BIG_VISION_MAP = dataclasses.replace(SMALL_VIT, layout="big_vision", classifier="map")


def _combined_posemb(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Older big_vision: posemb inside the encoder with a class-token row, added after the concatenation."""
    params = dict(params)
    row = np.full((1, 1, params["cls"].shape[-1]), 0.25, np.float32)
    params["cls"] = params["cls"] - row
    params["Transformer/pos_embedding"] = np.concatenate([row, params.pop("pos_embedding")], axis=1)
    return params


def _scanned(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """big_vision's scan=True: one stacked tensor per block parameter, Linen numbering."""
    blocks = {k: v for k, v in params.items() if k.startswith("Transformer/encoderblock_")}
    out = {k: v for k, v in params.items() if k not in blocks}
    for key in {k.split("/", 2)[2] for k in blocks}:
        stacked = [params[f"Transformer/encoderblock_{i}/{key}"] for i in range(SMALL_VIT.num_layers)]
        out[to_linen(f"Transformer/encoderblock/{key}")] = np.stack(stacked)
    return out


def _inlined_map_head(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k.removeprefix("MAPHead_0/"): v for k, v in params.items()}


@pytest.mark.parametrize(
    ("cfg", "variant", "fixes"),
    [
        (BIG_VISION_TOK, lambda p: {f"params/{to_linen(k)}": v for k, v in p.items()}, []),
        (BIG_VISION_TOK, _combined_posemb, ["position embedding moved", "class token's position embedding added"]),
        (BIG_VISION_TOK, _scanned, ["2 scanned encoder blocks split"]),
        (BIG_VISION_MAP, _inlined_map_head, ["inlined MAP head moved under MAPHead_0"]),
    ],
    ids=["params-prefix", "combined-posemb", "scanned", "inlined-map-head"],
)
def test_big_vision_layouts_load_as_the_same_function(
    write_checkpoint: Writer, cfg: ViTConfig, variant: Callable, fixes: list[str]
) -> None:
    """Each older layout big_vision's load() fixes reads as the same model: equal outputs in JAX."""
    params = init_params(cfg)
    ckpt = read_checkpoint(write_checkpoint(variant(params)))
    assert ckpt.config == cfg and all(any(f.startswith(s) for f in ckpt.fixes) for s in fixes), ckpt.fixes
    images = sample_images(2, cfg.image_size, seed=3)
    expected = jax_forward(cfg, prepared_params(cfg, params))(images)
    np.testing.assert_allclose(jax_forward(cfg, prepared_params(cfg, ckpt.params))(images), expected, atol=1e-5)


def test_a_two_tower_file_yields_its_image_tower_as_an_embedding_model(write_checkpoint: Writer) -> None:
    """SigLIP's layout: params/img/ (a MAP-head ViT whose head projects to the shared space), params/txt/, t, b."""
    image = {f"params/img/{to_linen(k)}": v for k, v in init_params(BIG_VISION_MAP).items()}
    text = {"params/txt/Embed_0/embedding": np.zeros((10, 8), np.float32), "params/t": np.ones(1, np.float32)}
    ckpt = read_checkpoint(write_checkpoint(image | text))
    assert ckpt.config == dataclasses.replace(BIG_VISION_MAP, output="embeddings")
    assert sorted(ckpt.ignored) == ["params/t", "params/txt/Embed_0/embedding"]
    assert ckpt.config.name.endswith("-map-embeddings") and "7-d embeddings" in describe(ckpt.config)


def test_scanned_blocks_that_disagree_are_refused(write_checkpoint: Writer) -> None:
    params = _scanned(init_params(BIG_VISION_TOK))
    key = next(k for k in params if k.startswith("Transformer/encoderblock/"))
    params[key] = params[key][:1]
    with pytest.raises(CheckpointError, match=r"scanned encoder blocks .* disagree on the layer count: \[1, 2\]"):
        read_checkpoint(write_checkpoint(params))


@pytest.mark.parametrize(
    ("pool", "message"),
    [("0", None), ("gap", None), ("map", "--pool map: the checkpoint has no MAP head")],
)
def test_pooling_the_file_cannot_show_is_the_users(write_checkpoint: Writer, pool: str, message: str | None) -> None:
    cfg = dataclasses.replace(BIG_VISION_TOK, classifier="gap")
    path = write_checkpoint(init_params(cfg))
    if message:
        with pytest.raises(CheckpointError, match=message):
            read_checkpoint(path, pool=pool)
        return
    assert read_checkpoint(path, pool=pool).config == dataclasses.replace(cfg, classifier=pool)
    with pytest.raises(CheckpointError, match="--pool 0: the checkpoint's cls says token"):
        read_checkpoint(write_checkpoint(init_params(BIG_VISION_TOK), name="tok.npz"), pool="0")
