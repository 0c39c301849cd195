"""The fast path (randomized subspace iteration with trimming) against the convex path."""

from __future__ import annotations

import pytest
import torch

from benchmarks.synthetic import flagged, make_module, make_pool
from clair_cli.core import audit
from clair_cli.core.audit import ClairAuditor
from clair_cli.core.decompose import normalise_blocks, rotate_blocks
from clair_cli.core.fastpath import FastDecomposer, _stacked, stack_gram, stacked_factors, top_singular
from clair_cli.core.pairwise import factor_grams
from clair_cli.core.reduction import reduce_module


def test_stacked_factors_reproduce_the_gram_of_the_stack() -> None:
    A, B, s, _ = make_module(K=5, ranks=[2, 4, 3, 4, 1], noise=0.3, seed=1)
    for side in ("out", "in"):
        W, offsets = stacked_factors(A, B, s, side)
        stack = reduce_module(A, B, s, side=side)
        dense = torch.cat([stack.dense_block(k) for k in range(5)], dim=1)
        torch.testing.assert_close(W @ W.T, dense @ dense.T)
        assert offsets == (0, 2, 6, 9, 13, 14)


def test_top_singular_matches_svd() -> None:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(300, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 400, generator=g, dtype=torch.float64)
    W += 0.01 * torch.randn(300, 400, generator=g, dtype=torch.float64)
    U, s = top_singular(W, 6, g)
    U_ref, s_ref, _ = torch.linalg.svd(W)
    torch.testing.assert_close(s, s_ref[:6], rtol=1e-8, atol=0)
    torch.testing.assert_close(U @ U.T, U_ref[:, :6] @ U_ref[:, :6].T, atol=1e-8, rtol=0)


@pytest.mark.parametrize("ranks", [[3, 3, 3, 3, 3], [2, 4, 3, 4, 1]])
def test_the_stack_gram_comes_from_the_factor_grams(ranks: list[int]) -> None:
    """W^T W of the unit-norm stack from the shared side's factor Gram (blocks of one width are
    batched, others go through a block-diagonal product), on both sides."""
    A, B, s, _ = make_module(K=5, ranks=ranks, noise=0.3, seed=4)
    A[2] = torch.zeros_like(A[2])  # a zero update: its block stays zero
    a_gram, b_gram = factor_grams(A, B)
    for side, gram in (("out", b_gram), ("in", a_gram)):
        W, offsets, ts = _stacked(A, B, s, side)
        W, norms = normalise_blocks(W, offsets)
        torch.testing.assert_close(stack_gram(gram, ts, norms), W.T @ W, atol=1e-12, rtol=1e-10)


def test_the_stack_gram_of_factors_wider_than_their_other_side() -> None:
    """Non-canonical factors: ranks above the other side's width (T_k not square) and blocks of
    one width but different ranks."""
    g = torch.Generator().manual_seed(7)
    for ranks, d_in in (([8, 8, 8], 4), ([3, 6, 8], 5), ([2, 4, 3], 40)):
        A = [torch.randn(r, d_in, generator=g, dtype=torch.float64) for r in ranks]
        B = [torch.randn(30, r, generator=g, dtype=torch.float64) for r in ranks]
        s = [0.5, 1.0, 2.0]
        W, offsets, ts = _stacked(A, B, s, "out")
        W, norms = normalise_blocks(W, offsets)
        torch.testing.assert_close(stack_gram(factor_grams(A, B)[1], ts, norms), W.T @ W, atol=1e-12, rtol=1e-10)
        FastDecomposer(rank=2).fit(A, B, s, "out", gram=factor_grams(A, B)[1])  # runs


def test_a_fixed_rank_above_the_shared_one_keeps_an_orthonormal_subspace() -> None:
    A, B, s, _ = make_module(K=40, r=3, d_out=256, d_in=64, noise=0.05, seed=8, dtype=torch.float32)
    gram = factor_grams(A, B)[1]
    for rank in (10, 30):
        for other in (None, factor_grams(A, B)[0]):
            U = FastDecomposer(rank=rank).fit(A, B, s, "out", gram=gram, other_gram=other).subspace_
            torch.testing.assert_close(U.T @ U, torch.eye(rank), atol=1e-5, rtol=0)


