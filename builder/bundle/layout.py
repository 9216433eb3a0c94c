"""How an OpenVINO engine is served: images per CPU stream, timed head to head at the device's batch mix.

The agent's OpenVINO engine runs a batch as chunks, one per stream at once
(:class:`agent.engine.runtimes.openvino.OpenVINOEngine`). Single images pad nothing, so every
batch size runs without waste; a larger chunk spends less of each layer waiting on its threads,
but a batch that is not a whole number of chunks pads its last one. Which wins depends on the
batch sizes the device serves and on the CPU, so it is measured: the shipped candidate is timed at
each layout in one process (:mod:`builder.evaluate.runoff`) and the bundle names the fastest. The
memory of the layout kept is measured by the shipped candidate's profile, which ``--max-memory``
then bounds.
"""

from __future__ import annotations

from collections.abc import Mapping

from builder.evaluate.runoff import RelativeSpeed

RULE = (
    "OpenVINO engines: images per stream 1, 2, 4, ... up to half the largest batch served, timed head to "
    "head at the batch sizes the device serves; the fastest there (the highest median paired ratio) is "
    "served: layouts give the same outputs, so no tie goes to accuracy"
)


def layouts_to_try(backend: str, served: Mapping[int, float]) -> list[int]:
    """Images per stream worth timing: 1, then powers of two while two chunks fit the largest batch served
    (a larger chunk leaves a stream idle at every size served). Only OpenVINO engines have a layout."""
    if backend != "openvino":
        return []
    largest, sizes = max(served), [1]
    while 2 * sizes[-1] * 2 <= largest:
        sizes.append(2 * sizes[-1])
    return sizes if len(sizes) > 1 else []


def fastest_layout(speeds: Mapping[int, RelativeSpeed]) -> int:
    """The layout that led the head to head. Layouts differ in nothing but speed, so the best estimate of it
    decides even where the intervals overlap (a close call costs little either way); the fewest images per
    stream among equal medians."""
    return min(speeds, key=lambda size: (-speeds[size].ratio, size))


def within_memory(kept: int, peak_rss_mib: float, max_memory_mib: float | None) -> int:
    """The layout served once ``kept``'s profile has measured its peak RSS: single images where it is over
    ``--max-memory`` (the candidate was chosen at single images, inside the limit)."""
    return 1 if max_memory_mib and peak_rss_mib > max_memory_mib else kept


def label(images_per_stream: int) -> str:
    return f"{images_per_stream} image{'s' if images_per_stream > 1 else ''} per stream"
