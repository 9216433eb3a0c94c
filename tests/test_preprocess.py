"""The one preprocessing function: geometry, channel order, in-place writes, spec validation."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.engine.preprocess import InputSpec, InputSpecError, crop_box, preprocess, preprocess_into


def frame(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_writes_into_the_given_slot_without_allocating() -> None:
    batch = np.zeros((2, 32, 32, 3), np.uint8)
    result = preprocess_into(frame(48, 64), InputSpec(32, 32), batch[1])
    assert np.shares_memory(result, batch) and batch[1].any() and not batch[0].any()


def test_stretch_is_a_plain_resize_with_bgr_to_rgb() -> None:
    f = frame(48, 64)
    expected = cv2.resize(f, (32, 32), interpolation=cv2.INTER_LINEAR)[..., ::-1]
    np.testing.assert_array_equal(preprocess(f, InputSpec(32, 32)), expected)


def test_same_order_and_size_is_a_copy() -> None:
    f = frame(32, 32)
    np.testing.assert_array_equal(preprocess(f, InputSpec(32, 32), source_order="RGB"), f)


def test_center_crop_takes_the_middle() -> None:
    f = np.zeros((40, 80, 3), np.uint8)
    f[:, 20:60] = 200  # the centred 40x40 square
    out = preprocess(f, InputSpec(20, 20, resize="center_crop", interpolation="area"), source_order="RGB")
    assert (out == 200).all()


@given(st.integers(1, 2000), st.integers(1, 2000), st.integers(1, 512), st.integers(1, 512))
def test_crop_box_is_inside_the_frame_and_keeps_aspect(fh: int, fw: int, h: int, w: int) -> None:
    top, left, height, width = crop_box(fh, fw, InputSpec(h, w, resize="center_crop"))
    assert 0 <= top and 0 <= left and top + height <= fh and left + width <= fw
    assert height == fh or width == fw
    assert abs(width / height - w / h) <= max(1 / height, 1 / width) * (w / h + 1) + 1e-9


def test_spec_json_round_trip() -> None:
    spec = InputSpec(224, 160, channel_order="BGR", resize="center_crop", interpolation="area")
    assert InputSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"height": 224}', "missing 'width'"),
        ('{"height": 0, "width": 4}', "'height' must be a positive integer"),
        ('{"height": 4, "width": 4, "resize": "pad"}', "'resize' must be one of stretch, center_crop"),
        ('{"height": 4, "width": 4, "dtype": "float32"}', "uint8 NHWC"),
        ("[1, 2]", "must be a JSON object"),
        ("{", "not valid JSON"),
    ],
)
def test_bad_specs_name_the_field(text: str, message: str) -> None:
    with pytest.raises(InputSpecError, match=message):
        InputSpec.from_json(text)


def test_bad_frames_are_refused() -> None:
    with pytest.raises(ValueError, match=r"expected an H x W x 3 uint8 frame, got shape \(8, 8\)"):
        preprocess(np.zeros((8, 8), np.uint8), InputSpec(4, 4))
    with pytest.raises(ValueError, match="output slot has shape"):
        preprocess_into(frame(8, 8), InputSpec(4, 4), np.zeros((5, 4, 3), np.uint8))
