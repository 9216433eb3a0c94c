"""Cameras that cannot reach their stream against the ones that can, through the real agent.

Four good cameras read the project's GStreamer RTSP server; 0, 2 or 4 "dead" cameras point at a TCP
port that accepts and never answers. In each run the agent starts, the server is SIGKILLed once
every good camera serves, and restarted 5 s later. Measured per scenario over ``--runs`` runs:

- start-up: agent process start to each good camera's first result;
- recovery: the server's return to each good camera's first result after it;
- a good camera that never starts or recovers within ``--patience`` seconds is counted as such.

Then throughput at 0 dead cameras, 4 x 720p, for ``--seconds``, ``--throughput-runs`` times: processed
frames/s and decode CPU per frame (the decoder's CPU outside preprocessing) from the agent's summary,
and the CPU per decoded frame of the agent with every process it reaped, which compares designs
(each figure its median over the runs, and the range). Those are whole-run figures: start-up included, which
costs a process per camera an interpreter's start each. Beside them, the steady state: over half
the run, from 2 s after every camera's first frame, the frames processed per second and the CPU of
the agent and every process under it per frame decoded (the agent's Prometheus counters, /proc).
``--only throughput`` runs only these and keeps them as ``camera_bench_throughput*``.

``--agent-root`` runs the agent from another checkout (same virtual environment), to measure the
code before a change beside the code after it. ``--compare PATH`` runs the throughput runs of
``--agent-root`` and of the checkout at PATH in turn, one of each after the other, so that the
machine's drift over the runs weighs on both alike.

    python bench/camera_bench.py [--runs 3] [--agent-root PATH] [--out bench/results]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from agent_bench import cpu_by_kind, frame_count, frame_counts  # noqa: E402
from agent_helpers import dead_listener, read_results, start_rtsp_server  # noqa: E402

from builder.bundle.build import build_engine_bundle  # noqa: E402
from builder.bundle.keys import keygen  # noqa: E402
from builder.bundle.options import EngineOptions  # noqa: E402
from builder.demo.train import CHECKPOINT_DIR  # noqa: E402
from builder.export.job import export_checkpoint  # noqa: E402

from conftest import free_port  # noqa: E402

GOOD = 4
# (dead cameras, their stall_timeout_s, rtsp_transport of every camera)
SCENARIOS = [(0, 5, "auto"), (2, 5, "auto"), (2, 20, "auto"), (4, 5, "auto"), (4, 20, "auto"), (2, 20, "tcp")]


def agent_config(
    work: Path, bundle: Path, public: Path, cameras: list[dict[str, Any]], prometheus_port: int = 0
) -> Path:
    config = {
        "device": "bench",
        "state_dir": str(work / "state"),
        "engine": {"bundle": str(bundle), "trusted_keys": [str(public)]},
        "cameras": cameras,
        "results": {"jsonl": str(work / "results.jsonl")},
        "metrics": {"print_every_s": 0, "prometheus_port": prometheus_port},
    }
    path = work / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    (work / "results.jsonl").unlink(missing_ok=True)
    return path


def start_agent(config: Path, agent_root: Path, *args: str) -> subprocess.Popen[str]:
    """The agent; its log goes to ``agent.log`` beside its config (kept for the run's --logs copy)."""
    with open(config.with_name("agent.log"), "a") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "agent.daemon", "--config", str(config), *args],
            cwd=agent_root,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )


def firsts(results: Path, cameras: set[str], since: float, patience: float) -> dict[str, float]:
    deadline, seen = time.monotonic() + patience, {}
    while time.monotonic() < deadline and set(seen) != cameras:
        for r in read_results(results):
            if r["camera"] in cameras and r["captured"] > since:
                seen.setdefault(r["camera"], r["captured"] - since)
        time.sleep(0.1)
    return seen


