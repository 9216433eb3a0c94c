"""Real exports through jax2onnx, run in ONNX Runtime against the independent linen reference."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from agent.engine.preprocess import METADATA_KEY, InputSpec
from builder.errors import VerificationError
from builder.export.architecture import BIG_VISION_POSEMB, ModelConfig, ResNetConfig, ViTConfig, config_to_dict
from builder.export.checkpoint import save_checkpoint
from builder.export.job import ExportOptions, ExportResult, export_checkpoint
from builder.export.models import init_params
from builder.export.onnx_export import EXTERNAL_DATA_FILE, read_metadata
from builder.export.resolution import POSEMB, resize_posemb
from builder.export.verify import REPORT_FILE, sample_images, verify, verify_and_report

from conftest import SMALL_MIXER, SMALL_VIT
from reference_models import reference_logits

FAMILIES: dict[str, ModelConfig] = {
    "vit-token": SMALL_VIT,
    "vit-gap": dataclasses.replace(SMALL_VIT, classifier="gap"),
    "vit-pre_logits": dataclasses.replace(SMALL_VIT, representation_size=24),
    "vit-patch14": dataclasses.replace(SMALL_VIT, patch_size=14, image_size=56),
    "mixer": SMALL_MIXER,
    # R+ViT-Ti_16's shape (the root alone, then 4x4 patches) and R50+ViT-B_16's (stages, then 1x1 patches)
    "hybrid-root": dataclasses.replace(SMALL_VIT, patch_size=4, resnet=ResNetConfig((), 0.5)),
    "hybrid-staged": dataclasses.replace(SMALL_VIT, patch_size=1, resnet=ResNetConfig((2, 1), 0.5)),
    # big_vision's models/vit.py: learned + gap, sincos2d + MAP head, class token, headless (embeddings)
    "bv-gap": dataclasses.replace(SMALL_VIT, layout="big_vision", classifier="gap"),
    "bv-map-sincos": dataclasses.replace(SMALL_VIT, layout="big_vision", classifier="map", posemb="sincos2d"),
    "bv-tok": dataclasses.replace(SMALL_VIT, layout="big_vision", classifier="token", representation_size=24),
    "bv-headless": dataclasses.replace(
        SMALL_VIT, layout="big_vision", classifier="map", num_classes=0, output="embeddings"
    ),
}


def export(tmp: Path, cfg: ModelConfig, options: ExportOptions = ExportOptions(), seed: int = 0) -> ExportResult:
    ckpt = tmp / "model.npz"
    save_checkpoint(ckpt, init_params(cfg, seed))
    if isinstance(cfg, ViTConfig) and cfg.posemb == "sincos2d":  # the file holds no resolution
        options = dataclasses.replace(options, resolution=options.resolution or cfg.image_size)
    return export_checkpoint(ckpt, tmp / "onnx", options)


def run(model: Path, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images})[0]


@pytest.fixture(scope="module", params=FAMILIES.values(), ids=FAMILIES.keys())
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    return export(tmp_path_factory.mktemp(request.param.name), request.param)


@pytest.mark.parametrize("batch", [1, 5])
def test_parity_with_reference(exported: ExportResult, batch: int) -> None:
    cfg = exported.config
    images = sample_images(batch, cfg.image_size, seed=7)
    expected = reference_logits(cfg, init_params(cfg), images)
    got = run(exported.model_path, images)
    assert got.shape == (batch, cfg.out_dim if isinstance(cfg, ViTConfig) else cfg.num_classes)
    np.testing.assert_allclose(got, expected, atol=1e-4 * max(1.0, np.abs(expected).max()))
    assert (got.argmax(-1) == expected.argmax(-1)).all()


def test_report_written_beside_model(exported: ExportResult) -> None:
    report = json.loads((exported.model_path.parent / REPORT_FILE).read_text())
    assert report["passed"] and report["batch_sizes"] == [1, 8] and report["top1_agreement"] == 1.0
    assert report["max_abs_error"] <= report["tolerance"] and report["opset"] == 20
    assert report["files"]["model.onnx"]["sha256"] == exported.report.files["model.onnx"]["sha256"]
    assert {"jax", "jax2onnx", "onnxruntime"} <= report["runtime"].keys()


def test_graph_contract(exported: ExportResult) -> None:
    cfg = exported.config
    model = onnx.load(exported.model_path)
    onnx.checker.check_model(model)
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "images" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [cfg.image_size, cfg.image_size, 3]
    vit = isinstance(cfg, ViTConfig)
    name, width = ("embeddings", cfg.out_dim) if vit and cfg.output == "embeddings" else ("logits", cfg.num_classes)
    assert out.name == name and out.type.tensor_type.shape.dim[1].dim_value == width
    ops = exported.report.op_histogram
    blocks = cfg.num_layers if isinstance(cfg, ViTConfig) else cfg.num_blocks
    map_head = 1 if vit and cfg.classifier == "map" else 0  # its LayerNorm and MLP
    assert ops["LayerNormalization"] == (2 * blocks + 1 + map_head)
    assert ops["Gelu"] == blocks * (1 if vit else 2) + map_head
    assert "Einsum" not in ops, "dense layers must be Gemm/MatMul for quantizers and TensorRT"
    assert {i.name for i in model.graph.initializer} >= {n.input[1] for n in model.graph.node if n.op_type == "Gemm"}


def test_metadata(exported: ExportResult) -> None:
    meta = read_metadata(exported.model_path)
    spec = InputSpec.from_json(meta[METADATA_KEY])
    assert spec == exported.input_spec == InputSpec(exported.config.image_size, exported.config.image_size)
    assert json.loads(meta["edgevit.architecture"]) == config_to_dict(exported.config)
    source = json.loads(meta["edgevit.source"])
    assert source["checkpoint"] == "model.npz" and len(source["sha256"]) == 64


@pytest.mark.slow
def test_resolution_change(tmp_path: Path) -> None:
    result = export(tmp_path, SMALL_VIT, ExportOptions(resolution=96))
    assert result.config.image_size == 96 and result.input_spec.height == 96
    params = init_params(SMALL_VIT)
    params[POSEMB] = resize_posemb(params[POSEMB], 6, has_class_token=True)
    images = sample_images(3, 96, seed=2)
    expected = reference_logits(result.config, params, images)
    np.testing.assert_allclose(run(result.model_path, images), expected, atol=1e-4 * max(1.0, np.abs(expected).max()))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bv-gap", "bv-map-sincos"])
def test_big_vision_resolution_change(tmp_path: Path, kind: str) -> None:
    """Learned: big_vision's resample_posemb (the grid zoomed, no class-token row); sincos2d: computed anew."""
    cfg = FAMILIES[kind]
    result = export(tmp_path, cfg, ExportOptions(resolution=96))
    assert result.config.image_size == 96 and result.config.grid == 6
    params = init_params(cfg)
    if cfg.posemb == "learn":
        params[BIG_VISION_POSEMB] = resize_posemb(params[BIG_VISION_POSEMB], 6, has_class_token=False)
    images = sample_images(3, 96, seed=2)
    expected = reference_logits(result.config, params, images)
    np.testing.assert_allclose(run(result.model_path, images), expected, atol=1e-4 * max(1.0, np.abs(expected).max()))


