"""``edgevit-build`` as a user runs it: a real process, its exit codes and messages."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from conftest import SMALL_MIXER, SMALL_VIT


def build(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "builder.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "200"},
    )


def test_export(write_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    proc = build(
        "export", write_checkpoint(SMALL_VIT), "--out", tmp_path / "out", "--model", "ViT-Ti_16", "--samples", "3"
    )
    assert proc.returncode == 2 and "does not match ViT-Ti_16" in proc.stderr  # small model is not a Ti
    proc = build("export", write_checkpoint(SMALL_VIT), "--out", tmp_path / "out", "--samples", "3")
    assert proc.returncode == 0, proc.stderr
    assert "verification passed" in proc.stdout and "at batch sizes [1, 3]" in proc.stdout
    assert (tmp_path / "out" / "model.onnx").is_file()
    assert json.loads((tmp_path / "out" / "verification.json").read_text())["passed"]


def test_bad_checkpoint_gets_one_clear_line(write_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    path = write_checkpoint(SMALL_VIT)
    path.write_bytes(path.read_bytes()[:1000])
    proc = build("export", path, "--out", tmp_path / "out")
    assert proc.returncode == 2
    assert re.search(r"error: checkpoint .*model\.npz is not a readable \.npz archive", proc.stderr)
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_mixer_resolution_is_refused(write_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    proc = build("export", write_checkpoint(SMALL_MIXER), "--out", tmp_path / "out", "--resolution", "128")
    assert proc.returncode == 2 and "cannot change resolution" in proc.stderr


def test_verification_failure_exit_code(write_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    proc = build("export", write_checkpoint(SMALL_MIXER), "--out", tmp_path / "out", "--tolerance", "1e-12")
    assert proc.returncode == 3 and "verification FAILED" in proc.stderr
    assert json.loads((tmp_path / "out" / "verification.json").read_text())["passed"] is False


def test_demo_main_job(tmp_path: Path) -> None:
    proc = build("demo", "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in ("vit-digits", "mixer-digits"):
        assert re.search(rf"{name}: held-out top-1 \d+\.\d\d% on \d+ digits", proc.stdout)
        assert (tmp_path / name / "model.onnx").is_file()
