"""Top-1 of the agent's results on a labelled demo video (frame sequence number -> label)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Score:
    top1: float
    frames: int
    boot: str | None  # the agent run scored: the file's last, since the agent appends across runs
    runs: int  # runs in the file


def score(results_jsonl: Path, labels_json: Path, camera: str | None = None) -> Score:
    """Top-1 of the last agent run in ``results_jsonl``; seq 1 is the video's first frame."""
    labels = json.loads(labels_json.read_text())["labels"]
    results = [json.loads(line) for line in results_jsonl.read_text().splitlines() if line.strip()]
    boots = list(dict.fromkeys(r.get("boot") for r in results))
    last = boots[-1] if boots else None
    hits = total = 0
    for result in results:
        if result.get("boot") != last or (camera and result["camera"] != camera) or result["seq"] > len(labels):
            continue
        total += 1
        hits += result["top"][0]["label"] == str(labels[result["seq"] - 1])
    return Score(hits / total if total else 0.0, total, last, len(boots))
