"""Top-1 of the agent's results on a labelled demo video (frame sequence number -> label)."""

from __future__ import annotations

import json
from pathlib import Path


def score(results_jsonl: Path, labels_json: Path, camera: str | None = None) -> tuple[float, int]:
    """(top-1, frames scored); seq 1 is the video's first frame."""
    labels = json.loads(labels_json.read_text())["labels"]
    hits = total = 0
    for line in results_jsonl.read_text().splitlines():
        result = json.loads(line)
        if camera and result["camera"] != camera or result["seq"] > len(labels):
            continue
        total += 1
        hits += result["top"][0]["label"] == str(labels[result["seq"] - 1])
    return (hits / total if total else 0.0), total
