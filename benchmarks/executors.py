"""The audit in one process against worker processes (``--jobs``) and Ray (``--executor ray``),
on a pool of real shapes.

    python -m benchmarks.executors                        # K = 32, 4 layers of 1024 (16 modules), 3 runs
    python -m benchmarks.executors --k 64 --layers 8 --hidden 2048 --runs 5

Each configuration runs in its own process on one thread a task (the CLI's policy,
:mod:`clair_cli.cli.threads`): ``local`` (this process), ``--jobs 2`` (two worker processes,
started by every audit, as each command does: their start is in every time), then Ray with 1
and 2 workers (``ray.init(num_cpus=n)``, started before the clock runs; the first audit also
pays for the workers' start and imports, so it is reported apart as ``first``). Printed: the
median wall-clock time of the audit over ``--runs`` runs after the first, the speed-up over
local, the driver's peak memory (its own resident set, not Ray's processes), the largest
``--jobs`` worker's, and whether the report is identical to the local one (it must be: the
modules' audits are folded in module order).

How it scales to thousands of adapters. The per-module work is independent: a task reads one
module's factors for the whole pool from the adapters' files, where it runs, and returns that
module's result and its ``K x K`` Gram matrix; with ``M`` modules, ``M`` tasks spread over
as many workers as the cluster has CPUs. What stays on the driver is the pool-wide ``K x K``
tally (two float64 matrices: 16 MB at ``K = 1000``), one module's result per task in flight
(at most two per worker), and the verdict over the ``K`` adapters. A task's memory is that of
the local audit's largest module (it grows with the square of the module's summed rank,
``clair_cli.core.fastpath.audit_memory_bytes``), so a pool too large for one machine's module is
too large for one worker too: Ray spreads modules, not one module. With ``K`` in the thousands the
verdict's calibration on the driver (quadratic in ``K``) and reading ``K`` files per task become
the costs to watch; the modules' audits themselves divide by the number of workers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import poolgen


def _run(pool: str, executor: str, workers: int, runs: int, jobs: int = 1) -> None:
    """One configuration, in this (fresh) process; prints one JSON line."""
    import resource
    import time

    import torch

    torch.set_num_threads(1)
    from clair_cli import pipeline
    from clair_cli.params import AuditParams
    from clair_cli.report.audit import audit_report

    start_s = 0.0
    if executor == "ray":
        import ray

        start = time.perf_counter()
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, logging_level="warning")
        start_s = time.perf_counter() - start
    params = AuditParams(device="cpu", executor=executor, jobs=jobs)
    opened = pipeline.open_pool([pool])
    times, digest = [], ""
    for _ in range(runs + 1):
        start = time.perf_counter()
        outcome = pipeline.audit(opened, params)
        times.append(time.perf_counter() - start)
        report = audit_report(outcome)
        report.pop("timing_s", None)
        report.pop("generated_at", None)
        digest = hashlib.sha256(json.dumps(report, sort_keys=True).encode()).hexdigest()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 if jobs > 1 else 0
    print(json.dumps({"start_s": start_s, "times": times, "peak": peak, "worker": worker, "digest": digest}))


def measure(pool: Path, executor: str, workers: int, runs: int, jobs: int = 1) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "benchmarks.executors", "--worker", str(pool), executor, str(workers), str(runs)]
    argv.append(str(jobs))
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=32, help="adapters in the pool")
    parser.add_argument("--layers", type=int, default=4, help="layers (4 modules each)")
    parser.add_argument("--hidden", type=int, default=1024, help="model width")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3, help="timed runs after the first")
    parser.add_argument("--pool", type=Path, help="where to write the pool (default: a temporary directory)")
    parser.add_argument("--no-ray", action="store_true", help="only local and --jobs 2 (no Ray installed)")
    args = parser.parse_args(argv)
    spec = poolgen.PoolSpec(k=args.k, layers=args.layers, hidden=args.hidden, rank=args.rank, bad=max(1, args.k // 16))
    with tempfile.TemporaryDirectory() as tmp:
        pool = poolgen.ensure(spec, args.pool or Path(tmp) / "pool")
        print(
            f"pool: K = {spec.k}, {len(spec.modules)} modules of {spec.hidden} x {spec.hidden}, rank {spec.rank} "
            f"({spec.bytes_on_disk() / 2**20:.0f} MiB); one thread a task; median of {args.runs} runs after the first"
        )
        rows = [
            ("local", "local", 1, 1),
            ("--jobs 2", "local", 0, 2),
            ("ray, 1 worker", "ray", 1, 1),
            ("ray, 2 workers", "ray", 2, 1),
        ]
        if args.no_ray:
            rows = rows[:2]
        results = {label: measure(pool, executor, n, args.runs, jobs) for label, executor, n, jobs in rows}
    base = statistics.median(results["local"]["times"][1:])
    print(
        f"\n| {'executor':<15} | audit (s) | first (s) | Ray start (s) | speed-up | driver peak (MiB) "
        "| worker peak (MiB) | report |"
    )
    print(f"|{'-' * 17}|-----------|-----------|---------------|----------|{'-' * 19}|{'-' * 19}|--------|")
    for label, r in results.items():
        t = statistics.median(r["times"][1:])
        same = "same" if r["digest"] == results["local"]["digest"] else "DIFFERS"
        worker = f"{r['worker'] / 2**20:17.0f}" if r.get("worker") else " " * 17
        print(
            f"| {label:<15} | {t:9.2f} | {r['times'][0]:9.2f} | {r['start_s']:13.1f} | {base / t:7.2f}x "
            f"| {r['peak'] / 2**20:17.0f} | {worker} | {same:<6} |"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _run(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    else:
        main()
