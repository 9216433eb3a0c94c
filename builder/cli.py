"""``edgevit-build``: the builder's command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from builder.architecture import describe
from builder.demo.evaluate import held_out_top1
from builder.demo.train import CHECKPOINT_DIR, DEMO_MODELS
from builder.errors import BuildError, VerificationError
from builder.export import ExportOptions, ExportResult, export_checkpoint
from builder.onnx_export import DEFAULT_OPSET
from builder.verify import DEFAULT_TOLERANCE, REPORT_FILE

EXIT_BAD_INPUT, EXIT_VERIFICATION = 2, 3


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="edgevit-build", description="Build verified edge engines from JAX ViT/Mixer checkpoints."
    )
    commands = root.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="checkpoint (.npz, published layout) -> verified ONNX")
    export.add_argument("checkpoint", type=Path)
    export.add_argument("--out", type=Path, required=True, help="output folder (model.onnx, verification.json)")
    export.add_argument(
        "--resolution", type=_positive, help="input size in pixels (ViT only; default: the checkpoint's)"
    )
    export.add_argument("--model", help="architecture name to check the file against, e.g. ViT-B_16, Mixer-B_16")
    export.add_argument("--opset", type=_positive, default=DEFAULT_OPSET, help="ONNX opset (TensorRT 10 reads <= 20)")
    export.add_argument(
        "--tolerance", type=float, default=DEFAULT_TOLERANCE, help="allowed max |Δlogit| / max(1, max |logit|)"
    )
    export.add_argument("--samples", type=_positive, default=8, help="images used to verify the export")
    export.add_argument(
        "--resize", choices=["stretch", "center_crop"], default="stretch", help="how frames become the input size"
    )
    export.add_argument("--interpolation", choices=["linear", "area"], default="linear")
    export.add_argument(
        "--external-data",
        choices=["auto", "always", "never"],
        default="auto",
        help="store weights in model.onnx.data (auto: only when they approach protobuf's 2 GiB limit)",
    )
    demo = commands.add_parser("demo", help="export the bundled demo checkpoints and measure their held-out accuracy")
    demo.add_argument(
        "--out", type=Path, default=Path("out/demo"), help="folder for the exports (one subfolder per model)"
    )
    return root


def _progress(console: Console) -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def _export(checkpoint: Path, out: Path, options: ExportOptions, console: Console) -> ExportResult:
    with _progress(console) as progress:
        result = export_checkpoint(checkpoint, out, options, progress)
    console.print(f"[bold]{result.config.name}[/]: {describe(result.config)}")
    console.print(result.report.summary())
    for path in [*result.files, result.model_path.parent / REPORT_FILE]:
        console.print(f"wrote {path}")
    return result


def run_export(args: argparse.Namespace, console: Console) -> None:
    options = ExportOptions(
        args.resolution,
        args.model,
        args.opset,
        args.tolerance,
        args.samples,
        args.resize,
        args.interpolation,
        args.external_data,
    )
    _export(args.checkpoint, args.out, options, console)


def run_demo(args: argparse.Namespace, console: Console) -> None:
    for name in DEMO_MODELS:
        checkpoint = CHECKPOINT_DIR / f"{name}.npz"
        result = _export(checkpoint, args.out / name, ExportOptions(), console)
        top1, count = held_out_top1(checkpoint, result.model_path)
        console.print(
            f"[bold]{name}[/]: held-out top-1 {top1:.2%} on {count} digits (ONNX Runtime, agent preprocessing)\n"
        )


COMMANDS = {"export": run_export, "demo": run_demo}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    console, errors = Console(), Console(stderr=True)
    try:
        COMMANDS[args.command](args, console)
    except BuildError as exc:
        errors.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return EXIT_VERIFICATION if isinstance(exc, VerificationError) else EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
