"""JAX (the native baseline) vs ONNX Runtime FP32 vs our INT8 engines, measured in one run.

For each model (random weights in the published layout, 224 px): export, quantize
(static QDQ u8s8 calibrated on 32 real digit images, and dynamic), then serve each
engine in its own process that does nothing else, at batch 1 and 8: images/s,
speed-up over JAX, peak RSS of that process, file size. It also measures this
machine's GEMM ceiling in ONNX Runtime (FP32 MatMul, u8 x s8 MatMulInteger at a ViT
MLP shape) and prints the fraction of it each engine reaches on its GEMM work.

    python bench/engine_bench.py [--models ViT-Ti_16 ViT-S_16 ViT-B_16 Mixer-B_16] [--seconds 3]
                                 [--out bench/results]

Writes ``engine_bench.json``, ``engine_bench.md`` (the README table) and
``engine_bench.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from export_bench import config  # noqa: E402

from agent.profile import peak_rss_mib, profile  # noqa: E402
from builder.architecture import ModelConfig, ViTConfig, param_shapes  # noqa: E402
from builder.passport import profile_engine  # noqa: E402

BATCHES = [1, 8]
ENGINES = ["jax", "ort-fp32", "int8-static", "int8-dynamic"]


def gemm_ops_per_image(cfg: ModelConfig) -> float:
    """Multiply-adds x 2 of every matrix product in one forward pass (Dense, patch embedding, attention)."""
    tokens = cfg.num_tokens
    ops = 0.0
    for key, shape in param_shapes(cfg).items():
        if not key.endswith("kernel"):
            continue
        fan_in, fan_out = int(np.prod(shape[:-1])), shape[-1]
        if key.endswith(("query/kernel", "key/kernel", "value/kernel")):
            fan_in, fan_out = shape[0], shape[1] * shape[2]
        rows = 1 if key.startswith(("head", "pre_logits")) else tokens
        if "token_mixing" in key:
            rows = cfg.hidden_dim  # token mixing multiplies across tokens, once per channel
        ops += 2 * rows * fan_in * fan_out
    if isinstance(cfg, ViTConfig):
        ops += cfg.num_layers * 2 * 2 * tokens * tokens * cfg.hidden_size  # q.k and attn.v
    return ops


def gemm_ceiling(seconds: float) -> dict[str, float]:
    """GOP/s of ONNX Runtime's FP32 MatMul and u8 x s8 MatMulInteger at M=8*197, K=768, N=3072."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    m, k, n = 8 * 197, 768, 3072
    rng = np.random.default_rng(0)
    graphs = {
        "fp32": (
            helper.make_graph(
                [helper.make_node("MatMul", ["x", "w"], ["y"])],
                "fp32",
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
                [onnx.numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w")],
            ),
            rng.standard_normal((m, k)).astype(np.float32),
        ),
        "int8": (
            helper.make_graph(
                [helper.make_node("MatMulInteger", ["x", "w", "xz", "wz"], ["y"])],
                "int8",
                [helper.make_tensor_value_info("x", TensorProto.UINT8, [m, k])],
                [helper.make_tensor_value_info("y", TensorProto.INT32, [m, n])],
                [
                    onnx.numpy_helper.from_array(rng.integers(-127, 128, (k, n), dtype=np.int8), "w"),
                    onnx.numpy_helper.from_array(np.uint8(128), "xz"),
                    onnx.numpy_helper.from_array(np.int8(0), "wz"),
                ],
            ),
            rng.integers(0, 256, (m, k), dtype=np.uint8),
        ),
    }
    result = {}
    for name, (graph, x) in graphs.items():
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
        model.ir_version = 10
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        session.run(None, {"x": x})
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            session.run(None, {"x": x})
            runs += 1
        result[f"{name}_gops"] = 2 * m * k * n * runs / (time.perf_counter() - start) / 1e9
    return result


def jax_child(checkpoint: str, seconds: float) -> None:
    """Serve the checkpoint with JAX jit (weights as arguments) and report like agent.profile."""
    from builder.checkpoint import read_checkpoint
    from builder.models import jax_forward, prepared_params

    ckpt = read_checkpoint(checkpoint)
    forward = jax_forward(ckpt.config, prepared_params(ckpt.config, ckpt.params))
    del ckpt
    rows = [profile(forward, 224, b, seconds, 5) for b in BATCHES]
    print(json.dumps({"latency": rows, "peak_rss_mib": peak_rss_mib()}))


def measure_model(name: str, seconds: float, work: Path) -> dict:
    from builder.checkpoint import save_checkpoint
    from builder.demo.digits import digit_images
    from builder.export import export_checkpoint
    from builder.models import init_params
    from builder.precision import quantize_dynamic_int8, quantize_static_int8

    cfg = config(name)
    ckpt = work / f"{name}.npz"
    save_checkpoint(ckpt, init_params(cfg))
    export = export_checkpoint(ckpt, work / "onnx")
    calibration = digit_images(cfg.image_size)[0][:32]
    files = {
        "jax": ckpt,
        "ort-fp32": export.model_path,
        "int8-static": quantize_static_int8(export.model_path, work / "static.onnx", calibration),
        "int8-dynamic": quantize_dynamic_int8(export.model_path, work / "dynamic.onnx"),
    }
    results = {}
    for engine, path in files.items():
        print(f"  {name}: {engine}", file=sys.stderr, flush=True)
        if engine == "jax":
            out = subprocess.run(
                [sys.executable, __file__, "--jax-child", str(path), "--seconds", str(seconds)],
                capture_output=True,
                text=True,
                check=True,
            )
            measured = json.loads(out.stdout.strip().splitlines()[-1])
        else:
            measured = profile_engine(path, "onnxruntime", "cpu", 224, BATCHES, seconds, None)
        results[engine] = {**measured, "file_mib": path.stat().st_size / 2**20}
    return {"model": name, "gemm_gops_per_image": gemm_ops_per_image(cfg) / 1e9, "engines": results}


def throughput(row: dict, engine: str, batch: int) -> float:
    return next(r["images_per_s"] for r in row["engines"][engine]["latency"] if r["batch"] == batch)


def markdown(rows: list[dict], ceiling: dict[str, float]) -> str:
    lines = [
        "| model | batch | engine | images/s | × JAX | peak RSS MiB | RSS vs JAX | file MiB | % of GEMM ceiling |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for batch in BATCHES:
            base = throughput(row, "jax", batch)
            base_rss = row["engines"]["jax"]["peak_rss_mib"]
            for engine in ENGINES:
                e = row["engines"][engine]
                ips = throughput(row, engine, batch)
                ceil = ceiling["int8_gops"] if engine.startswith("int8") else ceiling["fp32_gops"]
                achieved = ips * row["gemm_gops_per_image"] / ceil
                lines.append(
                    f"| {row['model']} | {batch} | {engine} | {ips:.1f} | {ips / base:.2f} | {e['peak_rss_mib']:.0f} "
                    f"| {e['peak_rss_mib'] / base_rss - 1:+.0%} | {e['file_mib']:.0f} | {achieved:.0%} |"
                )
    lines.append("")
    lines.append(
        f"GEMM ceiling (ONNX Runtime, M=1576 K=768 N=3072): FP32 {ceiling['fp32_gops']:.0f} GFLOP/s, "
        f"u8×s8 {ceiling['int8_gops']:.0f} GOP/s; % of ceiling = GEMM work per image × images/s ÷ ceiling "
        "(JAX and FP32 against the FP32 ceiling, INT8 against the INT8 one)."
    )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(ENGINES)
    for i, engine in enumerate(ENGINES):
        ratios = [throughput(r, engine, 8) / throughput(r, "jax", 8) for r in rows]
        ax.bar(np.arange(len(rows)) + i * width, ratios, width, label=engine)
    ax.set_xticks(np.arange(len(rows)) + width * (len(ENGINES) - 1) / 2, [r["model"] for r in rows])
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_ylabel("throughput × JAX (batch 8)")
    ax.set_title(f"edgevit engines vs JAX jit, {platform.machine()} CPU, 224 px")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args.add_argument("--models", nargs="+", default=["ViT-Ti_16", "ViT-S_16", "ViT-B_16", "Mixer-B_16"])
    args.add_argument("--seconds", type=float, default=3.0, help="measuring time per engine and batch size")
    args.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args.add_argument("--jax-child", help=argparse.SUPPRESS)
    parsed = args.parse_args()
    if parsed.jax_child:
        jax_child(parsed.jax_child, parsed.seconds)
        return
    ceiling = gemm_ceiling(parsed.seconds)
    rows = []
    for name in parsed.models:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(measure_model(name, parsed.seconds, Path(tmp)))
    parsed.out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, ceiling)
    (parsed.out / "engine_bench.json").write_text(json.dumps({"ceiling": ceiling, "models": rows}, indent=2) + "\n")
    (parsed.out / "engine_bench.md").write_text(table)
    plot(rows, parsed.out / "engine_bench.png")
    print(table)


if __name__ == "__main__":
    main()
