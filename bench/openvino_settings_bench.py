"""How to run an INT8 ViT in OpenVINO on this CPU: the settings behind agent/engine/runtimes/openvino.py, measured.

One model (ViT-B/16 by default: random weights in the published layout, 224 px), quantized
by edgevit's static Q/DQ recipe (SmoothQuant α=0.5 folded in, 32 digit images), run by
OpenVINO under each setting in its own process, at batch 8 unless the row says otherwise:

- the engine as the agent opens it (each batch split across OpenVINO's CPU streams, the parts
  run at once) against one request over every core (the ``LATENCY`` hint), head to head: one
  batch each in turn in one process, at batch 8, 4 and 2 (a few percent; separate processes
  of a few seconds would measure this machine's drift instead);
- static batch (what the engine compiles) against a dynamic and a bounded (1..8) batch;
- the THROUGHPUT hint with one request at a time, CPU pinning, 1 against 2 threads
  (the share of the cores left to camera threads);
- BF16 against FP32 for the float parts of the INT8 model;
- the attention matrix products quantized too (ONNX Runtime's Q/DQ of every MatMul);
- the engine's compile time, first and from OpenVINO's model cache.

    python bench/openvino_settings_bench.py [--model ViT-B_16] [--seconds 3] [--out bench/results]

Writes ``openvino_settings_bench.json`` and ``.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine_bench import alternating  # noqa: E402
from export_bench import config  # noqa: E402

SETTINGS = {
    "the engine: static batch 8 split across CPU streams, BF16": {"engine": True},
    "dynamic batch": {"shape": "dynamic"},
    "bounded batch 1..8": {"shape": "bounded"},
    "THROUGHPUT hint, one request": {"hint": "THROUGHPUT"},
    "CPU pinning": {"pinning": True},
    "1 inference thread (a core left to cameras)": {"threads": 1},
    "FP32 for the float parts": {"precision": "f32"},
    "attention MatMuls in INT8 too": {"model": "all-matmuls"},
}


def child(model: str, settings: dict, seconds: float) -> None:
    """Compile ``model`` with ``settings`` (or open it as the agent's engine does), time one batch size."""
    from agent.engine.profile import profile
    from agent.engine.runtimes.openvino import OpenVINOEngine, load_openvino

    batch = settings.get("batch", 8)
    if settings.get("engine"):
        engine = OpenVINOEngine(Path(model), "cpu-bf16", 8)
        print(json.dumps(profile(engine.run, 224, batch, seconds, 5)))
        return
    ov = load_openvino()
    core = ov.Core()
    ov_model = core.read_model(model)
    shape = {
        "static": [batch, 224, 224, 3],
        "dynamic": [-1, 224, 224, 3],
        "bounded": ov.PartialShape([ov.Dimension(1, 8), 224, 224, 3]),
    }[settings.get("shape", "static")]
    ov_model.reshape({ov_model.inputs[0].any_name: shape})
    options = {
        "PERFORMANCE_HINT": settings.get("hint", "LATENCY"),
        "INFERENCE_PRECISION_HINT": settings.get("precision", "bf16"),
        "ENABLE_CPU_PINNING": settings.get("pinning", False),
    }
    if "threads" in settings:
        options["INFERENCE_NUM_THREADS"] = settings["threads"]
    request = core.compile_model(ov_model, "CPU", options).create_infer_request()

    def run(images: np.ndarray) -> np.ndarray:
        request.infer({0: images})
        return request.get_output_tensor(0).data

    print(json.dumps(profile(run, 224, batch, seconds, 5)))


SPLIT_S = 20.0  # per batch size: the engine's split against one request, alternating batches


def split_child(model: str, seconds: float) -> None:
    """The engine (batch split across streams) and one request over every core, one batch each in turn.

    Separate processes a few seconds long put this machine's drift into a few-percent comparison;
    alternating batches put it on both alike. Prints, per batch size, both rates and the median ratio.
    """
    from agent.engine.runtimes.openvino import OpenVINOEngine, load_openvino

    engine = OpenVINOEngine(Path(model), "cpu-bf16", 8)
    core = load_openvino().Core()
    rows = []
    for batch in (8, 4, 2):
        ov_model = core.read_model(model)
        ov_model.reshape({ov_model.inputs[0].any_name: [batch, 224, 224, 3]})
        options = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "bf16"}
        request = core.compile_model(ov_model, "CPU", options).create_infer_request()
        images = np.random.default_rng(0).integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)
        runs = {"split": lambda images=images: engine.run(images), "one": lambda r=request, i=images: r.infer({0: i})}
        times = alternating(runs, seconds)
        split, one = times["split"], times["one"]
        rows.append({
            "batch": batch,
            "pairs": len(split),
            "split_images_per_s": float(batch / np.median(split)),
            "one_request_images_per_s": float(batch / np.median(one)),
            "ratio_median": float(np.median(one / split)),
        })  # fmt: skip
    print(json.dumps(rows))


