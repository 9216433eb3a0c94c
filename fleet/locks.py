"""One driver per device: a rollout is driven by one controller process, and a device is in one rollout.

The controller driving a rollout holds an exclusive ``flock`` on ``rollouts/<id>.lock`` in the
state folder for as long as it runs. The kernel releases it when the process ends, SIGKILL
included, so a lock is never stale: whether a rollout's controller is alive is whether its lock
is held. A new rollout is planned under ``rollouts/.plan.lock`` (two controllers starting at once
plan one after the other) and refused when a rollout that is not finished (running, or
interrupted by a lost broker) already targets one of its devices. ``resume`` takes the rollout's
lock first and is refused while its controller is alive.

This holds for controllers that share a state folder on one machine. Controllers on several
machines would need the same two facts from something they all reach: a lease per rollout,
retained on the broker (``<prefix>/_fleet/leases/<rollout>``, renewed by its controller, with the
devices it drives) or a row in a shared database; not built here, where one operator host drives
the fleet.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


class Busy(RuntimeError):
    """Another controller drives these devices or this rollout; the message says which and how to go on."""


class Ownership:
    """This process drives rollout ``rollout_id``; raises :class:`Busy` when another live process does."""

    def __init__(self, folder: Path, rollout_id: str) -> None:
        path = folder / "rollouts" / f"{rollout_id}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(self._fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            raise Busy(f"rollout {rollout_id} is driven by a running controller (pid {owner})") from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        os.close(self._fd)  # closing drops the lock


def driven(folder: Path, rollout_id: str) -> bool:
    """Whether a live controller holds rollout ``rollout_id``."""
    try:
        Ownership(folder, rollout_id).release()
    except Busy:
        return True
    return False


@contextlib.contextmanager
def planning(folder: Path) -> Iterator[None]:
    """Held while a rollout is planned and checked against the others."""
    path = folder / "rollouts" / ".plan.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
