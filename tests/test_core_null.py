"""The parallel-analysis null: Bartlett (Wishart) draws, the randomized route, sequential stopping."""

from __future__ import annotations

import math

import pytest
import torch
from synthetic import make_module

from clair_cli.core import decompose
from clair_cli.core.decompose import (
    NULL_BATCH,
    normalise_blocks,
    null_spectrum,
    parallel_analysis,
    rotated_draws,
)
from clair_cli.core.fastpath import null_top, stacked_factors


def _unit_stack(K: int = 8, d_out: int = 30, seed: int = 3) -> tuple[torch.Tensor, tuple[int, ...]]:
    ranks = [2, 3, 4, 4, 2, 3, 4, 1][:K]
    A, B, s, _ = make_module(K=K, ranks=ranks, d_out=d_out, noise=0.3, seed=seed)
    W, offsets = stacked_factors(A, B, s, "out")
    return normalise_blocks(W, offsets)[0], offsets


@pytest.mark.parametrize("d_out", [23, 40])
def test_wishart_draws_have_the_distribution_of_explicit_rotations(d_out: int) -> None:
    W, offsets = _unit_stack(d_out=d_out)
    assert W.shape[1] <= W.shape[0]  # the Wishart route is the one taken
    g = torch.Generator().manual_seed(0)
    n = 2000
    bartlett = null_spectrum(W, offsets, n, g)
    explicit = torch.stack([torch.linalg.svdvals(R) for R in rotated_draws(W, offsets, n, g)])
    for k in range(6):
        a, b = bartlett[:, k], explicit[:, k]
        se = math.sqrt((a.var() + b.var()) / n)
        assert abs(float(a.mean() - b.mean())) < 5 * se, k
        assert abs(float(a.std() / b.std()) - 1) < 0.12, k


def test_wider_than_the_space_uses_explicit_rotations() -> None:
    W, offsets = _unit_stack(d_out=12)
    assert W.shape[1] > W.shape[0]
    null = null_spectrum(W, offsets, 3, torch.Generator().manual_seed(0))
    assert null.shape == (3, 12)
    # Every draw keeps the total energy (unit blocks): sum of squares = K.
    torch.testing.assert_close(null.pow(2).sum(1), torch.full((3,), 8.0, dtype=null.dtype))


def test_null_top_randomized_route_is_close_to_the_exact_route(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("clair_cli.core.fastpath.WISHART_MAX_N", 100)  # force the randomized route
    g = torch.Generator().manual_seed(1)
    W = torch.linalg.qr(torch.randn(540, 540, generator=g, dtype=torch.float64))[0]
    W = W * torch.linspace(1, 2, 540, dtype=torch.float64)
    offsets = tuple(range(0, 541, 4))
    W = normalise_blocks(W, offsets)[0]
    wishart = null_spectrum(W, offsets, 60, g)[:, :5]
    monkeypatch.setattr("clair_cli.core.fastpath.null_spectrum", lambda *a: pytest.fail("Wishart route taken"))
    randomized = null_top(W, offsets, 60, 5, g)
    assert randomized.shape == (60, 5)
    # Randomized subspace iteration runs low on a flat null spectrum: by less than 3 %.
    ratio = randomized.mean(0) / wishart.mean(0)
    assert bool((ratio > 0.97).all() and (ratio <= 1.001).all()), ratio


def test_clear_modules_stop_after_one_batch_and_close_ones_draw_them_all() -> None:
    W, offsets = _unit_stack()
    g = torch.Generator().manual_seed(0)
    calls: list[int] = []

    def draw(n: int) -> torch.Tensor:
        calls.append(n)
        return null_spectrum(W, offsets, n, g)

    probe = null_spectrum(W, offsets, 50, torch.Generator().manual_seed(9))
    bound = probe.mean(0) + 3 * probe.std(0)
    clear = bound.clone()
    clear[:2] *= 3  # two values far above the bound, the rest far below
    clear[2:] *= 0.3
    r, null = parallel_analysis(clear, draw, 20, max_rank=10)
    assert (r, null.shape[0], calls) == (2, NULL_BATCH, [NULL_BATCH])

    calls.clear()
    close = clear.clone()
    close[2] = bound[2]  # a decision on the edge: every draw is taken
    r, null = parallel_analysis(close, draw, 20, max_rank=10)
    assert null.shape[0] == 20 and sum(calls) == 20


def test_parallel_analysis_needs_draws() -> None:
    with pytest.raises(ValueError, match="n_null"):
        parallel_analysis(torch.ones(3), lambda n: torch.ones(n, 3), 0, 2)


def test_settled_needs_two_draws() -> None:
    assert not decompose._settled(torch.ones(3), torch.ones(1, 3), 0)