def load_times(model: Path, cache: Path) -> dict[str, float]:
    """Seconds to open the engine as the agent does (every compiled batch size): first, then from the cache."""
    code = (
        "import sys, time; from pathlib import Path; t = time.perf_counter(); "
        "from agent.engine.runtimes.openvino import OpenVINOEngine; "
        "OpenVINOEngine(Path(sys.argv[1]), 'cpu-bf16', 8, None, Path(sys.argv[2])); print(time.perf_counter() - t)"
    )
    times = {}
    for run in ("first", "cached"):
        out = subprocess.run([sys.executable, "-c", code, str(model), str(cache)], capture_output=True, text=True)
        times[run] = float(out.stdout.strip().splitlines()[-1])
    return times


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args.add_argument("--model", default="ViT-B_16")
    args.add_argument("--seconds", type=float, default=3.0)
    args.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args.add_argument("--split-child", help=argparse.SUPPRESS)
    parsed = args.parse_args()
    if parsed.child:
        child(parsed.child[0], json.loads(parsed.child[1]), parsed.seconds)
        return
    if parsed.split_child:
        split_child(parsed.split_child, SPLIT_S)
        return
    import onnx

    from builder.demo.digits import digit_images
    from builder.export.checkpoint import save_checkpoint
    from builder.export.job import export_checkpoint
    from builder.export.models import init_params
    from builder.quantize.calibration import channel_absmax
    from builder.quantize.precision import quantize_static_int8
    from builder.quantize.smoothing import find_targets, smooth, smoothing_factors

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cfg = config(parsed.model)
        save_checkpoint(work / "model.npz", init_params(cfg))
        export = export_checkpoint(work / "model.npz", work / "onnx").model_path
        calibration = digit_images(cfg.image_size)[0][:32]
        model = onnx.load(str(export))
        targets = find_targets(model)
        absmax = channel_absmax(model, calibration, [t.norm for t in targets])
        onnx.save(smooth(model, targets, smoothing_factors(model, targets, absmax, 0.5)), str(work / "smoothed.onnx"))
        models = {
            "default": quantize_static_int8(work / "smoothed.onnx", work / "qdq.onnx", calibration),
            "all-matmuls": quantize_static_int8(
                work / "smoothed.onnx", work / "qdq-all.onnx", calibration, op_types=("Gemm", "Conv", "MatMul")
            ),
        }
        for name, settings in SETTINGS.items():
            path = models[settings.get("model", "default")]
            print(f"  {name}", file=sys.stderr, flush=True)
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    str(path),
                    json.dumps(settings),
                    "--seconds",
                    str(parsed.seconds),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            rows.append({"setting": name, **json.loads(out.stdout.strip().splitlines()[-1])})
        print("  the engine's split against one request, alternating batches", file=sys.stderr, flush=True)
        out = subprocess.run(
            [sys.executable, __file__, "--split-child", str(models["default"])],
            capture_output=True,
            text=True,
            check=True,
        )
        split = json.loads(out.stdout.strip().splitlines()[-1])
        loads = load_times(models["default"], work / "cache")
    base = rows[0]["images_per_s"]
    lines = [
        f"| {parsed.model} INT8 (edgevit Q/DQ) in OpenVINO | images/s | × the engine at batch 8 |",
        "|---|---|---|",
    ]
    lines += [f"| {r['setting']} | {r['images_per_s']:.1f} | {r['images_per_s'] / base:.2f} |" for r in rows]
    lines += [
        "",
        f"The engine's split across CPU streams against one request over every core, one batch each in turn for "
        f"{SPLIT_S:.0f} s per batch size in one process (median of the pair ratios):",
        "",
        "| batch | split img/s | one request img/s | split / one request | pairs |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['batch']} | {r['split_images_per_s']:.1f} | {r['one_request_images_per_s']:.1f} | "
        f"{r['ratio_median']:.2f} | {r['pairs']} |"
        for r in split
    ]
    lines.append("")
    lines.append(
        f"Opening the engine as the agent does (compiled for batch 1, 2, 4 and 8): {loads['first']:.1f} s the first "
        f"time, {loads['cached']:.1f} s from OpenVINO's model cache."
    )
    table = "\n".join(lines) + "\n"
    parsed.out.mkdir(parents=True, exist_ok=True)
    (parsed.out / "openvino_settings_bench.json").write_text(
        json.dumps({"rows": rows, "split": split, "load_s": loads}, indent=2)
    )
    (parsed.out / "openvino_settings_bench.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
