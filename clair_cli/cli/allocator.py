"""Freed large blocks go back to the system at once (glibc), while the command line writes.

glibc serves an allocation above its mmap threshold with its own mapping, released on free;
but the threshold starts at 128 KiB and rises to the size of each such block freed (up to
32 MiB), after which blocks of that size come from the heap, where freed space is kept and
fragments. A merge allocates and frees tens-of-MiB float64 temporaries per module: on a
Llama-2-7B-shaped pool that left 250 MiB of freed heap resident (peak 1.06 GiB against
810 MiB with a fixed threshold, and no slower). So ``clair merge`` and ``clair refine`` fix
the threshold at :data:`MMAP_THRESHOLD_BYTES` when they start writing, and hand the heap's
freed space back first (``malloc_trim``), unless ``MALLOC_MMAP_THRESHOLD_`` already sets it.

The audit before that keeps glibc's own threshold: its temporaries (``d x sum r_k`` stacks,
``sum r_k``-square null draws) are allocated and freed a few hundred times per module, and
with a fixed 1 MiB threshold each one was a fresh mapping whose pages the kernel zeroes on
first touch: 21 % of the audit of a 4-layer Llama-2-7B-shaped pool (17.0 s against 14.2 s,
2.3 million page faults against 0.4 million), for 150 MiB less peak memory.

Like the thread count (:mod:`clair_cli.cli.threads`), the library never changes the allocator:
a program that imports ``clair_cli`` keeps its allocator as it is.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # mallopt's parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20
TRIM_THRESHOLD_BYTES = 128 << 10  # glibc's default, which the audit's large frees have raised (up to 64 MiB)


def release_freed_memory() -> bool:
    """Hand the heap's freed space back to the system and fix glibc's mmap threshold from now on;
    whether it was done (False: not glibc, or the environment sets the threshold)."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    malloc_trim.argtypes = [ctypes.c_size_t]
    malloc_trim.restype = ctypes.c_int
    # Fixing the mmap threshold stops glibc adjusting either threshold, but leaves the trim
    # threshold where the audit's frees raised it (twice the largest block freed): reset it, or
    # the heap keeps that much freed memory through the whole merge.
    if not mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES):
        return False
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:  # the user's own setting stays
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    malloc_trim(0)
    return True
