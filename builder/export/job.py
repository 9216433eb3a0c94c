"""The export job: checkpoint -> (resolution) -> ONNX -> verified against JAX."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import jax
from rich.progress import Progress

from agent.engine.preprocess import InputSpec
from builder.choices import DEFAULT_OPSET, DEFAULT_TOLERANCE
from builder.export.architecture import ModelConfig
from builder.export.checkpoint import Checkpoint, read_checkpoint
from builder.export.models import inference_fn, jax_forward, prepared_params
from builder.export.onnx_export import ExternalData, Provenance, convert, metadata, save
from builder.export.resolution import at_resolution
from builder.export.verify import VerificationReport, sample_images, verify_and_report
from builder.progress import counter, step


@dataclass(frozen=True)
class ExportOptions:
    resolution: int | None = None
    model: str | None = None
    pool: str | None = None  # big_vision's pooling where the file cannot show it: gap (default) or 0
    opset: int = DEFAULT_OPSET
    tolerance: float = DEFAULT_TOLERANCE
    samples: int = 8
    resize: str = "stretch"
    interpolation: str = "linear"
    external_data: ExternalData = "auto"


@dataclass(frozen=True)
class ExportResult:
    config: ModelConfig
    files: list[Path]
    input_spec: InputSpec
    report: VerificationReport
    ignored: list[str]  # tensors of the file the model does not use (optimizer state, a text tower)
    fixes: list[str]  # older layouts put right on reading

    @property
    def model_path(self) -> Path:
        return self.files[0]


def load(path: Path, options: ExportOptions, progress: Progress) -> Checkpoint:
    return read_checkpoint(path, options.model, counter(progress, f"reading {path.name}"), options.pool)


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    options: ExportOptions = ExportOptions(),
    progress: Progress | None = None,
) -> ExportResult:
    """Export and verify; raises a :class:`builder.errors.BuildError` subclass on bad input or disagreement."""
    progress = progress or Progress(disable=True)
    out_dir = Path(out_dir)
    ckpt = load(Path(checkpoint), options, progress)
    cfg, params = at_resolution(ckpt.config, ckpt.params, options.resolution or ckpt.config.image_size)
    provenance = Provenance(ckpt.path.name, ckpt.sha256)
    ignored, fixes = ckpt.ignored, ckpt.fixes
    spec = InputSpec(cfg.image_size, cfg.image_size, resize=options.resize, interpolation=options.interpolation)
    del ckpt
    prepared = prepared_params(cfg, params)  # one copy of the weights serves export and reference
    del params
    with step(progress, f"converting {cfg.name} to ONNX (opset {options.opset})"):
        model = convert(cfg, inference_fn(cfg, prepared), options.opset)
    with step(progress, f"writing {out_dir}"):
        files = save(model, out_dir, metadata(cfg, spec, provenance), options.external_data)
    del model
    with step(progress, "verifying ONNX Runtime against JAX"):
        images = sample_images(options.samples, cfg.image_size)
        versions = {"jax": jax.__version__, "jax2onnx": version("jax2onnx")}
        report = verify_and_report(files, jax_forward(cfg, prepared), images, options.tolerance, versions)
    return ExportResult(cfg, files, spec, report, ignored, fixes)
