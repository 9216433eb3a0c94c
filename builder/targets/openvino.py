"""OpenVINO candidates for x86 CPUs: the export in FP32 or BF16, and INT8 two ways.

INT8 comes either from edgevit's own Q/DQ graph (the smoothed, searched static recipe of
:mod:`builder.quantize.int8_recipe`, which OpenVINO reads as it is) or from NNCF's post-training
quantization with ``model_type=TRANSFORMER`` (which applies its own SmoothQuant), saved
as OpenVINO IR. Both are measured and gated beside the ONNX Runtime candidates; the
float parts of an INT8 model run in BF16 where the CPU has it (target ``cpu-bf16``).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import onnx_ir as ir

from agent.engine.device import BF16_FEATURES, DeviceInfo
from agent.engine.runtimes import EngineError
from agent.engine.runtimes.openvino import load_openvino
from builder.errors import BuildError
from builder.rewrites.graph_passes import exact_gelu_before_quantization, float_dense_outputs
from builder.rewrites.token_mixing import left_weight_token_mixing

NNCF_IR = "model-int8-nncf.xml"


def available() -> bool:
    try:
        load_openvino()
    except EngineError:
        return False
    return True


def require() -> None:
    if not available():
        raise BuildError("--runtime openvino needs OpenVINO here: pip install 'edgevit[openvino]'")


def float_target(device: DeviceInfo) -> str:
    """``cpu-bf16`` where this CPU runs BF16 (what OpenVINO itself would pick), else ``cpu``."""
    return "cpu-bf16" if device.cpu_features & BF16_FEATURES else "cpu"


def qdq_for_openvino(qdq: Path) -> tuple[Path, dict[str, str]]:
    """edgevit's searched Q/DQ graph as OpenVINO runs it best (``-openvino.onnx``), and what changed, for the passport.

    Dense outputs are left float (:func:`builder.rewrites.graph_passes.float_dense_outputs`), with the same
    quantized weights and Dense inputs. A Mixer's token mixing gets its weights on the left
    (:mod:`builder.rewrites.token_mixing`), which requantizes that MLP's two inputs. GELUs whose output is
    quantized at once run in their exact form (:func:`builder.rewrites.graph_passes.exact_gelu_before_quantization`).
    """
    model = ir.load(qdq)
    float_dense_outputs(model)
    changes = {"dense_outputs": "float"}
    if left_weight_token_mixing(model):
        changes["token_mixing"] = "weights on the left, s8 inputs"
    gap = exact_gelu_before_quantization(model)
    if gap is not None:
        changes["gelu"] = f"erf form, at most {gap:.1%} of a quantization step from the tanh form"
    out = qdq.with_name(f"{qdq.stem}-openvino.onnx")
    ir.save(model, out)
    return out, changes


def nncf_int8(export: Path, calibration: np.ndarray, out_dir: Path, portable: bool = False) -> list[Path]:
    """NNCF's default INT8 for transformers (the reference users would reach for), as IR files.

    ``portable`` applies NNCF's overflow fix to every layer (7-bit weights), which CPUs without VNNI
    need for exact results; by default NNCF applies it to the first layer only.
    OpenVINO is loaded without its telemetry (:func:`agent.engine.runtimes.openvino.load_openvino`), which
    NNCF's own telemetry then falls back from too.
    """
    ov = load_openvino()
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    model = ov.Core().read_model(str(export))
    name = model.inputs[0].any_name
    model.reshape({name: [1, *calibration.shape[1:]]})
    dataset = nncf.Dataset([calibration[i : i + 1] for i in range(len(calibration))])
    overflow = OverflowFix.ENABLE if portable else OverflowFix.FIRST_LAYER
    # NNCF draws its own progress bars and info lines on stdout; the builder's step stands for them
    with contextlib.redirect_stdout(io.StringIO()):
        quantized = nncf.quantize(
            model,
            dataset,
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(calibration),
            advanced_parameters=AdvancedQuantizationParameters(overflow_fix=overflow),
        )
    quantized.reshape({name: [-1, *calibration.shape[1:]]})
    xml = out_dir / NNCF_IR
    ov.save_model(quantized, str(xml), compress_to_fp16=False)
    return [xml, xml.with_suffix(".bin")]


def requirements(precision: str, target: str, device: DeviceInfo, int8_features: list[str]) -> dict[str, object]:
    """OpenVINO of this release year, and the CPU features the engine's kernels need (none: any)."""
    year = int((device.openvino or "0").split(".")[0])
    requires: dict[str, object] = {"openvino": f">={year}.0,<{year + 1}"}
    if precision == "int8" and int8_features:
        requires["cpu_features_any"] = int8_features
    if target == "cpu-bf16":
        requires["bf16_features_any"] = sorted(BF16_FEATURES)
    return requires
