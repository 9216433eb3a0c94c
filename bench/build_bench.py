"""How long a CPU INT8 build takes and how much memory it needs, per model, through the CLI as a user runs it.

For each model (random weights in the published layout, 224 px): write the checkpoint, export it,
then time ``edgevit-build engine EXPORT --target cpu --precision int8`` with its defaults (128
calibration images; the gate's evaluation set is 64 digit images labelled by the FP32 export's own
predictions, as in ``engine_bench.py``). The build runs as a child process: its wall time, and the
peak RSS of the largest process of the build (the builder or one of the profiling processes it
starts, as ``/usr/bin/time -v`` reports it), and the largest RSS of all its processes together (what
the machine must hold; sampled every 0.5 s) with the step it happened in. The builder's own log lines
carry a clock, so the time is also split by step (recipe search, evaluation, profiling, head to head,
NNCF, mixed precision).

    python bench/build_bench.py [--models ViT-B_16 Mixer-B_16] [--out bench/results] [-- extra engine flags]

Writes ``build_bench.json`` and ``build_bench.md`` into ``--out`` and the build logs beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine_bench import image_folders  # noqa: E402
from export_bench import config  # noqa: E402
from tree_memory import TreeMemory  # noqa: E402

# A log line's step, by how its description starts; the first that matches names it.
STEPS = (
    ("recipe search", ("measuring activations", "scoring ")),
    ("mixed precision", ("mixed precision", "trying ")),
    ("NNCF", ("quantizing INT8 with NNCF",)),
    ("profiling", ("profiling ",)),
    ("head to head", ("timing ",)),
    ("evaluation", ("evaluating ",)),
)
LINE = re.compile(r"^(\d\d:\d\d:\d\d) (.*)$")


def step_seconds(log: str) -> dict[str, float]:
    """Seconds per step: each log line's step lasts until the next line begins (a build runs one at a time)."""
    stamps = []
    for line in log.splitlines():
        found = LINE.match(line)
        if found:
            name = next((s for s, starts in STEPS if found[2].startswith(starts)), "other")
            stamps.append((datetime.strptime(found[1], "%H:%M:%S"), name))
    totals: dict[str, float] = defaultdict(float)
    for (at, name), (after, _) in zip(stamps, stamps[1:], strict=False):
        totals[name] += (after - at).total_seconds() % 86400  # a build across midnight
    return dict(totals)


def prepare(name: str, work: Path) -> None:
    """The checkpoint, its export and the image folders, in ``work``: run in a process of its own (JAX), since
    Linux hands a process's peak RSS to the children it spawns (``ru_maxrss`` survives ``exec``), and the
    build's largest-process figure would then be the export's."""
    from builder.demo.digits import digit_images
    from builder.export.checkpoint import save_checkpoint
    from builder.export.job import export_checkpoint
    from builder.export.models import init_params

    ckpt = work / f"{name}.npz"
    save_checkpoint(ckpt, init_params(config(name)))
    export_checkpoint(ckpt, work / "onnx")
    image_folders(work / "onnx", digit_images(224)[0][:128], work, embeddings=False)


def measure(name: str, work: Path, extra: list[str], logs: Path) -> dict[str, Any]:
    from builder.bundle.keys import keygen

    subprocess.run([sys.executable, __file__, "--prepare", name, str(work)], check=True)
    key = keygen(work / "keys")[0]
    command = [
        sys.executable, "-m", "builder.cli", "engine", str(work / "onnx"), "--out", str(work / "bundle"),
        "--key", str(key), "--target", "cpu", "--precision", "int8", "--calib", str(work / "calib"),
        "--eval", str(work / "eval"), "--labels", str(work / "labels.txt"), *extra,
    ]  # fmt: skip
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"})
        memory = TreeMemory(proc.pid, every_s=0.5)
        _, status, usage = os.wait4(proc.pid, 0)  # the build's own rusage: the preparing child is not in it
        returncode = os.waitstatus_to_exitcode(status)
        memory.stop()
        at, tree_peak = memory.peak()
        seconds = time.perf_counter() - start
        out.seek(0)
        log = out.read()
    (logs / f"build_bench_{name}.log").write_text(log)
    if returncode != 0:
        raise SystemExit(f"{name}: the build failed:\n{log[-2000:]}")
    passport = json.loads((work / "bundle" / "passport.json").read_text())
    return {
        "model": name,
        "flags": extra,
        "wall_s": seconds,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "tree_peak_rss_mib": tree_peak,
        "tree_peak_during": step_at(log, time.strftime("%H:%M:%S", time.localtime(at))),
        "steps_s": step_seconds(log),
        "chosen": passport["engine"]["chosen"],
    }


def step_at(log: str, at: str) -> str:
    """The description of the last log line at or before ``at`` (HH:MM:SS)."""
    found = [m[2] for m in map(LINE.match, log.splitlines()) if m and m[1] <= at]
    return found[-1] if found else ""


def markdown(rows: list[dict[str, Any]]) -> str:
    steps = [s for s, _ in STEPS] + ["other"]
    lines = [
        "| model | flags | wall time | peak RSS MiB (largest process) | all processes MiB | "
        + " | ".join(steps)
        + " | ships |",
        "|---|---|---|---|---|" + "---|" * len(steps) + "---|",
    ]
    for r in rows:
        parts = " | ".join(f"{r['steps_s'].get(s, 0):.0f} s" for s in steps)
        flags = " ".join(r["flags"]) or "defaults"
        lines.append(
            f"| {r['model']} | {flags} | {r['wall_s'] / 60:.1f} min | {r['peak_rss_mib']:.0f} | "
            f"{r['tree_peak_rss_mib']:.0f} | {parts} | {r['chosen']} |"
        )
    lines.append("")
    lines += [f'- {r["model"]}: all processes together peaked during "{r["tree_peak_during"]}".' for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args.add_argument("--models", nargs="+", default=["ViT-B_16", "Mixer-B_16"])
    args.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args.add_argument("extra", nargs="*", help="more flags for edgevit-build engine (after --)")
    args.add_argument("--prepare", nargs=2, metavar=("MODEL", "WORK"), help=argparse.SUPPRESS)
    parsed = args.parse_args()
    if parsed.prepare:
        prepare(parsed.prepare[0], Path(parsed.prepare[1]))
        return
    parsed.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in parsed.models:  # one model per process: the peak RSS is that model's
        if len(parsed.models) > 1:
            subprocess.run(
                [sys.executable, __file__, "--models", name, "--out", str(parsed.out), "--", *parsed.extra], check=True
            )
            rows.append(json.loads((parsed.out / "build_bench.json").read_text())["models"][0])
            continue
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(measure(name, Path(tmp), parsed.extra, parsed.out))
    (parsed.out / "build_bench.json").write_text(json.dumps({"models": rows}, indent=2) + "\n")
    table = markdown(rows)
    (parsed.out / "build_bench.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
