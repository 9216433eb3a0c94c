"""What each ``edgevit-build`` sub-command does (:mod:`builder.cli` parses its arguments)."""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console

from agent.engine.bundle import BundleError, verify_bundle
from agent.engine.device import DeviceInfo
from agent.engine.golden import check_golden
from agent.engine.runtimes import EngineError, open_bundle_engine
from agent.engine.signing import SignatureError, load_public_key
from agent.engine.similarity import with_references
from builder.bundle.batch_mix import read_batch_mix
from builder.bundle.build import BundleResult, build_engine_bundle
from builder.bundle.keys import keygen
from builder.bundle.options import EngineOptions
from builder.bundle.pack import pack_bundle
from builder.bundle.view import candidate_table, not_tried_lines, show_passport
from builder.demo.evaluate import held_out_indices, held_out_top1
from builder.demo.train import CHECKPOINT_DIR, DEMO_MODELS
from builder.demo.video import write_labelled_video
from builder.errors import BuildError
from builder.evaluate.datasets import DEMO
from builder.evaluate.measure import Gate, profile_engine
from builder.export.architecture import describe
from builder.export.job import ExportOptions, ExportResult, export_checkpoint
from builder.export.verify import REPORT_FILE
from builder.progress import make_progress
from fleet.text import markup

Options = TypeVar("Options", ExportOptions, EngineOptions)
# The demo's models run a batch in well under a millisecond: a quarter second per batch size is already
# hundreds of timed runs per candidate, and the demo (and every fresh clone's first minutes) is shorter for it.
DEMO_PROFILE_S = 0.25


def _options(cls: type[Options], args: argparse.Namespace, **extra: Any) -> Options:
    """Build an options dataclass from the arguments of the same names (the parser mirrors its fields)."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if f.name not in extra}, **extra)


def _export_options(args: argparse.Namespace) -> ExportOptions:
    return _options(ExportOptions, args)


def _engine_options(args: argparse.Namespace) -> EngineOptions:
    batches: tuple[int, ...] = tuple(args.batches)
    shares: tuple[float, ...] = ()
    if args.batch_mix:
        mix = read_batch_mix(args.batch_mix, args.max_batch)
        batches, shares = tuple(mix), tuple(mix.values())
    return _options(
        EngineOptions,
        args,
        gate=Gate(args.max_drop, args.min_agreement, args.min_cosine),
        batches=batches,
        batch_shares=shares,
    )


def _export(checkpoint: Path, out: Path, options: ExportOptions, console: Console) -> ExportResult:
    with make_progress(console) as progress:
        result = export_checkpoint(checkpoint, out, options, progress)
    console.print(f"[bold]{result.config.name}[/]: {describe(result.config)}")
    for fix in result.fixes:
        console.print(f"fixed an older layout: {markup(fix)}")
    if result.ignored:
        shown = ", ".join(result.ignored[:4]) + (
            f" and {len(result.ignored) - 4} more" if len(result.ignored) > 4 else ""
        )
        console.print(f"left out {len(result.ignored)} tensors the image model does not use: {shown}")
    console.print(result.report.summary())
    for path in [*result.files, result.model_path.parent / REPORT_FILE]:
        console.print(f"wrote {path}")
    return result


def _engine(export_dir: Path, out: Path, key: Path, options: EngineOptions, console: Console) -> BundleResult:
    with make_progress(console) as progress:
        result = build_engine_bundle(export_dir, out, key, options, progress)
    title = f"{options.target} {options.precision}: {result.passport['evaluation_set']['description']}"
    console.print(candidate_table([c.summary() for c in result.candidates], result.chosen.label, title))
    for line in not_tried_lines(result.passport.get("not_tried")):
        console.print(line)
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
        batch = bundle.batch_range[1]
        engine = open_bundle_engine(bundle)
        engine = with_references(engine, bundle.references_path)
        golden = check_golden(engine, bundle.golden_path, batch)
        engine.close()
    except (BundleError, SignatureError, EngineError) as exc:
        raise BuildError(str(exc)) from exc
    passport = bundle.passport
    here = None
    if args.profile:
        batches = [row["batch"] for row in passport.get("latency") or []] or [1, bundle.batch_range[1]]
        here = profile_engine(
            bundle.engine_path,
            bundle.backend,
            bundle.target,
            bundle.input_spec.height,
            batches,
            args.profile_seconds,
            None,
            bundle.images_per_stream,
        )
    if args.json:
        print(json.dumps({"bundle_id": bundle.bundle_id, "signer": bundle.signer, "golden": asdict(golden),
                          "passport": passport, "profile_here": here}, indent=2))  # fmt: skip
    else:
        console.print(f"{bundle.bundle_id}: signature by {bundle.signer} valid, all files intact, runs on this device")
        console.print(golden.summary())
        show_passport(console, passport, here)
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
        options = EngineOptions(
            target="cpu", precision="int8", eval=DEMO, calib=DEMO, max_batch=8, profile_seconds=DEMO_PROFILE_S
        )
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
