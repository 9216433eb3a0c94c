"""Installed engines and the state file that says which one runs.

``<state_dir>/engines/<bundle_id>/`` holds one verified bundle per folder; a bundle
is copied to a hidden sibling, fsynced, re-verified and renamed into place, so a
folder under its id is always complete. ``<state_dir>/engines.json`` names the
active engine, the previous one, the canary in progress and the bundles marked bad.
It is replaced atomically (write a temporary file, fsync, rename, fsync the folder):
after a kill -9 or a power cut at any instant it holds either the old or the new
state, and both name engines that are fully installed.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent import bounded_json
from agent.engine.bundle import Bundle
from agent.lifecycle.failpoints import failpoint

STATE_FILE = "engines.json"
ENGINES_DIR = "engines"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            with open(Path(folder) / name, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(folder))


@dataclass
class Canary:
    """A swap not yet committed: enough to finish the window or undo it after a restart."""

    bundle: str
    previous: str
    before_previous: str | None
    started: float
    boots: int = 0
    command_id: str | None = None


@dataclass
class Mark:
    """Why a bundle was marked bad, and whether a later deploy of it is refused unless forced.

    A regression in what the engine computes (agreement, outputs, golden set, failed batches, a
    crash loop) is a verdict on the bundle: refused. A latency verdict is a verdict on the bundle
    on this device under its load at the time: recorded, and a later deploy tries again.
    """

    reason: str
    refuse: bool = True
    rule: str | None = None  # the canary rule that decided, when one did
    evidence: dict[str, Any] | None = None  # that rule's figures (agent.lifecycle.canary.Rule.public)
    at: float = 0.0

    def public(self) -> dict[str, Any]:
        return {"reason": self.reason, "refused_later": self.refuse, "rule": self.rule}


@dataclass
class EngineState:
    active: str | None = None
    previous: str | None = None
    seed: str | None = None  # the bundle id engine.bundle in the config held when last installed
    canary: Canary | None = None
    bad: dict[str, Mark] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EngineState:
        canary = data.get("canary")
        return cls(
            active=data.get("active"),
            previous=data.get("previous"),
            seed=data.get("seed"),
            canary=Canary(**canary) if canary else None,
            bad={k: Mark(v) if isinstance(v, str) else Mark(**v) for k, v in (data.get("bad") or {}).items()},
        )


class StoreError(RuntimeError):
    """The engine store cannot be read or written; the message says which file."""


class EngineStore:
    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / ENGINES_DIR
        self.state_path = state_dir / STATE_FILE
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the engine store {self.root}: {exc.strerror}") from exc
        for leftover in self.root.glob(".incoming-*"):  # a copy interrupted by a crash
            shutil.rmtree(leftover, ignore_errors=True)

    def load(self) -> EngineState:
        if not self.state_path.exists():
            return EngineState()
        try:
            return EngineState.from_json(bounded_json.load(self.state_path))
        except (OSError, ValueError, TypeError) as exc:
            raise StoreError(f"the state file {self.state_path} is unreadable: {exc}") from exc

    def save(self, state: EngineState) -> None:
        atomic_write(self.state_path, state.to_json())

    def path(self, bundle_id: str) -> Path:
        return self.root / bundle_id

    def installed(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def install(self, source: Path, verify: Callable[[Path], Bundle]) -> Bundle:
        """Copy a bundle in under its id, verified before and after the copy; an installed id is reused."""
        bundle = verify(source)
        target = self.path(bundle.bundle_id)
        if target.is_dir():
            return verify(target)
        staging = self.root / f".incoming-{bundle.bundle_id}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            shutil.copytree(source, staging, symlinks=False)
            _fsync_tree(staging)
            verify(staging)  # what was copied is what was verified
            failpoint("install-copied")
            staging.rename(target)
            fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return verify(target)

    def prune(self, keep: int, state: EngineState) -> list[str]:
        """Remove the oldest installed bundles beyond ``keep``, never one the state names."""
        named = {state.active, state.previous, state.seed} | (
            {state.canary.bundle, state.canary.previous, state.canary.before_previous} if state.canary else set()
        )
        removable = sorted(
            (p for p in map(self.path, self.installed()) if p.name not in named), key=lambda p: p.stat().st_mtime
        )
        excess = removable[: max(0, len(self.installed()) - keep)]
        for path in excess:
            shutil.rmtree(path, ignore_errors=True)
        return [p.name for p in excess]
