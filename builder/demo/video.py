"""Labelled demo videos: the held-out digits, one per frame, as a camera would film them.

Each 8x8 scan is enlarged to a ``size`` x ``size`` BGR frame and written with OpenCV
(MPEG-4 Part 2 in .mp4, lossy like a real camera stream). The labels, in frame
order, go to a JSON file beside the video, so a test or the demo can score what the
agent reports for each frame sequence number.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from builder.demo.digits import raw_digits


def write_labelled_video(path: Path, indices: np.ndarray, size: int = 128, fps: float = 30.0) -> list[int]:
    """Write frames for ``indices`` of the digits set; return (and save as ``.json``) their labels."""
    scans, labels = raw_digits()
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (size, size))
    if not writer.isOpened():
        raise OSError(f"OpenCV cannot write {path}")
    frame = np.empty((size, size, 3), np.uint8)
    for i in indices:
        cv2.resize(scans[i], (size, size), dst=frame, interpolation=cv2.INTER_LINEAR)
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    frame_labels = [int(labels[i]) for i in indices]
    path.with_suffix(".json").write_text(json.dumps({"fps": fps, "labels": frame_labels}) + "\n")
    return frame_labels
