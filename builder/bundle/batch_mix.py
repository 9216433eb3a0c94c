"""The batch sizes a device serves, read from what its agent measured there (``--batch-mix``).

A candidate is chosen by its speed at the sizes the device will serve. ``--batches`` says which sizes by
hand; the agent already counts the batches it ran, by size, in its metrics (the MQTT ``metrics`` payload,
its exit summary, and ``edgevit_batches_total`` in Prometheus), so the mix of a device that is already
serving can be handed to the builder as it is. A size's weight is its share of the *images* served, not of
batches: eight images at batch 8 cost the device as much time as eight at batch 1, and the choice's
weighted harmonic mean of images/s (:meth:`builder.bundle.candidates.Candidate.throughput`) is then the
device's own mean speed.

The file comes from a device, so it is parsed with limits and checked against what a build can honour.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from agent.bounded_json import JSONLimitError, JSONLimits, loads
from builder.errors import BuildError

# A metrics payload carries one entry per camera; a few hundred KiB is far beyond any real one.
MAX_BYTES = 1 << 20
_LIMITS = JSONLimits(max_bytes=MAX_BYTES, max_depth=32)
# Sizes carrying less than this share of the images are left out: each size kept is profiled per candidate.
MIN_SHARE = 0.01
# One sample of the agent's batch counter: size label, value, and the optional timestamp of the text format.
_PROMETHEUS = re.compile(
    r'^edgevit_batches(?:_total)?\{size="(\d{1,6})"\}\s+(\S{1,40})(?:\s+\d{1,20})?\s*$', re.MULTILINE
)


def _counts_from_json(document: Any) -> dict[str, Any]:
    """``batch_sizes`` of a metrics payload or of the agent's exit summary (``{"summary": {...}}``)."""
    for holder in (document, document.get("summary") if isinstance(document, dict) else None):
        counts = holder.get("batch_sizes") if isinstance(holder, dict) else None
        if isinstance(counts, dict):
            return counts
    raise BuildError("--batch-mix: no 'batch_sizes' in the JSON (an agent's metrics payload or its exit summary)")


def _counts(text: str) -> dict[str, Any]:
    if text.lstrip().startswith("{"):
        try:
            return _counts_from_json(loads(text, _LIMITS))
        except JSONLimitError as exc:
            raise BuildError(f"--batch-mix: {exc}") from None
    found = {size: value for size, value in _PROMETHEUS.findall(text)}
    if not found:
        raise BuildError(
            "--batch-mix: neither an agent's metrics JSON nor Prometheus text with edgevit_batches_total{size=...}"
        )
    return found


def shares_of(counts: dict[str, Any], max_batch: int) -> dict[int, float]:
    """Batch counts by size (as the agent reports them) -> each size's share of the images served.

    Raises :class:`BuildError` naming the entry at fault: a size that is not an integer in 1..``max_batch``
    (the engine could not serve it), a count that is not a finite number >= 0, or no batch at all.
    """
    images: dict[int, float] = {}
    for key, value in counts.items():
        size = int(key) if isinstance(key, str) and key.isdigit() and len(key) <= 6 else None
        if size is None or not 1 <= size <= max_batch:
            raise BuildError(f"--batch-mix: batch size {str(key)[:20]!r} is not within 1..--max-batch ({max_batch})")
        try:
            count = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            count = math.nan
        if not math.isfinite(count) or count < 0:
            raise BuildError(f"--batch-mix: the count of batch size {size} is {str(value)[:20]!r}, not a number >= 0")
        images[size] = count * size
    total = sum(images.values())
    if total <= 0:
        raise BuildError("--batch-mix: the agent has not run a batch yet")
    kept = {size: n for size, n in images.items() if n / total >= MIN_SHARE}
    kept_total = sum(kept.values())
    return {size: kept[size] / kept_total for size in sorted(kept)}


def read_batch_mix(path: Path, max_batch: int) -> dict[int, float]:
    """The image share per batch size in an agent's metrics (JSON, or Prometheus text) saved to ``path``."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_BYTES + 1)
    except OSError as exc:
        raise BuildError(f"--batch-mix: cannot read {path}: {exc.strerror}") from None
    if len(raw) > MAX_BYTES:
        raise BuildError(f"--batch-mix: {path} is over {MAX_BYTES} bytes; an agent's metrics are far smaller")
    return shares_of(_counts(raw.decode("utf-8", errors="replace")), max_batch)
