"""The demo scorer reads the last agent run of a results file the agent appends to."""

from __future__ import annotations

import json
from pathlib import Path

from builder.demo.score import score


def _result(boot: str, seq: int, label: str) -> str:
    return json.dumps({"camera": "digits", "boot": boot, "seq": seq, "top": [{"label": label, "score": 0.9}]})


def test_only_the_last_run_is_scored(tmp_path: Path) -> None:
    labels = tmp_path / "digits.json"
    labels.write_text(json.dumps({"labels": [1, 2, 3, 4]}))
    results = tmp_path / "results.jsonl"
    first = [_result("a", s, "0") for s in (1, 2, 3, 4)]  # a wrong earlier run
    second = [_result("b", s, str(label)) for s, label in ((1, 1), (2, 2), (3, 3), (4, 9))]
    results.write_text("\n".join(first + second) + "\n")
    scored = score(results, labels)
    assert (scored.top1, scored.frames, scored.boot, scored.runs) == (0.75, 4, "b", 2)
