"""The parallel-analysis null: Bartlett (Wishart) draws, the ambient space, the randomized route,
sequential stopping, and the rank found on pools of known shared rank."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.synthetic import make_module
from clair_cli.core import decompose
from clair_cli.core.decompose import (
    NULL_BATCH,
    ModuleDecomposer,
    carriers,
    normalise_blocks,
    null_spectrum,
    parallel_analysis,
    parallel_analysis_rank,
    rotated_draws,
)
from clair_cli.core.fastpath import null_top, stacked_factors
from clair_cli.core.reduction import reduce_module


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


def test_ambient_null_rotates_in_the_full_space() -> None:
    """Blocks of a core with few rows live in a d-dimensional space: rotated in d dimensions
    (zero rows added) they align less than inside the core's own rows, and the explicit route
    agrees with the Wishart route in d dimensions."""
    W, offsets = _unit_stack(d_out=12)  # 12 rows, 23 columns
    g = torch.Generator().manual_seed(0)
    wide = null_spectrum(W, offsets, 400, g, ambient=30)  # explicit rotations in 30 dimensions
    assert wide.shape == (400, 12)
    own = null_spectrum(W, offsets, 400, g)  # in the core's own 12 rows
    assert float(wide[:, 0].mean()) < 0.95 * float(own[:, 0].mean())
    narrow, narrow_offsets = W[:, :9], offsets[:4]  # blocks of widths 2, 3, 4: 9 columns <= 12 rows
    assert narrow_offsets[-1] == 9
    exact = null_spectrum(narrow, narrow_offsets, 600, g, ambient=30)  # Wishart route
    explicit = null_spectrum(torch.nn.functional.pad(narrow, (0, 0, 0, 18)), narrow_offsets, 600, g)
    assert exact.shape == explicit.shape == (600, 9)
    for k in range(3):
        se = math.sqrt((exact[:, k].var() + explicit[:, k].var()) / 600)
        assert abs(float(exact[:, k].mean() - explicit[:, k].mean())) < 5 * se, k


# Pools of known shared rank (d_out 64): (rank found in every one of 5 seeds, options).
KNOWN_RANK = [
    (1, {"r": 1}),
    (2, {"r": 2}),  # noiseless: the in-span null (the core's rho = 2 rows) found 0
    (3, {"r": 3}),
    (2, {"r": 2, "noise": 0.3}),
    (2, {"r": 2, "noise": 1.0}),
    (3, {"r": 3, "noise": 0.3}),
    (2, {"r": 2, "spread": 1.0}),
    (0, {"r": 2, "kind": "independent", "noise": 0.3}),
]


@pytest.mark.parametrize(("rank", "options"), KNOWN_RANK)
@pytest.mark.parametrize("K", [8, 20])
def test_auto_rank_finds_the_true_shared_rank(rank: int, options: dict, K: int) -> None:
    found = []
    for seed in range(5):
        A, B, s, _ = make_module(K=K, d_out=64, d_in=48, seed=seed, **options)
        found.append(ModuleDecomposer(random_state=seed).fit(reduce_module(A, B, s, "out")).rank_)
    assert found == [rank] * 5


def test_unequal_directions_are_found_more_often_than_with_the_in_span_null() -> None:
    """A second direction with a tenth of the first's energy: the ambient null finds it in most
    pools of 20; the in-span null found it in none (README, "What clair can and cannot detect")."""
    ambient, own = [], []
    for seed in range(10):
        A, B, s, _ = make_module(K=20, r=2, strengths=(1.0, 0.3), d_out=64, d_in=48, seed=seed)
        stack = reduce_module(A, B, s, "out")
        ambient.append(ModuleDecomposer(random_state=seed).fit(stack).rank_)
        Y = normalise_blocks(stack.G.double(), stack.offsets)[0]
        null = null_spectrum(Y, stack.offsets, 20, torch.Generator().manual_seed(seed))
        own.append(parallel_analysis_rank(torch.linalg.svdvals(Y), null, 10))
    assert sum(r == 2 for r in ambient) >= 5 and all(r in (1, 2) for r in ambient)
    assert sum(r == 2 for r in own) == 0


def test_a_direction_of_one_adapter_is_never_shared() -> None:
    """Noiseless benign adapters plus one contaminated one: past the shared direction, the
    pool's next singular values are that adapter's own; rotation leaves them unchanged, so
    only the carriers rule keeps them out."""
    A, B, s, _ = make_module(K=10, bad=(9,), r=1, d_out=64, seed=11)
    stack = reduce_module(A, B, s, "out")
    Y = normalise_blocks(stack.G.double(), stack.offsets)[0]
    U = torch.linalg.svd(Y, full_matrices=False)[0]
    assert carriers(Y, stack.offsets, U[:, 0]) > 8 and carriers(Y, stack.offsets, U[:, 1]) < 1.1
    assert ModuleDecomposer().fit(stack).rank_ == 1


def _large_unit_stack(
    K: int = 48, r: int = 16, d: int = 1024, seed: int = 0, ranks: list[int] | None = None
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """A fast-path-sized stack: ``K r`` columns past ``KRYLOV_MIN_N``, blocks of decaying spectra."""
    g = torch.Generator().manual_seed(seed)
    ranks = ranks or [r] * K
    blocks = [
        torch.linalg.qr(torch.randn(d, w, generator=g, dtype=torch.float64))[0]
        * torch.linspace(1.0, 0.1, w, dtype=torch.float64)
        for w in ranks
    ]
    offsets = tuple(int(x) for x in torch.tensor([0, *ranks]).cumsum(0))
    return normalise_blocks(torch.cat(blocks, dim=1), offsets)[0], offsets


def _null_grams(W: torch.Tensor, offsets: tuple[int, ...], seeds: list[int]) -> torch.Tensor:
    groups = decompose._block_spectra(W, offsets)
    S = torch.stack([decompose.wishart_draw(s, W.shape[0], W.shape[1], W.dtype, W.device) for s in seeds])
    return decompose.null_gram(groups, S)


@pytest.mark.parametrize("ranks", [None, [16, 8, 16, 12] * 12])
def test_the_null_gram_is_that_of_the_bartlett_factors(ranks: list[int] | None) -> None:
    """X^T X of a null draw built from its Wishart matrix (block products) equals the product of
    the draw's X = L^T T (:func:`bartlett_factors`), with blocks of one width and of several."""
    W, offsets = _large_unit_stack(K=48, d=1024, ranks=ranks)
    groups = decompose._block_spectra(W, offsets)
    L = torch.stack([decompose.bartlett_factor(s, W.shape[0], W.shape[1], W.dtype) for s in (5, 6)])
    X = decompose.bartlett_factors(groups, L, W)
    torch.testing.assert_close(_null_grams(W, offsets, [5, 6]), X.transpose(-1, -2) @ X, rtol=1e-9, atol=1e-9)


