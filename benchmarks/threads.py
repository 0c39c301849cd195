"""Threads on an idle and on a busy machine: does clair's thread policy keep it fast?

``clair audit`` runs as a separate process on three pools (the bundled sample adapters and
two generated pools: 32 adapters 1024 wide at r = 8, 16 modules; 64 adapters of Llama-7B
width at r = 16, 8 modules), each under three thread settings:

- ``torch default``: ``CLAIR_NUM_THREADS=0``, torch's own choice (one spinning OpenMP
  thread per core), what clair did before it had a policy;
- ``sleeping waiters``: the same count with ``OMP_WAIT_POLICY=PASSIVE``;
- ``clair default``: nothing set, clair's policy (``clair_cli/cli/threads.py``: one thread);
- ``1 thread``: ``CLAIR_NUM_THREADS=1``;

once on the machine as it is ("idle") and once beside a CPU hog: one busy-looping process
per usable CPU ("loaded"). Each cell is the median of ``--runs`` wall times. The last
column is the slowdown of each setting against one thread under the same load: the cost
of the threads themselves.

    python -m benchmarks.threads            # about 19 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import poolgen

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {
    "torch default": {"CLAIR_NUM_THREADS": "0"},
    "sleeping waiters": {"CLAIR_NUM_THREADS": "0", "OMP_WAIT_POLICY": "PASSIVE"},
    "clair default": {},
    "1 thread": {"CLAIR_NUM_THREADS": "1"},
}
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "CLAIR_NUM_THREADS")


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _spin(stop: mp.Event) -> None:  # type: ignore[valid-type]
    while not stop.is_set():  # type: ignore[attr-defined]
        sum(range(10_000))


def audit_time(pool: Path, setting: dict[str, str]) -> float:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    env.update(setting, NO_COLOR="1")
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "clair_cli", "audit", str(pool), "-q", "--exit-zero"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return time.perf_counter() - start


def measure(pools: dict[str, Path], runs: int, loaded: bool) -> dict[tuple[str, str], float]:
    stop = mp.Event()
    hogs = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(usable_cpus() if loaded else 0)]
    for h in hogs:
        h.start()
    if hogs:
        time.sleep(2.0)  # let the load average see them
    try:
        return {
            (pool, name): statistics.median(audit_time(path, setting) for _ in range(runs))
            for pool, path in pools.items()
            for name, setting in SETTINGS.items()
        }
    finally:
        stop.set()
        for h in hogs:
            h.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "clair-bench-threads")
    args = parser.parse_args()
    small = poolgen.PoolSpec(k=32, layers=4, hidden=1024, rank=8, shared=4, bad=2, dtype="float32")
    large = poolgen.PoolSpec(k=64, layers=2, hidden=4096, rank=16)
    pools = {
        "sample_adapters": ROOT / "sample_adapters",
        "K=32, 1024 wide, r=8": poolgen.ensure(small, args.work / "small"),
        "K=64, 4096 wide, r=16": poolgen.ensure(large, args.work / "large"),
    }
    print(f"usable CPUs: {usable_cpus()}; median of {args.runs} runs; wall seconds of `clair audit POOL -q`\n")
    print("| pool | machine | setting | wall (s) | vs 1 thread |")
    print("|---|---|---|---:|---:|")
    for loaded in (False, True):
        times = measure(pools, args.runs, loaded)
        for pool in pools:
            one = times[(pool, "1 thread")]
            for name in SETTINGS:
                t = times[(pool, name)]
                machine = "loaded" if loaded else "idle"
                print(f"| {pool} | {machine} | {name} | {t:.2f} | {t / one:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
