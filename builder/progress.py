"""Progress lines for the builder's slow steps (rich), one helper per kind of step."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import Progress


@contextmanager
def step(progress: Progress, description: str) -> Iterator[None]:
    """A step that cannot report fractions: a spinner, then a full bar when it ends."""
    task = progress.add_task(description, total=None)
    yield
    progress.update(task, total=1, completed=1)


def counter(progress: Progress, description: str) -> Callable[[int, int], None]:
    """A step that reports ``(done, total)`` through the returned callback."""
    task = progress.add_task(description, total=None)
    return lambda done, total: progress.update(task, completed=done, total=total)


def note(progress: Progress, description: str) -> None:
    """A step already done when reported: one line in the progress display."""
    progress.add_task(description, total=1, completed=1)