def keep_log(work: Path, args: argparse.Namespace, name: str) -> None:
    """The run's agent log into ``--logs``, to see why a camera did not start or recover."""
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)
        (work / "agent.log").rename(args.logs / f"{name}-{time.strftime('%H%M%S')}.log")


def one_run(work: Path, bundle: Path, public: Path, scenario: tuple[int, int, str], args: argparse.Namespace) -> dict:
    dead, stall, transport = scenario
    port, dead_port = free_port(), free_port()
    good = {f"good{i}" for i in range(GOOD)}
    common = {"rtsp_transport": transport, "fps": 10, "reconnect": {"initial_s": 0.5, "max_s": 5}}
    cameras = [{"name": n, "source": f"rtsp://127.0.0.1:{port}/cam", "stall_timeout_s": 5, **common} for n in good]
    cameras += [
        {"name": f"dead{i}", "source": f"rtsp://127.0.0.1:{dead_port}/cam", "stall_timeout_s": stall, **common}
        for i in range(dead)
    ]
    server = start_rtsp_server(port, "--size", "640x480")
    results = work / "results.jsonl"
    with dead_listener(dead_port):
        started_at = time.time()
        agent = start_agent(agent_config(work, bundle, public, cameras), args.agent_root)
        try:
            start = firsts(results, good, started_at, args.patience)
            server.send_signal(signal.SIGKILL)
            server.wait()
            time.sleep(5)
            server = start_rtsp_server(port, "--size", "640x480")
            back_at = time.time()
            recovery = firsts(results, good, back_at, args.patience)
        finally:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.communicate()
            server.kill()
            server.wait()
    keep_log(work, args, f"dead{dead}-stall{stall}-{transport}")
    return {"start_s": sorted(start.values()), "recovery_s": sorted(recovery.values()), "good": GOOD}


def throughput(work: Path, bundle: Path, public: Path, args: argparse.Namespace, agent_root: Path) -> dict:
    """0 dead cameras, 4 x 720p at the server's 30 fps, every frame taken, the agent of ``agent_root``."""
    port = free_port()
    server = start_rtsp_server(port, "--size", "1280x720")
    cameras = [
        {"name": f"good{i}", "source": f"rtsp://127.0.0.1:{port}/cam", "rtsp_transport": "tcp"} for i in range(4)
    ]
    metrics = free_port()
    try:
        agent = start_agent(
            agent_config(work, bundle, public, cameras, metrics), agent_root, "--duration", str(args.seconds)
        )
        assert agent.stdout is not None
        memory: list[tuple[float, float]] = []  # (RSS, USS) MiB of each decoder process, mid-run
        sampler = threading.Timer(args.seconds / 2 + 5, lambda: memory.extend(decoder_memory(agent.pid)))
        sampler.start()
        steady = steady_state(agent.pid, metrics, len(cameras), args.seconds / 2)
        stdout = agent.stdout.read()
        sampler.cancel()
        # the agent's CPU with every child it reaped (decoders, the engine worker): comparable across designs
        _, _, usage = os.wait4(agent.pid, 0)
    finally:
        server.kill()
        server.wait()
    keep_log(work, args, "throughput")
    summary = next(json.loads(line)["summary"] for line in stdout.splitlines() if line.startswith('{"summary"'))
    cams = summary["cameras"].values()
    decoded = sum(c["decoded"] for c in cams)
    return {
        "decoders": len(memory),
        "decoder_rss_mib": round(statistics.mean(m[0] for m in memory), 1) if memory else None,
        "decoder_uss_mib": round(statistics.mean(m[1] for m in memory), 1) if memory else None,
        "agent_cpu_ms_per_frame": round((usage.ru_utime + usage.ru_stime) / max(decoded, 1) * 1e3, 3),
        "processed_fps": round(sum(c["processed_fps"] for c in cams), 1),
        "decoded_fps": round(sum(c["decoded_fps"] for c in cams), 1),
        "decode_cpu_ms_per_frame": round(
            sum((c["decode_cpu_ms"] or 0) * c["decoded"] for c in cams) / max(decoded, 1), 3
        ),
        **steady,
    }


