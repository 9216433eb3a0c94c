"""The builder's hold on the allocator (builder/memory.py), seen through glibc's own accounting."""

from __future__ import annotations

import subprocess
import sys

import pytest

# mallinfo2's fields, in order: hblkhd is the bytes held in blocks mapped on their own
CHILD = """
import ctypes, sys
import numpy as np
from builder.memory import return_large_blocks

FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"

class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in FIELDS.split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
if sys.argv[1] == "pinned":
    return_large_blocks()
freed = np.ones(4 << 20, np.uint8)  # freeing a 4 MiB block is what raises glibc's threshold by default
del freed
before = libc.mallinfo2().hblkhd
kept = np.ones(2 << 20, np.uint8)
print(libc.mallinfo2().hblkhd - before >= kept.nbytes)
"""


@pytest.mark.parametrize("mode, mapped", [("pinned", True), ("default", False)])
def test_a_tensor_sized_block_is_mapped_on_its_own_once_pinned(mode: str, mapped: bool) -> None:
    """Pinned, a 2 MiB buffer allocated after a 4 MiB one was freed is mapped on its own, so freeing it gives
    its pages back; by default glibc puts it on the heap (the case the builder's steps used to hit)."""
    found = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == str(mapped)
