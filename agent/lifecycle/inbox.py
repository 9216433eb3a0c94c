"""``engine.inbox``: bundle folders or archives dropped into a folder are deployed like a ``deploy`` command.

For devices without a broker, or a USB stick and a shell. An item is taken once it has been still for
:data:`SETTLE_S` (a copy in progress is not a bundle yet), the oldest first, one at a time, and never while
a deploy or a canary is under way. Installed: the item is removed (the store has its copy). Refused: it
is moved to ``rejected/`` with the reason in ``<name>.reason.txt`` beside it, so nobody retries it blind.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from agent.engine.bundle import MANIFEST
from agent.lifecycle.archive import is_archive
from agent.lifecycle.fetch import BundleRef
from agent.lifecycle.lifecycle import Lifecycle, LifecycleError

SETTLE_S = 2.0
REJECTED = "rejected"


def next_item(folder: Path, now: float, pending: set[Path]) -> Path | None:
    """The oldest settled bundle in ``folder`` not already being deployed; hidden names are copies in progress."""
    items = [
        p
        for p in folder.iterdir()
        if not p.name.startswith(".")
        and p not in pending
        and (is_archive(p) or (p / MANIFEST).is_file())
        and now - p.stat().st_mtime >= SETTLE_S
    ]
    return min(items, key=lambda p: p.stat().st_mtime) if items else None


class Inbox:
    def __init__(self, folder: Path, lifecycle: Lifecycle) -> None:
        self.folder, self._lifecycle = folder, lifecycle
        self._pending: set[Path] = set()

    def poll(self) -> None:
        """Deploy the next settled item, when the lifecycle is idle (called by the main loop)."""
        if not self._lifecycle.idle() or not self.folder.is_dir():
            return
        item = next_item(self.folder, time.time(), self._pending)
        if item is None:
            return
        self._pending.add(item)
        try:
            self._lifecycle.request_deploy(BundleRef(path=item), False, None, lambda ok, msg: self._done(item, ok, msg))
        except LifecycleError:
            self._pending.discard(item)

    def _done(self, item: Path, ok: bool, message: str) -> None:
        if ok:
            shutil.rmtree(item) if item.is_dir() else item.unlink(missing_ok=True)
        else:
            rejected = item.parent / REJECTED
            rejected.mkdir(exist_ok=True)
            shutil.move(str(item), rejected / item.name)
            (rejected / f"{item.name}.reason.txt").write_text(message + "\n")
        self._pending.discard(item)
