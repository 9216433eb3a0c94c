"""How to compile an OpenVINO engine that serves every batch size 1..8: peak memory against speed.

The agent's batcher may hand the engine any batch from 1 to the bundle's maximum. Each design
below serves all of them; each runs in a process of its own that opens it and runs every batch
size once (what a serving agent touches), then is timed at batch 1 and batch 8. Its peak RSS is
the figure a device must hold. The model is edgevit's searched Q/DQ INT8 ViT-B/16 graph as
OpenVINO runs it (random weights in the published layout, 224 px), in BF16 where the CPU has it.

- ``engine``: what the agent opens (:class:`agent.engine.runtimes.openvino.OpenVINOEngine`): one
  compile for one image per CPU stream (batches run as single images, one per stream at once)
  and one LATENCY compile for batch 1.
- ``per size``: the design before it: a compile per batch size (1, 2, 4, 8), each larger batch
  split in parts across the streams.
- ``streams only``: the per-stream compile alone (batch 1 runs on one stream).
- ``dynamic``: one LATENCY compile with the batch bounded to 1..8.
- ``static 8``: OpenVINO's documented way for one batch size (LATENCY hint, static batch 8),
  smaller batches padded to 8: the peer's memory for a device that only ever batches 8.

The engine against ``per size`` is also timed head to head (one batch each in turn in one process,
median of the pair ratios), as the difference is within a shared machine's drift.

    python bench/openvino_memory_bench.py [--seconds 6] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine_bench import alternating  # noqa: E402
from export_bench import config  # noqa: E402

from agent.engine.profile import peak_rss_mib  # noqa: E402

DESIGNS = ["engine", "per size", "streams only", "dynamic", "static 8"]
MAX_BATCH = 8


def _per_size(core: Any, model: Any, config: dict[str, Any]) -> Callable[[np.ndarray], np.ndarray]:
    """The design before the engine's: a compile per batch size 1, 2, 4, 8, each split across the streams."""
    name, shape = model.inputs[0].any_name, [224, 224, 3]
    model.reshape({name: [1, *shape]})
    per_stream = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "THROUGHPUT", **config})
    streams = int(per_stream.get_property("NUM_STREAMS"))
    compiled = {}
    for size in (1, 2, 4, 8):
        count = min(streams, size)
        part = -(-size // count)
        if count == 1:
            model.reshape({name: [size, *shape]})
            one = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY", **config})
        elif part == 1:
            one = per_stream
        else:
            model.reshape({name: [part, *shape]})
            one = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": count, **config})
        compiled[size] = ([one.create_infer_request() for _ in range(count)], part, np.zeros((size, *shape), np.uint8))

    def run(images: np.ndarray) -> np.ndarray:
        size = next(s for s in compiled if s >= len(images))
        requests, part, padded = compiled[size]
        padded[: len(images)] = images
        for i, request in enumerate(requests):
            request.start_async({0: padded[i * part : (i + 1) * part]})
        for request in requests:
            request.wait()
        return np.concatenate([r.get_output_tensor(0).data for r in requests])[: len(images)]

    return run


def open_design(design: str, path: str) -> Callable[[np.ndarray], np.ndarray]:
    from agent.engine.device import DeviceInfo
    from agent.engine.runtimes.openvino import PRECISION, OpenVINOEngine, load_openvino
    from builder.targets.openvino import float_target

    target = float_target(DeviceInfo.probe())
    if design == "engine":
        return OpenVINOEngine(Path(path), target, MAX_BATCH).run
    ov = load_openvino()
    core, config = ov.Core(), {"INFERENCE_PRECISION_HINT": PRECISION[target]}
    model = core.read_model(path)
    name = model.inputs[0].any_name
    if design == "per size":
        return _per_size(core, model, config)
    if design == "streams only":
        model.reshape({name: [1, 224, 224, 3]})
        compiled = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "THROUGHPUT", **config})
        requests = [compiled.create_infer_request() for _ in range(int(compiled.get_property("NUM_STREAMS")))]

        def streams_only(images: np.ndarray) -> np.ndarray:
            out = []
            for start in range(0, len(images), len(requests)):
                part = images[start : start + len(requests)]
                for request, image in zip(requests, part, strict=False):
                    request.start_async({0: image[None]})
                for request, _ in zip(requests, part, strict=False):
                    request.wait()
                    out.append(request.get_output_tensor(0).data[0].copy())
            return np.stack(out)

        return streams_only
    if design == "dynamic":
        model.reshape({name: ov.PartialShape([ov.Dimension(1, MAX_BATCH), 224, 224, 3])})
    else:
        model.reshape({name: [MAX_BATCH, 224, 224, 3]})
    request = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY", **config}).create_infer_request()
    padded = np.zeros((MAX_BATCH, 224, 224, 3), np.uint8)

    def one_request(images: np.ndarray) -> np.ndarray:
        if design == "static 8":
            padded[: len(images)] = images
            images = padded
        request.infer({0: images})
        logits: np.ndarray = request.get_output_tensor(0).data[: len(images)].copy()
        return logits

    return one_request