def steady_state(agent_pid: int, port: int, cameras: int, window: float) -> dict[str, float]:
    """Frames processed per second and CPU per decoded frame of the agent and every process under it, over
    ``window`` seconds from 2 s after every camera's first frame: what serving costs, start-up aside."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and sum(n > 0 for n in _counts(port, "decoded").values()) < cameras:
        time.sleep(0.2)
    time.sleep(2.0)
    cpu, decoded, processed, start = tree_cpu_s(agent_pid), *_totals(port), time.monotonic()
    time.sleep(window)
    cpu_after, decoded_after, processed_after, elapsed = tree_cpu_s(agent_pid), *_totals(port), time.monotonic()
    elapsed -= start
    return {
        "steady_processed_fps": round((processed_after - processed) / elapsed, 1),
        "steady_cpu_ms_per_frame": round((cpu_after - cpu) / max(decoded_after - decoded, 1) * 1e3, 3),
    }


def _counts(port: int, kind: str) -> dict[str, float]:
    try:
        return frame_counts(port, kind)
    except OSError:  # the endpoint is not up yet
        return {}


def _totals(port: int) -> tuple[float, float]:
    return frame_count(port, "decoded"), frame_count(port, "processed")


def tree_cpu_s(pid: int) -> float:
    """CPU seconds so far of a process and every process under it."""
    return sum(cpu_by_kind(psutil.Process(pid)).values())


def decoder_memory(agent_pid: int) -> list[tuple[float, float]]:
    """Resident and unique (USS: what killing it would free) MiB of each of the agent's decoder processes."""
    found = []
    for child in psutil.Process(agent_pid).children():
        with contextlib.suppress(psutil.Error):
            if "agent.stream.decoder" in child.cmdline():
                info = child.memory_full_info()
                found.append((info.rss / 2**20, info.uss / 2**20))
    return found


