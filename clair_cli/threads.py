"""CPU threads for the command line, chosen before torch is imported.

clair's work is many small factor-sized operations (K x K Grams, r x r eigenproblems,
d x r products). With torch's defaults (one OpenMP thread per core, threads that spin
while they wait) a machine busy with other work makes those threads fight for cores:
``clair audit sample_adapters`` took 33 s on a 2-core machine running two other busy
processes, against 3.6 s with one thread (``benchmarks/threads.py``). So the command line,
unless told otherwise:

- lets waiting OpenMP threads sleep (``OMP_WAIT_POLICY=PASSIVE``) instead of spinning;
- uses one thread for pools whose largest module is small (width x summed rank under
  ``LARGE_MODULE``: extra threads gained nothing there on an idle machine and cost up to
  10x on a busy one), and for larger pools one thread per CPU this process may run on
  (its affinity and cgroup quota).

The count never depends on the machine's load: float32 products differ in their last bits
between thread counts, and the same command on the same machine must give the same report.

``OMP_NUM_THREADS`` or ``CLAIR_NUM_THREADS=N`` set the count; ``CLAIR_NUM_THREADS=0``
leaves torch's defaults entirely. The library itself never changes threads: a program
that imports ``clair_cli`` keeps its own settings.
"""

from __future__ import annotations

import math
import os
from collections.abc import MutableMapping
from pathlib import Path

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
# Width x summed rank of a pool's largest module from which threads pay: a 4096-wide module
# of 64 adapters at r = 16 (4.2M) ran 1.35x faster on two threads; 1024 x 256 (0.26M) and
# the sample adapters not at all (benchmarks/threads.py).
LARGE_MODULE = 1 << 20

_chosen: int | None = None  # the count configure_threads chose itself (None: the user's)


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def configure_threads(environ: MutableMapping[str, str] | None = None) -> int | None:
    """Set the OpenMP/MKL thread environment for this run; return the count chosen.

    Must run before torch is imported (OpenMP reads its environment once, on load).
    Returns None when the user's own settings are kept.
    """
    global _chosen
    _chosen = None
    env = os.environ if environ is None else environ
    wanted = env.get("CLAIR_NUM_THREADS", "").strip()
    if wanted == "0":
        return None  # torch's defaults, untouched
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if wanted.isdigit():
        count = int(wanted)
    elif "OMP_NUM_THREADS" in env:
        return None
    else:
        count = _chosen = usable_cpus()
    env["OMP_NUM_THREADS"] = str(count)
    env.setdefault("MKL_NUM_THREADS", str(count))
    return count


def fit_to_pool(width: int, summed_rank: int) -> int | None:
    """Once the pool's shapes are known: one thread for small pools (see ``LARGE_MODULE``).

    Only when ``configure_threads`` chose the count itself; returns the count set, or None.
    """
    if _chosen is None:
        return None
    import torch

    count = _chosen if width * summed_rank >= LARGE_MODULE else 1
    torch.set_num_threads(count)
    return count
