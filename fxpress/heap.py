"""The C heap under a memory budget: large freed blocks go back to the OS at once, and free pages are trimmed.

glibc keeps freed memory for reuse; a process streaming a model through a budget must hand it back instead, or
its resident memory grows by what it once held. Elsewhere than glibc these do nothing.
"""

from __future__ import annotations

from functools import cache
from typing import Any

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


@cache  # find_library runs ldconfig: once per process, not at every pass and engine run
def _libc() -> Any:
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def return_freed_memory() -> None:
    """Make glibc hand large freed blocks back to the OS at once (what a memory budget relies on).

    glibc raises its mmap threshold each time a large mmapped block is freed, so later tensors of a few MB
    come from the heap, whose freed space stays resident: streaming a model tensor by tensor then grows the
    process by about the model's size. A fixed threshold (128 KiB, glibc's default start) keeps every tensor
    above it in its own mapping, returned on free. Elsewhere than glibc this does nothing.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)


def trim_heap() -> None:
    """Give the heap's free pages back to the OS (glibc's malloc_trim): the many small blocks a pass or a
    calibration run frees would otherwise stay resident, and the next stage's peak would start above them."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