def test_cached_wishart_draws_are_fresh_draws_bit_for_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    W, offsets = _large_unit_stack(K=40)
    first = _null_grams(W, offsets, [1, 2])
    assert any(key[0] == 1 for key in decompose._WISHART_CACHE)
    monkeypatch.setattr(decompose, "_WISHART_CACHE", {})
    assert torch.equal(_null_grams(W, offsets, [1, 2]), first)
    monkeypatch.setattr(decompose, "WISHART_CACHE_BYTES", 10)  # nothing fits: nothing kept
    monkeypatch.setattr(decompose, "_WISHART_CACHE", {})
    assert torch.equal(_null_grams(W, offsets, [1, 2]), first) and not decompose._WISHART_CACHE


@pytest.mark.parametrize("ranks", [None, [16, 8, 16, 12] * 12])
def test_a_null_draw_is_its_whitened_wishart_matrix_scaled_by_the_block_spectra(ranks: list[int] | None) -> None:
    """TopNull's X^T X = Sigma N Sigma (N shared by every module of one block layout) equals the
    block products T^T S T of the draw's Wishart matrix, for blocks of one width and of several,
    and a cached N is a fresh one bit for bit."""
    W, offsets = _large_unit_stack(K=48, d=1024, ranks=ranks)
    top = decompose.TopNull(W, offsets, 48, torch.Generator().manual_seed(0))
    seeds = [5, 6]
    N = torch.stack([decompose.whitened_draw(s, W.shape[0], top.layout, W.dtype, W.device) for s in seeds])
    M = N * (top.sigma[:, None] * top.sigma[None, :])
    torch.testing.assert_close(M, _null_grams(W, offsets, seeds), rtol=1e-9, atol=1e-9)
    assert any(key[0] == "whitened" for key in decompose._WISHART_CACHE)
    decompose._WISHART_CACHE.clear()
    again = torch.stack([decompose.whitened_draw(s, W.shape[0], top.layout, W.dtype, W.device) for s in seeds])
    assert torch.equal(again, N)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_krylov_top_values_equal_a_dense_eigensolve(dtype: torch.dtype) -> None:
    """The leading values of the large modules' null draws (block Krylov) are those of a dense
    eigensolve of the same draws, to about float32's rounding."""
    W, offsets = _large_unit_stack()
    M = _null_grams(W.to(dtype), offsets, [11, 12, 13])
    for m in (8, 16):
        top = decompose.top_eigenvalues(M, m, torch.Generator().manual_seed(0))
        assert top is not None and top.shape == (3, m)
        exact = torch.linalg.eigvalsh(M.double()).flip(-1)[:, :m]
        assert float(((top.double() - exact) / exact[:, :1]).abs().max()) < 1e-5, m


