"""``edgevit-build``: the builder's command line."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import fields
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from agent.engine.bundle import BundleError, verify_bundle
from agent.engine.device import DeviceInfo
from agent.engine.golden import check_golden
from agent.engine.runtimes import EngineError, open_engine
from agent.engine.signing import SignatureError, load_public_key
from builder.architecture import describe
from builder.datasets import DEMO
from builder.demo.evaluate import held_out_indices, held_out_top1
from builder.demo.train import CHECKPOINT_DIR, DEMO_MODELS
from builder.demo.video import write_labelled_video
from builder.engine_build import RUNTIMES, TARGETS, BundleResult, EngineOptions, build_engine_bundle
from builder.errors import BuildError, VerificationError
from builder.export import ExportOptions, ExportResult, export_checkpoint
from builder.keys import keygen
from builder.onnx_export import DEFAULT_OPSET
from builder.pack import pack_bundle
from builder.passport import Gate, GateError
from builder.precision import CALIBRATION_METHODS
from builder.verify import DEFAULT_TOLERANCE, REPORT_FILE

EXIT_BAD_INPUT, EXIT_VERIFICATION, EXIT_GATE = 2, 3, 4


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _export_arguments(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--resolution", type=_positive, help="input size in pixels (ViT only; default: the checkpoint's)")
    cmd.add_argument("--model", help="architecture name to check the file against, e.g. ViT-B_16, Mixer-B_16")
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
    cmd.add_argument("--interpolation", choices=["linear", "area"], default="linear")
    cmd.add_argument(
        "--external-data",
        choices=["auto", "always", "never"],
        default="auto",
        help="store weights in model.onnx.data (auto: only near protobuf's 2 GiB limit)",
    )


def _engine_arguments(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--target", choices=list(TARGETS), default="cpu")
    cmd.add_argument("--precision", choices=["fp32", "bf16", "fp16", "int8"], default="fp32")
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
    cmd.add_argument("--max-batch", type=_positive, default=8)
    cmd.add_argument(
        "--quantization",
        choices=["auto", "static", "dynamic"],
        default="auto",
        help="INT8 method; auto builds both and the passport picks (TensorRT: static only)",
    )
    cmd.add_argument("--calibration", choices=list(CALIBRATION_METHODS), default="minmax")
    cmd.add_argument(
        "--smoothing",
        default="auto",
        help="SmoothQuant alpha for outlier channels: auto (searched on held-aside calibration images), off, "
        "or a value in (0, 1]",
    )
    cmd.add_argument("--calibration-images", type=_positive, default=128)
    cmd.add_argument(
        "--quantize-ops",
        choices=["weights", "all"],
        default="weights",
        help="weights: Gemm/Conv only (default); all: every op, which the gate usually refuses",
    )
    cmd.add_argument("--max-drop", type=float, default=1.0, help="allowed top-1 drop, in points")
    cmd.add_argument("--min-agreement", type=float, default=0.99, help="required top-1 agreement with FP32")
    cmd.add_argument("--accept-accuracy-loss", action="store_true", help="ship even if outside the budget (recorded)")
    cmd.add_argument("--key", type=Path, required=True, help="Ed25519 signing key (edgevit-build keygen)")
    cmd.add_argument("--name", help="model name in the manifest (default: the checkpoint's)")
    cmd.add_argument("--version", default="1", help="model version in the manifest")
    cmd.add_argument("--golden", type=_positive, default=8, help="frames in the golden set")
    cmd.add_argument("--workspace-mib", type=_positive, default=1024, help="TensorRT workspace memory-pool limit")
    cmd.add_argument("--timing-cache", type=Path, help="TensorRT timing cache file, reused and updated")
    cmd.add_argument("--profile-seconds", type=float, default=1.0, help="time spent per batch size when profiling")
    cmd.add_argument("--threads", type=_positive, help="ONNX Runtime intra-op threads (default: all cores)")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="edgevit-build", description="Build verified, signed edge engines from JAX ViT/Mixer checkpoints."
    )
    commands = root.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="checkpoint (.npz, published layout) -> verified ONNX")
    export.add_argument("checkpoint", type=Path)
    export.add_argument("--out", type=Path, required=True, help="output folder (model.onnx, verification.json)")
    _export_arguments(export)
    engine = commands.add_parser("engine", help="verified export folder -> measured, gated, signed bundle")
    engine.add_argument("export_dir", type=Path)
    engine.add_argument("--out", type=Path, required=True, help="bundle folder to create")
    _engine_arguments(engine)
    build = commands.add_parser("build", help="export + engine in one step")
    build.add_argument("checkpoint", type=Path)
    build.add_argument("--out", type=Path, required=True, help="bundle folder to create")
    _export_arguments(build)
    _engine_arguments(build)
    keys = commands.add_parser("keygen", help="create an Ed25519 key pair for signing bundles")
    keys.add_argument("--out", type=Path, required=True, help="folder for NAME.key (private) and NAME.pub")
    keys.add_argument("--name", default="edgevit")
    inspect = commands.add_parser("inspect", help="verify a bundle as a device would and show its passport")
    inspect.add_argument("bundle", type=Path)
    inspect.add_argument("--trust", type=Path, action="append", required=True, help="trusted public key (repeatable)")
    pack = commands.add_parser("pack", help="bundle folder -> reproducible .tar.gz for devices to download")
    pack.add_argument("bundle", type=Path)
    pack.add_argument("--out", type=Path, required=True, help="archive path (.tar.gz)")
    pack.add_argument("--trust", type=Path, action="append", help="check the signature too (repeatable)")
    demo = commands.add_parser("demo", help="demo checkpoints -> verified exports -> signed INT8 CPU bundles")
    demo.add_argument("--out", type=Path, default=Path("out/demo"), help="folder for exports, keys and bundles")
    return root


def _progress(console: Console) -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def _options(cls: type, args: argparse.Namespace, **extra: object) -> object:
    """Build an options dataclass from the arguments of the same names (the parser mirrors its fields)."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if f.name not in extra}, **extra)


