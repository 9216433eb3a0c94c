"""The camera decoder's side, in this process: what it sends for a real (small) video file, frame for
frame, and the GStreamer pipelines it builds for hardware decode. The process, its supervision and
its isolation are tested with the real agent in test_camera_isolation.py."""

from __future__ import annotations

import io
import json
from pathlib import Path

import cv2
import numpy as np

from agent.config import CameraConfig
from agent.engine.preprocess import InputSpec, preprocess_into
from agent.stream.camera import opencv_has_gstreamer, unusable_sources
from agent.stream.decoder import FRAME, HEADER, STATE, Decoder, gstreamer_pipeline

SPEC = InputSpec(height=32, width=32)


def write_video(path: Path, frames: int) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (96, 64))
    rng = np.random.default_rng(0)
    for _ in range(frames):
        writer.write(rng.integers(0, 255, (64, 96, 3), np.uint8))
    writer.release()


def messages(data: bytes) -> list[tuple[bytes, dict | np.ndarray | None]]:
    out, at = [], 0
    while at < len(data):
        kind, size, *_ = HEADER.unpack_from(data, at)
        payload = data[at + HEADER.size : at + HEADER.size + size]
        if kind == STATE:
            out.append((kind, json.loads(payload)))
        elif kind == FRAME:
            out.append((kind, np.frombuffer(payload, np.uint8).reshape(SPEC.height, SPEC.width, 3)))
        else:
            out.append((kind, None))
        at += HEADER.size + size
    return out


def test_a_file_is_sent_frame_for_frame_preprocessed_then_ends(tmp_path: Path) -> None:
    video = tmp_path / "clip.avi"
    write_video(video, 12)
    settings = CameraConfig(name="clip", source=str(video), stride=2).model_dump(mode="json")
    out = io.BytesIO()
    Decoder(settings, SPEC, out).run()
    sent = messages(out.getvalue())
    states = [m["state"] for kind, m in sent if kind == STATE]
    assert states == ["opening", "connected", "ended"]
    assert next(m for kind, m in sent if kind == STATE and m["state"] == "connected")["decode"] == "software"
    frames = [m for kind, m in sent if kind == FRAME]
    capture, expected, slot = cv2.VideoCapture(str(video)), [], np.empty((32, 32, 3), np.uint8)
    while (read := capture.read())[0]:
        expected.append(preprocess_into(read[1], SPEC, slot, "BGR").copy())
    assert len(frames) == 6 and all(np.array_equal(a, b) for a, b in zip(frames, expected[::2], strict=True))
    last = out.getvalue().rfind(b'{"state": "ended"') - HEADER.size  # every message carries the counters
    _, _, decoded, reconnects, _, _, preprocessed, _ = HEADER.unpack_from(out.getvalue(), last)
    assert (decoded, reconnects, preprocessed) == (12, 0, 6)


def test_a_region_outside_the_frame_fails_the_camera_with_the_reason(tmp_path: Path) -> None:
    video = tmp_path / "clip.avi"
    write_video(video, 3)
    settings = CameraConfig(name="clip", source=str(video), region=(50, 0, 100, 10)).model_dump(mode="json")
    out = io.BytesIO()
    Decoder(settings, SPEC, out).run()
    sent = messages(out.getvalue())
    failed = [m for kind, m in sent if kind == STATE and m["state"] == "failed"]
    assert failed and "does not fit the stream's 96x64 frames" in failed[0]["error"]
    assert not [m for kind, m in sent if kind == FRAME]


def test_hardware_decode_pipelines() -> None:
    rtsp = gstreamer_pipeline("rtsp://viewer:pw@192.0.2.1/s", "jetson", "tcp")
    assert rtsp.startswith('rtspsrc location="rtsp://viewer:pw@192.0.2.1/s" latency=200 protocols=tcp ! decodebin')
    assert "nvvidconv ! video/x-raw,format=BGRx" in rtsp and rtsp.endswith("appsink drop=true max-buffers=2 sync=false")
    local = gstreamer_pipeline("clip.mp4", "nvcodec", "auto")
    assert local.startswith('uridecodebin uri="file:///') and "nvvidconv" not in local


def test_hardware_decode_through_gstreamer_needs_an_opencv_with_it() -> None:
    camera = CameraConfig(name="gate", source="rtsp://192.0.2.1/s", hw_decode="jetson")
    problems = unusable_sources([camera])
    assert bool(problems) != opencv_has_gstreamer()
    assert not unusable_sources([CameraConfig(name="gate", source="rtsp://192.0.2.1/s", hw_decode="vaapi")])
