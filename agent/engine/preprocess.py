"""The one preprocessing function shared by builder and agent.

Exported graphs take uint8 RGB NHWC images at the model's resolution and scale them
to [-1, 1] themselves, so what stays outside the graph is only geometry (how a frame
of any size becomes H x W) and channel order. That policy is written into every
export as an :class:`InputSpec`; :func:`preprocess_into` applies it. The builder
measures accuracy through this same function, so the device cannot drift from it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import cv2
import numpy as np

from agent import bounded_json

ResizePolicy = Literal["stretch", "center_crop"]
Interpolation = Literal["linear", "area"]
ChannelOrder = Literal["RGB", "BGR"]

METADATA_KEY = "edgevit.input_spec"  # where exports store the spec (ONNX metadata_props)

_INTERPOLATION = {"linear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA}
_CHOICES: dict[str, tuple[str, ...]] = {
    "resize": ("stretch", "center_crop"),
    "interpolation": tuple(_INTERPOLATION),
    "channel_order": ("RGB", "BGR"),
}


class InputSpecError(ValueError):
    """An input spec (from an export's metadata or a bundle) is malformed."""


@dataclass(frozen=True)
class InputSpec:
    """What a model expects of its input, beyond the fixed uint8 NHWC layout.

    ``resize='stretch'`` resizes the whole frame to H x W (the original
    vision_transformer evaluation pipeline); ``'center_crop'`` keeps the aspect
    ratio by cropping the largest centred region of the target aspect first.
    Scaling to [-1, 1] is inside the graph and therefore not a field here.
    """

    height: int
    width: int
    channel_order: ChannelOrder = "RGB"
    resize: ResizePolicy = "stretch"
    interpolation: Interpolation = "linear"

    def __post_init__(self) -> None:
        for name in ("height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InputSpecError(f"input spec '{name}' must be a positive integer, got {value!r}")
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise InputSpecError(
                    f"input spec '{name}' must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                )

    def to_json(self) -> str:
        return json.dumps({"layout": "NHWC", "dtype": "uint8", **asdict(self)}, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputSpec:
        if data.get("layout", "NHWC") != "NHWC" or data.get("dtype", "uint8") != "uint8":
            raise InputSpecError(
                f"input spec describes {data.get('dtype')} {data.get('layout')} input; edgevit models take uint8 NHWC"
            )
        known = {f.name for f in fields(cls)}
        missing = [name for name in ("height", "width") if name not in data]
        if missing:
            raise InputSpecError(f"input spec is missing '{missing[0]}'")
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_json(cls, text: str) -> InputSpec:
        try:
            data = bounded_json.loads(text, bounded_json.FILE_LIMITS)
        except bounded_json.JSONLimitError as exc:
            raise InputSpecError(f"input spec is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise InputSpecError("input spec must be a JSON object")
        return cls.from_dict(data)


def crop_box(frame_height: int, frame_width: int, spec: InputSpec) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the frame region that is resized to the model input."""
    if spec.resize == "stretch":
        return 0, 0, frame_height, frame_width
    target = spec.width / spec.height
    if frame_width / frame_height > target:
        width = max(1, round(frame_height * target))
        return 0, (frame_width - width) // 2, frame_height, width
    height = max(1, round(frame_width / target))
    return (frame_height - height) // 2, 0, height, frame_width


def preprocess_into(
    frame: np.ndarray, spec: InputSpec, out: np.ndarray, source_order: ChannelOrder = "BGR"
) -> np.ndarray:
    """Write ``frame`` (H x W x 3 uint8, ``source_order``) into ``out`` (spec.height x spec.width x 3).

    ``out`` is typically one slot of a preallocated batch, so the per-frame path
    allocates nothing: the crop is a view, resize and colour conversion write in place.
    OpenCV decodes to BGR, hence the default ``source_order``.
    """
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"expected an H x W x 3 uint8 frame, got shape {frame.shape} dtype {frame.dtype}")
    if out.shape != (spec.height, spec.width, 3) or out.dtype != np.uint8:
        raise ValueError(
            f"output slot has shape {out.shape} dtype {out.dtype}, spec needs ({spec.height}, {spec.width}, 3) uint8"
        )
    top, left, height, width = crop_box(frame.shape[0], frame.shape[1], spec)
    region = frame[top : top + height, left : left + width]
    if region.shape[:2] == out.shape[:2]:
        np.copyto(out, region)
    else:
        cv2.resize(region, (spec.width, spec.height), dst=out, interpolation=_INTERPOLATION[spec.interpolation])
    if source_order != spec.channel_order:
        cv2.cvtColor(out, cv2.COLOR_BGR2RGB, dst=out)
    return out


def preprocess(frame: np.ndarray, spec: InputSpec, source_order: ChannelOrder = "BGR") -> np.ndarray:
    """Allocating convenience form of :func:`preprocess_into`, for offline use."""
    return preprocess_into(frame, spec, np.empty((spec.height, spec.width, 3), np.uint8), source_order)
