"""The newcomer's path: set-up that fails fast, help that says enough, output readable at 80 columns."""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from builder.bundle.view import show_passport
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
    assert re.search(r"--bind BIND\s+address to listen on .*\(default: 127\.0\.0\.1\)", fleet)


def _commands(root: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in root._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("module", ["builder.cli", "fleet.cli"])
def test_every_argument_has_help_and_each_default_once(module: str) -> None:
    root = importlib.import_module(module).parser()
    for name, cmd in _commands(root).items():
        for action in cmd._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"{module} {name} {action.dest} has no help"
        text = cmd.format_help()
        assert "(default: )" not in text
        assert not re.search(r"\(default:? [^)]*\)\s*\(default", text), f"{name}: a default shown twice"


def test_only_commands_that_send_commands_offer_signing() -> None:
    import fleet.cli

    commands = _commands(fleet.cli.parser())
    signing = {name for name, cmd in commands.items() if any("--sign" in a.option_strings for a in cmd._actions)}
    assert signing == {"deploy", "resume", "rollback"}


def test_fleet_help_loads_nothing_heavy() -> None:
    """``edgevit-fleet --help`` is what an operator types first: the parser alone, no numpy, rich or MQTT."""
    heavy = "{'numpy', 'rich', 'paho', 'pydantic', 'cv2', 'importlib.metadata'}"
    code = f"import sys; from fleet.cli import parser; parser(); print(sorted({heavy} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


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


def test_a_latency_row_timed_at_another_size_says_so() -> None:
    from builder.bundle.view import latency_table

    rows = [{"batch": b, "images_per_s": 10.0, "p50_ms": 1.0, "p99_ms": 2.0} for b in (1, 4)]
    rows.insert(1, {**rows[1], "batch": 3, "images_per_s": 7.5, "timed_at": 4})
    console = Console(record=True, width=80, color_system=None)
    console.print(latency_table(rows, None))
    text = console.export_text()
    assert "3 (as 4)" in text and "(as N): same requests, timed at N" in text
    assert max(len(line) for line in text.splitlines()) <= 80


def _snapshot(cameras: dict[str, str]) -> dict:
    cams = {n: {"processed_fps": 10.0, "skipped": 1, "shed": 0, "state": state} for n, state in cameras.items()}
    return {"cameras": cams, "latency": {"p50_ms": 123.45, "p99_ms": 1234.56}, "decision": {"batch": 8}}


def test_the_agent_live_line_fits_80_columns() -> None:
    from agent.daemon import live_line

    one = live_line(_snapshot({"digits": "connected"}))
    assert one.endswith("| digits=connected") and len(one) < 80
    many = live_line(_snapshot({f"camera-{i:02d}": "connected" if i % 4 else "reconnecting" for i in range(12)}))
    assert many.endswith("| 9/12 connected") and len(many) < 80
    assert len(live_line(_snapshot({"c" * 64: "connected"}))) < 80


def test_finished_steps_stop_their_clocks() -> None:
    """A step, a counter and a note, each finished: their elapsed times no longer run, their spinners stop."""
    progress = make_progress(Console(width=80, force_terminal=True, file=open(os.devnull, "w")))  # noqa: SIM115
    with step(progress, "exporting"):
        pass
    counter(progress, "calibrating")(4, 4)
    note(progress, "scored a recipe")
    time.sleep(1.2)
    assert all(task.finished and task.finished_time is not None and task.finished_time < 1 for task in progress.tasks)
