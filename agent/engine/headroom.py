"""Memory headroom: is there room to load a candidate engine beside the serving one?

A hot swap loads the candidate while the serving engine keeps running, and a canary
keeps both loaded. On a small Jetson that second engine can push the device into the
OOM killer, which may pick the agent itself. So the load is refused up front when the
memory left afterwards would fall under ``swap.min_free_mib``. The serving engine's
worker is the best guide to what an engine costs on this device; the candidate's need
is that worker's resident memory, scaled up by the ratio of the two engine files.
On Jetson, CPU and GPU share one memory, so the kernel's MemAvailable covers both.
"""

from __future__ import annotations

from typing import Protocol

import psutil

from agent.engine.bundle import Bundle
from agent.engine.runtimes import Engine
from agent.engine.worker import WorkerEngine


class Serving(Protocol):
    """What the check reads of the engine in service (the pipeline's ``Serving``)."""

    bundle: Bundle
    engine: Engine


class MemoryShortage(RuntimeError):
    """Loading the candidate now would leave too little memory; nothing about the bundle is wrong."""


def estimated_need_mib(candidate: Bundle, serving: Serving) -> float:
    """MiB a worker for ``candidate`` is expected to take, judged by the serving worker."""
    size = candidate.engine_path.stat().st_size
    rss = serving.engine.memory_mib() if isinstance(serving.engine, WorkerEngine) else None  # GPU's share on Jetson
    if rss is None:
        return size / 2**20
    scale = size / max(serving.bundle.engine_path.stat().st_size, 1)
    return max(rss * max(scale, 1.0), size / 2**20)


def check_headroom(candidate: Bundle, serving: Serving, min_free_mib: float) -> None:
    """Raise :class:`MemoryShortage` unless ``min_free_mib`` stays available with the candidate loaded."""
    if not min_free_mib:
        return
    available = psutil.virtual_memory().available / 2**20
    need = estimated_need_mib(candidate, serving)
    if available - need < min_free_mib:
        raise MemoryShortage(
            f"not enough memory to load {candidate.bundle_id} beside the serving engine: {available:.0f} MiB "
            f"available, about {need:.0f} MiB needed (the serving engine's worker, scaled by engine size), and "
            f"swap.min_free_mib {min_free_mib:g} must stay free; free memory, or install it as engine.bundle "
            "and restart"
        )