@pytest.mark.parametrize("other", [False, True], ids=["frames by QR", "frames from the other Gram"])
@pytest.mark.parametrize(
    "module",
    [
        dict(K=24, r=3, d_out=160, d_in=64, noise=0.5, bad=(3, 11), seed=5),
        dict(K=30, r=2, ranks=[2, 4, 3, 4, 1, 6] * 5, d_out=160, d_in=64, noise=0.3, bad=(7,), seed=9),  # mixed ranks
        dict(K=20, r=3, d_out=160, d_in=64, noise=0.0, bad=(2,), seed=3),  # exactly low rank: honest shares at 0
    ],
    ids=["one rank", "mixed ranks", "noiseless"],
)
def test_the_fast_path_gives_the_same_results_from_the_factor_grams(module: dict, other: bool) -> None:
    """Without factor Grams the stack W is formed; with them the fit never forms it (rank,
    spectrum, trimming, shares and the subspace from W^T W): the same decisions and values, on
    both sides, with a zero update among the adapters."""
    A, B, s, _ = make_module(**module)
    A[5] = torch.zeros_like(A[5])
    a_gram, b_gram = factor_grams(A, B)
    for side, gram, other_gram in (("out", b_gram, a_gram), ("in", a_gram, b_gram)):
        plain = FastDecomposer(random_state=1).fit(A, B, s, side)
        via = FastDecomposer(random_state=1).fit(A, B, s, side, gram=gram, other_gram=other_gram if other else None)
        assert via.rank_ == plain.rank_ and torch.equal(via.collaborators_, plain.collaborators_)
        assert plain.rank_ > 0 or side == "in"  # the pools share output directions only
        assert not bool(via.collaborators_[5]) and float(via.off_subspace_[5]) == 0.0
        # The leading values (those at 0 in exact arithmetic come out of W^T W at sqrt(eps), 1e-8
        # in float64); the tail of 48 probed with 10 extra vectors is an estimate on either route
        # (this one applies W^T W once more).
        torch.testing.assert_close(via.spectrum_[:10], plain.spectrum_[:10], rtol=1e-8, atol=1e-7)
        torch.testing.assert_close(via.spectrum_, plain.spectrum_, rtol=1e-2, atol=1e-7)
        torch.testing.assert_close(via.off_subspace_, plain.off_subspace_, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(via.norms_, plain.norms_, rtol=1e-10, atol=1e-12)
        U, V = via.subspace_, plain.subspace_
        torch.testing.assert_close(U.T @ U, torch.eye(U.shape[1], dtype=U.dtype), atol=1e-12, rtol=0)
        torch.testing.assert_close(U @ U.T, V @ V.T, atol=1e-8, rtol=0)


def test_a_rank_above_the_columns_kept_fits_the_directions_there_are() -> None:
    """A trimming round that keeps fewer columns than the rank (9 rank-1 adapters on 9 of 12
    shared directions kept, 8 rank-16 ones carrying all 12 trimmed), a fixed rank above the summed
    ranks, and a gate's few references: the subspace spans the directions there are, as when W
    is formed (found by review: the factor-Gram route raised a shape mismatch)."""
    g = torch.Generator().manual_seed(2)
    d, common = 512, 12
    U = torch.linalg.qr(torch.randn(d, common, generator=g, dtype=torch.float64))[0]
    A, B = [], []
    for k in range(9):
        B.append(U[:, k : k + 1] * 2)
        A.append(torch.randn(1, 96, generator=g, dtype=torch.float64))
    for _ in range(8):
        own = torch.randn(d, 16 - common, generator=g, dtype=torch.float64)
        B.append(torch.cat([U * 3, own / own.norm(dim=0) * 3], 1))
        A.append(torch.linalg.qr(torch.randn(96, 16, generator=g, dtype=torch.float64))[0].T)
    K = len(A)
    auditor = ClairAuditor().fit([audit.ModuleInput("layers.0.q_proj", list(range(K)), A, B, [1.0] * K)], K)
    assert auditor.shared_rank_ == {"layers.0.q_proj": 12} and flagged(auditor) == set(range(9, 17))
    mods = make_pool(M=1, K=4, ranks=[3] * 4, d_out=64, d_in=32)
    for side in ("out", "in", "both"):
        result = ClairAuditor(solver="fast", rank=13, side=side).fit(mods, 4).module_results_[0]
        assert result.subspace.shape[1] <= 12
    pool = make_pool(M=1, K=30, noise=0.2, d_out=96)
    ClairAuditor(solver="fast", rank=40).fit(pool, 30, reference=[27, 28, 29])


def test_the_factor_gram_route_in_float32_keeps_the_formed_route_s_decisions() -> None:
    """The audit's working precision: shares from W^T W lose digits only where they are near 0."""
    A, B, s, _ = make_module(K=40, r=3, d_out=256, d_in=64, noise=0.2, bad=(4, 17), seed=8, dtype=torch.float32)
    a_gram, b_gram = factor_grams(A, B)
    plain = FastDecomposer().fit(A, B, s, "out")
    via = FastDecomposer().fit(A, B, s, "out", gram=b_gram, other_gram=a_gram)
    assert via.rank_ == plain.rank_ == 3 and torch.equal(via.collaborators_, plain.collaborators_)
    assert set(torch.nonzero(~via.collaborators_).flatten().tolist()) == {4, 17}
    torch.testing.assert_close(via.off_subspace_, plain.off_subspace_, rtol=1e-4, atol=1e-5)
    # The leading values; the tail of a randomized iteration is an estimate on either route.
    torch.testing.assert_close(via.spectrum_[:8], plain.spectrum_[:8], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ranks", [[3] * 6, [2, 4, 3, 4, 1, 5]])
def test_block_spectra_from_the_gram_are_the_blocks_singular_values(ranks: list[int]) -> None:
    from clair_cli.core import decompose

    A, B, s, _ = make_module(K=6, ranks=ranks, noise=0.3, seed=2)
    W, offsets = stacked_factors(A, B, s, "out")
    W = normalise_blocks(W, offsets)[0]
    direct = decompose._block_spectra(W, offsets)
    via = decompose.block_spectra_from_gram(W.T @ W, offsets, W.shape[0])
    assert [(ks, width) for ks, width, _ in via] == [(ks, width) for ks, width, _ in direct]
    for (_, _, a), (_, _, b) in zip(via, direct, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_rotated_blocks_keep_their_singular_values() -> None:
    A, B, s, _ = make_module(K=4, ranks=[2, 3, 3, 2], noise=0.3, seed=2)
    W, offsets = stacked_factors(A, B, s, "out")
    R = rotate_blocks(W, offsets, torch.Generator().manual_seed(0))
    for k in range(4):
        blk, rot = W[:, offsets[k] : offsets[k + 1]], R[:, offsets[k] : offsets[k + 1]]
        torch.testing.assert_close(torch.linalg.svdvals(rot), torch.linalg.svdvals(blk))
    assert not torch.allclose(R, W)


CASES = {
    "random directions": dict(M=2, K=40, bad=(3, 17, 30), noise=0.2, d_out=96, d_in=64),
    "40 % contaminated": dict(M=1, K=30, bad=tuple(range(0, 30, 5)) + tuple(range(1, 30, 5)), noise=0.1, d_out=96),
    "one module only": dict(M=3, K=30, bad=(4, 9), bad_modules=(1,), noise=0.2, d_out=96),
    "mixed ranks": dict(M=2, K=24, bad=(5, 20), ranks=[2, 4, 8, 4, 6, 3] * 4, noise=0.1, d_out=96),
    "clean": dict(M=2, K=40, noise=0.3, d_out=96),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fast_path_gives_the_convex_verdicts(case) -> None:
    mods = make_pool(**CASES[case])
    K = CASES[case]["K"]
    convex = ClairAuditor(solver="convex").fit(mods, K)
    fast = ClairAuditor(solver="fast").fit(mods, K)
    assert flagged(fast) == flagged(convex) == set(CASES[case].get("bad", ()))
    assert fast.shared_rank_ == convex.shared_rank_
    assert all(r.solver == "fast" for r in fast.module_results_)
    for rf, rc in zip(fast.module_results_, convex.module_results_, strict=True):
        # Same subspace up to the noise-level differences of the two estimators.
        Pf, Pc = rf.subspace @ rf.subspace.T, rc.subspace @ rc.subspace.T
        assert float((Pf - Pc).norm()) < 0.1


def test_fast_path_recovers_noiseless_subspace_exactly() -> None:
    A, B, s, U = make_module(K=50, bad=(1, 2, 3, 10, 20), r=3, d_out=80, seed=7)
    dec = FastDecomposer().fit(A, B, s)
    assert dec.rank_ == 3 and dec.converged_
    torch.testing.assert_close(dec.subspace_ @ dec.subspace_.T, U @ U.T, atol=1e-8, rtol=0)
    assert set(torch.nonzero(~dec.collaborators_).flatten().tolist()) == {1, 2, 3, 10, 20}


def test_fast_path_independent_adapters_share_nothing() -> None:
    for seed in range(4):
        mods = make_pool(M=2, K=40, kind="independent", seed=seed, d_out=96)
        auditor = ClairAuditor(solver="fast").fit(mods, 40)
        assert not auditor.shared_structure_ and not flagged(auditor)


def test_auto_switches_on_total_rank(monkeypatch) -> None:
    mods = make_pool(M=1, K=12, noise=0.1)
    assert ClairAuditor().fit(mods, 12).module_results_[0].solver == "convex"
    monkeypatch.setattr(audit, "FAST_PATH_MIN_SUM_RANK", 47)  # 12 adapters x rank 4 = 48
    # From a stream (no refit: a subspace refitted without a flagged adapter sums to 44).
    assert ClairAuditor().fit(iter(mods), 12).module_results_[0].solver == "fast"


def test_fast_path_is_deterministic() -> None:
    mods = make_pool(M=1, K=30, bad=(2,), noise=0.3, d_out=96)
    a = ClairAuditor(solver="fast", random_state=3).fit(mods, 30)
    b = ClairAuditor(solver="fast", random_state=3).fit(mods, 30)
    assert a.scores_ == b.scores_


def test_bad_solver_name() -> None:
    with pytest.raises(ValueError, match="solver must be"):
        ClairAuditor(solver="dense").fit(make_pool(M=1, K=5), 5)  # type: ignore[arg-type]


def test_large_modules_read_the_null_s_leading_values_only_and_find_the_same_rank(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A module of 768 summed ranks takes TopNull's route (leading values by block Krylov); the
    exact route's dense eigensolves give the same rank, collaborators and shares."""
    from clair_cli.core import fastpath

    A, B, s, _ = make_module(K=48, r=3, ranks=[16] * 48, d_out=1024, d_in=256, noise=0.5, bad=(5,), seed=6)
    used: list[int] = []
    real = fastpath.TopNull
    monkeypatch.setattr(fastpath, "TopNull", lambda *a: used.append(1) or real(*a))
    fast = FastDecomposer(random_state=2).fit(A, B, s, "out")
    assert used and fast.null_spectrum_ is not None and fast.null_spectrum_.shape[1] < 48
    monkeypatch.setattr(fastpath, "KRYLOV_MIN_N", 10**6)
    dense = FastDecomposer(random_state=2).fit(A, B, s, "out")
    assert dense.null_spectrum_ is not None and dense.null_spectrum_.shape[1] == 48
    assert fast.rank_ == dense.rank_ > 0 and torch.equal(fast.collaborators_, dense.collaborators_)
    torch.testing.assert_close(fast.off_subspace_, dense.off_subspace_, rtol=1e-4, atol=1e-5)
