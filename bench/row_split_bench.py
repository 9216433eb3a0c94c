"""Why the builder splits Dense layers by rows (``builder/rewrites/row_split.py``): OpenVINO's INT8 Dense kernel
at the row counts one image gives, on one thread and over every core.

A stack of ViT-B/16 MLP-shaped INT8 Dense layers (Q/DQ graph, random weights, K=768 N=3072), compiled as the
agent compiles batch 1 (LATENCY hint, BF16 float parts where the CPU has them), timed at each row count by
OpenVINO's own per-node counters. Rows per second per thread that drop at 196 or 197 rows (a ViT's or a
Mixer's tokens) but not at whole multiples of the kernel's row block times the threads are what the split
evens out. Then the whole model: ViT-B/16 (random weights in the published layout), its static INT8 Q/DQ
graph as OpenVINO's candidate gets it, with and without the split, in turns in one process at batch 1.

    python bench/row_split_bench.py [--seconds 3] [--out bench/results]

Writes ``row_split.json`` and ``row_split.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import psutil
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.engine.device import BF16_FEATURES, DeviceInfo  # noqa: E402
from agent.engine.runtimes.openvino import load_openvino  # noqa: E402

ROWS = [64, 128, 192, 196, 197, 208, 256]
K, N, LAYERS = 768, 3072, 8


def dense_stack(rows: int, path: Path) -> Path:
    """``LAYERS`` INT8 Dense layers K→N, each reading the first K columns of the last one's output."""
    rng = np.random.default_rng(0)
    nodes, weights = [], [nh.from_array(np.array(0.02, np.float32), "s"), nh.from_array(np.array(128, np.uint8), "z")]
    weights += [nh.from_array(np.array([v]), name) for v, name in ((0, "start"), (K, "end"), (1, "axis"))]
    current = "x"
    for i in range(LAYERS):
        weights += [
            nh.from_array(rng.integers(-127, 128, (K, N)).astype(np.int8), f"w{i}"),
            nh.from_array(np.full(N, 1e-3, np.float32), f"ws{i}"),
            nh.from_array(np.zeros(N, np.int8), f"wz{i}"),
            nh.from_array(rng.standard_normal(N).astype(np.float32), f"b{i}"),
        ]
        nodes += [
            helper.make_node("QuantizeLinear", [current, "s", "z"], [f"q{i}"]),
            helper.make_node("DequantizeLinear", [f"q{i}", "s", "z"], [f"d{i}"]),
            helper.make_node("DequantizeLinear", [f"w{i}", f"ws{i}", f"wz{i}"], [f"wd{i}"], axis=1),
            helper.make_node("Gemm", [f"d{i}", f"wd{i}", f"b{i}"], [f"y{i}"]),
            helper.make_node("Slice", [f"y{i}", "start", "end", "axis"], [f"o{i}"]),
        ]
        current = f"o{i}"
    graph = helper.make_graph(
        nodes,
        "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, K])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, [rows, K])],
        weights,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), path)
    return path


def _config(threads: int | None) -> dict[str, Any]:
    config = {"PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": True}
    if DeviceInfo.probe().cpu_features & BF16_FEATURES:
        config["INFERENCE_PRECISION_HINT"] = "bf16"
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return config


def dense_rate(path: Path, rows: int, threads: int | None, seconds: float) -> float:
    """Rows × layers per second through the Dense layers alone (OpenVINO's per-node counters), median run."""
    core = load_openvino().Core()
    request = core.compile_model(core.read_model(str(path)), "CPU", _config(threads)).create_infer_request()
    x = np.random.default_rng(1).standard_normal((rows, K)).astype(np.float32)
    for _ in range(3):
        request.infer({0: x})
    spent, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        request.infer({0: x})
        spent.append(
            sum(p.real_time.total_seconds() for p in request.profiling_info if p.node_type.startswith("FullyConnected"))
        )
    return rows * LAYERS / float(np.median(spent))


