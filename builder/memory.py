"""Handing freed memory back to the system between a build's steps.

A build loads, copies and frees whole models step after step (a ViT-B/16 graph is 330 MB), and
ONNX Runtime sessions come and go with their arenas. glibc's allocator keeps what is freed for
reuse rather than returning it, so without this the builder's resident memory ratchets up step
by step, and the build's peak with it (``bench/build_bench.py`` measures both). Elsewhere than
glibc this only collects garbage.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return None


_TRIM = _malloc_trim()


def release_freed_memory() -> None:
    """Collect garbage, then return the allocator's free memory to the system."""
    gc.collect()
    if _TRIM is not None:
        _TRIM(0)