def test_resize_posemb_keeps_class_token_and_corners() -> None:
    posemb = np.random.default_rng(0).standard_normal((1, 1 + 16, 8)).astype(np.float32)
    resized = resize_posemb(posemb, 7, has_class_token=True)
    assert resized.shape == (1, 1 + 49, 8)
    np.testing.assert_array_equal(resized[:, 0], posemb[:, 0])
    old, new = posemb[0, 1:].reshape(4, 4, 8), resized[0, 1:].reshape(7, 7, 8)
    for (oy, ox), (ny, nx) in [((0, 0), (0, 0)), ((0, 3), (0, 6)), ((3, 0), (6, 0)), ((3, 3), (6, 6))]:
        np.testing.assert_allclose(new[ny, nx], old[oy, ox], atol=1e-6)
    np.testing.assert_allclose(resize_posemb(posemb, 4, True), posemb)
    gap = posemb[:, 1:]
    assert resize_posemb(gap, 2, has_class_token=False).shape == (1, 4, 8)


@pytest.mark.parametrize(
    "cfg, resolution, message",
    [
        (SMALL_MIXER, 96, "cannot change resolution: its token-mixing weights are tied to 16 tokens"),
        (SMALL_VIT, 100, "resolution 100 is not a positive multiple of the patch size 16"),
    ],
)
def test_impossible_resolution(tmp_path: Path, cfg: ModelConfig, resolution: int, message: str) -> None:
    with pytest.raises(Exception, match=message):
        export(tmp_path, cfg, ExportOptions(resolution=resolution))
    assert not (tmp_path / "onnx").exists()


@pytest.mark.slow
def test_external_data_file(tmp_path: Path) -> None:
    result = export(tmp_path, SMALL_VIT, ExportOptions(external_data="always"))
    assert [p.name for p in result.files] == ["model.onnx", EXTERNAL_DATA_FILE]
    assert result.files[1].stat().st_size > result.files[0].stat().st_size
    assert set(result.report.files) == {"model.onnx", EXTERNAL_DATA_FILE}
    images = sample_images(2, 64)
    np.testing.assert_allclose(
        run(result.model_path, images), reference_logits(SMALL_VIT, init_params(SMALL_VIT), images), atol=1e-4
    )


@pytest.mark.slow
def test_disagreement_fails_with_report(tmp_path: Path) -> None:
    result = export(tmp_path, SMALL_MIXER)
    other = init_params(SMALL_MIXER, seed=1)
    wrong_reference = lambda x: reference_logits(SMALL_MIXER, other, x)  # noqa: E731
    images = sample_images(4, 64)
    assert not verify(result.files, wrong_reference, images).passed
    with pytest.raises(VerificationError, match="verification FAILED: max |Δlogit|"):
        verify_and_report(result.files, wrong_reference, images, tolerance=1e-3)
    report = json.loads((result.model_path.parent / REPORT_FILE).read_text())
    assert report["passed"] is False and report["max_abs_error"] > 1e-3


@pytest.mark.slow
def test_full_size_vit_ti16(tmp_path: Path) -> None:
    """One published configuration at full size: ViT-Ti/16 at 224 with 1000 classes."""
    cfg = ViTConfig(16, 192, 768, 3, 12, 1000, 224)
    result = export(tmp_path, cfg, ExportOptions(model="ViT-Ti_16"))
    assert result.report.passed and result.config == cfg


@pytest.mark.parametrize("pool", ["gap", "map", "token", "0"])
def test_big_vision_poolings_match_the_reference_in_jax(pool: str) -> None:
    """Every pooling in JAX against big_vision's restated model (the exports above cover all but ``0``, whose
    graph is the class token's without the token)."""
    from builder.export.models import jax_forward, prepared_params

    cfg = dataclasses.replace(SMALL_VIT, layout="big_vision", classifier=pool)
    params = init_params(cfg)
    images = sample_images(2, cfg.image_size, seed=4)
    expected = reference_logits(cfg, params, images)
    got = jax_forward(cfg, prepared_params(cfg, params))(images)
    np.testing.assert_allclose(got, expected, atol=1e-5 * max(1.0, np.abs(expected).max()))
