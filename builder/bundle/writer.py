"""Writing signed bundles (the format itself lives in agent.engine.bundle).

The bundle is assembled in a hidden sibling folder and renamed into place only when
complete and signed, so an interrupted build never leaves something that looks like
a bundle.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.engine.bundle import GOLDEN, LABELS, MANIFEST, PASSPORT, REFERENCES, SIGNATURE, file_digest
from agent.engine.signing import sign
from builder.errors import BuildError

ENGINE_DIR = "engine"


def write_bundle(
    out: Path,
    engine_files: list[Path],
    labels: list[str],
    passport: dict[str, Any],
    golden: dict[str, np.ndarray],
    manifest: dict[str, Any],
    key: Ed25519PrivateKey,
    references: np.ndarray | None = None,
) -> Path:
    """Assemble, hash, sign and atomically place a bundle at ``out`` (which must not exist); ``references``: an
    embedding model's reference vectors, one per label."""
    if out.exists():
        raise BuildError(f"{out} exists; choose another --out or remove it")
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / ENGINE_DIR).mkdir(parents=True)
    try:
        engine_names = []
        for src in engine_files:
            shutil.copyfile(src, staging / ENGINE_DIR / src.name)
            engine_names.append(f"{ENGINE_DIR}/{src.name}")
        (staging / LABELS).write_text(json.dumps(labels, indent=2) + "\n")
        (staging / PASSPORT).write_text(json.dumps(passport, indent=2, sort_keys=True) + "\n")
        with open(staging / GOLDEN, "wb") as fh:
            np.savez(fh, **golden)
        documents = [LABELS, PASSPORT, GOLDEN]
        if references is not None:
            with open(staging / REFERENCES, "wb") as fh:
                np.savez(fh, vectors=references.astype(np.float32))
            documents.append(REFERENCES)
        files = {name: file_digest(staging / name) for name in [*engine_names, *documents]}
        manifest = {**manifest, "engine": {**manifest["engine"], "files": engine_names}, "files": files}
        data = json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"
        (staging / MANIFEST).write_bytes(data)
        (staging / SIGNATURE).write_bytes(sign(data, key))
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
