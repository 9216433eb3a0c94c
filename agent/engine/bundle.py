"""The bundle format and the one function that decides whether this device may run one.

A bundle is a folder::

    manifest.json      identity, engine, input spec, requirements, sha256 of every file
    manifest.sig       Ed25519 signature over manifest.json (see agent.engine.signing)
    engine/...         the engine file(s): an ONNX model, or a TensorRT plan
    labels.json        class names, index order
    passport.json      accuracy and latency measured at build time, and the gate's verdict
    golden.npz         preprocessed inputs with reference outputs, for on-device checks
    references.npz     an embedding model's reference vectors, one per label (schema 2)

:func:`verify_bundle` checks, in order: the signature against trusted keys, the
manifest's schema, every file's size and sha256 (and that no unlisted file was
slipped in), and that this device meets the engine's requirements. Each failure is a
:class:`BundleError` naming the file, key or requirement at fault.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from agent import bounded_json
from agent.engine.device import DeviceInfo
from agent.engine.preprocess import InputSpec, InputSpecError
from agent.engine.signing import SignatureError, verify

# Schema 2 adds the "output" section of embedding models (agent.engine.similarity); classifier bundles are still
# written as schema 1, so that agents of earlier releases keep installing them.
SCHEMA_VERSION = 2
OLDEST_SCHEMA = 1
MANIFEST, SIGNATURE = "manifest.json", "manifest.sig"
LABELS, PASSPORT, GOLDEN, REFERENCES = "labels.json", "passport.json", "golden.npz", "references.npz"
BACKENDS = {"onnxruntime": ("cpu", "cuda"), "tensorrt": ("tensorrt",), "openvino": ("cpu", "cpu-bf16")}
PRECISIONS = ("fp32", "fp16", "int8")
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class BundleError(ValueError):
    """The bundle must not be installed; the message says why."""


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: everything the agent needs to load and check its engine."""

    root: Path
    manifest: dict[str, Any]
    signer: str

    @property
    def bundle_id(self) -> str:
        return str(self.manifest["bundle_id"])

    @property
    def backend(self) -> str:
        return str(self.manifest["engine"]["backend"])

    @property
    def target(self) -> str:
        return str(self.manifest["engine"]["target"])

    @property
    def engine_path(self) -> Path:
        return self.root / str(self.manifest["engine"]["files"][0])

    @property
    def images_per_stream(self) -> int:
        """An OpenVINO engine's serving layout (the builder times it); 1 where the manifest names none."""
        return int(self.manifest["engine"].get("images_per_stream", 1))

    @property
    def batch_range(self) -> tuple[int, int]:
        batch = self.manifest["engine"]["batch"]
        return batch["min"], batch["max"]

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec.from_dict(self.manifest["input"])

    @property
    def labels(self) -> list[str]:
        return [str(label) for label in read_document(self.root, LABELS, list)]

    @property
    def passport(self) -> dict[str, Any]:
        return read_passport(self.root)

    @property
    def golden_path(self) -> Path:
        return self.root / GOLDEN

    @property
    def references_path(self) -> Path | None:
        """An embedding model's reference vectors; None for a classifier."""
        output = self.manifest.get("output") or {}
        return self.root / REFERENCES if output.get("kind") == "embeddings" else None


def schema_of(manifest: dict[str, Any]) -> int:
    """The schema a manifest needs: 2 where it has an ``output`` section, else 1."""
    return 2 if "output" in manifest else OLDEST_SCHEMA


def read_passport(root: Path) -> dict[str, Any]:
    """The passport of the bundle at ``root``, as built (reading it verifies nothing)."""
    passport: dict[str, Any] = read_document(root, PASSPORT, dict)
    return passport


def read_document(root: Path, name: str, kind: type[list[Any]] | type[dict[str, Any]]) -> Any:
    """The JSON document ``name`` of the bundle at ``root``, parsed with limits and of the ``kind`` its reader
    needs. A signed bundle's hashes vouch for what its builder wrote; an unsigned one's files (an operator's
    ``require_signature: false``) and a store's bundles read before verification vouch for nothing."""
    return _parsed(root, name, _read(root, name, bounded_json.FILE_LIMITS), kind)


def _read(root: Path, name: str, limits: bounded_json.JSONLimits) -> bytes:
    try:
        return bounded_json.read_bytes(root / name, limits)
    except (OSError, ValueError) as exc:
        raise BundleError(f"bundle {root.name}: {name} cannot be read: {exc}") from exc


