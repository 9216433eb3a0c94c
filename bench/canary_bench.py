"""The canary's error rates and detection, simulated and with real agents (bench/results/canary_bench.*).

    python bench/canary_bench.py [--canaries 1000] [--swaps 20] [--runs 10] [--window 45]
                                 [--fleet-devices 10] [--skip-agents] [--out bench/results]

1. The demo video's correlation: every frame of the 450 held-out digits through two pairs of
   engines (the weaker and the retrained model; v2's INT8 and FP32), the runs of disagreeing
   frames measured (bench/canary_sim.py takes their length from here).
2. Simulation, ``--canaries`` per row, through the agent's own rules (bench/canary_sim.py).
3. Real agents (bench/canary_agents.py): same-model swaps, a model update, a damaged engine,
   each on one device, then through ``edgevit-fleet deploy`` to ``--fleet-devices`` agents per
   scenario. Commit scenarios use a ``--window`` s canary window (the default 300 s would make
   the run hours long); the damaged engine is judged with the default window.

Needs the ``mosquitto`` binary.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import canary_agents  # noqa: E402
import canary_sim  # noqa: E402

from agent.engine.bundle import verify_bundle  # noqa: E402
from agent.engine.preprocess import preprocess_into  # noqa: E402
from agent.engine.runtimes import open_bundle_engine  # noqa: E402


def video_frames(path: Path) -> np.ndarray:
    capture, frames = cv2.VideoCapture(str(path)), []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return np.stack(frames)


def top1(bundle: Path, frames: np.ndarray) -> np.ndarray:
    """Top-1 of every video frame through a bundle's engine and the agent's preprocessing."""
    b = verify_bundle(bundle, None)
    spec = b.input_spec
    batch = np.empty((len(frames), spec.height, spec.width, 3), np.uint8)
    for slot, frame in zip(batch, frames, strict=True):
        preprocess_into(frame, spec, slot, "BGR")
    engine = open_bundle_engine(b)
    n = b.batch_range[1]
    out = np.concatenate([engine.run(batch[i : i + n]).argmax(-1) for i in range(0, len(batch), n)])
    engine.close()
    return out


def demo_correlation(files: dict[str, Path]) -> dict[str, dict[str, float]]:
    frames = video_frames(files["video"])
    classes = {name: top1(files[name], frames) for name in ("v1-int8", "v2-fp32", "v2-int8", "damaged")}
    pairs = {
        "retrained v2 vs v1": ("v2-fp32", "v1-int8"),
        "v2 FP32 vs INT8": ("v2-fp32", "v2-int8"),
        "damaged vs v2": ("damaged", "v2-fp32"),
    }
    return {label: canary_sim.correlation((classes[a] != classes[b]).astype(np.int8)) for label, (a, b) in
            pairs.items()}  # fmt: skip


def _simulate(args: tuple[canary_sim.Spec, int, int]) -> canary_sim.Row:
    return canary_sim.simulate(*args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--swaps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--window", type=float, default=45.0)
    parser.add_argument("--fleet-devices", type=int, default=10)
    parser.add_argument("--skip-agents", action="store_true", help="the correlation and the simulation only")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    started = time.monotonic()
    report: dict = {"settings": vars(args) | {"out": str(args.out)}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        log("building the bundles")
        files = canary_agents.prepare(work)
        report["correlation"] = demo_correlation(files)
        log(f"demo video: {json.dumps(report['correlation'])}")
        runs = max(1.0, report["correlation"]["v2 FP32 vs INT8"]["mean_run_frames"],
                   report["correlation"]["retrained v2 vs v1"]["mean_run_frames"])  # fmt: skip
        with multiprocessing.get_context("spawn").Pool(2) as pool:  # two cores: the rows in two processes
            pending = pool.apply_async(canary_sim.whole_canary_false_reverts, (args.canaries, runs))
            rows = pool.map(_simulate, [(s, args.canaries, i) for i, s in enumerate(canary_sim.specs(runs))])
            whole = pending.get()
        report["simulation"] = [asdict(r) for r in rows]
        report["whole_canary_false_reverts"] = whole
        log(canary_sim.table(rows))
        if not args.skip_agents:
            log("real agents, one device each")
            report["agents"] = canary_agents.single_device(work, files, args.swaps, args.runs, args.window, log)
            log("real agents through edgevit-fleet")
            report["fleet"] = canary_agents.fleet(work, files, args.fleet_devices, args.window, log)
    report["seconds"] = round(time.monotonic() - started)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "canary_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "canary_bench.md").write_text(markdown(report, rows))
    print(markdown(report, rows))


def markdown(report: dict, rows: list[canary_sim.Row]) -> str:
    parts = ["## Demo video: runs of disagreeing frames\n"]
    parts += ["| pair | disagreement | lag-1 | lag-2 | mean run (frames) |", "|---|---|---|---|---|"]
    for pair, c in report["correlation"].items():
        parts.append(f"| {pair} | {c['rate']:.2%} | {c['lag1']:.3f} | {c['lag2']:.3f} | {c['mean_run_frames']:.2f} |")
    parts += ["", "## Simulation\n", canary_sim.table(rows),
              f"A good same-model bundle judged by both rules: {report['whole_canary_false_reverts']:.2%} of "
              f"{report['settings']['canaries']} canaries reverted (canary.alpha 1 %).", ""]  # fmt: skip
    for scenario, outcomes in report.get("agents", {}).items():
        parts += [f"## One device: {scenario}\n", "| deploy | outcome | rule | agreement (bound / limit) | "
                  "latency ratio (pairs) | s |", "|---|---|---|---|---|---|"]  # fmt: skip
        for o in outcomes:
            agreement = "-" if o["agreement"] is None else (
                f"{o['agreement']:.2%} ({o['agreement_bound']:.2%} / {o['agreement_limit']:.2%})")  # fmt: skip
            latency = "-" if o["latency_ratio"] is None else f"{o['latency_ratio']:.2f} ({o['latency_pairs']})"
            parts.append(f"| {o['deploy']} | {o['outcome']} | {o['rule'] or '-'} | {agreement} | {latency} | "
                         f"{o['seconds'] or '-'} |")  # fmt: skip
        parts.append("")
    for row in report.get("fleet", []):
        parts += [f"## Fleet: {row['group']} ({row['bundle']}), exit {row['exit']}, {row['seconds']} s\n", "```",
                  *row["lines"], "```", ""]  # fmt: skip
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    main()