def whole_model(work: Path, seconds: float) -> dict[str, Any]:
    """ViT-B/16's static INT8 Q/DQ graph in OpenVINO's copy (``qdq_for_openvino``), split and not, in turns."""
    import onnx_ir as ir
    from export_bench import config

    from builder.demo.digits import digit_images
    from builder.evaluate.runoff import relative_speeds, time_head_to_head
    from builder.export.checkpoint import save_checkpoint
    from builder.export.job import export_checkpoint
    from builder.export.models import init_params
    from builder.quantize.precision import quantize_static_int8
    from builder.rewrites.row_split import split_rows
    from builder.targets.openvino import qdq_for_openvino

    cfg = config("ViT-B_16")
    save_checkpoint(work / "vit.npz", init_params(cfg))
    export = export_checkpoint(work / "vit.npz", work / "onnx")
    calibration = digit_images(cfg.image_size)[0][:32]
    plain = qdq_for_openvino(quantize_static_int8(export.model_path, work / "qdq.onnx", calibration))[0]
    threads = psutil.cpu_count(logical=False) or 1
    model = ir.load(plain)
    first = split_rows(model, threads)
    split = work / "split.onnx"
    ir.save(model, split)
    target = "cpu-bf16" if DeviceInfo.probe().cpu_features & BF16_FEATURES else "cpu"
    engines = {"as built": ("openvino", target, plain, 1), "split": ("openvino", target, split, 1)}
    times = time_head_to_head(engines, cfg.image_size, {1: 1.0}, seconds * 20, None)
    speeds = relative_speeds(times)
    return {
        "first_rows": first,
        "threads": threads,
        "rounds": len(times["split"]),
        "as_built_images_per_s": float(1 / np.median(times["as built"])),
        "split_images_per_s": float(1 / np.median(times["split"])),
        "split_vs_as_built": speeds["split"].ratio / speeds["as built"].ratio,
        "speeds": {label: s.as_dict() for label, s in speeds.items()},
    }


def markdown(dense: list[dict[str, Any]], whole: dict[str, Any]) -> str:
    lines = [
        f"OpenVINO INT8 Dense layers (K={K}, N={N}), rows per second per thread, by OpenVINO's per-node counters:",
        "",
        "| rows | 1 thread | every core | every core, per thread | of 1 thread |",
        "|---|---|---|---|---|",
    ]
    for d in dense:
        per_thread = d["every_core"] / d["cores"]
        lines.append(
            f"| {d['rows']} | {d['one_thread']:.0f} | {d['every_core']:.0f} | {per_thread:.0f} "
            f"| {per_thread / d['one_thread']:.0%} |"
        )
    lines += [
        "",
        "ViT-B/16 at batch 1, its static INT8 Q/DQ graph as OpenVINO's candidate gets it, with its Dense layers "
        f"split at row "
        f"{whole['first_rows']} for {whole['threads']} threads against the same graph as built, in turns in one "
        f"process ({whole['rounds']} rounds): **{whole['split_vs_as_built']:.2f}×** "
        f"({whole['split_images_per_s']:.1f} against {whole['as_built_images_per_s']:.1f} img/s).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args.add_argument("--seconds", type=float, default=3.0, help="measuring time per row count and thread count")
    args.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    options = args.parse_args()
    cores = psutil.cpu_count(logical=False) or 1
    dense = []
    with tempfile.TemporaryDirectory() as tmp:
        for rows in ROWS:
            path = dense_stack(rows, Path(tmp) / f"dense-{rows}.onnx")
            one, every = dense_rate(path, rows, 1, options.seconds), dense_rate(path, rows, None, options.seconds)
            dense.append({"rows": rows, "one_thread": one, "every_core": every, "cores": cores})
            print(f"rows {rows}: {one:.0f} rows/s on 1 thread, {every:.0f} on {cores}", file=sys.stderr, flush=True)
        whole = whole_model(Path(tmp), options.seconds)
    result = {"machine": platform.processor() or platform.machine(), "dense": dense, "vit_b16_batch_1": whole}
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / "row_split.json").write_text(json.dumps(result, indent=1))
    (options.out / "row_split.md").write_text(markdown(dense, whole))
    print(markdown(dense, whole))


if __name__ == "__main__":
    main()
