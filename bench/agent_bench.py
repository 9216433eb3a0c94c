"""The agent end to end: 1, 2, 4 and 8 cameras of 30 fps video through the real daemon.

Two engines: the demo ViT INT8 bundle (64 px) and ViT-Ti/16 INT8 at 224 px (random
weights, built with ``--accept-accuracy-loss`` since only its speed matters here).
For each, measured in one run on this machine:

- the raw engine's images/s at its best batch size (found by a sweep with ``agent.engine.profile``,
  own process, before each pass), measured right before and right after each agent run; a run's
  share is its frames/s over the mean of the two. The share of all cores the engine kept busy at
  that batch size on its own is from the sweep;
- the agent's processed frames/s, frame-to-result p99 and skipped/shed frames, with
  adaptive batching and with fixed batch 1 and fixed maximum batch at the same load;
- where the CPU went while every camera ran: the engine's worker, the decoders, the agent
  itself, and idle, in percent of all cores (read from /proc for half the run).

Frames/s is the agent's steady state, as the raw engine's figure is over warm runs: the
frames processed in the window the CPU split is read over (every camera serving), from the
agent's own Prometheus counters at its two ends. Counted over the whole run, the decoders'
start-up (the camera bench's to measure) and the batch policy's first batches would weigh
as a loss of throughput in a run of seconds; the p99 and the frame counts are the whole
run's.

``--repeat N`` makes N passes (a shared machine's speed drifts by tens of percent within
minutes); a row is the pass with the median share of its raw figure, with the range of the
shares beside it.

The cameras are looping files paced at 30 fps (decode and resize run on the same two
cores as the engine, as they would on a CPU-only box).

    python bench/agent_bench.py [--seconds 8] [--budget-ms 100] [--repeat 1] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import cv2
import psutil
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from export_bench import config  # noqa: E402

from agent.engine.bundle import Bundle, verify_bundle  # noqa: E402
from agent.stream.pipeline import PassportLatency  # noqa: E402
from builder.bundle.build import build_engine_bundle  # noqa: E402
from builder.bundle.keys import keygen  # noqa: E402
from builder.bundle.options import EngineOptions  # noqa: E402
from builder.demo.digits import raw_digits  # noqa: E402
from builder.demo.evaluate import held_out_indices  # noqa: E402
from builder.demo.train import CHECKPOINT_DIR  # noqa: E402
from builder.demo.video import write_labelled_video  # noqa: E402
from builder.evaluate.measure import profile_engine  # noqa: E402
from builder.export.checkpoint import save_checkpoint  # noqa: E402
from builder.export.job import export_checkpoint  # noqa: E402
from builder.export.models import init_params  # noqa: E402

CAMERAS = [1, 2, 4, 8]
RAW_BRACKET_S = 2.0  # the engine alone before and after each run, at its best batch size


def bundles(work: Path, key: Path) -> dict[str, Path]:
    demo = export_checkpoint(CHECKPOINT_DIR / "vit-digits.npz", work / "demo-export")
    out = {
        "demo ViT INT8 64px": build_engine_bundle(
            demo.model_path.parent,
            work / "demo-bundle",
            key,
            EngineOptions(precision="int8", eval="demo", calib="demo", profile_seconds=0.3),
        ).path
    }
    save_checkpoint(work / "ti.npz", init_params(config("ViT-Ti_16")))
    ti = export_checkpoint(work / "ti.npz", work / "ti-export")
    labels = work / "labels.txt"
    labels.write_text("\n".join(f"class{i}" for i in range(1000)))
    evaluation = work / "eval" / "class0"
    evaluation.mkdir(parents=True)
    for i, scan in enumerate(raw_digits()[0][:16]):
        cv2.imwrite(str(evaluation / f"{i}.png"), cv2.resize(scan, (224, 224)))
    out["ViT-Ti/16 INT8 224px"] = build_engine_bundle(
        ti.model_path.parent,
        work / "ti-bundle",
        key,
        EngineOptions(
            precision="int8",
            eval=str(work / "eval"),
            calib=str(work / "eval"),
            labels=labels,
            accept_accuracy_loss=True,
            profile_seconds=0.3,
        ),
    ).path
    return out


def best_batch(b: Bundle) -> tuple[int, float]:
    """The batch size at which the bundle's engine alone serves the most images/s over a sweep, in whichever
    runtime it ships for (the builder may pick OpenVINO), and the share of the cores it kept busy there.
    What the engine leaves idle by itself, the agent cannot use for it either."""
    best = max(_raw(b, list(range(1, b.batch_range[1] + 1)), 1.0), key=lambda row: row["images_per_s"])
    return int(best["batch"]), 100 * float(best["cpu_share"])


def raw_at(b: Bundle, batch: int) -> float:
    """The engine alone at one batch size, images/s: taken right before and right after each agent run, so
    the share compares the agent with the machine as it was then (its speed drifts by tens of percent within
    minutes, as much as the gap a share is read for)."""
    return float(_raw(b, [batch], RAW_BRACKET_S)[0]["images_per_s"])


def _raw(b: Bundle, batches: list[int], seconds: float) -> list[dict]:
    profile = profile_engine(  # served as the agent serves it
        b.engine_path, b.backend, b.target, b.input_spec.height, batches, seconds, None, b.images_per_stream
    )
    return list(profile["latency"])


def run_agent(
    bundle: Path,
    public: Path,
    video: Path,
    cameras: int,
    batching: dict,
    seconds: float,
    work: Path,
    agent_root: Path = ROOT,
) -> dict:
    cfg = {
        "device": "bench",
        "state_dir": str(work / "state"),
        "engine": {"bundle": str(bundle), "trusted_keys": [str(public)]},
        "cameras": [{"name": f"cam{i}", "source": str(video), "loop": True, "fps": 30} for i in range(cameras)],
        "batching": batching,
        "metrics": {"prometheus_port": (port := free_port())},
    }
    path = work / "agent.yaml"
    path.write_text(yaml.safe_dump(cfg))
    command = [sys.executable, "-m", "agent.daemon", "--config", str(path), "--duration", str(seconds)]
    with subprocess.Popen(
        [*command, "--log-level", "WARNING"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=agent_root
    ) as proc:
        split, processed_fps = steady_window(proc.pid, cameras, seconds / 2, port)
        out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"the agent failed ({proc.returncode}): {err[-2000:]}")
    summary = next(json.loads(line)["summary"] for line in out.splitlines() if line.startswith('{"summary"'))
    cams = summary["cameras"].values()
    return {
        "processed_fps": processed_fps,
        "run_processed_fps": sum(c["processed"] for c in cams) / seconds,  # start-up included
        "taken": sum(c["taken"] for c in cams),
        "skipped": sum(c["skipped"] for c in cams),
        "shed": sum(c["shed"] for c in cams),
        "p99_ms": summary["latency"]["p99_ms"],
        "batches": summary["batch_sizes"],
        "cpu_split": split,
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def steady_window(pid: int, cameras: int, window: float, port: int) -> tuple[dict[str, float], float]:
    """Over ``window`` seconds that start 2 s after the last decoder did (every camera serving): where the
    machine's CPU went, in percent of all cores, for the engine's worker, the decoders, the agent itself
    (relaying frames, batching, results) and nothing (idle, or other processes); and the frames/s the agent
    processed, from its Prometheus counters."""
    agent = psutil.Process(pid)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and sum(_kind(p) == "decoders" for p in _tree(agent)) < cameras:
        time.sleep(0.1)
    time.sleep(2.0)
    before, frames_before, start = cpu_by_kind(agent), frame_count(port, "processed"), time.monotonic()
    time.sleep(window)
    after, frames_after, elapsed = cpu_by_kind(agent), frame_count(port, "processed"), time.monotonic() - start
    cores = psutil.cpu_count() or 1
    split = {k: round((after.get(k, 0.0) - before.get(k, 0.0)) / elapsed / cores * 100, 1) for k in KINDS}
    split["idle"] = round(100 - sum(split.values()), 1)
    return split, (frames_after - frames_before) / elapsed


def frame_counts(port: int, kind: str) -> dict[str, float]:
    """Each camera's frames of one fate so far (``processed``, ``decoded``...), as the agent's Prometheus
    endpoint counts them."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        sample.labels["camera"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "edgevit_frames_total" and sample.labels.get("kind") == kind
    }


