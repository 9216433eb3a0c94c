"""The newcomer's path: set-up that fails fast, help that says enough, output readable at 80 columns."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from builder.passport_view import show_passport
from builder.progress import LogProgress, counter, make_progress, note, step

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("edgevit-build", "edgevit-agent", "edgevit-fleet")


def command(name: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / name
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=60, env={**os.environ, **env})


def test_make_test_names_missing_system_packages_in_seconds(tmp_path: Path) -> None:
    """A machine without ffmpeg: one line naming the package, before anything is installed."""
    for tool in ("bash", "env", "make", "systemd-analyze", "chromium", "chromedriver"):
        if found := shutil.which(tool):
            (tmp_path / tool).symlink_to(found)
    started = time.monotonic()
    proc = subprocess.run(
        ["/usr/bin/make", "--no-print-directory", "test"], cwd=ROOT, capture_output=True, text=True,
        env={"PATH": str(tmp_path), "HOME": str(tmp_path)}, timeout=60,
    )  # fmt: skip
    assert time.monotonic() - started < 10
    assert proc.returncode != 0
    line = next(line for line in proc.stderr.splitlines() if "missing" in line)
    assert "apt-get install" in line and "ffmpeg" in line.split("apt-get install", 1)[1]


@pytest.mark.parametrize("name", COMMANDS)
def test_help_shows_defaults_and_version(name: str) -> None:
    helped = command(name, "--help", COLUMNS="100")
    assert helped.returncode == 0 and "``" not in helped.stdout
    version = command(name, "--version")
    assert version.returncode == 0 and re.fullmatch(rf"{name} \(edgevit\) \d+\.\d+\.\d+\S*\n", version.stdout)


def test_every_engine_option_has_help_and_its_default() -> None:
    text = command("edgevit-build", "engine", "--help", COLUMNS="200").stdout
    for option, default in [
        ("--target", "cpu"),
        ("--precision", "fp32"),
        ("--max-batch", "8"),
        ("--calibration", "minmax"),
    ]:
        entry = re.search(rf"^  {option} \S+\s+(.+)$", text, re.M)
        assert entry and f"(default: {default})" in entry.group(1), option
    fleet = command("edgevit-fleet", "serve", "--help", COLUMNS="200").stdout
    assert re.search(r"--bind BIND\s+address to listen on .*\(default: 0\.0\.0\.0\)", fleet)


def test_builder_help_does_not_load_jax() -> None:
    heavy = "{'jax', 'onnxruntime', 'openvino'}"
    code = f"import sys; from builder.cli import parser; parser(); print(sorted({heavy} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_fleet_names_the_broker_it_cannot_reach() -> None:
    proc = command("edgevit-fleet", "status", "--host", "127.0.0.1", "--port", "1999")
    assert proc.returncode == 2
    assert "MQTT broker 127.0.0.1:1999" in proc.stderr and "Traceback" not in proc.stderr


def test_progress_in_a_log_is_timestamped_lines() -> None:
    console = Console(record=True, width=80, force_terminal=False)
    with make_progress(console) as progress:
        assert isinstance(progress, LogProgress)
        with step(progress, "converting a model with a long description that would push the bar off an 80-column line"):
            pass
        report = counter(progress, "calibrating")
        for done in range(1, 5):
            report(done, 4)
        note(progress, "scoring a recipe")
    lines = console.export_text().splitlines()
    stamp = r"\d\d:\d\d:\d\d "
    assert re.fullmatch(stamp + r"converting .* \.\.\.", lines[0])
    assert re.fullmatch(stamp + r"converting .*: done \(\d+\.\d s\)", lines[1])
    assert re.fullmatch(stamp + r"calibrating \.\.\.", lines[2])
    assert re.fullmatch(stamp + r"calibrating: 4/4 done \(\d+\.\d s\)", lines[3])  # intermediate counts: every 10 s
    assert re.fullmatch(stamp + r"scoring a recipe: done", lines[4])


def test_progress_on_an_80_column_terminal_keeps_count_and_time() -> None:
    terminal = Console(width=80, force_terminal=True, file=open(os.devnull, "w"))  # noqa: SIM115
    progress = make_progress(terminal)
    report = counter(progress, "calibrating INT8 on 128 images, smoothed α=0.65, every layer measured")
    report(37, 128)
    screen = Console(record=True, width=80, color_system=None, file=open(os.devnull, "w"))  # noqa: SIM115
    screen.print(progress.get_renderable())
    line = screen.export_text().strip()
    assert len(line) <= 80 and "37/128" in line and re.search(r"\d:\d\d:\d\d$", line)


def test_passport_fits_80_columns(demo_bundle: Path) -> None:
    import json

    console = Console(record=True, width=80, force_terminal=True, color_system=None)
    passport = json.loads((demo_bundle / "passport.json").read_text())
    show_passport(console, passport, {"latency": passport["latency"], "peak_rss_mib": 1.0})
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    for candidate in passport["candidates"]:
        assert candidate["label"] in text  # each label whole, on one line
    assert "1.00×" in text  # the re-measured column beside the built one