def _parsed(root: Path, name: str, data: bytes, kind: type[list[Any]] | type[dict[str, Any]]) -> Any:
    try:
        document = bounded_json.loads(data, bounded_json.FILE_LIMITS)
    except bounded_json.JSONLimitError as exc:
        raise BundleError(f"bundle {root.name}: {name} cannot be read: {exc}") from exc
    if not isinstance(document, kind):
        raise BundleError(f"bundle {root.name}: {name} must be a JSON {'list' if kind is list else 'object'}")
    return document


def file_digest(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return {"sha256": digest.hexdigest(), "bytes": path.stat().st_size}


def _get(data: dict[str, Any], dotted: str, kind: type | tuple[type, ...]) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise BundleError(f"manifest is missing '{dotted}'")
        node = node[part]
    if not isinstance(node, kind) or isinstance(node, bool) and kind is not bool:
        raise BundleError(f"manifest '{dotted}' has the wrong type ({type(node).__name__})")
    return node


def validate_manifest(manifest: dict[str, Any]) -> None:
    """Schema check with messages that name the key."""
    schema = _get(manifest, "schema", int)
    if schema > SCHEMA_VERSION:
        raise BundleError(
            f"manifest schema {schema} is newer than this agent reads ({SCHEMA_VERSION}): update edgevit on this "
            f"device, or build the bundle with an edgevit that writes schema {SCHEMA_VERSION} (CHANGELOG.md)"
        )
    if schema < OLDEST_SCHEMA:
        raise BundleError(
            f"manifest schema {schema} is older than this agent reads ({OLDEST_SCHEMA}): rebuild the bundle "
            "with this edgevit (CHANGELOG.md)"
        )
    _get(manifest, "bundle_id", str)
    backend, target = _get(manifest, "engine.backend", str), _get(manifest, "engine.target", str)
    if target not in BACKENDS.get(backend, ()):
        raise BundleError(
            f"manifest 'engine.backend' {backend!r} with 'engine.target' {target!r} is not a known engine"
        )
    if _get(manifest, "engine.precision", str) not in PRECISIONS:
        raise BundleError(f"manifest 'engine.precision' must be one of {', '.join(PRECISIONS)}")
    files = _get(manifest, "engine.files", list)
    if not files or not all(isinstance(f, str) for f in files):
        raise BundleError("manifest 'engine.files' must list the engine file(s)")
    low, high = _get(manifest, "engine.batch.min", int), _get(manifest, "engine.batch.max", int)
    if not 1 <= low <= high:
        raise BundleError(f"manifest 'engine.batch' range {low}..{high} is invalid")
    if "images_per_stream" in manifest["engine"]:
        chunk = _get(manifest, "engine.images_per_stream", int)
        if not 1 <= chunk <= high or backend != "openvino" and chunk != 1:
            raise BundleError(
                f"manifest 'engine.images_per_stream' must lie within 1..{high} (above 1 for OpenVINO only), "
                f"got {chunk}"
            )
    try:
        InputSpec.from_dict(_get(manifest, "input", dict))
    except InputSpecError as exc:
        raise BundleError(f"manifest 'input': {exc}") from exc
    _get(manifest, "requires", dict)
    listed = _get(manifest, "files", dict)
    output = manifest.get("output")
    if output is not None or schema >= 2:
        kind = _get(manifest, "output.kind", str)
        if kind not in ("logits", "embeddings"):
            raise BundleError(f"manifest 'output.kind' must be logits or embeddings, got {kind[:40]!r}")
        if schema < 2:
            raise BundleError("manifest has an 'output' section, which needs schema 2")
    for name in (
        *files,
        LABELS,
        PASSPORT,
        GOLDEN,
        *([REFERENCES] if output and output["kind"] == "embeddings" else []),
    ):
        if name not in listed:
            raise BundleError(f"manifest 'files' does not list {name}")


def check_files(root: Path, listed: dict[str, Any]) -> None:
    """Every listed file present with its size and sha256; nothing unlisted besides manifest and signature."""
    for name, expected in sorted(listed.items()):
        path = root / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            raise BundleError(f"manifest lists {name!r}, which points outside the bundle")
        if not path.is_file() or path.is_symlink():
            raise BundleError(f"{name} is missing from the bundle")
        actual = file_digest(path)
        if actual["bytes"] != expected.get("bytes") or actual["sha256"] != expected.get("sha256"):
            raise BundleError(f"{name} does not match its sha256 in the manifest: the file was altered")
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink()}
    extra = sorted(present - set(listed) - {MANIFEST, SIGNATURE})
    if extra:
        raise BundleError(f"{extra[0]} is in the bundle but not in its manifest")


