"""Time of parallel analysis's null draws on large modules: the leading values only (TopNull)
against the dense route (a full eigensolve of every draw).

    python -m benchmarks.null_draws          # n = 640 ... 2048 summed ranks, 5 draws, one thread (about 30 s)

Stacks of K unit-norm rank-16 blocks (decaying spectra) in 4096 dimensions, float32; TopNull is
timed with its draws' (whitened Wishart) matrices already built, as for every module of a pool
after the first of its block layout.
"""

from __future__ import annotations

import time

import torch

from clair_cli.core import decompose

DRAWS = 5


def _stack(K: int, r: int = 16, d: int = 4096) -> tuple[torch.Tensor, tuple[int, ...]]:
    g = torch.Generator().manual_seed(0)
    decay = torch.linspace(1.0, 0.1, r, dtype=torch.float64)
    blocks = [torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))[0] * decay for _ in range(K)]
    offsets = tuple(range(0, K * r + 1, r))
    return decompose.normalise_blocks(torch.cat(blocks, dim=1), offsets)[0].float(), offsets


def main() -> None:
    torch.set_num_threads(1)
    print("| summed ranks | dense route (s) | leading values, draws shared (s) | widened to 32 (s) |")
    print("|---:|---:|---:|---:|")
    for K in (40, 48, 64, 96, 128):
        W, offsets = _stack(K)
        start = time.perf_counter()
        decompose.null_spectrum(W, offsets, DRAWS, torch.Generator().manual_seed(0))
        dense = time.perf_counter() - start
        decompose.TopNull(W, offsets, 48, torch.Generator().manual_seed(0))(DRAWS)  # builds the draws' matrices
        top = decompose.TopNull(W, offsets, 48, torch.Generator().manual_seed(0))
        start = time.perf_counter()
        top(DRAWS)
        lead = time.perf_counter() - start
        start = time.perf_counter()
        top.widen()
        wide = time.perf_counter() - start
        print(f"| {K * 16} | {dense:.2f} | {lead:.2f} | {wide:.2f} |")


if __name__ == "__main__":
    main()
