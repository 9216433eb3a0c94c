"""``edgevit-build`` as a user runs it: a real process, its exit codes and messages."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.engine.device import DeviceInfo, full_range_int8_exact

from conftest import SMALL_MIXER, SMALL_VIT

pytestmark = pytest.mark.integration  # real builder processes, end to end: exports and builds


def build(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "builder.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "200"},
    )


def test_export_checks_the_named_architecture(write_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    """(A successful export through the CLI is the documents' export block: tests/test_doc_commands.py.)"""
    proc = build(
        "export", write_checkpoint(SMALL_VIT), "--out", tmp_path / "out", "--model", "ViT-Ti_16", "--samples", "3"
    )
    assert proc.returncode == 2 and "does not match ViT-Ti_16" in proc.stderr  # small model is not a Ti


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


def test_demo_main_job(demo_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    tmp_path, proc = demo_run
    for name in ("vit-digits", "mixer-digits"):
        assert re.search(rf"{name}: held-out top-1 \d+\.\d\d% on \d+ digits", proc.stdout)
        assert (tmp_path / name / "model.onnx").is_file()
        assert re.search(
            rf"wrote bundle {tmp_path}/bundles/{name}-cpu-int8 \({name}-1-cpu(-bf16)?-int8-[0-9a-f]{{8}}\)",
            proc.stdout.replace("\n", ""),
        )
    inspect = build(
        "inspect", tmp_path / "bundles" / "vit-digits-cpu-int8", "--trust", tmp_path / "keys" / "edgevit.pub"
    )
    assert inspect.returncode == 0, inspect.stderr
    assert "all files intact, runs on this device" in inspect.stdout and "golden set passed" in inspect.stdout
    # each candidate's recipe: method, calibration, smoothing (the demo model has no outliers to smooth)
    assert "int8 static (minmax)" in inspect.stdout and "int8 dynamic" in inspect.stdout
    scheme = "u8s8" if full_range_int8_exact(DeviceInfo.probe()) else "u8s7"  # --int8-cpu auto: as this CPU
    assert f"static-qdq-{scheme}" in inspect.stdout and ("no smoothing" in inspect.stdout or "α=" in inspect.stdout)
    # the whole passport: the gate, latency per batch size, the recipe of what ships
    assert re.search(r"gate: top-1 drop ≤ 1 pts, agreement ≥ 99%; passed", inspect.stdout)
    assert "latency per batch size" in inspect.stdout and "engine: " in inspect.stdout
    # piped output is a log: every step a timestamped line with its count or elapsed time
    assert re.search(r"^\d\d:\d\d:\d\d converting ViT-\S+ to ONNX \(opset 20\): done \(\d+\.\d s\)$", proc.stdout, re.M)
    assert re.search(r"^\d\d:\d\d:\d\d evaluating the FP32 reference: \d+/\d+ done", proc.stdout, re.M)
    as_json = build(
        "inspect", tmp_path / "bundles" / "mixer-digits-cpu-int8", "--trust", tmp_path / "keys" / "edgevit.pub",
        "--json", "--profile", "--profile-seconds", "0.05",
    )  # fmt: skip
    assert as_json.returncode == 0, as_json.stderr
    shown = json.loads(as_json.stdout)
    passport = json.loads((tmp_path / "bundles" / "mixer-digits-cpu-int8" / "passport.json").read_text())
    assert shown["passport"] == passport and shown["golden"]["passed"]
    assert [r["batch"] for r in shown["profile_here"]["latency"]] == [r["batch"] for r in passport["latency"]]
    assert all(r["images_per_s"] > 0 for r in shown["profile_here"]["latency"])


def test_keygen_never_overwrites(tmp_path: Path) -> None:
    assert build("keygen", "--out", tmp_path).returncode == 0
    assert (tmp_path / "edgevit.key").stat().st_mode & 0o777 == 0o600
    again = build("keygen", "--out", tmp_path)
    assert again.returncode == 2 and "refusing to overwrite a signing key" in again.stderr


def test_gate_exit_code_and_a_tampered_bundle(
    demo_run: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    """Exit 4 when the gate refuses (blank calibration images); a bundle altered after signing is refused.
    (A successful build through the CLI is the documents' build block: tests/test_doc_commands.py.)"""
    demo, _ = demo_run
    key, public = demo / "keys" / "edgevit.key", demo / "keys" / "edgevit.pub"
    checkpoint = Path(__file__).parents[1] / "builder" / "demo" / "checkpoints" / "vit-digits.npz"
    blank = tmp_path / "blank"
    blank.mkdir()
    for i in range(3):
        (blank / f"{i}.pgm").write_bytes(b"P5\n16 16\n255\n" + bytes(256))
    proc = build(
        "build", checkpoint, "--out", tmp_path / "int8", "--eval", "demo", "--key", key, "--precision", "int8",
        "--quantization", "static", "--runtime", "onnxruntime", "--calib", blank, "--profile-seconds", "0.05",
    )  # fmt: skip
    assert proc.returncode == 4, proc.stderr
    assert "no bundle: every candidate is outside the accuracy budget" in proc.stderr
    assert not (tmp_path / "int8").exists()
    bundle = tmp_path / "bundle"
    shutil.copytree(demo / "bundles" / "mixer-digits-cpu-int8", bundle)
    (bundle / "labels.json").write_text("[]")
    tampered = build("inspect", bundle, "--trust", public)
    assert tampered.returncode == 2 and "labels.json does not match its sha256" in tampered.stderr
