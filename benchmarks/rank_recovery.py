"""Shared rank chosen by parallel analysis on synthetic pools of known rank.

For each pool kind and pool size, ``--seeds`` pools (d_out = 64, d_in = 48, rank-4 adapters)
are audited by ``ModuleDecomposer(rank="auto")`` (the null in the module's full space) and,
for comparison, by the earlier null that rotated blocks inside the pool's own span. The table
gives how often each rank was chosen.

    python -m benchmarks.rank_recovery            # the README figures (about 1 minute)
"""

from __future__ import annotations

import argparse
import collections
import time

import torch

from benchmarks.synthetic import make_module
from clair_cli.core.decompose import ModuleDecomposer, normalise_blocks, null_spectrum, parallel_analysis_rank
from clair_cli.core.reduction import reduce_module

CASES = {
    "rank 1": (1, {"r": 1}),
    "rank 2": (2, {"r": 2}),
    "rank 3": (3, {"r": 3}),
    "rank 2, noise 0.3": (2, {"r": 2, "noise": 0.3}),
    "rank 3, noise 0.3": (3, {"r": 3, "noise": 0.3}),
    "rank 2, consensus (spread 0.3)": (2, {"r": 2, "spread": 0.3}),
    "rank 2, energies 1 : 0.25": (2, {"r": 2, "strengths": (1.0, 0.5)}),
    "rank 2, energies 1 : 0.09": (2, {"r": 2, "strengths": (1.0, 0.3)}),
    "rank 3, energies 1 : 0.36 : 0.09": (3, {"r": 3, "strengths": (1.0, 0.6, 0.3)}),
    "rank 2, energies 1 : 0.09, noise 0.3": (2, {"r": 2, "strengths": (1.0, 0.3), "noise": 0.3}),
    "independent (rank 0), noise 0.3": (0, {"r": 2, "kind": "independent", "noise": 0.3}),
}


def in_span_rank(stack, seed: int) -> int:
    """The earlier rule: blocks rotated inside the core's own rows, no participation check."""
    Y = normalise_blocks(stack.G.double(), stack.offsets)[0]
    null = null_spectrum(Y, stack.offsets, 20, torch.Generator().manual_seed(seed))
    return parallel_analysis_rank(torch.linalg.svdvals(Y), null, max(1, min(Y.shape) - 1))


def counts(values: list[int]) -> str:
    return ", ".join(f"{r}: {n}" for r, n in sorted(collections.Counter(values).items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    print(f"Rank chosen (rank: pools), {args.seeds} pools per row, d_out 64")
    print()
    print("| pool | true rank | K | ambient null (clair) | exactly right | in-span null (before) |")
    print("|---|---:|---:|---|---:|---|")
    for label, (rank, options) in CASES.items():
        for K in (8, 20):
            now, before = [], []
            for seed in range(args.seeds):
                A, B, s, _ = make_module(K=K, d_out=64, d_in=48, seed=seed, **options)
                stack = reduce_module(A, B, s, "out")
                now.append(ModuleDecomposer(random_state=seed).fit(stack).rank_)
                before.append(in_span_rank(stack, seed))
            right = sum(r == rank for r in now)
            print(f"| {label} | {rank} | {K} | {counts(now)} | {right}/{args.seeds} | {counts(before)} |")
    print(f"\n({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
