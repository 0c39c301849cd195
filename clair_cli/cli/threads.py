"""CPU threads for the command line, chosen before torch is imported.

clair's work is many small factor-sized operations (K x K Grams, r x r eigenproblems,
d x r products). With torch's defaults (one OpenMP thread per core, threads that spin
while they wait) a machine busy with other work makes those threads fight for cores:
``clair audit sample_adapters`` took 33 s on a 2-core machine running two other busy
processes, against 3.6 s on one thread. Letting waiting threads sleep instead
(``OMP_WAIT_POLICY=PASSIVE``) fixed the busy case but made a large pool 1.6x slower than
one thread on the idle machine, and a count read from the load average would make the
report depend on the load (float32 products differ in their last bits between thread
counts). So the command line runs on one thread unless told otherwise: never far from
the fastest setting on an idle 2-core machine (a 4096-wide pool of 64 adapters: 1.3x
torch's default), never slowed by a busy one (``benchmarks/threads.py``).

``CLAIR_NUM_THREADS=N`` (or ``OMP_NUM_THREADS``) sets the count, for a large pool on an
idle machine with many cores; ``CLAIR_NUM_THREADS=0`` leaves torch's defaults. The library
itself never changes threads: a program that imports ``clair_cli`` keeps its own settings.
"""

from __future__ import annotations

import os
from collections.abc import Callable, MutableMapping


def configure_threads(environ: MutableMapping[str, str] | None = None) -> int | None:
    """Set the OpenMP/MKL thread count for this run; return it (None: the user's settings kept).

    Must run before torch is imported (OpenMP reads its environment once, on load).
    """
    env = os.environ if environ is None else environ
    wanted = env.get("CLAIR_NUM_THREADS", "").strip()
    if wanted == "0":
        return None  # torch's defaults, untouched
    if wanted.isascii() and wanted.isdigit():  # "²" is a digit to isdigit(), not to int()
        count = int(wanted)
    elif "OMP_NUM_THREADS" in env:
        return None
    else:
        count = 1
    env["OMP_NUM_THREADS"] = str(count)
    env.setdefault("MKL_NUM_THREADS", str(count))
    return count


def flush_denormals() -> Callable[[], None]:
    """Have this process's float arithmetic treat subnormal numbers as zero (flush-to-zero and
    denormals-are-zero, on CPUs that have them); return what puts this thread's setting back.

    A product that lands in the subnormal range (below about 1.2e-38 in float32, 2.2e-308 in
    float64) is computed by a slow path of the CPU, about 100x slower than a normal one on
    x86: an upload of factors near 1e-20 (balanced float32 factors of an update near 1e-40)
    made the audit's float32 Gram products of its module 100x slower, and a pool of such
    uploads with one ordinary adapter made ``clair audit`` 8x slower than the same pool at
    ordinary scale (an outside review, 2026-12-06). Such values are far below anything an
    update carries: clair reads them as zero (the update of such an adapter is zero in
    float32's Gram products either way, and flagged as a free rider). The flush reads a
    subnormal input as zero too, so the reader refuses factors holding subnormal values wherever
    they could hide more than ``SUBNORMAL_NEGLIGIBLE`` in the update
    (:func:`clair_cli.io.adapter.subnormal_suspects`), and config numbers are checked from their
    bits.

    The setting is per thread and each thread inherits it where it starts, so it must come
    before torch starts its thread pool: at the start of a command, right after the numerical
    libraries are imported. The command line only: a program that imports ``clair_cli`` keeps
    its own settings.
    """
    import torch

    from clair_cli.executors import denormals_flushed

    before = denormals_flushed()
    torch.set_flush_denormal(True)

    def restore() -> None:
        if not before:
            torch.set_flush_denormal(False)

    return restore
