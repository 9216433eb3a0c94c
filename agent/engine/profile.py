"""Latency and memory of one engine, in a process that does nothing else.

``python -m agent.engine.profile ENGINE --backend onnxruntime --target cpu --size 224 --batches 1 8``
prints JSON: per batch size p50/p99 milliseconds, images/s and how well the mean is known, and the process's
peak RSS. The builder runs it in a subprocess for the passport, so the memory figure
is that of a process serving the engine, not of the builder with JAX loaded; on a
device it profiles TensorRT plans on the target, where they run.

An OpenVINO engine serving several images per stream runs the same padded requests for every batch size
that needs as many of them (with 4 images per stream: 2, 3 and 4; 5 to 8), so one of those sizes is timed
and the others' rows share its run times, marked ``timed_at``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from agent.engine.runtimes import open_engine
from agent.engine.runtimes.openvino import OpenVINOEngine

STABLE = 0.01  # the mean run time is known to within ±1 % (95 % interval): profiling more changes no choice


def profile(
    engine_run: Callable[[np.ndarray], np.ndarray], size: int, batch: int, max_seconds: float, min_runs: int
) -> dict[str, float]:
    """Runs ``batch`` images until the mean run time is :data:`STABLE` (after ``min_runs``), or for
    ``max_seconds``: a build profiles many candidates at every batch size, and most settle early."""
    images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    for _ in range(2):
        engine_run(images)
    times: list[float] = []
    total = squares = 0.0
    start, cpu_start = time.perf_counter(), time.process_time()
    while True:
        t0 = time.perf_counter()
        engine_run(images)
        took = time.perf_counter() - t0
        times.append(took)
        total, squares = total + took, squares + took * took
        n = len(times)
        if n < min_runs:
            continue
        mean = total / n
        spread = 1.96 * np.sqrt(max(squares / n - mean * mean, 0.0) * n / (n - 1) / n) / mean
        if spread <= STABLE or time.perf_counter() - start >= max_seconds:
            break
    cpu_share = (time.process_time() - cpu_start) / (time.perf_counter() - start) / len(os.sched_getaffinity(0))
    ms = np.asarray(times) * 1e3
    return {
        "batch": batch,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "images_per_s": float(batch * len(ms) / (ms.sum() / 1e3)),
        "runs": len(ms),
        # half the 95 % interval of the mean run time, relative to it: within it two engines are not told apart
        "rel_ci95": float(1.96 * ms.std(ddof=1) / np.sqrt(len(ms)) / ms.mean()),
        # the share of this process's cores the engine kept busy: the rest it leaves idle on its own
        "cpu_share": round(cpu_share, 3),
    }


def timed_sizes(batches: list[int], requests: Callable[[int], int] | None) -> dict[int, int]:
    """Each batch size and the size timed for it. Sizes whose batches run the same requests (``requests``: an
    OpenVINO engine's count per batch size, whose short chunks are padded) share one timing, of the largest of
    them; every size is timed where the engine says nothing."""
    if requests is None:
        return {b: b for b in batches}
    largest: dict[int, int] = {}
    for b in batches:
        largest[requests(b)] = max(b, largest.get(requests(b), b))
    return {b: largest[requests(b)] for b in batches}


def shared_row(row: dict[str, float], batch: int) -> dict[str, float]:
    """``row``, timed at another batch size running the same requests, as the row of ``batch``: the same run
    times, so ``batch`` images per run."""
    return {**row, "batch": batch, "images_per_s": row["images_per_s"] * batch / row["batch"], "timed_at": row["batch"]}


def peak_rss_mib() -> float:
    """Peak resident memory of this process image.

    Linux's ``ru_maxrss`` survives ``exec`` and so reports the parent's size for a
    child spawned by a large builder process; ``VmHWM`` belongs to this image alone.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    args = argparse.ArgumentParser(prog="python -m agent.engine.profile", description=__doc__)
    args.add_argument("engine")
    args.add_argument("--backend", default="onnxruntime")
    args.add_argument("--target", default="cpu")
    args.add_argument("--size", type=int, required=True, help="input height = width in pixels")
    args.add_argument("--batches", type=int, nargs="+", required=True)
    args.add_argument("--max-seconds", type=float, default=1.0, help="per batch size, if not stable sooner")
    args.add_argument("--min-runs", type=int, default=10)
    args.add_argument("--threads", type=int)
    args.add_argument("--images-per-stream", type=int, default=1, help="an OpenVINO engine's serving layout")
    parsed = args.parse_args()
    engine = open_engine(
        parsed.backend,
        parsed.target,
        parsed.engine,
        max(parsed.batches),
        parsed.threads,
        images_per_stream=parsed.images_per_stream,
    )
    sizes = timed_sizes(parsed.batches, engine.requests if isinstance(engine, OpenVINOEngine) else None)
    timed = {
        t: profile(engine.run, parsed.size, t, parsed.max_seconds, parsed.min_runs) for t in sorted(set(sizes.values()))
    }
    rows = [timed[t] if t == b else shared_row(timed[t], b) for b, t in sizes.items()]
    print(json.dumps({"latency": rows, "peak_rss_mib": peak_rss_mib()}))


if __name__ == "__main__":
    main()
