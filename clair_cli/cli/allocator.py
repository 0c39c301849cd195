"""Freed large blocks go back to the system at once (glibc), for the command line.

glibc serves an allocation above its mmap threshold with its own mapping, released on free;
but the threshold starts at 128 KiB and rises to the size of each such block freed (up to
32 MiB), after which blocks of that size come from the heap, where freed space is kept and
fragments. A merge allocates and frees tens-of-MiB float64 temporaries per module: on a
Llama-2-7B-shaped pool that left 250 MiB of freed heap resident (peak 1.06 GiB against
810 MiB with a fixed threshold, and no slower). So the command line fixes the threshold
at :data:`MMAP_THRESHOLD_BYTES`, unless ``MALLOC_MMAP_THRESHOLD_`` already sets it. Like the
thread count (:mod:`clair_cli.cli.threads`), the library never changes it: a program that
imports ``clair_cli`` keeps its allocator as it is.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_MMAP_THRESHOLD = -3  # mallopt's parameter (malloc.h)
MMAP_THRESHOLD_BYTES = 1 << 20


def configure_allocator() -> bool:
    """Fix glibc's mmap threshold for this process; whether it was set (False: not glibc, or the
    environment sets it)."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
