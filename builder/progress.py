"""Progress for the builder's slow steps: a live display on a terminal, timestamped lines in a log.

Steps report through the helpers below (``step``, ``counter``, ``note``), whatever the display.
On a terminal the display stays readable down to 80 columns: the description gives way
(ellipsis), never the count or the elapsed time. When output is piped or logged, every
start, progress and end is a plain line with the wall-clock time, so a log of a long build
shows where it is and how long each step took.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Column

REPORT_EVERY_S = 10.0  # a counter's line in a log at most this often (and at its end)


class LogProgress(Progress):
    """``Progress`` that writes ``HH:MM:SS description: done/total (elapsed)`` lines instead of a live display."""

    def __init__(self, console: Console) -> None:
        super().__init__(console=console, disable=True)
        self._log = console
        self._started: dict[TaskID, float] = {}
        self._reported: dict[TaskID, float] = {}
        self._ended: set[TaskID] = set()  # reported as done: said once

    def _line(self, text: str) -> None:
        self._log.print(f"{time.strftime('%H:%M:%S')} {text}", highlight=False, markup=False, soft_wrap=True)

    def add_task(self, description: str, start: bool = True, total: float | None = 100.0, **kw: Any) -> TaskID:
        task = super().add_task(description, start=start, total=total, **kw)
        self._started[task] = self._reported[task] = time.monotonic()
        if total is not None and kw.get("completed", 0) >= total:
            self._ended.add(task)
            self._line(f"{description}: done")
        else:
            self._line(f"{description} ...")
        return task

    def update(self, task_id: TaskID, **kw: Any) -> None:
        super().update(task_id, **kw)
        task = next(t for t in self.tasks if t.id == task_id)
        now = time.monotonic()
        finished = task.total is not None and task.completed >= task.total
        if task_id in self._ended or (not finished and now - self._reported[task_id] < REPORT_EVERY_S):
            return
        if finished:
            self._ended.add(task_id)
        self._reported[task_id] = now
        elapsed = now - self._started[task_id]
        count = f" {task.completed:g}/{task.total:g}" if task.total not in (None, 1) else ""
        self._line(f"{task.description}:{count}{' done' if finished else ''} ({elapsed:.1f} s)")


def make_progress(console: Console) -> Progress:
    """The live display on a terminal; :class:`LogProgress` when output goes to a pipe or a file."""
    if not console.is_terminal:
        return LogProgress(console)
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}", table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis")),
        BarColumn(bar_width=10),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        expand=True,
    )


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
    """A step already done when reported: one line in the progress display, its clock stopped (rich stops a
    task's clock only in ``update``)."""
    task = progress.add_task(description, total=1, completed=1)
    progress.update(task, completed=1)
