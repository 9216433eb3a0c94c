"""Handing freed memory back to the system between a build's steps.

A build loads, copies and frees whole models step after step (a ViT-B/16 graph is 330 MB), and
ONNX Runtime sessions come and go with their arenas. glibc's allocator keeps what is freed for
reuse rather than returning it, so without this the builder's resident memory ratchets up step
by step, and the build's peak with it (``bench/build_bench.py`` measures both). Elsewhere than
glibc this only collects garbage.

glibc also raises its mmap threshold each time a large block is freed (up to 32 MiB), so that the
weight-sized buffers of the next step come from the heap, where one that stays alive keeps every
free block below it from being returned. :func:`return_large_blocks` pins the threshold, so each
such buffer is mapped on its own and unmapped when freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable


def _glibc(function: str) -> Callable[..., int] | None:
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), function) if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return None


_TRIM, _MALLOPT = _glibc("malloc_trim"), _glibc("mallopt")
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
LARGE_BLOCK = 1 << 20  # bytes: a tensor of a ViT's layer, not the small objects of Python and protobuf


def return_large_blocks() -> None:
    """From now on, blocks of :data:`LARGE_BLOCK` or more go straight back to the system when freed.

    The setting is the whole process's: the engine job sets it for the builder, whose engine profiles run in
    processes of their own (their timings keep glibc's default), and a program that calls the job gets it too.
    """
    if _MALLOPT is not None:
        _MALLOPT(_M_MMAP_THRESHOLD, LARGE_BLOCK)


def release_freed_memory() -> None:
    """Collect garbage, then return the allocator's free memory to the system."""
    gc.collect()
    if _TRIM is not None:
        _TRIM(0)
