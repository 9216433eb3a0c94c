"""Export time and peak memory for full-size models: ViT-B/16, Mixer-B/16, R50+ViT-B/16 and big_vision
B/16 with a MAP head, at 224.

Random weights in the published layout (no pretrained weights can be downloaded
here); the export cost does not depend on the values. Each model is exported in its
own process so that its peak RSS is its own. Prints a table; ``--json`` for scripts.

    python bench/export_bench.py [--models ViT-B_16 Mixer-B_16 R50+ViT-B_16 bv-B_16-map] [--json]

Names are vit_jax's (``builder.export.architecture.published_config``) or :data:`BIG_VISION`'s.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from builder.export.architecture import ModelConfig, ViTConfig, published_config  # noqa: E402

# big_vision models in its layout: B/16 with its MAP head (SigLIP's pooling) and SigLIP So400m/14's image tower
BIG_VISION: dict[str, ModelConfig] = {
    "bv-B_16-map": ViTConfig(16, 768, 3072, 12, 12, 1000, 224, "map", layout="big_vision"),
    # SigLIP B/16's image tower: the same encoder, headless
    "bv-B_16-map-embeddings": ViTConfig(16, 768, 3072, 12, 12, 0, 224, "map", layout="big_vision", output="embeddings"),
    "bv-So400m_14-map-embeddings": ViTConfig(
        14, 1152, 4304, 16, 27, 0, 224, "map", layout="big_vision", output="embeddings"
    ),
}


def config(name: str) -> ModelConfig:
    """A bench model by name: big_vision's above, or any vit_jax name (hybrids included)."""
    return BIG_VISION[name] if name in BIG_VISION else published_config(name)


def measure(name: str) -> dict[str, float | str]:
    """Runs in the child: write a checkpoint, export it, report phases and peak RSS."""
    from builder.export.checkpoint import save_checkpoint
    from builder.export.job import ExportOptions, export_checkpoint
    from builder.export.models import init_params

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / f"{name}.npz"
        save_checkpoint(ckpt, init_params(config(name)))
        start = time.perf_counter()
        result = export_checkpoint(ckpt, Path(tmp) / "onnx", ExportOptions())
        seconds = time.perf_counter() - start
        return {
            "model": name,
            "checkpoint_mib": ckpt.stat().st_size / 2**20,
            "onnx_mib": sum(p.stat().st_size for p in result.files) / 2**20,
            "export_s": seconds,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "max_abs_error": result.report.max_abs_error,
        }


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args.add_argument("--models", nargs="+", default=["ViT-B_16", "Mixer-B_16", "R50+ViT-B_16", "bv-B_16-map"])
    args.add_argument("--json", action="store_true")
    args.add_argument("--child", help=argparse.SUPPRESS)
    parsed = args.parse_args()
    if parsed.child:
        print(json.dumps(measure(parsed.child)))
        return
    rows = []
    for name in parsed.models:
        out = subprocess.run([sys.executable, __file__, "--child", name], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    if parsed.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'model':<14}{'ckpt MiB':>10}{'onnx MiB':>10}{'export s':>10}{'peak RSS MiB':>14}{'max |Δlogit|':>14}")
    for r in rows:
        print(
            f"{r['model']:<14}{r['checkpoint_mib']:>10.0f}{r['onnx_mib']:>10.0f}{r['export_s']:>10.1f}"
            f"{r['peak_rss_mib']:>14.0f}{r['max_abs_error']:>14.2e}"
        )
    print("export = read + convert + write + verify (ONNX Runtime vs JAX on 8 images at batch 1 and 8)")


if __name__ == "__main__":
    main()
