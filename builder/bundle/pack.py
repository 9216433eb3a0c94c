"""One bundle folder -> one reproducible ``.tar.gz`` for devices to download.

Members are the bundle's own files under one folder named after the bundle id, in
sorted order, with zeroed owners and times: the same bundle always packs to the same
bytes, so its sha256 names it. The bundle is verified (hashes, and the signature
when keys are given) before it is packed.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.engine.bundle import verify_bundle
from builder.errors import BuildError


def _add(tar: tarfile.TarFile, path: Path, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = path.stat().st_size, 0o644, 0
    with open(path, "rb") as fh:
        tar.addfile(info, fh)


def pack_bundle(bundle_dir: Path, out: Path, trusted: list[Ed25519PublicKey] | None) -> dict[str, object]:
    """Write the archive; return the reference a ``deploy`` command carries (url left to the caller)."""
    bundle = verify_bundle(bundle_dir, trusted)
    if out.exists():
        raise BuildError(f"{out} exists; choose another path or remove it")
    files = sorted(p for p in bundle_dir.rglob("*") if p.is_file())
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for path in files:
            _add(tar, path, f"{bundle.bundle_id}/{path.relative_to(bundle_dir).as_posix()}")
    data = buffer.getvalue()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return {"bundle_id": bundle.bundle_id, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
