"""The C heap under a memory budget: large freed blocks go back to the OS at once, and free pages are trimmed.

glibc keeps freed memory for reuse; a process streaming a model through a budget must hand it back instead, or
its resident memory grows by what it once held. Elsewhere than glibc these do nothing.
"""

from __future__ import annotations

import os
import resource
from functools import cache
from typing import Any

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
TRIM_GROWTH = 256 * 2**20  # trim_heap_when_grown trims once the process has grown by this much since a trim
_after_last_trim = [0]  # resident bytes just after the last trim_heap


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


def resident_bytes() -> int:
    """The process's resident memory now (/proc on Linux; elsewhere the peak so far, which bounds it)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def trim_heap() -> None:
    """Give the heap's free pages back to the OS (glibc's malloc_trim): the many small blocks a pass or a
    calibration run frees would otherwise stay resident, and the next stage's peak would start above them."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
        _after_last_trim[0] = resident_bytes()


def trim_heap_when_grown(growth: int = TRIM_GROWTH) -> None:
    """trim_heap once the process has grown by `growth` bytes since the last trim.

    Why: glibc's heap keeps the tensors a pass frees for reuse, and reuse is patchy, so a pass that rewrites a
    checkpoint weight by weight grows by about what it once held (1.9 GiB against 1.0 for a 300M model under a
    256 MiB budget). Trimming at every weight costs a third more time in page faults; trimming once the
    process has grown by 256 MiB keeps most of the gain for a few percent.
    """
    if resident_bytes() > _after_last_trim[0] + growth:
        trim_heap()
