"""TensorRT 10 plans, built on the device that will run them.

Plans only deserialize on the GPU model and TensorRT version they were built with,
so this runs on the target (a Jetson, or a server with the same GPU) and records
both in the bundle. INT8 is explicit: the ONNX already carries symmetric Q/DQ from
:func:`builder.quantize.precision.quantize_static_int8` (``flavour='tensorrt'``); the
implicit calibrators are deprecated since TensorRT 10.1. The TensorRT 10 builder
flags FP16/INT8 used here were removed in TensorRT 11, hence ``tensorrt<11``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from builder.errors import BuildError

INPUT_NAME = "images"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlanSettings:
    precision: str
    image_size: int
    min_batch: int
    opt_batch: int
    max_batch: int
    workspace_mib: int = 1024
    timing_cache: Path | None = None


def tensorrt_version() -> str | None:
    try:
        import tensorrt
    except ImportError:
        return None
    return str(tensorrt.__version__)


def build_plan(onnx_path: Path, plan_path: Path, settings: PlanSettings) -> Path:
    """Parse, configure (profile, workspace, precision, timing cache) and serialize a plan."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BuildError(
            "TensorRT plans are built on the target device, and this machine has no TensorRT "
            "(install edgevit[gpu] there: tensorrt>=10,<11)"
        ) from exc
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mib << 20)
    if settings.precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)  # layers left unquantized may run in FP16
    if settings.precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)  # honours the model's explicit Q/DQ
    profile = builder.create_optimization_profile()
    s = settings.image_size
    profile.set_shape(
        INPUT_NAME, (settings.min_batch, s, s, 3), (settings.opt_batch, s, s, 3), (settings.max_batch, s, s, 3)
    )
    config.add_optimization_profile(profile)
    cache_bytes = (
        settings.timing_cache.read_bytes() if settings.timing_cache and settings.timing_cache.exists() else b""
    )
    if not config.set_timing_cache(config.create_timing_cache(cache_bytes), ignore_mismatch=False):
        # a cache from another GPU or TensorRT: start afresh (this build rewrites it) rather than build without one
        log.warning("timing cache %s does not match this GPU/TensorRT; starting a new one", settings.timing_cache)
        if not config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False):
            raise BuildError("TensorRT refused an empty timing cache")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BuildError(f"TensorRT failed to build a {settings.precision} plan from {onnx_path} (see its log above)")
    plan_path.write_bytes(bytes(plan))
    if settings.timing_cache:
        settings.timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return plan_path
