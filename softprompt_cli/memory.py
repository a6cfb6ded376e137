"""Giving the memory that PyTorch frees back to the operating system, now and then.

On Linux, glibc keeps freed tensors' memory in its heap for reuse. Batches of varying lengths (what
length grouping makes) free and request blocks of ever-different sizes, so the heap fragments and
grows past what any single step needs: on the default MRPC job, 0.87 GB after the longest step, 1.19 GB
by the end of the epoch, 1.34 GB during evaluation. `malloc_trim` returns the free pages; the next step
touches them afresh, which costs page faults, so training calls it every few steps, not every step.
Where the C library has no `malloc_trim` (macOS, musl), this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache

EVERY_STEPS = 10  # every step: -0.38 GB of peak but -18% speed; every 10: -0.19 GB at no measurable cost


@cache
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None).malloc_trim
    except (AttributeError, OSError):
        return None


def release_free_memory() -> None:
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
