"""Every export is checked: ONNX Runtime against the JAX forward on the same inputs.

A tolerance on logits alone would let a broken batch dimension through (batch 1
right, batch N wrong), so the samples run at batch 1 and at full batch. The report
is written whether or not the check passes: a failed export leaves the evidence.
"""

from __future__ import annotations

import collections
import json
import platform
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from agent.engine.bundle import file_digest
from builder.choices import DEFAULT_TOLERANCE
from builder.errors import VerificationError

REPORT_FILE = "verification.json"


@dataclass
class VerificationReport:
    passed: bool
    tolerance: float
    max_abs_error: float
    mean_abs_error: float
    max_abs_logit: float
    top1_agreement: float
    samples: int
    batch_sizes: list[int]
    opset: int
    op_histogram: dict[str, int]
    files: dict[str, dict[str, object]]
    runtime: dict[str, str] = field(default_factory=dict)  # versions of what produced and ran it

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"verification {verdict}: max |Δlogit| {self.max_abs_error:.3g} "
            f"(allowed {self.tolerance:g} × max(1, {self.max_abs_logit:.3g})), mean {self.mean_abs_error:.3g}, "
            f"top-1 agreement {self.top1_agreement:.1%} on {self.samples} samples at batch sizes {self.batch_sizes}"
        )

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")


def sample_images(count: int, size: int, seed: int = 0) -> np.ndarray:
    """Uniform-noise uint8 images: they exercise the full input range, unlike real photos."""
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(collections.Counter(node.op_type for node in model.graph.node).items()))


def run_onnx(session: ort.InferenceSession, images: np.ndarray, batch_size: int) -> np.ndarray:
    name = session.get_inputs()[0].name
    chunks = [session.run(None, {name: images[i : i + batch_size]})[0] for i in range(0, len(images), batch_size)]
    return np.concatenate(chunks)


def verify(
    model_files: list[Path],
    reference: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    tolerance: float = DEFAULT_TOLERANCE,
    reference_versions: Mapping[str, str] = {},
) -> VerificationReport:
    """Compare ONNX Runtime (CPU) with ``reference`` on ``images``; write nothing, raise nothing.

    ``reference_versions`` names what produced the reference (JAX, exporter) for the report.
    """
    model_path = model_files[0]
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    expected = np.asarray(reference(images), np.float32)
    batch_sizes = sorted({1, len(images)})
    errors, agreements = [], []
    for batch_size in batch_sizes:
        got = run_onnx(session, images, batch_size)
        errors.append(np.abs(got - expected))
        agreements.append(got.argmax(-1) == expected.argmax(-1))
    error, agree = np.stack(errors), np.stack(agreements)
    max_logit = float(np.abs(expected).max())
    proto = onnx.load(model_path, load_external_data=False)
    return VerificationReport(
        passed=bool(error.max() <= tolerance * max(1.0, max_logit)),
        tolerance=tolerance,
        max_abs_error=float(error.max()),
        mean_abs_error=float(error.mean()),
        max_abs_logit=max_logit,
        top1_agreement=float(agree.mean()),
        samples=len(images),
        batch_sizes=batch_sizes,
        opset=next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
        op_histogram=op_histogram(proto),
        files={p.name: file_digest(p) for p in model_files},
        runtime={"onnxruntime": ort.__version__, "python": platform.python_version(), **reference_versions},
    )


def verify_and_report(
    model_files: list[Path],
    reference: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    tolerance: float,
    reference_versions: Mapping[str, str] = {},
) -> VerificationReport:
    """:func:`verify`, write ``verification.json`` beside the model, raise if it failed."""
    report = verify(model_files, reference, images, tolerance, reference_versions)
    report.write(model_files[0].parent / REPORT_FILE)
    if not report.passed:
        raise VerificationError(report.summary() + f"; report: {model_files[0].parent / REPORT_FILE}")
    return report
