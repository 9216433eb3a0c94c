"""Batches through the engine's worker process: one at a time, against the next queued while one runs.

The agent runs its engine in a child process (``agent.engine.worker``). One batch at a
time, the worker waits for every round trip: the agent copying the batch in, the pipe,
both processes waking, the logits coming back, and the agent's own work on them. With
the next batch submitted while one runs (what the pipeline does since this bench was
written), the worker starts it the moment the last one ends. For the demo ViT INT8 bundle
(64 px) and ViT-Ti/16 INT8 at 224 px, at batch 1 and the bundle's maximum, measured in one
run on this machine, alternating the two ways ``--repeat`` times:

- the engine in this process, ``run`` in a loop (the ceiling);
- for ONNX Runtime bundles, the same engine as one session with a thread per core, the
  way it ran before it split batches across single-threaded streams;
- through the worker, one batch at a time (``WorkerEngine.run``, then top-k of its logits);
- through the worker, the next batch submitted before the last one's logits are collected.

No cameras and no decoders: this is the engine path alone, where the gap between batches is
all there is to lose. ``bench/agent_bench.py`` measures the whole agent.

    python bench/worker_bench.py [--seconds 3] [--repeat 3] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent_bench import bundles  # noqa: E402

from agent.engine.bundle import verify_bundle  # noqa: E402
from agent.engine.runtimes import Engine, open_bundle_engine, open_engine  # noqa: E402
from agent.engine.worker import WorkerEngine, WorkerSpec  # noqa: E402
from agent.stream.results import top_k  # noqa: E402
from builder.bundle.keys import keygen  # noqa: E402


def images_per_s(step: Callable[[], object], batch: int, seconds: float) -> float:
    """Batches of ``batch`` images through ``step`` (running one) for ``seconds``."""
    done, started = 0, time.monotonic()
    while time.monotonic() - started < seconds:
        step()
        done += 1
    return done * batch / (time.monotonic() - started)


def measure(bundle_path: Path, batch: int, seconds: float, repeat: int) -> dict:
    bundle = verify_bundle(bundle_path, None)
    spec = bundle.input_spec
    images = np.random.default_rng(0).integers(0, 256, (batch, spec.height, spec.width, 3), np.uint8)
    local = open_bundle_engine(bundle)
    one_session = None
    if bundle.backend == "onnxruntime":
        one_session = open_engine(
            bundle.backend, bundle.target, bundle.engine_path, bundle.batch_range[1], split_batches=False
        )
    worker = WorkerEngine(WorkerSpec.of(bundle, bundle.target, None))
    running = worker.submit(images)  # warm-up, then always the batch in flight

    def through(engine: Engine) -> Callable[[], object]:
        return lambda: top_k(engine.run(images), 5)

    def next_queued() -> None:
        nonlocal running
        following = worker.submit(images)
        top_k(worker.collect(running), 5)
        running = following

    figures: dict[str, list[float]] = {"in process": [], "one session": [], "one at a time": [], "next queued": []}
    try:
        worker.collect(running)
        for _ in range(repeat):
            figures["in process"].append(images_per_s(through(local), batch, seconds))
            if one_session is not None:
                figures["one session"].append(images_per_s(through(one_session), batch, seconds))
            figures["one at a time"].append(images_per_s(through(worker), batch, seconds))
            running = worker.submit(images)
            figures["next queued"].append(images_per_s(next_queued, batch, seconds))
            worker.collect(running)
    finally:
        worker.close()
        local.close()
        if one_session is not None:
            one_session.close()
    medians = {k: statistics.median(v) for k, v in figures.items() if v}
    return {
        "batch": batch,
        "backend": f"{bundle.backend} {bundle.target}",
        "images_per_s": medians,
        "runs": figures,
        "queued_vs_one_at_a_time": medians["next queued"] / medians["one at a time"],
        "queued_vs_in_process": medians["next queued"] / medians["in process"],
    }


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args.add_argument("--seconds", type=float, default=3.0)
    args.add_argument("--repeat", type=int, default=3)
    args.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parsed = args.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        key, _, _ = keygen(work / "keys")
        for name, path in bundles(work, key).items():
            max_batch = verify_bundle(path, None).batch_range[1]
            for batch in sorted({1, max_batch}):
                print(f"  {name}, batch {batch}", file=sys.stderr, flush=True)
                rows.append({"engine": name, **measure(path, batch, parsed.seconds, parsed.repeat)})
    lines = [
        "| engine | batch | in process img/s | in process, one session | worker, one at a time | worker, next queued "
        "| queued / one at a time | queued / in process |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ips = r["images_per_s"]
        single = f"{ips['one session']:.0f}" if "one session" in ips else "—"
        lines.append(
            f"| {r['engine']} ({r['backend']}) | {r['batch']} | {ips['in process']:.0f} | {single} "
            f"| {ips['one at a time']:.0f} "
            f"| {ips['next queued']:.0f} | {r['queued_vs_one_at_a_time']:.2f}× | {r['queued_vs_in_process']:.2f}× |"
        )
    table = "\n".join(lines) + "\n"
    parsed.out.mkdir(parents=True, exist_ok=True)
    (parsed.out / "worker_bench.json").write_text(json.dumps(rows, indent=2) + "\n")
    (parsed.out / "worker_bench.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
