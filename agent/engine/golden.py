"""The golden-set check: does this engine, on this device, still compute the built model?

``golden.npz`` holds preprocessed inputs (``images``), the FP32 reference logits
(``reference``) and the allowed max |Δlogit| (``allowed_error``), fixed at build time
from what the engine showed there with a margin for a different CPU or GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.engine.runtimes import Engine


@dataclass(frozen=True)
class GoldenCheck:
    passed: bool
    max_abs_error: float
    allowed_error: float
    top1_agreement: float

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"golden set {verdict}: max |Δlogit| {self.max_abs_error:.3g} (allowed {self.allowed_error:.3g}), "
            f"top-1 agreement {self.top1_agreement:.1%}"
        )


def check_golden(engine: Engine, golden_path: Path, batch_size: int) -> GoldenCheck:
    with np.load(golden_path) as golden:
        images, reference, allowed = golden["images"], golden["reference"], float(golden["allowed_error"])
    outputs = np.concatenate([engine.run(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
    error = float(np.abs(outputs - reference).max())
    agreement = float((outputs.argmax(-1) == reference.argmax(-1)).mean())
    return GoldenCheck(error <= allowed, error, allowed, agreement)
