"""On a machine with a GPU, TensorRT 10 and pycuda: the demo ViT as FP32, FP16 and INT8 TensorRT plans.

Builds each bundle with the builder itself (``--target tensorrt``), loads it as the agent
does (verified, in a worker process), checks its golden set, re-measures accuracy on the
demo's held-out digits and latency per batch size, and prints them beside the passport's
figures. This is the part of the TensorRT path a CPU cannot test; it has not run yet
(no lent machine had TensorRT), and the README says so until it has.

    python bench/tensorrt_device_check.py [--out DIR]     # writes tensorrt_device_check.json there
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.engine.bundle import verify_bundle  # noqa: E402
from agent.engine.device import DeviceInfo, gpu_problems  # noqa: E402
from agent.engine.golden import check_golden  # noqa: E402
from agent.engine.worker import WorkerEngine, WorkerSpec  # noqa: E402


def check(precision: str, export: Path, key: Path, work: Path) -> dict:
    from builder.bundle.build import build_engine_bundle
    from builder.bundle.candidates import Export
    from builder.bundle.options import EngineOptions
    from builder.evaluate.datasets import DEMO, evaluation_set, load_labels
    from builder.evaluate.measure import logits

    options = EngineOptions(target="tensorrt", precision=precision, eval=DEMO, calib=DEMO, profile_seconds=0.5)
    started = time.monotonic()
    result = build_engine_bundle(export, work / f"trt-{precision}", key, options)
    built_s = time.monotonic() - started
    bundle = verify_bundle(result.path, None, DeviceInfo.probe())
    engine = WorkerEngine(WorkerSpec.of(bundle, bundle.target, None))
    try:
        golden = check_golden(engine, bundle.golden_path, bundle.batch_range[1])
        source = Export.read(export).source["checkpoint"]
        frames = evaluation_set(DEMO, load_labels(None, source, DEMO, 10), source)
        found = logits(engine, frames.preprocessed(bundle.input_spec), 8)
        top1 = float(np.mean(found.argmax(-1) == frames.labels))
    finally:
        engine.close()
    passport = bundle.passport
    return {
        "precision": precision,
        "bundle_id": bundle.bundle_id,
        "build_s": round(built_s, 1),
        "golden_passed": golden.passed,
        "golden_max_abs_error": golden.max_abs_error,
        "top1_here": top1,
        "top1_passport": passport["accuracy"]["engine_top1"],
        "agreement_passport": passport["accuracy"]["top1_agreement"],
        "latency_passport": passport["latency"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    device = DeviceInfo.probe()
    missing = [p for p in gpu_problems(device) if "ExecutionProvider" not in p]  # plans need TensorRT and pycuda only
    if missing:
        print("cannot run here:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 2
    from builder.bundle.keys import keygen
    from builder.demo.train import CHECKPOINT_DIR
    from builder.export.job import export_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        export = export_checkpoint(CHECKPOINT_DIR / "vit-digits.npz", work / "export").model_path.parent
        key = keygen(work / "keys")[0]
        rows = [check(p, export, key, work) for p in ("fp32", "fp16", "int8")]
    report = {"device": device.describe(), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tensorrt_device_check.json").write_text(json.dumps(report, indent=2) + "\n")
    for r in rows:
        print(f"{r['precision']:5s} golden {'ok' if r['golden_passed'] else 'FAILED'}  top-1 here {r['top1_here']:.2%} "
              f"(passport {r['top1_passport']:.2%})  built in {r['build_s']} s")  # fmt: skip
    return 0 if all(r["golden_passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