def spread(values: list[float], digits: int = 1) -> str:
    return f"{min(values):.{digits}f}–{max(values):.{digits}f}" if values else "—"


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args.add_argument("--runs", type=int, default=3)
    args.add_argument("--patience", type=float, default=60.0, help="seconds a good camera gets to start or recover")
    args.add_argument("--seconds", type=float, default=20.0, help="length of the 4 x 720p throughput run")
    args.add_argument("--throughput-runs", type=int, default=1, help="how many 4 x 720p throughput runs")
    args.add_argument("--agent-root", type=Path, default=ROOT, help="the checkout whose agent runs")
    args.add_argument("--compare", type=Path, help="another checkout whose throughput runs alternate with these")
    args.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args.add_argument("--logs", type=Path, help="keep each run's agent log in this folder")
    args.add_argument(
        "--only",
        help="run only the scenarios whose 'dead,stall,transport' contains this ('throughput': only the 4 x 720p "
        "runs, kept as camera_bench_throughput*); any other partial run prints its table and keeps no result file",
    )
    parsed = args.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        key, public, _ = keygen(work / "keys")
        export = export_checkpoint(CHECKPOINT_DIR / "vit-digits.npz", work / "export")
        bundle = build_engine_bundle(
            export.model_path.parent, work / "bundle", key, EngineOptions(profile_seconds=0.2)
        ).path
        for scenario in [s for s in SCENARIOS if not parsed.only or parsed.only in ",".join(map(str, s))]:
            runs = []
            for run in range(parsed.runs):
                print(f"  {scenario}: run {run + 1}", file=sys.stderr, flush=True)
                runs.append(one_run(work, bundle, public, scenario, parsed))
            rows.append({"dead": scenario[0], "stall_s": scenario[1], "transport": scenario[2], "runs": runs})
        roots = [parsed.agent_root, *([parsed.compare] if parsed.compare else [])]
        flows: dict[Path, list[dict]] = {root: [] for root in roots}
        for run in range(parsed.throughput_runs if parsed.only in (None, "throughput") else 0):
            for root in roots:
                print(f"  throughput: run {run + 1}, {root}", file=sys.stderr, flush=True)
                flows[root].append(throughput(work, bundle, public, parsed, root))
    lines = [f"agent: {parsed.agent_root}"]
    if rows:
        lines += [
            f"{GOOD} good cameras at 640x480, fps 10; {parsed.runs} runs per row; "
            f"a camera not back within {parsed.patience:g} s counts as never",
            "",
            "| dead cameras | their stall_timeout_s | transport | good cameras' start-up s | never started "
            "| recovery after the server's return s | never recovered | median recovery s |",
            "|---|---|---|---|---|---|---|---|",
        ]
    for row in rows:
        start = [s for r in row["runs"] for s in r["start_s"]]
        back = [s for r in row["runs"] for s in r["recovery_s"]]
        expected = GOOD * len(row["runs"])
        lines.append(
            f"| {row['dead']} | {row['stall_s'] if row['dead'] else '—'} | {row['transport']} | {spread(start)} | "
            f"{expected - len(start)} | {spread(back)} | {expected - len(back)} | "
            f"{statistics.median(back) if back else float('nan'):.1f} |"
        )
    for root, runs_of_root in flows.items():
        lines += throughput_lines(runs_of_root, parsed.seconds, root if parsed.compare else None)
    table = "\n".join(lines) + "\n"
    print(table)
    if parsed.only not in (None, "throughput"):  # a partial run: nothing to keep as the bench's result
        return
    parsed.out.mkdir(parents=True, exist_ok=True)
    name = "camera_bench" + ("_throughput" if parsed.only else "") + ("" if parsed.agent_root == ROOT else "_other")
    kept = {str(root): runs_of_root for root, runs_of_root in flows.items()}  # each checkout's runs
    (parsed.out / f"{name}.json").write_text(json.dumps({"rows": rows, "throughput": kept}, indent=2) + "\n")
    (parsed.out / f"{name}.md").write_text(table)


def throughput_lines(flows: list[dict], seconds: float, root: Path | None) -> list[str]:
    """The 4 x 720p runs of one checkout (named where two are compared): each figure's median and range."""
    lines: list[str] = []
    if flows:
        flow = flows[0]

        def measured(key: str, digits: int) -> str:
            """The figure's median over the runs, and its range."""
            values = [f[key] for f in flows]
            middle = f"{statistics.median(values):.{digits}f}"
            return middle + (f" ({spread(values, digits)})" if len(flows) > 1 else "")

        lines += [
            "",
            *([f"agent: {root}"] if root else []),
            f"4 x 1280x720 at 30 fps, 0 dead cameras, {seconds:g} s, "
            f"{'each figure the median of ' + str(len(flows)) + ' runs (range)' if len(flows) > 1 else 'one run'}: "
            f"{measured('processed_fps', 1)} frames/s processed, {measured('decoded_fps', 1)} decoded; per decoded "
            "frame: "
            f"{measured('decode_cpu_ms_per_frame', 3)} ms decode CPU as the agent reports it, "
            f"{measured('agent_cpu_ms_per_frame', 3)} ms CPU of the agent and all its processes",
            f"steady state (half the run, every camera serving): {measured('steady_processed_fps', 1)} frames/s "
            f"processed, {measured('steady_cpu_ms_per_frame', 3)} ms CPU of the agent and all its processes per "
            "decoded frame",
        ]
        if flow["decoders"]:
            lines.append(
                f"{flow['decoders']} decoder processes (first run): {flow['decoder_rss_mib']} MiB resident each, "
                f"{flow['decoder_uss_mib']} MiB of it their own (USS; the rest is shared libraries)"
            )
    return lines


if __name__ == "__main__":
    main()
