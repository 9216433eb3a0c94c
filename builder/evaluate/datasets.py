"""Labelled evaluation sets and calibration sets, as frames a camera could have produced.

An evaluation set is a folder of class subfolders of images (``eval/cat/001.jpg``), or
``demo``: the held-out split recorded beside a bundled demo checkpoint. A calibration
set is a folder of images (subfolders allowed), or ``demo``: the demo's training split.
``demo:NAME`` names the demo model whose splits to use, for checkpoints derived from one
(the outlier-channel variants of :mod:`builder.demo.outliers`).
Frames keep their own size; :meth:`Frames.preprocessed` applies the model's input
spec through the agent's preprocessing, as a device would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from agent import bounded_json
from agent.engine.preprocess import ChannelOrder, InputSpec, preprocess_into
from builder.errors import BuildError

DEMO = "demo"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".webp", ".tif", ".tiff"}


class DatasetError(BuildError):
    """An evaluation or calibration set cannot be used."""


@dataclass
class Frames:
    """Frames of any size, with labels when known (-1 where not)."""

    description: str
    frames: list[np.ndarray]
    labels: np.ndarray
    source_order: ChannelOrder

    def __len__(self) -> int:
        return len(self.frames)

    def preprocessed(self, spec: InputSpec) -> np.ndarray:
        batch = np.empty((len(self.frames), spec.height, spec.width, 3), np.uint8)
        for slot, frame in zip(batch, self.frames, strict=True):
            preprocess_into(frame, spec, slot, self.source_order)
        return batch

    def subset(self, count: int) -> Frames:
        """An evenly spread subset (calibration needs variety, not volume)."""
        if count >= len(self):
            return self
        idx = np.linspace(0, len(self) - 1, count).round().astype(int)
        return Frames(self.description, [self.frames[i] for i in idx], self.labels[idx], self.source_order)


def read_image(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DatasetError(f"{path} cannot be decoded as an image")
    return image


def _images_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def labelled_folder(root: Path, labels: list[str]) -> Frames:
    if not root.is_dir():
        raise DatasetError(f"evaluation set {root} is not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DatasetError(f"evaluation set {root} has no class subfolders (expected {root}/<label>/<image>)")
    frames, targets = [], []
    for name in classes:
        if name not in labels:
            raise DatasetError(
                f"evaluation folder {root / name} is not one of the model's labels ({', '.join(labels)})"
            )
        for path in _images_under(root / name):
            frames.append(read_image(path))
            targets.append(labels.index(name))
    if not frames:
        raise DatasetError(f"evaluation set {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return Frames(f"{root} ({len(frames)} images, {len(classes)} classes)", frames, np.asarray(targets), "BGR")


def image_folder(root: Path) -> Frames:
    if not root.is_dir():
        raise DatasetError(f"calibration set {root} is not a folder")
    paths = _images_under(root)
    if not paths:
        raise DatasetError(f"calibration set {root} holds no images")
    return Frames(f"{root} ({len(paths)} images)", [read_image(p) for p in paths], np.full(len(paths), -1), "BGR")


def demo_card(source_checkpoint: str) -> tuple[dict, Path]:
    from builder.demo.train import CHECKPOINT_DIR

    path = CHECKPOINT_DIR / Path(source_checkpoint).with_suffix(".json").name
    if not path.is_file():
        raise DatasetError(
            f"'demo' sets exist only for models exported from the bundled demo checkpoints, not {source_checkpoint}"
        )
    return json.loads(path.read_text()), path


def _demo_source(spec: str, source_checkpoint: str) -> str:
    """The checkpoint whose demo card a ``demo`` or ``demo:NAME`` spec refers to."""
    return f"{spec.removeprefix(DEMO + ':')}.npz" if spec.startswith(DEMO + ":") else source_checkpoint


def is_demo(spec: str) -> bool:
    return spec == DEMO or spec.startswith(DEMO + ":")


def demo_split(source_checkpoint: str, held_out: bool) -> Frames:
    from builder.demo.digits import raw_digits

    card, path = demo_card(source_checkpoint)
    scans, labels = raw_digits()
    mask = np.zeros(len(labels), bool)
    mask[card["split"]["held_out_indices"]] = True
    idx = np.flatnonzero(mask if held_out else ~mask)
    part = "held-out" if held_out else "training"
    return Frames(f"demo {part} split of {path.stem} ({len(idx)} digits)", [scans[i] for i in idx], labels[idx], "RGB")


def evaluation_set(spec: str, labels: list[str], source_checkpoint: str) -> Frames:
    if is_demo(spec):
        return demo_split(_demo_source(spec, source_checkpoint), held_out=True)
    return labelled_folder(Path(spec), labels)


def calibration_set(spec: str, source_checkpoint: str) -> Frames:
    if is_demo(spec):
        return demo_split(_demo_source(spec, source_checkpoint), held_out=False)
    return image_folder(Path(spec))


def load_labels(path: Path | None, source_checkpoint: str, eval_spec: str, classes: int | None) -> list[str]:
    """Labels from a file (JSON list or one per line), the demo card, or the eval folder's class names; ``classes``
    None: any number (an embedding model's, whose references are made one per label)."""
    if path is not None:
        try:
            text = bounded_json.read_bytes(path, bounded_json.FILE_LIMITS).decode()
            labels = (
                bounded_json.loads(text, bounded_json.FILE_LIMITS)
                if text.lstrip().startswith("[")
                else [line.strip() for line in text.splitlines() if line.strip()]
            )
        except (OSError, ValueError) as exc:  # JSONLimitError and UnicodeDecodeError are ValueErrors
            raise DatasetError(f"--labels {path}: {str(exc)[:200]}") from None
        if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
            raise DatasetError(f"--labels {path}: a JSON list of label strings, or one label per line")
        origin = str(path)
    elif is_demo(eval_spec):
        labels, origin = demo_card(_demo_source(eval_spec, source_checkpoint))[0]["labels"], "the demo card"
    else:
        labels = sorted(p.name for p in Path(eval_spec).iterdir() if p.is_dir()) if Path(eval_spec).is_dir() else []
        origin = f"the class folders of {eval_spec}"
    if classes is not None and len(labels) != classes:
        raise DatasetError(f"{len(labels)} labels from {origin}, but the model has {classes} classes (use --labels)")
    return labels
