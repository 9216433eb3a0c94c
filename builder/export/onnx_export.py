"""JAX forward -> ONNX through jax2onnx, with the model's identity written into it.

The graph takes ``images`` (uint8 RGB NHWC, dynamic batch) and returns ``logits``, or
``embeddings`` for a model without a classifier head (a headless ViT, a two-tower image encoder).
Metadata properties (``edgevit.*``) carry the input spec, the architecture and the
source checkpoint, so an ONNX file alone says how to feed it and where it came from.
Weights stay inside ``model.onnx`` while the file is far from protobuf's 2 GiB
ceiling; beyond that (ViT-H) they go to one external file ``model.onnx.data`` beside
it, which must travel with the model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import onnx
import onnx_ir as ir
from jax2onnx import to_onnx

from agent.engine.preprocess import METADATA_KEY as INPUT_SPEC_KEY
from agent.engine.preprocess import InputSpec
from builder.choices import DEFAULT_OPSET
from builder.export.architecture import ModelConfig, ViTConfig, config_to_dict
from builder.export.tidy import tidy

INPUT_NAME = "images"


def output_name(cfg: ModelConfig) -> str:
    return "embeddings" if isinstance(cfg, ViTConfig) and cfg.output == "embeddings" else "logits"


MODEL_FILE, EXTERNAL_DATA_FILE = "model.onnx", "model.onnx.data"
EXTERNAL_DATA_THRESHOLD = 1536 << 20  # bytes of weights beyond which they go external
METADATA_SCHEMA = "1"

ExternalData = Literal["auto", "always", "never"]


@dataclass(frozen=True)
class Provenance:
    checkpoint: str
    checkpoint_sha256: str


def metadata(cfg: ModelConfig, spec: InputSpec, provenance: Provenance) -> dict[str, str]:
    return {
        "edgevit.schema": METADATA_SCHEMA,
        INPUT_SPEC_KEY: spec.to_json(),
        "edgevit.architecture": json.dumps(config_to_dict(cfg), sort_keys=True),
        "edgevit.source": json.dumps(
            {"checkpoint": provenance.checkpoint, "sha256": provenance.checkpoint_sha256}, sort_keys=True
        ),
    }


def convert(cfg: ModelConfig, forward: Callable[[jax.Array], jax.Array], opset: int = DEFAULT_OPSET) -> ir.Model:
    """Trace ``forward`` (from :func:`builder.export.models.inference_fn`: weights as constants) and convert it.

    The result stays in jax2onnx's IR: serialising it straight to disk skips a full
    in-memory protobuf copy of the weights, and works past protobuf's 2 GiB limit.
    """
    logging.getLogger("onnx_ir.serde").setLevel(logging.ERROR)  # benign shape-value chatter
    spec = jax.ShapeDtypeStruct(("batch", cfg.image_size, cfg.image_size, 3), jnp.uint8)
    model = to_onnx(
        forward,
        [spec],
        model_name=cfg.name,
        opset=opset,
        input_names=[INPUT_NAME],
        output_names=[output_name(cfg)],
        normalization_mode="prefer_native",
        return_mode="ir",
    )
    return tidy(model)


def weight_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def save(model: ir.Model, out_dir: Path, meta: dict[str, str], external_data: ExternalData = "auto") -> list[Path]:
    """Write ``model.onnx`` (+ ``model.onnx.data`` when external); return the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.metadata_props.clear()
    model.metadata_props.update(meta)
    external = external_data == "always" or (external_data == "auto" and weight_bytes(model) > EXTERNAL_DATA_THRESHOLD)
    path = out_dir / MODEL_FILE
    (out_dir / EXTERNAL_DATA_FILE).unlink(missing_ok=True)
    ir.save(model, path, external_data=EXTERNAL_DATA_FILE if external else None, size_threshold_bytes=1024)
    return [path, out_dir / EXTERNAL_DATA_FILE] if external else [path]


def read_metadata(path: Path) -> dict[str, str]:
    """The ``edgevit.*`` properties of an exported model (weights are not loaded)."""
    model = onnx.load(path, load_external_data=False)
    return {p.key: p.value for p in model.metadata_props if p.key.startswith("edgevit.")}