def incompatibilities(requires: dict[str, Any], device: DeviceInfo) -> list[str]:
    """Each way this device falls short of the engine's requirements, in words."""
    problems = []
    if (arch := requires.get("arch")) and arch != device.arch:
        problems.append(f"built for {arch} CPUs, this device is {device.arch}")
    if spec := requires.get("onnxruntime"):
        problems += _version_problems("ONNX Runtime", spec, device.onnxruntime)
    for provider in requires.get("providers", []):
        if provider not in device.providers:
            problems.append(
                f"needs ONNX Runtime's {provider}, this device offers {', '.join(device.providers) or 'none'}"
            )
    if spec := requires.get("openvino"):
        problems += _version_problems("OpenVINO", spec, device.openvino)
    if (features := requires.get("cpu_features_any")) and not set(features) & device.cpu_features:
        problems.append(f"needs a CPU with one of {', '.join(features)} for its INT8 kernels, this CPU has none")
    if (features := requires.get("bf16_features_any")) and not set(features) & device.cpu_features:
        problems.append(f"needs a CPU with one of {', '.join(features)} for BF16, this CPU has none")
    if (trt := requires.get("tensorrt")) and trt != device.tensorrt:
        problems.append(
            f"is a TensorRT {trt} plan, this device has TensorRT {device.tensorrt or 'not installed'}"
            + tensorrt_hint(trt, device)
        )
    if (cc := requires.get("compute_capability")) and cc != device.compute_capability:
        problems.append(
            f"was built for GPU compute capability {cc}, this device has {device.compute_capability or 'no GPU'}"
        )
    if (model := requires.get("jetson_model")) and model != device.jetson_model:
        problems.append(f"was built on a {model}, this device is {device.jetson_model or 'not a Jetson'}")
    return problems


def tensorrt_hint(wanted: str, device: DeviceInfo) -> str:
    """What to do about a TensorRT mismatch on a Jetson, where TensorRT comes with JetPack."""
    if not device.jetson_model:
        return ""
    if device.tensorrt is None:
        return (
            " (on JetPack, TensorRT's Python module is the system package python3-libnvinfer: the venv needs "
            "--system-site-packages; scripts/jetson-install sets it up)"
        )
    if wanted.split(".")[0] != device.tensorrt.split(".")[0]:
        return (
            " (TensorRT comes with JetPack: 6.0 ships 8.6, 6.1 and 6.2 ship 10.3; build the plan on a device "
            "with this JetPack, or upgrade it)"
        )
    return " (plans run only on the TensorRT release they were built with: rebuild it on this device)"


def _version_problems(name: str, spec: str, version: str | None) -> list[str]:
    if version is None:
        return [f"needs {name} {spec}, which is not installed"]
    try:
        ok = Version(version) in SpecifierSet(spec)
    except (InvalidSpecifier, InvalidVersion) as exc:
        return [f"has an unreadable {name} requirement {spec!r}: {exc}"]
    return [] if ok else [f"needs {name} {spec}, this device has {version}"]


def verify_bundle(root: Path, trusted_keys: list[Ed25519PublicKey] | None, device: DeviceInfo | None = None) -> Bundle:
    """Verify signature, schema, files and (when ``device`` is given) compatibility.

    ``trusted_keys=None`` skips the signature (an operator's explicit choice,
    ``require_signature: false``); hashes and compatibility are always checked.
    """
    root = Path(root)
    manifest_path, signature_path = root / MANIFEST, root / SIGNATURE
    if not manifest_path.is_file():
        raise BundleError(f"{root} is not a bundle: {MANIFEST} is missing")
    data = _read(root, MANIFEST, bounded_json.FILE_LIMITS)  # the bytes the signature covers
    signer = "unchecked"
    if trusted_keys is not None:
        if not signature_path.is_file():
            raise BundleError(f"bundle {root.name} is unsigned: {SIGNATURE} is missing")
        try:
            signer = verify(data, _read(root, SIGNATURE, bounded_json.COMMAND_LIMITS), trusted_keys)
        except SignatureError as exc:
            raise BundleError(f"bundle {root.name}: {exc}") from exc
    manifest = _parsed(root, MANIFEST, data, dict)
    validate_manifest(manifest)
    check_files(root, manifest["files"])
    if device is not None and (problems := incompatibilities(manifest["requires"], device)):
        raise BundleError(f"bundle {manifest['bundle_id']} cannot run on this device: it " + "; it ".join(problems))
    return Bundle(root, manifest, signer)
