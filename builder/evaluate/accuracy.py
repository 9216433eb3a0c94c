"""Top-1 accuracy of an exported model on labelled frames, through the agent's preprocessing.

Frames go through :func:`agent.engine.preprocess.preprocess_into` with the spec stored in
the model, exactly as on a device, so the figure is the one a camera would see.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from agent.engine.preprocess import METADATA_KEY, ChannelOrder, InputSpec, preprocess_into


def open_model(path: Path) -> tuple[ort.InferenceSession, InputSpec]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in meta:
        raise ValueError(f"{path} has no {METADATA_KEY} metadata: it was not exported by edgevit-build")
    return session, InputSpec.from_json(meta[METADATA_KEY])


def predict(
    session: ort.InferenceSession, spec: InputSpec, frames: np.ndarray, source_order: ChannelOrder, batch_size: int = 64
) -> np.ndarray:
    """Logits for ``frames`` (N x H x W x 3 uint8, any H x W), batched through one reused buffer."""
    name = session.get_inputs()[0].name
    batch = np.empty((batch_size, spec.height, spec.width, 3), np.uint8)
    logits = []
    for start in range(0, len(frames), batch_size):
        chunk = frames[start : start + batch_size]
        for slot, frame in zip(batch, chunk, strict=False):
            preprocess_into(frame, spec, slot, source_order)
        logits.append(session.run(None, {name: batch[: len(chunk)]})[0])
    return np.concatenate(logits)


def top1_accuracy(
    model_path: Path, frames: np.ndarray, labels: np.ndarray, source_order: ChannelOrder = "RGB"
) -> float:
    session, spec = open_model(model_path)
    return float((predict(session, spec, frames, source_order).argmax(-1) == labels).mean())
