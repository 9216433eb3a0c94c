"""Turning a bundle reference into a bundle folder on this device.

A reference is ``{"path": "/abs/folder-or-archive"}`` or ``{"url": "https://...",
"sha256": "...", "size": N}``. Downloads land in ``<state_dir>/downloads/<sha256>.part``
and resume with an HTTP Range request, after a dropped connection within this fetch
or after a restart in a later one; a server that ignores Range is read again from the
start. No more than the declared size (itself capped by ``max_bytes``) is accepted,
and the file is used only when its sha256 matches. Archives are unpacked with
:func:`agent.lifecycle.archive.safe_extract`; the bundle's own signature and hashes are checked
afterwards by the caller.
"""

from __future__ import annotations

import http.client
import logging
import re
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.engine.bundle import BundleError, file_digest
from agent.lifecycle.archive import is_archive, safe_extract

log = logging.getLogger("edgevit.fetch")
CHUNK = 1 << 16
ATTEMPTS = 4


@dataclass(frozen=True)
class BundleRef:
    path: Path | None = None
    url: str | None = None
    sha256: str | None = None
    size: int | None = None

    @classmethod
    def parse(cls, data: Any, max_bytes: int) -> BundleRef:
        """Validate a reference from a command; errors name the key."""
        if not isinstance(data, dict):
            raise ValueError("'bundle' must be an object with 'path', or 'url' with 'sha256' and 'size'")
        if "path" in data:
            path = data["path"]
            if not isinstance(path, str) or not Path(path).is_absolute():
                raise ValueError("'bundle.path' must be an absolute path on the device")
            return cls(path=Path(path))
        url, sha256, size = data.get("url"), data.get("sha256"), data.get("size")
        if not isinstance(url, str) or not re.match(r"^https?://", url):
            raise ValueError("'bundle.url' must be an http:// or https:// URL (or give 'bundle.path')")
        if not isinstance(sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise ValueError("'bundle.sha256' must be the archive's sha256 as 64 lowercase hex digits")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= max_bytes:
            raise ValueError(f"'bundle.size' must be the archive's size in bytes, at most {max_bytes}")
        return cls(url=url, sha256=sha256, size=size)

    def describe(self) -> str:
        return str(self.path) if self.path else f"{self.url} ({self.size} bytes, sha256 {(self.sha256 or '')[:12]}…)"


def _download_once(ref: BundleRef, part: Path, timeout_s: float, context: ssl.SSLContext) -> None:
    """Append to ``part`` from where it ends; raises OSError/URLError on a dropped connection."""
    assert ref.url and ref.size
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(ref.url, headers={"Range": f"bytes={have}-"} if have else {})
    with urllib.request.urlopen(request, timeout=timeout_s, context=context) as response:
        resumed = response.status == 206
        if have and not resumed:
            log.info("server ignored the Range request: downloading %s from the start", ref.url)
        with open(part, "ab" if resumed else "wb") as fh:
            written = fh.tell()
            while chunk := response.read(CHUNK):
                written += len(chunk)
                if written > ref.size:
                    raise BundleError(f"{ref.url} sent more than the declared {ref.size} bytes")
                fh.write(chunk)


def download(ref: BundleRef, downloads: Path, ca: Path | None = None, timeout_s: float = 30.0) -> Path:
    """Download ``ref`` (resuming) and return the verified archive's path; ``ca``: a private store's CA."""
    context = ssl.create_default_context(cafile=str(ca) if ca else None)
    assert ref.url and ref.sha256 and ref.size
    downloads.mkdir(parents=True, exist_ok=True)
    part = downloads / f"{ref.sha256}.part"
    for attempt in range(1, ATTEMPTS + 1):
        try:
            _download_once(ref, part, timeout_s, context)
        except urllib.error.HTTPError as exc:
            if exc.code == 416:  # asked past the end: what we have is the whole file, or garbage
                pass
            else:
                raise BundleError(f"{ref.url}: HTTP {exc.code} {exc.reason}") from exc
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            got = part.stat().st_size if part.exists() else 0
            log.warning("download of %s interrupted at %d bytes (%s), attempt %d", ref.url, got, exc, attempt)
            if attempt == ATTEMPTS:
                raise BundleError(
                    f"{ref.url}: download failed after {ATTEMPTS} attempts ({got} bytes kept): {exc}"
                ) from exc

            time.sleep(min(2**attempt * 0.25, 5))
            continue
        if part.stat().st_size >= ref.size:
            break
    got = part.stat().st_size
    if got != ref.size:
        raise BundleError(f"{ref.url}: got {got} bytes, expected {ref.size}")
    digest = file_digest(part)["sha256"]
    if digest != ref.sha256:
        part.unlink()
        raise BundleError(f"{ref.url}: sha256 is {digest}, the command said {ref.sha256}")
    done = downloads / f"{ref.sha256}.tar"
    part.rename(done)
    return done


def fetch(ref: BundleRef, downloads: Path, work: Path, max_bytes: int, ca: Path | None = None) -> Path:
    """The bundle folder ``ref`` names: a local folder as is, an archive unpacked into ``work``."""
    if ref.path is not None:
        if ref.path.is_dir():
            return ref.path
        if not ref.path.is_file():
            raise BundleError(f"{ref.path} does not exist on this device")
        if not is_archive(ref.path):
            raise BundleError(f"{ref.path} is neither a bundle folder nor a .tar/.tar.gz/.tgz archive")
        archive = ref.path
    else:
        archive = download(ref, downloads, ca)
    try:
        return safe_extract(archive, work, max_bytes)
    finally:
        if archive.parent == downloads:
            archive.unlink(missing_ok=True)
