"""``edgevit-build``: verified, signed edge engines from JAX ViT/Mixer checkpoints.

checkpoint (.npz, published layout) -> export (verified ONNX) -> engine (candidates
measured and gated against FP32, the fastest inside the gate signed into a bundle) ->
pack (an archive devices download). ``inspect`` shows a bundle's passport.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from agent.command_line import new_parser, subcommands
from builder.choices import (
    CALIBRATIONS,
    DEFAULT_OPSET,
    DEFAULT_TENSORRT,
    DEFAULT_TOLERANCE,
    INT8_CPUS,
    PRECISIONS,
    QUANTIZATIONS,
    QUANTIZE_OPS,
    RUNTIMES,
    TARGETS,
)
from builder.errors import BuildError, GateError, VerificationError

EXIT_BAD_INPUT, EXIT_VERIFICATION, EXIT_GATE = 2, 3, 4


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


CHECKPOINT_HELP = "ViT, hybrid or Mixer .npz checkpoint (vision_transformer or big_vision layout)"


def _export_arguments(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--resolution", type=_positive, help="input size in pixels (ViT only; default: the checkpoint's)")
    cmd.add_argument(
        "--model", help="architecture name to check the file against, e.g. ViT-B_16, R50+ViT-B_16, Mixer-B_16"
    )
    cmd.add_argument(
        "--pool",
        choices=["gap", "0"],
        help="big_vision pooling where the file cannot show it (no cls, no MAP head): gap (default) or 0",
    )
    cmd.add_argument("--opset", type=_positive, default=DEFAULT_OPSET, help="ONNX opset (TensorRT 10 reads <= 20)")
    cmd.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help="allowed max |Δlogit| / max(1, max |logit|) between ONNX Runtime and JAX",
    )
    cmd.add_argument("--samples", type=_positive, default=8, help="images used to verify the export")
    cmd.add_argument(
        "--resize", choices=["stretch", "center_crop"], default="stretch", help="how frames become the input size"
    )
    cmd.add_argument(
        "--interpolation", choices=["linear", "area"], default="linear", help="resampling filter used to resize frames"
    )
    cmd.add_argument(
        "--external-data",
        choices=["auto", "always", "never"],
        default="auto",
        help="store weights in model.onnx.data (auto: only near protobuf's 2 GiB limit)",
    )


def _engine_arguments(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--target",
        choices=list(TARGETS),
        default="cpu",
        help="device the engine is for (tensorrt: a plan for that GPU)",
    )
    cmd.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="engine arithmetic; anything below fp32 is gated against the FP32 export",
    )
    cmd.add_argument(
        "--runtime",
        choices=list(RUNTIMES),
        default="auto",
        help="CPU runtimes to build candidates for; auto: every one installed (ONNX Runtime, OpenVINO)",
    )
    cmd.add_argument(
        "--eval",
        required=True,
        help="labelled folder (<label>/<image>), 'demo' (held-out split) or 'demo:NAME' (that demo model's)",
    )
    cmd.add_argument("--calib", help="folder of images for INT8 calibration, 'demo' (training split) or 'demo:NAME'")
    cmd.add_argument("--labels", type=Path, help="class names: JSON list or one per line (default: eval folders)")
    cmd.add_argument(
        "--max-batch", type=_positive, default=8, help="largest batch the engine serves (the agent's batcher)"
    )
    served = cmd.add_mutually_exclusive_group()
    served.add_argument(
        "--batches",
        type=_positive,
        nargs="+",
        default=(),
        metavar="N",
        help="batch sizes the device will serve (a one-camera box: 1); the speed a candidate is chosen by "
        "(default: --max-batch)",
    )
    served.add_argument(
        "--batch-mix",
        type=Path,
        metavar="FILE",
        help="a serving device's agent metrics (its MQTT metrics JSON, exit summary or Prometheus text): "
        "candidates are chosen by their speed at the batch sizes it ran, weighted by images",
    )
    cmd.add_argument(
        "--max-memory",
        type=_positive_float,
        metavar="MiB",
        help="ship only a candidate whose serving process peaked at or under this resident memory (measured)",
    )
    cmd.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        default="auto",
        help="INT8 method; auto builds both and the passport picks (TensorRT: static only)",
    )
    cmd.add_argument(
        "--int8-cpu",
        choices=INT8_CPUS,
        default="auto",
        help="x86 CPUs an INT8 engine is for: vnni (8-bit weights; devices without VNNI/AMX refuse it), any "
        "(7-bit weights, exact on every x86), auto: like the CPU building it",
    )
    cmd.add_argument("--calibration", choices=CALIBRATIONS, default="minmax", help="how INT8 activation ranges are set")
    cmd.add_argument(
        "--smoothing",
        default="auto",
        help="SmoothQuant alpha for outlier channels: auto (searched on held-aside calibration images), off, "
        "or a value in (0, 1]",
    )
    cmd.add_argument("--calibration-images", type=_positive, default=128, help="images used for INT8 calibration")
    cmd.add_argument(
        "--quantize-ops",
        choices=QUANTIZE_OPS,
        default="weights",
        help="weights: Gemm/Conv only (default); all: every op, which the gate usually refuses",
    )
    cmd.add_argument("--max-drop", type=float, default=1.0, help="allowed top-1 drop, in points")
    cmd.add_argument("--min-agreement", type=float, default=0.99, help="required top-1 agreement with FP32")
    cmd.add_argument(
        "--min-cosine",
        type=float,
        default=0.99,
        help="embedding models: required mean cosine similarity of the embeddings to FP32's",
    )
    cmd.add_argument(
        "--references",
        type=Path,
        metavar="FILE.npz",
        help="embedding models: reference embeddings ('names', 'vectors') results are scored against "
        "(default: one prototype per class of --eval)",
    )
    cmd.add_argument("--accept-accuracy-loss", action="store_true", help="ship even if outside the budget (recorded)")
    cmd.add_argument(
        "--baseline",
        type=Path,
        help="the bundle or export this engine replaces: their agreement (what a device's canary expects) and "
        "accuracies go in the passport; a top-1 drop beyond --max-drop refuses the build",
    )
    cmd.add_argument("--key", type=Path, required=True, help="Ed25519 signing key (edgevit-build keygen)")
    cmd.add_argument("--name", help="model name in the manifest (default: the checkpoint's)")
    cmd.add_argument("--version", default="1", help="model version in the manifest")
    cmd.add_argument("--golden", type=_positive, default=8, help="frames in the golden set")
    cmd.add_argument("--workspace-mib", type=_positive, default=1024, help="TensorRT workspace memory-pool limit")
    cmd.add_argument("--timing-cache", type=Path, help="TensorRT timing cache file, reused and updated")
    cmd.add_argument(
        "--tensorrt-version",
        default=DEFAULT_TENSORRT,
        help="TensorRT release whose ONNX parser rules a TensorRT-bound graph is checked against on a machine "
        "without TensorRT (JetPack 6.1/6.2: 10.3; 6.0: 8.6)",
    )
    cmd.add_argument(
        "--profile-seconds",
        type=float,
        default=1.0,
        help="longest time spent per batch size when profiling (sooner once the mean is known to ±1 %%)",
    )
    cmd.add_argument("--threads", type=_positive, help="ONNX Runtime intra-op threads (default: all cores)")


def parser() -> argparse.ArgumentParser:
    root = new_parser("edgevit-build", __doc__)
    commands = subcommands(root)
    export = commands.add_parser("export", help="checkpoint (.npz, published layout) -> verified ONNX")
    export.add_argument(
        "checkpoint", type=Path, help="ViT, hybrid or Mixer .npz checkpoint (vision_transformer or big_vision layout)"
    )
    export.add_argument("--out", type=Path, required=True, help="output folder (model.onnx, verification.json)")
    _export_arguments(export)
    engine = commands.add_parser("engine", help="verified export folder -> measured, gated, signed bundle")
    engine.add_argument("export_dir", type=Path, help="a folder edgevit-build export wrote")
    engine.add_argument("--out", type=Path, required=True, help="bundle folder to create")
    _engine_arguments(engine)
    build = commands.add_parser("build", help="export + engine in one step")
    build.add_argument(
        "checkpoint", type=Path, help="ViT, hybrid or Mixer .npz checkpoint (vision_transformer or big_vision layout)"
    )
    build.add_argument("--out", type=Path, required=True, help="bundle folder to create")
    _export_arguments(build)
    _engine_arguments(build)
    keys = commands.add_parser("keygen", help="create an Ed25519 key pair for signing bundles")
    keys.add_argument("--out", type=Path, required=True, help="folder for NAME.key (private) and NAME.pub")
    keys.add_argument("--name", default="edgevit", help="file name of the pair, and the key's name")
    inspect = commands.add_parser("inspect", help="verify a bundle as a device would and show its passport")
    inspect.add_argument("bundle", type=Path, help="bundle folder (edgevit-build engine/build)")
    inspect.add_argument("--trust", type=Path, action="append", required=True, help="trusted public key (repeatable)")
    inspect.add_argument("--json", action="store_true", help="the whole passport and the checks, machine-readable")
    inspect.add_argument(
        "--profile", action="store_true", help="re-measure the engine on this machine, beside the passport's figures"
    )
    inspect.add_argument(
        "--profile-seconds",
        type=float,
        default=1.0,
        help="longest time spent per batch size (--profile; sooner once stable)",
    )
    pack = commands.add_parser("pack", help="bundle folder -> reproducible .tar.gz for devices to download")
    pack.add_argument("bundle", type=Path, help="bundle folder (edgevit-build engine/build)")
    pack.add_argument("--out", type=Path, required=True, help="archive path (.tar.gz)")
    pack.add_argument("--trust", type=Path, action="append", help="check the signature too (repeatable)")
    demo = commands.add_parser("demo", help="demo checkpoints -> verified exports -> signed INT8 CPU bundles")
    demo.add_argument("--out", type=Path, default=Path("out/demo"), help="folder for exports, keys and bundles")
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    console = Console()
    console.soft_wrap = not console.is_terminal  # a log keeps each message on one line
    errors = Console(stderr=True)
    try:
        from builder.commands import COMMANDS  # JAX and the runtimes load only now: --help stays fast

        COMMANDS[args.command](args, console)
    except BuildError as exc:
        errors.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        if isinstance(exc, VerificationError):
            return EXIT_VERIFICATION
        return EXIT_GATE if isinstance(exc, GateError) else EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
