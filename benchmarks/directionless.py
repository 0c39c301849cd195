"""Directionless pools: what the audit flags where honest updates agree on no direction.

    python -m benchmarks.directionless [--seeds 4]

Honest pools spread around zero in a shared subspace (``benchmarks.synthetic.directionless_pool``:
random coefficients on 1, 2, 4 or 8 shared rank-4 updates per module, own parts of 0-1x, a
common part of 0 or 0.3; 8, 12 and 18 adapters; every update at unit norm). No adapter here is
contaminated, so every flag is a false one; the rules that need the pool to agree on a direction
(1, 9 and 11) must stay off, or find nothing. Prints per configuration the adapters flagged in
each seed's pool and the largest ``pull`` margin; compare two commits' outputs line by line.
"""

from __future__ import annotations

import argparse
import time

from benchmarks.synthetic import directionless_pool, flagged
from clair_cli.core.audit import ClairAuditor


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.directionless", description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=4)
    args = parser.parse_args()
    start = time.perf_counter()
    print("| K | dims | own | common | adapters flagged per seed | flagged by pull | largest pull margin |")
    print("|---:|---:|---:|---:|---|---:|---:|")
    total = by_pull = 0
    for K in (8, 12, 18):
        for dims in (1, 2, 4, 8):
            for own in (0.0, 0.5, 1.0):
                for common in (0.0, 0.3):
                    counts, pulled, margin = [], 0, 0.0
                    for seed in range(args.seeds):
                        aud = ClairAuditor().fit(directionless_pool(K, dims, own, common, seed), K)
                        counts.append(len(flagged(aud)))
                        pulled += sum(any(r.rule == "pull" for r in v.reasons) for v in aud.verdicts_)
                        margin = max([margin] + [v.signals.get("pull", 0.0) for v in aud.verdicts_])
                    total += sum(counts)
                    by_pull += pulled
                    print(f"| {K} | {dims} | {own} | {common} | {counts} | {pulled} | {margin:.2f} |", flush=True)
    elapsed = time.perf_counter() - start
    print(f"\n{total} adapters flagged in all, {by_pull} of them with a pull reason ({elapsed:.0f} s)")


if __name__ == "__main__":
    main()