def frame_count(port: int, kind: str) -> float:
    """Every camera's frames of one fate so far."""
    return sum(frame_counts(port, kind).values())


KINDS = ("engine", "decoders", "agent")


def _tree(agent: psutil.Process) -> list[psutil.Process]:
    return [agent, *agent.children(recursive=True)]


def _kind(process: psutil.Process) -> str:
    try:
        command = " ".join(process.cmdline())
    except psutil.Error:
        return "gone"
    return "decoders" if "agent.stream.decoder" in command else "agent" if "agent.daemon" in command else "engine"


def cpu_by_kind(agent: psutil.Process) -> dict[str, float]:
    """CPU seconds so far of each kind of process, children that were waited for excluded."""
    found: dict[str, float] = {}
    for process in _tree(agent):
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        kind = _kind(process)
        found[kind] = found.get(kind, 0.0) + times.user + times.system
    return found


def median_run(runs: list[dict]) -> dict:
    """The pass whose share of its own raw engine figure is the median, with every pass's share beside it."""
    shares = [r["processed_fps"] / r["raw_ips"] for r in runs]
    middle = sorted(range(len(runs)), key=lambda i: shares[i])[len(runs) // 2]
    return {**runs[middle], "of_raw_median": statistics.median(shares), "of_raw": shares, "passes": runs}


def main_batch(run: dict) -> int:
    """The batch size that served the most images in a pass (the summary counts batches per size)."""
    return max((int(size) for size in run["batches"]), key=lambda size: size * run["batches"][str(size)], default=0)


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args.add_argument("--seconds", type=float, default=8.0)
    args.add_argument("--budget-ms", type=float, default=100.0)
    args.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args.add_argument("--only", help="measure only engines whose name contains this")
    args.add_argument("--cameras", type=int, nargs="+", default=CAMERAS, help="camera counts to run")
    args.add_argument("--agent-root", type=Path, default=ROOT, help="the checkout whose agent runs (same venv)")
    args.add_argument("--repeat", type=int, default=1, help="passes; each row shows their median and range")
    parsed = args.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        key, public, _ = keygen(work / "keys")
        video = work / "digits.mp4"
        write_labelled_video(video, held_out_indices(CHECKPOINT_DIR / "vit-digits.npz"))
        for name, bundle in bundles(work, key).items():
            if parsed.only and parsed.only not in name:
                continue
            engine = json.loads((bundle / "manifest.json").read_text())["engine"]
            label, max_batch = f"{name} ({engine['backend']} {engine['target']})", engine["batch"]["max"]
            # what the agent's batch policy starts from: the passport's p99 and mean per batch size, and the layout
            verified = verify_bundle(bundle, None)
            latency = PassportLatency.of(verified)
            passport = {
                "images_per_stream": verified.images_per_stream,
                "p99_ms": {size: seconds * 1e3 for size, seconds in latency.p99.items()},
                "mean_ms": {size: seconds * 1e3 for size, seconds in latency.mean.items()},
            }
            modes = {
                "adaptive": {"mode": "adaptive"},
                "fixed 1": {"mode": "fixed", "fixed_batch": 1},
                f"fixed {max_batch}": {"mode": "fixed", "fixed_batch": max_batch},
            }
            runs: dict[tuple[int, str], list[dict]] = {}
            for repeat in range(parsed.repeat):  # the sweep again before each pass: the machine drifts
                batch, raw_cpu = best_batch(verified)
                for cameras in parsed.cameras:
                    for mode, batching in modes.items():
                        print(f"  {name}: {cameras} cameras, {mode} ({repeat + 1})", file=sys.stderr, flush=True)
                        before = raw_at(verified, batch)
                        measured = run_agent(
                            bundle,
                            public,
                            video,
                            cameras,
                            {**batching, "latency_budget_ms": parsed.budget_ms},
                            parsed.seconds,
                            work,
                            parsed.agent_root,
                        )
                        bracket = [before, raw_at(verified, batch)]
                        runs.setdefault((cameras, mode), []).append(
                            {"raw_ips": statistics.mean(bracket), "raw_bracket_ips": bracket,
                             "raw_batch": batch, "raw_cpu_pct": raw_cpu, **measured}
                        )  # fmt: skip
            for (cameras, mode), found in runs.items():
                rows.append({"engine": label, "cameras": cameras, "offered_fps": 30 * cameras, "mode": mode,
                             "passport": passport, **median_run(found)})  # fmt: skip
    lines = [
        "| engine | cameras (30 fps) | mode | raw engine img/s around the run (batch; its CPU %) "
        "| agent frames/s | % of raw "
        f"| p99 ms (budget {parsed.budget_ms:g}) | batch serving most images | skipped | shed "
        "| CPU %: engine / decoders / agent / idle |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        spread = f" ({min(r['of_raw']):.0%}–{max(r['of_raw']):.0%})" if len(r["of_raw"]) > 1 else ""
        cpu = r["cpu_split"]
        lines.append(
            f"| {r['engine']} | {r['cameras']} | {r['mode']} | {r['raw_ips']:.0f} "
            f"({r['raw_batch']}; {r['raw_cpu_pct']:.0f}) | "
            f"{r['processed_fps']:.1f} | {r['of_raw_median']:.0%}{spread} | {r['p99_ms']} | {main_batch(r)} | "
            f"{r['skipped']} | {r['shed']} | {' / '.join(f'{cpu[k]:.0f}' for k in (*KINDS, 'idle'))} |"
        )
    table = "\n".join(lines) + "\n"
    parsed.out.mkdir(parents=True, exist_ok=True)
    whole = not parsed.only and parsed.cameras == CAMERAS and parsed.agent_root == ROOT
    name = "agent_bench" if whole else "agent_bench_partial"  # a partial run never replaces the whole table
    (parsed.out / f"{name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    (parsed.out / f"{name}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
