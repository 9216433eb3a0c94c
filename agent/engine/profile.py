"""Latency and memory of one engine, in a process that does nothing else.

``python -m agent.engine.profile ENGINE --backend onnxruntime --target cpu --size 224 --batches 1 8``
prints JSON: per batch size p50/p99 milliseconds, images/s and how well the mean is known, and the process's
peak RSS. The builder runs it in a subprocess for the passport, so the memory figure
is that of a process serving the engine, not of the builder with JAX loaded; on a
device it profiles TensorRT plans on the target, where they run.
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
    rows = [profile(engine.run, parsed.size, b, parsed.max_seconds, parsed.min_runs) for b in parsed.batches]
    print(json.dumps({"latency": rows, "peak_rss_mib": peak_rss_mib()}))


if __name__ == "__main__":
    main()