def child(design: str, path: str, seconds: float) -> None:
    run = open_design(design, path)
    images = np.random.default_rng(0).integers(0, 256, (MAX_BATCH, 224, 224, 3), dtype=np.uint8)
    for batch in range(1, MAX_BATCH + 1):  # every size once, as a serving agent's batcher would
        run(images[:batch])
    speed = {}
    for batch in (1, MAX_BATCH):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            run(images[:batch])
            count += batch
        speed[batch] = count / (time.perf_counter() - start)
    print(json.dumps({"design": design, "peak_rss_mib": peak_rss_mib(), "b1": speed[1], "b8": speed[MAX_BATCH]}))


def head_to_head(path: str, seconds: float) -> None:
    runs = {design: open_design(design, path) for design in ("engine", "per size")}
    images = np.random.default_rng(0).integers(0, 256, (MAX_BATCH, 224, 224, 3), dtype=np.uint8)
    found = {}
    for batch in (1, MAX_BATCH):
        part = images[:batch]
        calls: dict[str, Callable[[], object]] = {d: partial(run, part) for d, run in runs.items()}
        times = alternating(calls, seconds)
        ratio = times["per size"] / times["engine"]  # > 1: the engine is faster
        found[batch] = {"ratio_median": float(np.median(ratio)), "quartiles": np.percentile(ratio, [25, 75]).tolist()}
    print(json.dumps(found))


def qdq_graph(work: Path) -> Path:
    from builder.demo.digits import digit_images
    from builder.export.checkpoint import save_checkpoint
    from builder.export.job import export_checkpoint
    from builder.export.models import init_params
    from builder.quantize.precision import quantize_static_int8
    from builder.targets.openvino import qdq_for_openvino

    save_checkpoint(work / "ViT-B_16.npz", init_params(config("ViT-B_16")))
    export = export_checkpoint(work / "ViT-B_16.npz", work / "onnx")
    qdq = quantize_static_int8(export.model_path, work / "qdq.onnx", digit_images(224)[0][:32])
    return qdq_for_openvino(qdq)[0]


def _run(*flags: str) -> Any:
    out = subprocess.run([sys.executable, __file__, *flags], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args.add_argument("--seconds", type=float, default=6.0)
    args.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args.add_argument("--head-to-head", help=argparse.SUPPRESS)
    parsed = args.parse_args()
    if parsed.child:
        design, path = parsed.child
        child(design, path, parsed.seconds)
        return
    if parsed.head_to_head:
        head_to_head(parsed.head_to_head, parsed.seconds)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = str(qdq_graph(Path(tmp)))
        rows = [_run("--child", design, path, "--seconds", str(parsed.seconds)) for design in DESIGNS]
        pair = _run("--head-to-head", path, "--seconds", str(3 * parsed.seconds))
    peer = next(r for r in rows if r["design"] == "static 8")
    lines = [
        "| design | peak RSS MiB | × static 8 | batch 1 img/s | batch 8 img/s |",
        "|---|---|---|---|---|",
        *(
            f"| {r['design']} | {r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] / peer['peak_rss_mib']:.2f} | "
            f"{r['b1']:.1f} | {r['b8']:.1f} |"
            for r in rows
        ),
        "",
        "The engine against the design before it, head to head (per size ÷ engine time per batch, median; > 1: the "
        "engine is faster): "
        + "; ".join(
            f"batch {b}: {v['ratio_median']:.3f} (quartiles {v['quartiles'][0]:.3f}–{v['quartiles'][1]:.3f})"
            for b, v in pair.items()
        )
        + ".",
    ]
    parsed.out.mkdir(parents=True, exist_ok=True)
    measured = {"designs": rows, "head_to_head": pair}
    (parsed.out / "openvino_memory_bench.json").write_text(json.dumps(measured, indent=2) + "\n")
    (parsed.out / "openvino_memory_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
