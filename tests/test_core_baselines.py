"""Baselines against plain dense implementations on small cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from benchmarks.synthetic import make_module
from clair_cli import methods
from clair_cli.core import baselines
from clair_cli.core.lowrank import truncate_dense, truncate_factored
from clair_cli.core.pairwise import gram

# The registered methods without audit: each applies one function of core.baselines.
BASELINES = [m.name for m in methods.REGISTRY.values() if isinstance(m, methods.Baseline)]


@pytest.fixture()
def pool():
    A, B, s, _U = make_module(K=7, ranks=[2, 4, 3, 4, 5, 1, 3], d_out=12, d_in=10, noise=0.5, seed=11)
    return A, B, s


def dense(A, B, s) -> torch.Tensor:
    return torch.stack([sk * b @ a for a, b, sk in zip(A, B, s, strict=True)])


def full_rank(A) -> int:
    return 10  # min(d_out, d_in): no truncation for the dense baselines


def test_gram_matches_dense(pool) -> None:
    A, B, s = pool
    T = dense(A, B, s).flatten(1)
    torch.testing.assert_close(gram(A, B, s), T @ T.T)


@pytest.mark.parametrize("weights", [None, [1, 2, 3, 0, 1, 1, 2]])
def test_mean_exact_and_truncated(pool, weights) -> None:
    A, B, s = pool
    w = torch.tensor(weights or [1] * 7, dtype=torch.float64)
    w = w / w.sum()
    expected = (w[:, None, None] * dense(A, B, s)).sum(0)
    res = methods.get("mean").combine(A, B, s, weights)
    torch.testing.assert_close(res.B @ res.A, expected)
    assert res.rank == sum(a.shape[0] for a, wk in zip(A, w, strict=True) if wk > 0)
    # Truncation equals the best rank-3 approximation (Eckart-Young).
    res3 = baselines.mean(A, B, s, weights, rank=3)
    u, sv, vh = torch.linalg.svd(expected)
    torch.testing.assert_close(res3.B @ res3.A, (u[:, :3] * sv[:3]) @ vh[:3])
    assert res3.info["truncation_error"] == pytest.approx(float(sv[3:].norm() / sv.norm()))


def test_fedavg_is_product_of_means() -> None:
    A, B, s, _ = make_module(K=5, d_out=12, d_in=10, seed=3)
    s = [2.0] * 5
    res = baselines.fedavg(A, B, s)
    expected = 2.0 * torch.stack(B).mean(0) @ torch.stack(A).mean(0)
    torch.testing.assert_close(res.B @ res.A, expected)
    mean = baselines.mean(A, B, s)
    assert not torch.allclose(mean.B @ mean.A, expected)  # not the mean of the updates


def test_fedavg_zero_pads_mixed_ranks(pool) -> None:
    A, B, s = pool
    res = baselines.fedavg(A, B, s)
    r = max(a.shape[0] for a in A)
    pa = sum(torch.nn.functional.pad(a, (0, 0, 0, r - a.shape[0])) for a in A) / 7
    pb = sum(sk * torch.nn.functional.pad(b, (0, r - b.shape[1])) for b, sk in zip(B, s, strict=True)) / 7
    torch.testing.assert_close(res.B @ res.A, pb @ pa)


def test_median_matches_numpy(pool) -> None:
    A, B, s = pool
    for k in (7, 6):  # odd and even pool sizes
        res = baselines.median(A[:k], B[:k], s[:k], rank=full_rank(A))
        expected = np.median(dense(A[:k], B[:k], s[:k]).numpy(), axis=0)
        np.testing.assert_allclose((res.B @ res.A).numpy(), expected, atol=1e-10)


def test_trimmed_mean_matches_scipy(pool) -> None:
    from scipy.stats import trim_mean

    A, B, s = pool
    res = baselines.trimmed_mean(A, B, s, rank=full_rank(A), trim=0.2)
    expected = trim_mean(dense(A, B, s).numpy(), 0.2, axis=0)
    np.testing.assert_allclose((res.B @ res.A).numpy(), expected, atol=1e-10)
    assert res.info["trimmed_each_side"] == 1


def reference_krum(T: torch.Tensor, f: int, m: int) -> list[int]:
    K = T.shape[0]
    flat = T.flatten(1)
    scores = []
    for i in range(K):
        d = sorted(float((flat[i] - flat[j]).square().sum()) for j in range(K) if j != i)
        scores.append(sum(d[: K - f - 2]))
    return sorted(np.argsort(scores, kind="stable")[:m].tolist())


@pytest.mark.parametrize("f,m", [(None, 1), (2, 1), (2, 3), (None, None)])
def test_krum_matches_dense(pool, f, m) -> None:
    A, B, s = pool
    T = dense(A, B, s)
    f_eff = baselines.default_byzantine(7) if f is None else f
    m_eff = 7 - f_eff if m is None else m
    res = baselines.multi_krum(A, B, s, f=f, m=m)
    assert res.selected == reference_krum(T, f_eff, m_eff)
    torch.testing.assert_close(res.B @ res.A, T[res.selected].mean(0))


def test_krum_rejects_an_outlier() -> None:
    A, B, s, _ = make_module(K=8, bad=(3,), d_out=12, d_in=10, seed=5)
    B[3] = B[3] * 50
    assert 3 not in baselines.krum(A, B, s).selected
    assert 3 not in baselines.multi_krum(A, B, s).selected


def reference_ties(T: torch.Tensor, w: torch.Tensor, density: float) -> torch.Tensor:
    kept = []
    for t in T:
        k = int(density * t.numel())
        mask = torch.zeros(t.numel(), dtype=torch.bool)
        mask[torch.topk(t.abs().flatten(), k).indices] = True
        kept.append(t * mask.view_as(t))
    X = torch.stack(kept)
    sign = torch.where(X.sum(0) >= 0, 1.0, -1.0).double()
    agree = (X.sign() == sign).double() * w[:, None, None]
    return (X * agree).sum(0) / agree.sum(0).clamp_min(1e-300)


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
@pytest.mark.parametrize("weights", [None, [1, 2, 3, 1, 1, 1, 2]])
def test_ties_matches_dense(pool, density, weights) -> None:
    A, B, s = pool
    w = torch.tensor(weights or [1] * 7, dtype=torch.float64)
    res = baselines.ties(A, B, s, weights, rank=full_rank(A), density=density)
    torch.testing.assert_close(res.B @ res.A, reference_ties(dense(A, B, s), w / w.sum(), density))


def test_dense_baselines_stream_in_row_blocks(pool, monkeypatch) -> None:
    A, B, s = pool
    whole = baselines.median(A, B, s, rank=10)
    monkeypatch.setattr(baselines, "CHUNK_ELEMENTS", 7 * 10 * 2)  # two rows per block
    chunked = baselines.median(A, B, s, rank=10)
    torch.testing.assert_close(whole.B @ whole.A, chunked.B @ chunked.A)


def test_dense_baselines_default_to_largest_input_rank(pool) -> None:
    A, B, s = pool
    res = baselines.median(A, B, s)
    assert res.rank == 5 and 0 < res.info["truncation_error"] < 1


def test_truncate_dense_randomized_matches_exact() -> None:
    g = torch.Generator().manual_seed(0)
    M = torch.randn(200, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 150, generator=g, dtype=torch.float64)
    M += 1e-3 * torch.randn(200, 150, generator=g, dtype=torch.float64)
    a, b, err = truncate_dense(M, 5)  # randomized branch (5 + 10 < 150)
    u, sv, vh = torch.linalg.svd(M)
    torch.testing.assert_close(b @ a, (u[:, :5] * sv[:5]) @ vh[:5], atol=1e-9, rtol=1e-7)
    assert err == pytest.approx(float(sv[5:].norm() / sv.norm()), rel=1e-6)
    a2, b2, _ = truncate_dense(M, 5)
    assert torch.equal(a, a2) and torch.equal(b, b2)  # deterministic


def test_truncate_factored_keeps_numerical_rank() -> None:
    A, B, s, _ = make_module(K=1, ranks=[4], noise=0.3, seed=2)
    a, b, err = truncate_factored(torch.cat([A[0], A[0]]), torch.cat([B[0], B[0]], dim=1), None)
    assert a.shape[0] == 4 and err < 1e-12
    torch.testing.assert_close(b @ a, 2 * B[0] @ A[0])


def test_registry_lists_the_baselines() -> None:
    assert set(BASELINES) == {"mean", "fedavg", "median", "trimmed-mean", "krum", "multi-krum", "ties"}


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda A, B, s: baselines.krum(A[:3], B[:3], s[:3], f=1), "K > 2f"),
        (lambda A, B, s: baselines.krum(A[:2], B[:2], s[:2]), "at least 3 adapters"),
        (lambda A, B, s: baselines.median(A, B, s, weights=[1] * 7), "does not take weights"),
        (lambda A, B, s: baselines.trimmed_mean(A, B, s, trim=0.5), "trim must be"),
        (lambda A, B, s: baselines.ties(A, B, s, density=0), "density must be"),
        (lambda A, B, s: baselines.mean(A, B, s, weights=[1, 2]), "expected 7 weights"),
        (lambda A, B, s: baselines.mean(A, B, s, rank=0), "rank must be positive"),
    ],
)
def test_bad_arguments(pool, call, match) -> None:
    A, B, s = pool
    with pytest.raises(ValueError, match=match):
        call(A, B, s)


def test_float32_inputs_stay_float32(pool) -> None:
    A, B, s = pool
    A32, B32 = [a.float() for a in A], [b.float() for b in B]
    for name in BASELINES:
        res = methods.get(name).combine(A32, B32, s)
        assert res.A.dtype == torch.float32 and res.B.dtype == torch.float32, name
        assert math.isfinite(float((res.B @ res.A).norm())), name


def test_dense_baselines_take_adapters_of_other_dtypes() -> None:
    """One reused row-block buffer (``_chunks``) was made in the first adapter's dtype and written
    with ``matmul(out=)``: a float64 adapter after a float32 one raised, where the stacked blocks
    promoted it. The buffer is in the promoted dtype, and the result as before."""
    g = torch.Generator().manual_seed(0)
    A = [torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g, dtype=torch.float64)] * 2
    B = [torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g, dtype=torch.float64)] * 2
    for merge in (baselines.median, baselines.trimmed_mean):
        got = merge(A, B, [1.0] * 4)
        want = merge([a.double() for a in A], [b.double() for b in B], [1.0] * 4)
        assert got.A.dtype == torch.float32
        assert torch.allclose((got.B @ got.A).double(), want.B @ want.A, atol=1e-5)