def _export_options(args: argparse.Namespace) -> ExportOptions:
    return _options(ExportOptions, args)


def _engine_options(args: argparse.Namespace) -> EngineOptions:
    return _options(EngineOptions, args, gate=Gate(args.max_drop, args.min_agreement))


def _export(checkpoint: Path, out: Path, options: ExportOptions, console: Console) -> ExportResult:
    with _progress(console) as progress:
        result = export_checkpoint(checkpoint, out, options, progress)
    console.print(f"[bold]{result.config.name}[/]: {describe(result.config)}")
    console.print(result.report.summary())
    for path in [*result.files, result.model_path.parent / REPORT_FILE]:
        console.print(f"wrote {path}")
    return result


def _recipe(quantization: dict | None) -> str:
    """How a candidate was made, in a few words: method, calibration, smoothing, layers left in float."""
    if not quantization:
        return "-"
    parts = [quantization["method"]]
    if quantization.get("calibration"):
        parts.append(quantization["calibration"])
    alpha = quantization.get("smoothing_alpha")
    parts.append(f"α={alpha:g}" if alpha is not None else quantization.get("smoothing", "no smoothing"))
    if quantization.get("float_layers"):
        parts.append(f"{len(quantization['float_layers'])} layers float")
    return ", ".join(parts)


def candidate_table(candidates: list[dict], chosen: str, title: str) -> Table:
    """The candidates of a build (their passport summaries), the one that ships marked."""
    table = Table(
        "candidate",
        "recipe",
        "top-1",
        "drop (pts)",
        "agreement",
        "max |Δlogit|",
        "img/s @max batch",
        "gate",
        title=title,
    )
    for c in candidates:
        a = c["accuracy"]
        table.add_row(
            c["label"] + (" [bold](ships)[/]" if c["label"] == chosen else ""),
            _recipe(c["quantization"]),
            f"{a['engine_top1']:.2%}",
            f"{a['top1_drop_points']:.2f}",
            f"{a['top1_agreement']:.2%}",
            f"{a['max_abs_logit_error']:.3g}",
            f"{c['latency'][-1]['images_per_s']:.1f}" if c["latency"] else "-",
            "pass" if not c["gate_misses"] else "; ".join(c["gate_misses"]),
        )
    return table


def _engine(export_dir: Path, out: Path, key: Path, options: EngineOptions, console: Console) -> BundleResult:
    with _progress(console) as progress:
        result = build_engine_bundle(export_dir, out, key, options, progress)
    title = f"{options.target} {options.precision}: {result.passport['evaluation_set']['description']}"
    console.print(candidate_table([c.summary() for c in result.candidates], result.chosen.label, title))
    ref = result.passport["accuracy"]["reference_top1"]
    if not result.bundle:
        console.print(
            f"FP32 reference top-1 {ref:.2%}; the TensorRT INT8 recipe passed the gate here in ONNX Runtime "
            f"(Q/DQ simulated on the CPU). Wrote {result.path} (the gated Q/DQ model and recipe.json); this "
            "machine has no TensorRT, so the plan itself is built on the device with the same command."
        )
        return result
    console.print(f"FP32 reference top-1 {ref:.2%}; wrote bundle {result.path} ({result.passport['bundle_id']})")
    if result.passport["gate"]["accepted_accuracy_loss"]:
        console.print("[yellow]shipped outside the accuracy budget (--accept-accuracy-loss), recorded in the passport")
    return result


