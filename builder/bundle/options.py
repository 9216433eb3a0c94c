"""Engine options: what a build is asked for, checked before anything heavy runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from agent.engine.device import BF16_FEATURES, DeviceInfo, full_range_int8_exact
from builder.choices import (
    DEFAULT_TENSORRT,
    RUNTIMES,
    TARGETS,
    Calibration,
    Flavour,
    Int8Cpu,
    Precision,
    Quantization,
    QuantizeOps,
    Runtime,
    Target,
)
from builder.errors import BuildError
from builder.evaluate.measure import Gate
from builder.quantize.int8_recipe import (
    parse_smoothing,
)
from builder.targets import openvino as openvino_engines
from builder.targets.tensorrt_plan import tensorrt_version


@dataclass(frozen=True)
class EngineOptions:
    target: Target = "cpu"
    precision: Precision = "fp32"
    eval: str = "demo"
    calib: str | None = None
    labels: Path | None = None
    max_batch: int = 8
    max_memory: float | None = None  # MiB of peak RSS a candidate's serving process may reach (--max-memory)
    batches: tuple[int, ...] = ()  # the batch sizes the device will serve, speed is judged at (--batches)
    batch_shares: tuple[float, ...] = ()  # each of `batches`' share of the images (--batch-mix; empty: equal)
    quantization: Quantization = "auto"
    calibration: Calibration = "minmax"
    smoothing: str = "auto"  # SmoothQuant α: auto (searched on held-aside calibration frames) | off | a value
    quantize_ops: QuantizeOps = "weights"
    calibration_images: int = 128
    gate: Gate = field(default_factory=Gate)
    accept_accuracy_loss: bool = False
    name: str | None = None
    version: str = "1"
    golden: int = 8
    workspace_mib: int = 1024
    timing_cache: Path | None = None
    profile_seconds: float = 1.0
    threads: int | None = None
    runtime: Runtime = "auto"
    tensorrt_version: str = DEFAULT_TENSORRT  # the parser rules a TensorRT-bound graph is checked against here
    baseline: Path | None = None  # the bundle or export this engine replaces (builder.evaluate.baseline)
    references: Path | None = None  # an embedding model's reference embeddings (builder.evaluate.references)
    int8_cpu: Int8Cpu = "auto"


def cpu_flavour(options: EngineOptions, device: DeviceInfo) -> Flavour:
    """The INT8 flavour of a CPU build (:data:`builder.choices.Flavour`).

    ``vnni`` keeps full 8-bit weights, which are exact and fastest on CPUs with VNNI or AMX and which
    devices without them refuse; ``any`` keeps weights in 7 bits, exact on every x86. ``auto`` builds
    for the kind of CPU the engine is measured on, so that the passport's figures are the device's.
    """
    wanted = options.int8_cpu
    if wanted == "auto":
        wanted = "vnni" if full_range_int8_exact(device) else "any"
    return "cpu" if wanted == "vnni" else "cpu-portable"


def served_mix(options: EngineOptions) -> dict[int, float]:
    """Batch size -> its weight in a candidate's speed: ``--batch-mix``'s image shares, else ``--batches``
    weighted equally, else the largest batch alone."""
    if options.batch_shares:
        return dict(zip(options.batches, options.batch_shares, strict=True))
    return dict.fromkeys(options.batches or (options.max_batch,), 1.0)


def checked_tensorrt(options: EngineOptions) -> str:
    """The TensorRT whose parser rules apply: the one installed here, else the one the options name."""
    return tensorrt_version() or options.tensorrt_version


def check_options(options: EngineOptions) -> None:
    if options.precision not in TARGETS.get(options.target, ()):
        allowed = ", ".join(f"{t}: {'/'.join(p)}" for t, p in TARGETS.items())
        raise BuildError(f"--precision {options.precision} is not offered for --target {options.target} ({allowed})")
    if options.max_batch < 1:
        raise BuildError("--max-batch must be at least 1")
    if any(not 1 <= b <= options.max_batch for b in options.batches):
        raise BuildError(f"--batches must lie within 1..--max-batch ({options.max_batch}), got {list(options.batches)}")
    parse_smoothing(options.smoothing)
    if options.runtime not in RUNTIMES:
        raise BuildError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {options.runtime!r}")
    if options.runtime == "openvino" and options.target != "cpu":
        raise BuildError(f"--runtime openvino is a CPU runtime; --target {options.target} has its own")
    if options.runtime == "openvino" or options.precision == "bf16":
        openvino_engines.require()


def runtimes_for(options: EngineOptions) -> tuple[str, ...]:
    """The runtimes whose candidates a build makes: the target's own, or for the CPU those asked for."""
    if options.target != "cpu":
        return ("onnxruntime",)
    if options.precision == "bf16":
        return ("openvino",)
    if options.runtime == "auto":
        return ("onnxruntime", "openvino") if openvino_engines.available() else ("onnxruntime",)
    return (options.runtime,)


def not_tried(options: EngineOptions, device: DeviceInfo) -> list[dict[str, str]]:
    """What this build leaves out because of this machine, each with what would add it: a runtime that is
    not installed, a CPU feature that is missing. Shown under the candidate table and kept in the passport,
    so that a slower bundle is never the silent result of a narrower install."""
    lines = []
    if options.target == "cpu" and options.runtime == "auto" and not openvino_engines.available():
        lines.append(
            {
                "what": "OpenVINO candidates",
                "why": "OpenVINO is not installed here",
                "add": "pip install 'edgevit[openvino]'",
            }
        )
    if options.target == "cpu" and options.precision == "int8" and not full_range_int8_exact(device):
        if options.int8_cpu == "auto":
            lines.append(
                {
                    "what": "INT8 with full 8-bit weights",
                    "why": "this CPU has no VNNI or AMX, where they compute exactly (7-bit weights instead)",
                    "add": "build on a CPU with VNNI or AMX, for the devices that have them",
                }
            )
    if (
        options.target == "cpu"
        and "openvino" in runtimes_for(options)
        and not device.cpu_features & BF16_FEATURES
        and device.arch in ("x86_64", "AMD64")
    ):
        lines.append(
            {
                "what": "OpenVINO with BF16 float parts",
                "why": "this CPU has no AVX512_BF16 or AMX",
                "add": "build on a CPU with AVX512_BF16 or AMX for devices that have them",
            }
        )
    return lines
