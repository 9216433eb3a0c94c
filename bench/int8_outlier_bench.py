"""INT8 on models with outlier channels: naive, smoothed and mixed-precision candidates, measured in one run.

Part 1, accuracy: the demo ViT and Mixer with a few LayerNorm channels made ``k`` times wider by
an exact FP32 identity (:mod:`builder.demo.outliers`; ``k`` = 1 is the unchanged model), built
with the default gate twice: smoothing off (today's naive recipe, and mixed precision where it
misses) and smoothing on (the α search). For every candidate: top-1 agreement with FP32 on the
held-out digits, and images/s at batch 8 (64 px demo models, each engine in its own process).

Part 2, speed: ViT-B/16 and Mixer-B/16 (random weights in the published layout, 224 px, batch 8),
static and dynamic INT8 of the export as it is and of the export with SmoothQuant folded in
(α = 0.5): folding changes weights and LayerNorm parameters only, so the speed must not move.

    python bench/int8_outlier_bench.py [--strengths 1 32 64 128] [--big ViT-B_16 Mixer-B_16] [--seconds 3]

Writes ``int8_outlier_bench.json`` and ``int8_outlier_bench.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from export_bench import config  # noqa: E402

from builder.bundle.build import build_engine_bundle  # noqa: E402
from builder.bundle.keys import keygen  # noqa: E402
from builder.bundle.options import EngineOptions  # noqa: E402
from builder.demo.outliers import write_outlier_checkpoint  # noqa: E402
from builder.demo.train import CHECKPOINT_DIR  # noqa: E402
from builder.errors import BuildError  # noqa: E402
from builder.evaluate.measure import profile_engine  # noqa: E402
from builder.export.job import export_checkpoint  # noqa: E402


def accuracy_rows(name: str, strength: int, key: Path, seconds: float, work: Path) -> list[dict]:
    checkpoint = write_outlier_checkpoint(CHECKPOINT_DIR / f"{name}.npz", strength, work / f"{name}.npz")
    export = export_checkpoint(checkpoint, work / f"{name}-x{strength}").model_path.parent
    rows = []
    for smoothing, kind in (("off", "naive"), ("auto", "smoothed")):
        options = EngineOptions(
            precision="int8",
            eval="demo",
            calib="demo",
            smoothing=smoothing,
            accept_accuracy_loss=True,
            runtime="onnxruntime",  # edgevit's own recipes; OpenVINO is engine_bench's
            profile_seconds=seconds / 8,
            max_batch=8,
        )
        try:
            result = build_engine_bundle(export, work / f"bundle-{name}-{strength}-{smoothing}", key, options)
        except BuildError as exc:  # e.g. mixed precision reached its limit: the naive rows still count
            print(f"  {name} x{strength} smoothing {smoothing}: {exc}", file=sys.stderr)
            continue
        for c in result.candidates:
            q = c.quantization or {}
            rows.append(
                {
                    "model": name,
                    "strength": strength,
                    "candidate": "mixed precision" if q.get("float_layers") else kind,
                    "label": c.label,
                    "alpha": q.get("smoothing_alpha"),
                    "float_layers": len(q.get("float_layers") or []),
                    "agreement": c.accuracy.top1_agreement,
                    "top1_drop_points": c.accuracy.top1_drop_points,
                    "gate": "pass" if not c.misses else "miss",
                    "images_per_s": c.throughput(),
                }
            )
    return rows


def speed_rows(name: str, seconds: float, work: Path) -> list[dict]:
    import onnx

    from builder.demo.digits import digit_images
    from builder.export.checkpoint import save_checkpoint
    from builder.export.models import init_params
    from builder.quantize.calibration import channel_absmax
    from builder.quantize.precision import quantize_dynamic_int8, quantize_static_int8
    from builder.quantize.smoothing import find_targets, smooth, smoothing_factors

    cfg = config(name)
    save_checkpoint(work / f"{name}.npz", init_params(cfg))
    export = export_checkpoint(work / f"{name}.npz", work / name).model_path
    calibration = digit_images(cfg.image_size)[0][:32]
    model = onnx.load(str(export))
    targets = find_targets(model)
    factors = smoothing_factors(model, targets, channel_absmax(model, calibration, [t.norm for t in targets]), 0.5)
    smoothed = work / f"{name}-smoothed.onnx"
    onnx.save(smooth(model, targets, factors), str(smoothed))
    rows = []
    for kind, source in (("as exported", export), ("smoothed α=0.5", smoothed)):
        engines = {
            "int8 static": quantize_static_int8(source, work / "static.onnx", calibration),
            "int8 dynamic": quantize_dynamic_int8(source, work / "dynamic.onnx"),
        }
        for engine, path in engines.items():
            print(f"  {name}: {engine}, {kind}", file=sys.stderr, flush=True)
            measured = profile_engine(path, "onnxruntime", "cpu", cfg.image_size, [8], seconds, None)
            rows.append(
                {
                    "model": name,
                    "engine": engine,
                    "source": kind,
                    "images_per_s": measured["latency"][0]["images_per_s"],
                }
            )
    return rows


def markdown(accuracy: list[dict], speed: list[dict]) -> str:
    lines = [
        "| model | outlier strength | candidate | recipe | agreement with FP32 | top-1 drop (pts) | gate "
        "| img/s (batch 8, 64 px) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in accuracy:
        recipe = r["label"] + (f", α={r['alpha']:g}" if r["alpha"] is not None else "")
        lines.append(
            f"| {r['model']} | {r['strength']}× | {r['candidate']} | {recipe} | {r['agreement']:.2%} "
            f"| {r['top1_drop_points']:.2f} | {r['gate']} | {r['images_per_s']:.0f} |"
        )
    lines += [
        "",
        "| model (224 px, batch 8) | engine | export as it is, img/s | smoothed α=0.5, img/s | ratio |",
        "|---|---|---|---|---|",
    ]
    for model in dict.fromkeys(r["model"] for r in speed):
        for engine in ("int8 static", "int8 dynamic"):
            plain, smoothed = (
                next(r["images_per_s"] for r in speed if (r["model"], r["engine"], r["source"]) == (model, engine, s))
                for s in ("as exported", "smoothed α=0.5")
            )
            lines.append(f"| {model} | {engine} | {plain:.1f} | {smoothed:.1f} | {smoothed / plain:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args.add_argument("--strengths", type=int, nargs="+", default=[1, 32, 64, 128])
    args.add_argument("--models", nargs="+", default=["vit-digits", "mixer-digits"])
    args.add_argument("--big", nargs="*", default=["ViT-B_16", "Mixer-B_16"])
    args.add_argument("--seconds", type=float, default=3.0, help="measuring time per engine")
    args.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parsed = args.parse_args()
    accuracy, speed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        key = keygen(work / "keys")[0]
        for name in parsed.models:
            for strength in parsed.strengths:
                print(f"{name} x{strength}", file=sys.stderr, flush=True)
                accuracy += accuracy_rows(name, strength, key, parsed.seconds, work)
        for name in parsed.big:
            with tempfile.TemporaryDirectory(dir=work) as big:
                speed += speed_rows(name, parsed.seconds, Path(big))
    parsed.out.mkdir(parents=True, exist_ok=True)
    table = markdown(accuracy, speed)
    (parsed.out / "int8_outlier_bench.json").write_text(json.dumps({"accuracy": accuracy, "speed": speed}, indent=2))
    (parsed.out / "int8_outlier_bench.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
