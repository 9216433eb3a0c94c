"""Memory headroom: is there room to load a candidate engine beside the serving one?

A hot swap loads the candidate while the serving engine keeps running, and a canary
keeps both loaded. On a small Jetson that second engine can push the device into the
OOM killer, which may pick the agent itself. So the load is refused up front when the
memory left afterwards would fall under ``swap.min_free_mib``. Where both passports hold
the peak resident memory their builds measured (a process serving only that engine), the
candidate's need is its figure scaled by how the serving worker here compares with its
own figure (the device's allocator, runtime versions and GPU share differ from the build
machine's). Otherwise the serving worker's resident memory scaled by the ratio of the two
engine files is the guide.
On Jetson, CPU and GPU share one memory, so the kernel's MemAvailable covers both.
"""

from __future__ import annotations

from typing import Protocol

import psutil

from agent.engine.bundle import Bundle
from agent.engine.worker import WorkerEngine


class Serving(Protocol):
    """What the check reads of the engine in service (the pipeline's ``Serving``)."""

    bundle: Bundle
    engine: WorkerEngine


class MemoryShortage(RuntimeError):
    """Loading the candidate now would leave too little memory; nothing about the bundle is wrong."""


def estimated_need_mib(candidate: Bundle, serving: Serving) -> float:
    """MiB a worker for ``candidate`` is expected to take, judged by the serving worker."""
    size = candidate.engine_path.stat().st_size
    rss = serving.engine.memory_mib()  # with its GPU share on a Jetson; None while no worker process runs
    if rss is None:
        return size / 2**20
    measured, serving_measured = candidate.passport.get("peak_rss_mib"), serving.bundle.passport.get("peak_rss_mib")
    if measured and serving_measured:
        return float(measured) * rss / float(serving_measured)
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
            f"available, about {need:.0f} MiB needed (its passport's peak RSS, or engine size, scaled by the "
            "serving engine's worker here), and "
            f"swap.min_free_mib {min_free_mib:g} must stay free; free memory, or install it as engine.bundle "
            "and restart"
        )
