"""The verifier: a signed demo bundle, then every way of damaging, forging or misplacing it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from agent.engine.bundle import (
    LABELS,
    MANIFEST,
    PASSPORT,
    SIGNATURE,
    BundleError,
    incompatibilities,
    verify_bundle,
)
from agent.engine.device import X86_INT8_FEATURES, DeviceInfo
from agent.engine.signing import load_private_key, load_public_key, sign
from builder.bundle.build import build_engine_bundle
from builder.bundle.keys import keygen
from builder.bundle.options import EngineOptions


@pytest.fixture(scope="module")
def pristine(demo_exports: dict[str, Path], signing_key, tmp_path_factory) -> Path:
    options = EngineOptions(precision="int8", quantization="dynamic", profile_seconds=0.05)
    return build_engine_bundle(
        demo_exports["mixer-digits"], tmp_path_factory.mktemp("b") / "bundle", signing_key[0], options
    ).path


@pytest.fixture
def bundle(pristine: Path, tmp_path: Path) -> Path:
    return shutil.copytree(pristine, tmp_path / "bundle")


@pytest.fixture
def trusted(signing_key) -> list:
    return [load_public_key(signing_key[1])]


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def resign(bundle: Path, manifest: dict, signing_key) -> None:
    """A manifest changed by someone who holds the real key: the signature is valid, the content is not."""
    data = json.dumps(manifest).encode()
    (bundle / MANIFEST).write_bytes(data)
    (bundle / SIGNATURE).write_bytes(sign(data, load_private_key(signing_key[0])))


def test_pristine_bundle_verifies(bundle: Path, trusted, signing_key) -> None:
    verified = verify_bundle(bundle, trusted, DeviceInfo.probe())
    assert verified.engine_path.is_file() and verified.labels == [str(d) for d in range(10)]
    assert verified.input_spec.height == 64 and verified.batch_range == (1, 8)


def test_changed_engine_byte(bundle: Path, trusted) -> None:
    engine = next((bundle / "engine").iterdir())
    flip_byte(engine, engine.stat().st_size // 2)
    with pytest.raises(BundleError, match=rf"engine/{engine.name} does not match its sha256 in the manifest"):
        verify_bundle(bundle, trusted)


def test_changed_manifest_byte(bundle: Path, trusted) -> None:
    text = (bundle / MANIFEST).read_text()
    (bundle / MANIFEST).write_text(text.replace('"max": 8', '"max": 9'))
    with pytest.raises(BundleError, match="does not match the manifest: the manifest was altered"):
        verify_bundle(bundle, trusted)


def test_changed_passport(bundle: Path, trusted) -> None:
    passport = json.loads((bundle / "passport.json").read_text())
    passport["accuracy"]["engine_top1"] = 1.0
    (bundle / "passport.json").write_text(json.dumps(passport))
    with pytest.raises(BundleError, match="passport.json does not match its sha256"):
        verify_bundle(bundle, trusted)


def test_wrong_key(bundle: Path, tmp_path: Path) -> None:
    _, other_public, other_id = keygen(tmp_path / "other")
    with pytest.raises(BundleError, match=rf"signed by key \w+, which is not trusted \(trusted: {other_id}\)"):
        verify_bundle(bundle, [load_public_key(other_public)])


@pytest.mark.parametrize(
    "name, message",
    [
        ("labels.json", "labels.json is missing from the bundle"),
        ("golden.npz", "golden.npz is missing from the bundle"),
        (SIGNATURE, "is unsigned: manifest.sig is missing"),
        (MANIFEST, "is not a bundle: manifest.json is missing"),
    ],
)
def test_missing_file(bundle: Path, trusted, name: str, message: str) -> None:
    (bundle / name).unlink()
    with pytest.raises(BundleError, match=message):
        verify_bundle(bundle, trusted)


def test_unlisted_file(bundle: Path, trusted) -> None:
    (bundle / "engine" / "extra.so").write_bytes(b"\x7fELF")
    with pytest.raises(BundleError, match="engine/extra.so is in the bundle but not in its manifest"):
        verify_bundle(bundle, trusted)


@pytest.mark.parametrize(
    "text, message",
    [
        ("not json", "signature file is malformed"),
        ("[" * 5000, "signature file is malformed: JSON nested deeper than 16"),
        ('{"key_id": 1' + "0" * 5000 + "}", "signature file is malformed: a JSON number is longer than 40"),
        ("[" * 100_000, "manifest.sig cannot be read: document is over the limit of 16384 bytes"),
    ],
)
def test_garbled_signature(bundle: Path, trusted, text: str, message: str) -> None:
    (bundle / SIGNATURE).write_text(text)
    with pytest.raises(BundleError, match=message):
        verify_bundle(bundle, trusted)


@pytest.mark.parametrize("text", ["[" * 100_000, '{"schema": 1' + "0" * 5000 + "}"])
def test_an_unsigned_manifest_nested_too_deep_or_too_long_a_number_is_refused(bundle: Path, text: str) -> None:
    (bundle / MANIFEST).write_text(text)
    with pytest.raises(BundleError, match="manifest.json cannot be read"):
        verify_bundle(bundle, None)  # no signature check: the operator's explicit choice


@pytest.mark.parametrize(
    "name, text, message",
    [
        (LABELS, '{"0": "zero"}', "labels.json must be a JSON list"),
        (LABELS, "[" * 5000, "labels.json cannot be read: JSON nested deeper than 32"),
        (PASSPORT, "[1, 2]", "passport.json must be a JSON object"),
        (PASSPORT, '{"n": ' + "9" * 5000 + "}", "passport.json cannot be read: a JSON number is longer than 40"),
    ],
)
def test_labels_and_passport_are_read_with_limits_and_of_their_kind(
    bundle: Path, trusted, name: str, text: str, message: str
) -> None:
    """They are read after verification, from a folder that can change: an unsigned bundle's, or a store's."""
    verified = verify_bundle(bundle, trusted)
    (bundle / name).write_text(text)
    with pytest.raises(BundleError, match=message):
        getattr(verified, "labels" if name == LABELS else "passport")


def test_signed_but_malformed_manifest(bundle: Path, trusted, signing_key) -> None:
    manifest = json.loads((bundle / MANIFEST).read_text())
    del manifest["engine"]["backend"]
    resign(bundle, manifest, signing_key)
    with pytest.raises(BundleError, match="manifest is missing 'engine.backend'"):
        verify_bundle(bundle, trusted)


@pytest.mark.parametrize("chunk", [0, 9, "4", True, 2])
def test_signed_serving_layout_the_engine_cannot_honour(bundle: Path, trusted, signing_key, chunk) -> None:
    """Images per stream: an integer within the batch range, and above 1 only for OpenVINO (this bundle's
    engine is ONNX Runtime's)."""
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["engine"]["images_per_stream"] = chunk
    resign(bundle, manifest, signing_key)
    with pytest.raises(BundleError, match="manifest 'engine.images_per_stream'"):
        verify_bundle(bundle, trusted)


def test_signed_path_traversal(bundle: Path, trusted, signing_key) -> None:
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["files"]["../../etc/passwd"] = {"sha256": "0" * 64, "bytes": 1}
    resign(bundle, manifest, signing_key)
    with pytest.raises(BundleError, match="points outside the bundle"):
        verify_bundle(bundle, trusted)


def test_device_with_old_onnxruntime_and_no_vnni(bundle: Path, trusted, signing_key) -> None:
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["requires"]["cpu_features_any"] = sorted(X86_INT8_FEATURES)  # as an --int8-cpu vnni build has
    resign(bundle, manifest, signing_key)
    old = DeviceInfo(
        arch="x86_64", cpu_features=frozenset({"avx2"}), onnxruntime="1.16.3", providers=("CPUExecutionProvider",)
    )
    with pytest.raises(BundleError) as err:
        verify_bundle(bundle, trusted, old)
    message = str(err.value)
    assert "cannot run on this device" in message
    assert "needs ONNX Runtime >=1.18,<2, this device has 1.16.3" in message
    assert "needs a CPU with one of amx_int8, avx512_vnni, avx_vnni for its INT8 kernels" in message


def test_device_without_the_provider(bundle: Path, trusted) -> None:
    gpu_only = DeviceInfo(
        arch="aarch64",
        cpu_features=frozenset({"avx512_vnni"}),
        onnxruntime="1.20.0",
        providers=("CUDAExecutionProvider",),
    )
    with pytest.raises(BundleError, match="needs ONNX Runtime's CPUExecutionProvider, this device offers CUDA"):
        verify_bundle(bundle, trusted, gpu_only)


def test_tensorrt_plan_requirements_name_the_mismatch() -> None:
    requires = {"tensorrt": "10.3.0", "compute_capability": "8.7", "jetson_model": "NVIDIA Jetson AGX Orin"}
    device = DeviceInfo(
        arch="aarch64", tensorrt="10.7.0", compute_capability="8.7", jetson_model="NVIDIA Jetson Orin Nano"
    )
    assert incompatibilities(requires, device) == [
        "is a TensorRT 10.3.0 plan, this device has TensorRT 10.7.0 (plans run only on the TensorRT release they "
        "were built with: rebuild it on this device)",
        "was built on a NVIDIA Jetson AGX Orin, this device is NVIDIA Jetson Orin Nano",
    ]
    desktop = DeviceInfo(arch="x86_64", tensorrt="10.3.0", compute_capability="8.9")
    assert "was built for GPU compute capability 8.7, this device has 8.9" in incompatibilities(requires, desktop)
