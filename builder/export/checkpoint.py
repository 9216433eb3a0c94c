"""Reading ``.npz`` checkpoints in the google-research/vision_transformer and big_vision layouts.

The file is a zip of ``/``-joined parameter names. Files in the wild differ in two
ways that carry no meaning, and both are normalised here so the rest of the builder
sees one canonical naming (the pre-Linen numbering of the published files):
a leading ``opt/target/`` prefix (flax optimizer checkpoints, whose ``opt/state``
entries are dropped), and the Linen numbering produced by the original loader
(``MultiHeadDotProductAttention_0``, ``LayerNorm_1``, ``MlpBlock_0``), which big_vision uses
too. big_vision's own prefixes and older layouts are :mod:`builder.export.big_vision`'s.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agent.engine.bundle import file_digest
from builder.errors import CheckpointError
from builder.export import big_vision
from builder.export.architecture import ModelConfig, Shape, infer_config

TARGET_PREFIX = "opt/target/"
_LINEN_TO_PUBLISHED = {
    "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
    "LayerNorm_1": "LayerNorm_2",
    "MlpBlock_0": "MlpBlock_3",
}
_ENCODER_BLOCK = re.compile(r"^(Transformer/encoderblock_\d+)/([^/]+)(/.*)$")


@dataclass
class Checkpoint:
    """A loaded checkpoint: canonical flat params, the inferred config and provenance."""

    path: Path
    sha256: str
    config: ModelConfig
    params: dict[str, np.ndarray]
    ignored: list[str] = field(default_factory=list)
    fixes: list[str] = field(default_factory=list)  # older big_vision layouts put right (builder.export.big_vision)

    @property
    def shapes(self) -> dict[str, Shape]:
        return {k: tuple(v.shape) for k, v in self.params.items()}


def canonical_names(names: list[str]) -> tuple[dict[str, str], list[str]]:
    """Map each file name to its canonical name; also return names that are ignored.

    Raises when a block mixes the two numberings, since then two tensors would claim
    the same place and silently picking one would export the wrong model.
    """
    ignored: list[str] = []
    if any(n.startswith(TARGET_PREFIX) for n in names):
        ignored = [n for n in names if not n.startswith(TARGET_PREFIX)]
        names = [n for n in names if n.startswith(TARGET_PREFIX)]
    mapping: dict[str, str] = {}
    for name in names:
        canonical = name.removeprefix(TARGET_PREFIX)
        if match := _ENCODER_BLOCK.match(canonical):
            block, module, rest = match.groups()
            canonical = f"{block}/{_LINEN_TO_PUBLISHED.get(module, module)}{rest}"
        if canonical in mapping.values():
            other = next(k for k, v in mapping.items() if v == canonical)
            raise CheckpointError(
                f"{name} and {other} both map to {canonical}: the file mixes Linen and pre-Linen numbering"
            )
        mapping[name] = canonical
    return mapping, ignored


def _open(path: Path) -> zipfile.ZipFile:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise CheckpointError(
            f"checkpoint {path} is not a readable .npz archive ({exc}): the file is truncated or not an .npz"
        ) from exc


def _read_member(archive: zipfile.ZipFile, member: str) -> np.ndarray:
    try:
        with archive.open(member) as fh:
            array = np.lib.format.read_array(fh, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise CheckpointError(
            f"tensor {member.removesuffix('.npy')} cannot be read ({exc}): the file is damaged"
        ) from exc
    if not np.issubdtype(array.dtype, np.floating):
        raise CheckpointError(f"tensor {member.removesuffix('.npy')} has dtype {array.dtype}, expected floating point")
    return array.astype(np.float32, copy=False)


def read_checkpoint(
    path: str | Path,
    model: str | None = None,
    on_tensor: Callable[[int, int], None] | None = None,
    pool: str | None = None,
) -> Checkpoint:
    """Load, normalise and validate a checkpoint of either family's layout; ``on_tensor(done, total)`` reports
    progress; ``pool`` is big_vision's pooling where the tensors cannot tell (``gap`` or ``0``)."""
    path = Path(path)
    with _open(path) as archive:
        members = [m for m in archive.namelist() if m.endswith(".npy")]
        if not members:
            raise CheckpointError(f"checkpoint {path} holds no arrays")
        stripped, outside, layout = big_vision.strip_prefix([m.removesuffix(".npy") for m in members])
        mapping, ignored = canonical_names(list(stripped.values()))
        file_of = {name: member for member, name in stripped.items()}
        params: dict[str, np.ndarray] = {}
        for done, (name, canonical) in enumerate(mapping.items(), 1):
            params[canonical] = _read_member(archive, file_of[name] + ".npy")
            if on_tensor:
                on_tensor(done, len(mapping))
    params = big_vision.fix_old_layouts(params, layout)
    params = {canonical_names([k])[0][k]: v for k, v in params.items()}  # blocks a scanned file held
    config = infer_config({k: v.shape for k, v in params.items()}, model, pool, layout.image_tower)
    return Checkpoint(path, file_digest(path)["sha256"], config, params, outside + ignored, layout.fixes)


def save_checkpoint(path: str | Path, params: Mapping[str, np.ndarray]) -> None:
    """Write flat params as a published-layout ``.npz`` (what ``np.savez`` of the tree gives)."""
    np.savez(path, **{k: np.asarray(v, np.float32) for k, v in params.items()})