def test_krylov_gives_up_where_a_dense_eigensolve_is_as_cheap() -> None:
    """Too many values for the draws' width (32 of 768 on a flat null spectrum), or a matrix
    too small: None, and TopNull falls back to a dense eigensolve."""
    W, offsets = _large_unit_stack()
    assert decompose.top_eigenvalues(_null_grams(W, offsets, [11]), 32, torch.Generator().manual_seed(0)) is None
    small = torch.randn(1, 40, 40, dtype=torch.float64)
    assert decompose.top_eigenvalues(small @ small.transpose(-1, -2), 16, torch.Generator().manual_seed(0)) is None


def test_top_null_draws_have_the_distribution_of_the_full_null() -> None:
    """TopNull's draws (rebuilt from per-draw seeds) and null_spectrum's: the same distribution
    of the leading values; widening recomputes the same draws with more values."""
    W, offsets = _large_unit_stack(K=40)
    n = 60
    top = decompose.TopNull(W, offsets, 48, torch.Generator().manual_seed(1))
    few = torch.cat([top(5) for _ in range(n // 5)])
    assert few.shape == (n, decompose.NULL_WIDTH)
    full = null_spectrum(W, offsets, n, torch.Generator().manual_seed(2))
    for k in range(decompose.NULL_WIDTH):
        a, b = few[:, k], full[:, k]
        se = math.sqrt((a.var() + b.var()) / n)
        assert abs(float(a.mean() - b.mean())) < 5 * se, k
    wider = top.widen()
    assert wider is not None and wider.shape == (n, 2 * decompose.NULL_WIDTH)
    torch.testing.assert_close(wider[:, : decompose.NULL_WIDTH], few, rtol=1e-5, atol=0)
    assert top.widen() is not None and top.width == 48 and top.widen() is None


def test_the_rank_is_never_cut_by_the_values_drawn() -> None:
    """A spectrum above the null at every one of the first NULL_WIDTH values: the draws are
    widened until a value falls under the bound, and the rank is the one a full null gives."""
    W, offsets = _large_unit_stack(K=40)
    g = torch.Generator().manual_seed(3)
    probe = null_spectrum(W, offsets, 20, torch.Generator().manual_seed(4))
    bound = probe.mean(0) + 3 * probe.std(0)
    spectrum = bound[:48].clone()
    spectrum[:20] *= 2  # 20 shared values, more than a first draw holds
    spectrum[20:] *= 0.5
    top = decompose.TopNull(W, offsets, 48, g)
    r, null = parallel_analysis(spectrum, top, 20, max_rank=47, widen=top.widen)
    assert r == 20 and null.shape[1] == 32
    r_full, _ = parallel_analysis(spectrum, lambda k: null_spectrum(W, offsets, k, g)[:, :48], 20, max_rank=47)
    assert r_full == 20


def test_all_finite_is_exact_where_the_sum_overflows() -> None:
    from clair_cli.core.canonical import all_finite

    big = torch.full((4, 3), 1e308, dtype=torch.float64)  # finite entries, an infinite sum
    assert all_finite(big) and all_finite(torch.empty(0, 3)) and all_finite(torch.randn(5, 5))
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = torch.randn(64, 16, dtype=torch.float64)
        x[7, 3] = bad
        assert not all_finite(x) and not all_finite(x.float())
    mixed = torch.tensor([float("inf"), float("-inf"), 1.0])  # a NaN sum, not a finite one
    assert not all_finite(mixed)


def test_top_null_uses_krylov_on_large_draws_and_agrees_with_a_dense_eigensolve(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    W, offsets = _large_unit_stack(K=64, d=1100)  # 1024 columns: the Krylov route
    calls: list[int] = []
    real = decompose.top_eigenvalues
    monkeypatch.setattr(decompose, "top_eigenvalues", lambda *a: calls.append(1) or real(*a))
    top = decompose.TopNull(W.float(), offsets, 48, torch.Generator().manual_seed(0))
    values = top(3)
    assert calls and values.shape == (3, decompose.NULL_WIDTH)
    M = _null_grams(W.float(), offsets, top.batches[0]).double()
    exact = torch.linalg.eigvalsh(M).flip(-1)[:, : decompose.NULL_WIDTH].sqrt()
    assert float(((values.double() - exact) / exact[:, :1]).abs().max()) < 1e-5