def run_export(args: argparse.Namespace, console: Console) -> None:
    _export(args.checkpoint, args.out, _export_options(args), console)


def run_engine(args: argparse.Namespace, console: Console) -> None:
    _engine(args.export_dir, args.out, args.key, _engine_options(args), console)


def run_build(args: argparse.Namespace, console: Console) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.out.parent, prefix=f".{args.out.name}.export-") as tmp:
        _export(args.checkpoint, Path(tmp), _export_options(args), console)
        _engine(Path(tmp), args.out, args.key, _engine_options(args), console)


def run_keygen(args: argparse.Namespace, console: Console) -> None:
    private, public, kid = keygen(args.out, args.name)
    console.print(f"wrote {private} (keep secret) and {public} (give to devices); key id {kid}")


def run_inspect(args: argparse.Namespace, console: Console) -> None:
    try:
        bundle = verify_bundle(args.bundle, [load_public_key(p) for p in args.trust], DeviceInfo.probe())
        engine = open_engine(bundle.backend, bundle.target, bundle.engine_path, bundle.batch_range[1])
        golden = check_golden(engine, bundle.golden_path, bundle.batch_range[1])
        engine.close()
    except (BundleError, SignatureError, EngineError) as exc:
        raise BuildError(str(exc)) from exc
    passport, accuracy = bundle.passport, bundle.passport["accuracy"]
    console.print(f"{bundle.bundle_id}: signature by {bundle.signer} valid, all files intact, runs on this device")
    console.print(golden.summary())
    console.print(
        f"top-1 {accuracy['engine_top1']:.2%} (FP32 {accuracy['reference_top1']:.2%}), agreement "
        f"{accuracy['top1_agreement']:.2%}; gate {'passed' if passport['gate']['passed'] else 'MISSED'}"
    )
    console.print(candidate_table(passport["candidates"], passport["engine"]["chosen"], "candidates"))
    if not golden.passed:
        raise BuildError(f"{bundle.bundle_id} does not reproduce its golden set on this device")


def run_pack(args: argparse.Namespace, console: Console) -> None:
    try:
        reference = pack_bundle(args.bundle, args.out, args.trust and [load_public_key(p) for p in args.trust])
    except (BundleError, SignatureError) as exc:
        raise BuildError(str(exc)) from exc
    console.print(f"wrote {args.out}; deploy with bundle: {json.dumps({**reference, 'url': '<where it is served>'})}")


def run_demo(args: argparse.Namespace, console: Console) -> None:
    keys = args.out / "keys"
    key = keys / "edgevit.key"
    if not key.exists():
        run_keygen(argparse.Namespace(out=keys, name="edgevit"), console)
    for name in DEMO_MODELS:
        checkpoint = CHECKPOINT_DIR / f"{name}.npz"
        result = _export(checkpoint, args.out / name, ExportOptions(), console)
        top1, count = held_out_top1(checkpoint, result.model_path)
        console.print(
            f"[bold]{name}[/]: held-out top-1 {top1:.2%} on {count} digits (ONNX Runtime, agent preprocessing)"
        )
        bundle = args.out / "bundles" / f"{name}-cpu-int8"
        if bundle.exists():
            console.print(f"{bundle} exists, kept")
            continue
        options = EngineOptions(target="cpu", precision="int8", eval=DEMO, calib=DEMO, max_batch=8)
        _engine(args.out / name, bundle, key, options, console)
        console.print()
    video = args.out / "digits.mp4"
    labels = write_labelled_video(video, held_out_indices(CHECKPOINT_DIR / "vit-digits.npz"))
    console.print(f"wrote {video}: {len(labels)} held-out digits at 30 fps, labels in {video.with_suffix('.json')}")


COMMANDS = {
    "export": run_export,
    "engine": run_engine,
    "build": run_build,
    "keygen": run_keygen,
    "inspect": run_inspect,
    "pack": run_pack,
    "demo": run_demo,
}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    console, errors = Console(), Console(stderr=True)
    try:
        COMMANDS[args.command](args, console)
    except BuildError as exc:
        errors.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        if isinstance(exc, VerificationError):
            return EXIT_VERIFICATION
        return EXIT_GATE if isinstance(exc, GateError) else EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
