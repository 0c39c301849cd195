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
from collections.abc import MutableMapping


def configure_threads(environ: MutableMapping[str, str] | None = None) -> int | None:
    """Set the OpenMP/MKL thread count for this run; return it (None: the user's settings kept).

    Must run before torch is imported (OpenMP reads its environment once, on load).
    """
    env = os.environ if environ is None else environ
    wanted = env.get("CLAIR_NUM_THREADS", "").strip()
    if wanted == "0":
        return None  # torch's defaults, untouched
    if wanted.isdigit():
        count = int(wanted)
    elif "OMP_NUM_THREADS" in env:
        return None
    else:
        count = 1
    env["OMP_NUM_THREADS"] = str(count)
    env.setdefault("MKL_NUM_THREADS", str(count))
    return count
