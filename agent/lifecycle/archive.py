"""Unpacking bundle archives without trusting them.

A bundle travels as a tar (optionally gzip-compressed) of its folder. Before a byte
is written, every member is checked: only regular files and folders (no symbolic or
hard links, devices or FIFOs), relative names that stay inside the destination, no
member over ``max_member_bytes``, no more than ``max_members``, and a total that fits
``max_total_bytes``. The checks run as each header is read, so an archive of a million
empty members is refused at the first member over the limit, in milliseconds and with
the memory of that many headers, not after all of them were read. Extraction then uses
tarfile's ``data`` filter as a second guard. The signature and hashes are checked
afterwards by :func:`agent.engine.bundle.verify_bundle`.
"""

from __future__ import annotations

import tarfile
from pathlib import Path, PurePosixPath

from agent.engine.bundle import MANIFEST, BundleError

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def is_archive(path: Path) -> bool:
    return path.name.endswith(ARCHIVE_SUFFIXES)


def _check_member(member: tarfile.TarInfo, max_member_bytes: int) -> None:
    name = PurePosixPath(member.name)
    if name.is_absolute() or ".." in name.parts or "\\" in member.name:
        raise BundleError(f"archive member {member.name!r} points outside the bundle")
    if member.issym() or member.islnk():
        raise BundleError(f"archive member {member.name!r} is a link ({member.linkname!r}); bundles hold files only")
    if not (member.isfile() or member.isdir()):
        raise BundleError(f"archive member {member.name!r} is not a regular file or folder")
    if member.size > max_member_bytes:
        raise BundleError(f"archive member {member.name!r} is {member.size} bytes, over the {max_member_bytes} limit")


def safe_extract(archive: Path, dest: Path, max_total_bytes: int, max_members: int = 64) -> Path:
    """Extract ``archive`` into the empty folder ``dest``; return the folder holding manifest.json."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members: list[tarfile.TarInfo] = []
            total = 0
            for member in tar:  # one header at a time: refuse at the first that breaks a limit
                if len(members) == max_members:
                    raise BundleError(f"archive has more than {max_members} members, the limit")
                _check_member(member, max_total_bytes)
                total += member.size
                if total > max_total_bytes:
                    raise BundleError(f"archive unpacks to more than {max_total_bytes} bytes, the limit")
                members.append(member)
            tar.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BundleError(f"{archive.name} is not a readable bundle archive: {exc}") from exc
    if (dest / MANIFEST).is_file():
        return dest
    folders = [p for p in dest.iterdir() if p.is_dir()]
    if len(folders) == 1 and (folders[0] / MANIFEST).is_file():
        return folders[0]
    raise BundleError(f"{archive.name} holds no {MANIFEST} at its top level or in a single folder")
