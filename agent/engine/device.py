"""What this device is, as far as running an engine is concerned.

An engine needs things of a device: an ONNX Runtime recent enough for its opset, an
execution provider, CPU instructions its INT8 kernels rely on, or (TensorRT) the
exact TensorRT version and GPU it was built on. :class:`DeviceInfo` holds the
device's side of that comparison; :func:`DeviceInfo.probe` reads it off the running
machine, and a description of another device can be written out by hand.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path

JETSON_MODEL_FILE = Path("/proc/device-tree/model")


@dataclass(frozen=True)
class DeviceInfo:
    arch: str
    cpu_features: frozenset[str] = field(default_factory=frozenset)
    onnxruntime: str | None = None
    providers: tuple[str, ...] = ()
    openvino: str | None = None
    tensorrt: str | None = None
    compute_capability: str | None = None
    jetson_model: str | None = None

    @classmethod
    def probe(cls) -> DeviceInfo:
        """This machine. Optional runtimes that are not installed are simply absent."""
        return cls(
            arch=platform.machine(),
            cpu_features=_cpu_features(),
            onnxruntime=_onnxruntime()[0],
            providers=_onnxruntime()[1],
            openvino=_openvino(),
            tensorrt=_tensorrt(),
            compute_capability=_compute_capability(),
            jetson_model=_jetson_model(),
        )

    def describe(self) -> dict[str, object]:
        """JSON-able summary, for passports and status reports."""
        return {
            "arch": self.arch,
            "onnxruntime": self.onnxruntime,
            "providers": list(self.providers),
            "openvino": self.openvino,
            "tensorrt": self.tensorrt,
            "compute_capability": self.compute_capability,
            "jetson_model": self.jetson_model,
            "int8_features": sorted(self.cpu_features & INT8_FEATURES),
            "bf16_features": sorted(self.cpu_features & BF16_FEATURES),
        }


# CPU flags that give ONNX Runtime's u8 x s8 kernels their speed and exactness on x86:
# without VNNI, AVX2 u8s8 uses VPMADDUBSW, whose int16 sums of two u8 x s8 products saturate
# (2 x 255 x 127 > 32767; ONNX Runtime's docs). Weights kept within [-64, 64] (7 bits) cannot
# saturate it (2 x 255 x 64 = 32640), so such engines run exactly on any x86.
X86_INT8_FEATURES = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
INT8_FEATURES = X86_INT8_FEATURES | {"asimddp", "i8mm"}  # Arm dot-product / matrix-multiply extensions
# What OpenVINO's CPU plugin needs to run BF16 (its default inference precision where present).
BF16_FEATURES = frozenset({"avx512_bf16", "amx_bf16"})


def full_range_int8_exact(device: DeviceInfo) -> bool:
    """Whether INT8 kernels with full 8-bit weights compute exactly here (VNNI/AMX on x86; any Arm)."""
    return device.arch not in ("x86_64", "AMD64") or bool(device.cpu_features & X86_INT8_FEATURES)


def _cpu_features() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def _onnxruntime() -> tuple[str | None, tuple[str, ...]]:
    try:
        import onnxruntime
    except ImportError:
        return None, ()
    return onnxruntime.__version__, tuple(onnxruntime.get_available_providers())


def _openvino() -> str | None:
    from agent.engine.runtimes import EngineError
    from agent.engine.runtimes.openvino import load_openvino

    try:
        return str(load_openvino().get_version()).split("-")[0]
    except EngineError:
        return None


def _tensorrt() -> str | None:
    try:
        import tensorrt
    except ImportError:
        return None
    return str(tensorrt.__version__)


def _compute_capability() -> str | None:
    try:
        import pycuda.driver as cuda

        cuda.init()
        major, minor = cuda.Device(0).compute_capability()
    except Exception:  # no pycuda, no driver or no GPU: all mean "no CUDA device"
        return None
    return f"{major}.{minor}"


def gpu_problems(device: DeviceInfo) -> list[str]:
    """What a GPU device (a Jetson above all) still lacks for TensorRT and CUDA bundles, each with its fix."""
    problems = []
    if device.tensorrt is None:
        problems.append(
            "TensorRT's Python module is not importable: on JetPack it is python3-libnvinfer, seen only by a venv made "
            "with --system-site-packages (scripts/jetson-install)"
        )
    elif int(device.tensorrt.split(".")[0]) < 10:
        problems.append(f"TensorRT {device.tensorrt}: edgevit's TensorRT bundles need 10.x (JetPack 6.1 or 6.2)")
    for provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        if provider not in device.providers:
            problems.append(f"ONNX Runtime has no {provider}: install NVIDIA's onnxruntime-gpu wheel for JetPack")
    if device.compute_capability is None:
        problems.append(
            "pycuda sees no CUDA device: pip install pycuda with CUDA_ROOT=/usr/local/cuda; user in 'video'"
        )
    return problems


def main(argv: list[str] | None = None) -> int:
    """``python -m agent.engine.device [--require-gpu]``: this device as the agent sees it, and what is missing."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m agent.engine.device", description=main.__doc__)
    parser.add_argument("--require-gpu", action="store_true", help="exit 1 naming what TensorRT/CUDA still lack")
    args = parser.parse_args(argv)
    device = DeviceInfo.probe()
    print(json.dumps(device.describe(), indent=2))
    problems = gpu_problems(device) if args.require_gpu else []
    for problem in problems:
        print(f"missing: {problem}")
    return 1 if problems else 0


def _jetson_model() -> str | None:
    try:
        return JETSON_MODEL_FILE.read_text().rstrip("\x00\n") or None
    except OSError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
