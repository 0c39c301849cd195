"""Every verdict and merge is a function of the updates alone, not of how they are factored.

An attacker can send any factorisation of its update: ``(c B, A / c)`` over the dtype's
range, ``(B M, M^{-1} A)`` for an ill-conditioned ``M``, extra zero or negligible directions
(rank inflation), a scale moved between ``alpha`` and the factors. None of it may change a
flag, and no score may move beyond rounding.
"""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.synthetic import make_pool
from clair_cli.core.audit import ClairAuditor, ModuleInput
from clair_cli.core.canonical import canonical_factors


def _refactor(mods: list[ModuleInput], k: int, how: str, seed: int = 0) -> list[ModuleInput]:
    """The pool with adapter ``k``'s factors changed by ``how``; every update unchanged."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for m in mods:
        A, B, s = list(m.A), list(m.B), list(m.scales)
        a, b = A[k].double(), B[k].double()
        r = a.shape[0]
        if how.startswith("scale:"):
            c = float(how.split(":")[1])
            a, b = a / c, b * c
        elif how == "ill-conditioned":
            # M = Q diag(1e-4 .. 1e4) Q'^T: condition number 1e8 (float64 holds B M and M^-1 A to
            # about 1e-8 of the update; at 1e14 the stored update itself would differ by 1 %).
            q1 = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64))[0]
            q2 = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64))[0]
            d = torch.logspace(-4, 4, r, dtype=torch.float64)
            M, M_inv = q1 @ torch.diag(d) @ q2.T, q2 @ torch.diag(1 / d) @ q1.T
            a, b = M_inv @ a, b @ M
        elif how == "rank-inflation":
            # 12 extra directions: zero rows of A against random columns of B, and the reverse.
            extra_b = torch.randn(b.shape[0], 6, generator=g, dtype=torch.float64)
            extra_a = torch.randn(6, a.shape[1], generator=g, dtype=torch.float64)
            a = torch.cat([a, torch.zeros(6, a.shape[1], dtype=torch.float64), extra_a])
            b = torch.cat([b, extra_b, torch.zeros(b.shape[0], 6, dtype=torch.float64)], dim=1)
        elif how == "scale-in-alpha":
            a, s[k] = a * s[k] * 1e9, 1e-9
        else:
            raise ValueError(how)
        A[k], B[k] = a.to(m.A[k].dtype), b.to(m.B[k].dtype)
        out.append(ModuleInput(m.name, list(m.members), A, B, s))
    return out


def _audit(mods: list[ModuleInput], K: int, **kw) -> ClairAuditor:
    return ClairAuditor(**kw).fit(mods, K)


POOLS = {
    # 16 clients sharing a subspace, one other-direction client and one boosted client.
    "contaminated": dict(M=3, K=16, bad=(14,), spread=0.5, seed=3),
    "clean": dict(M=2, K=12, spread=0.8, seed=5),
}
MOVES = ["scale:1e18", "scale:1e-18", "scale:1e6", "scale:1e160", "ill-conditioned", "rank-inflation", "scale-in-alpha"]


@pytest.fixture(scope="module")
def pools() -> dict[str, tuple[list[ModuleInput], int, ClairAuditor]]:
    out = {}
    for name, kw in POOLS.items():
        mods = make_pool(**kw)
        if name == "contaminated":
            for m in mods:
                m.B[15] = m.B[15] * 8.0  # a boosted client
        out[name] = (mods, kw["K"], _audit(mods, kw["K"]))
    return out


@pytest.mark.parametrize("pool", sorted(POOLS))
@pytest.mark.parametrize("how", MOVES)
def test_refactored_adapter_changes_no_verdict(pools, pool: str, how: str) -> None:
    mods, K, base = pools[pool]
    for k in (0, K - 1):  # an honest adapter, and the last (boosted in the contaminated pool)
        moved = _audit(_refactor(mods, k, how), K)
        assert moved.flagged_ == base.flagged_, (how, k)
        for s0, s1 in zip(base.scores_, moved.scores_, strict=True):
            assert math.isclose(s0, s1, rel_tol=1e-6, abs_tol=1e-6), (how, k, s0, s1)


def test_canonical_factors_are_one_per_update() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 30, generator=g, dtype=torch.float64)
    b = torch.randn(20, 4, generator=g, dtype=torch.float64)
    a0, b0 = canonical_factors(a, b, 2.0)
    for c in (1e-300, 1e-200, 1e-150, 1e-18, 1.0, 1e18, 1e150, 1e200, 1e300):  # Gram products would overflow
        a1, b1 = canonical_factors(a / c, b * c, 2.0)
        torch.testing.assert_close(b1 @ a1, b0 @ a0, rtol=0, atol=1e-13 * float((b0 @ a0).norm()))
        # the same factors up to the sign of each singular pair
        signs = torch.sign((b1 * b0).sum(0))
        torch.testing.assert_close(b1 * signs, b0, rtol=1e-10, atol=1e-12)
    # balanced: equal norms of the two factors; orthogonal columns and rows
    torch.testing.assert_close(a0.norm(), b0.norm())
    gram = b0.T @ b0
    torch.testing.assert_close(gram, torch.diag(gram.diagonal()), atol=1e-12, rtol=0)


def test_canonical_factors_drop_empty_directions_and_keep_one() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.cat([torch.randn(2, 10, generator=g, dtype=torch.float64), torch.zeros(3, 10, dtype=torch.float64)])
    b = torch.randn(8, 5, generator=g, dtype=torch.float64)
    a1, b1 = canonical_factors(a, b, 1.0)
    assert a1.shape == (2, 10) and b1.shape == (8, 2)
    torch.testing.assert_close(b1 @ a1, b @ a)
    az, bz = canonical_factors(torch.zeros(3, 10), torch.zeros(8, 3), 1.0)
    assert az.shape == (1, 10) and not bool((bz @ az).any())


def test_canonical_factors_refuse_non_finite() -> None:
    with pytest.raises(ValueError, match="finite"):
        canonical_factors(torch.full((2, 3), math.nan), torch.ones(4, 2), 1.0)


def test_canonical_factors_refuse_finite_factors_of_an_infinite_update() -> None:
    """Finite float64 factors whose product is past float64's range gave NaN factors, silently (the
    SVD of an infinite core); a scale that overflows the product likewise."""
    big = torch.full((2, 8), 1e160, dtype=torch.float64)
    with pytest.raises(ValueError, match="range"):
        canonical_factors(big, big.T.clone(), 1.0)
    with pytest.raises(ValueError, match="range"):
        canonical_factors(big * 1e-100, big.T * 1e-100, 1e300)
    a, b = canonical_factors(big * 1e-100, big.T.clone(), 1.0)  # 1e220 per entry: in range
    assert bool(a.isfinite().all() and b.isfinite().all())


def test_merge_is_invariant_to_factoring() -> None:
    """The exact mean (clair's default merge and ``mean``) of a pool with one adapter
    re-factored by 1e18 equals that of the pool as given."""
    from clair_cli import pipeline
    from clair_cli.params import AuditParams

    mods = make_pool(M=2, K=8, spread=0.5, seed=11)

    def pool_of(ms: list[ModuleInput]):
        return pipeline.pool_from_factors(
            {f"a{k}": {m.name: (m.A[k], m.B[k], m.scales[k]) for m in ms} for k in range(8)}
        )

    dense = []
    for ms in (mods, _refactor(mods, 3, "scale:1e18")):
        merged = pipeline.merge(pool_of(ms), "mean", AuditParams())
        dense.append({n: r.B.double() @ r.A.double() for n, r in merged.modules.items()})
    for n in dense[0]:
        torch.testing.assert_close(dense[1][n], dense[0][n], rtol=1e-5, atol=1e-7)


def test_canonical_module_equals_one_update_at_a_time() -> None:
    """The module's adapters are factored in batches of one shape: the same factors, bit for
    bit, as :func:`canonical_factors` on each (mixed ranks, a zero update, a dropped direction)."""
    from clair_cli.core.canonical import canonical_module

    g = torch.Generator().manual_seed(0)
    ranks = [4, 4, 2, 4, 2, 4, 4]
    A = [torch.randn(r, 48, generator=g) for r in ranks]
    B = [torch.randn(40, r, generator=g) for r in ranks]
    B[1] = torch.zeros(40, 4)
    B[3][:, 0] = 0.0
    scales = [0.5 + k for k in range(len(ranks))]
    cA, cB, cs = canonical_module(A, B, scales)
    assert cs == [1.0] * len(ranks)
    for k in range(len(ranks)):
        a, b = canonical_factors(A[k], B[k], scales[k])
        assert torch.equal(cA[k], a) and torch.equal(cB[k], b)
    # Factors of a real model's width, where batched and single Gram products could differ.
    A = [torch.randn(16, 2048, generator=g) for _ in range(3)]
    B = [torch.randn(2048, 16, generator=g) for _ in range(3)]
    cA, cB, _ = canonical_module(A, B, [2.0] * 3)
    for k in range(3):
        a, b = canonical_factors(A[k], B[k], 2.0)
        assert torch.equal(cA[k], a) and torch.equal(cB[k], b)


def test_triangular_factors_take_cholesky_only_where_it_is_accurate() -> None:
    """Well-conditioned tall factors: ``R`` from the Cholesky factor of the Gram matrix (``Q``
    left implicit), Householder's ``R`` up to the signs of its rows. Ill-conditioned,
    rank-deficient and wide ones: Householder's QR, ``Q`` formed."""
    from clair_cli.core.canonical import CHOLESKY_QR_MAX_CONDITION, triangular_factors

    g = torch.Generator().manual_seed(2)
    X = torch.randn(4, 300, 8, generator=g, dtype=torch.float64)
    X[1] = X[1] @ torch.diag(torch.logspace(-2, 2, 8, dtype=torch.float64))  # condition 1e4
    X[2, :, 5] = 0.0  # rank-deficient (rank inflation)
    Q, R = triangular_factors(X)
    assert Q[0] is None and Q[3] is None and all(Q[k] is not None for k in (1, 2))
    assert float(torch.linalg.cond(X[1])) > CHOLESKY_QR_MAX_CONDITION
    _, Rh = torch.linalg.qr(X, mode="reduced")
    for k in (0, 3):
        signs = torch.sign(Rh[k].diagonal())
        torch.testing.assert_close(R[k], signs[:, None] * Rh[k], rtol=0, atol=1e-12 * float(R[k].abs().max()))
    for k in (1, 2):
        torch.testing.assert_close(Q[k] @ R[k], X[k], rtol=0, atol=1e-12 * float(X[k].abs().max()))
    huge = X[:1] * 1e-3
    huge[0, 0, 0] = 1.5 * 2.0**1023  # 2^1024, the power of two that would scale it, overflows
    Qx, Rx = triangular_factors(huge)
    assert Qx[0] is not None and Rx.shape == (1, 8, 8)  # Householder's QR, as before the Cholesky route
    Qw, Rw = triangular_factors(torch.randn(3, 5, 8, generator=g, dtype=torch.float64))
    assert all(q is not None and q.shape == (5, 5) for q in Qw) and Rw.shape == (3, 5, 8)


def test_canonical_factors_agree_across_the_two_routes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Canonical factors by the Cholesky route and by Householder's QR (forced) are the same
    to 1e-12 of the update, up to the sign of each singular pair."""
    from clair_cli.core import canonical

    g = torch.Generator().manual_seed(3)
    A = [torch.randn(8, 200, generator=g, dtype=torch.float64) for _ in range(5)]
    spread = torch.diag(torch.logspace(0, 2.9, 8, dtype=torch.float64))  # condition about 800, under the bound
    B = [torch.randn(150, 8, generator=g, dtype=torch.float64) @ spread for _ in range(5)]
    fast = canonical.canonical_module(A, B, [2.0] * 5)
    monkeypatch.setattr(canonical, "CHOLESKY_QR_MAX_CONDITION", 0.5)  # every matrix by Householder's QR
    slow = canonical.canonical_module(A, B, [2.0] * 5)
    for a0, b0, a1, b1 in zip(slow[0], slow[1], fast[0], fast[1], strict=True):
        size = float((b0 @ a0).norm())
        signs = torch.sign((b1 * b0).sum(0))
        torch.testing.assert_close(b1 * signs, b0, rtol=0, atol=1e-12 * size**0.5)
        torch.testing.assert_close(signs[:, None] * a1, a0, rtol=0, atol=1e-12 * size**0.5)


def test_content_keys_are_equal_exactly_for_equal_factors() -> None:
    """Keys read a sample of each factor's entries; adapters whose samples agree but whose
    factors differ elsewhere still get different keys, and identical ones equal keys."""
    from clair_cli.core.order import SAMPLE_STRIDE, content_keys

    g = torch.Generator().manual_seed(4)
    a = torch.randn(4, 300, generator=g, dtype=torch.float64)
    b = torch.randn(200, 4, generator=g, dtype=torch.float64)
    b2 = b.clone()
    b2.view(-1)[1] += 1.0  # an entry the sample skips
    assert 1 % SAMPLE_STRIDE != 0
    keys = content_keys([a, a, a, a.clone()], [b, b2, b, b.clone()], [1.0, 1.0, 2.0, 1.0])
    assert keys[0] != keys[1] and keys[0] != keys[2] and keys[0] == keys[3]
    assert len(set(keys)) == 3


@pytest.mark.parametrize("dtype, caught, overflows", [(torch.float32, 1e19, 1e20), (torch.float64, 1e150, 1e155)])
def test_an_update_too_large_for_the_working_precision_is_refused_not_passed(
    dtype: torch.dtype, caught: float, overflows: float
) -> None:
    """Up to where the Gram products overflow, a boosted adapter is flagged; past it the audit
    refuses the module, naming the adapter (found by review: every statistic turned NaN and the
    boosted adapter passed). The command line's readers refuse such factors long before."""
    for boost in (caught, overflows):
        pool = make_pool(M=1, K=30, r=2, d_out=64, d_in=48, noise=0.2, bad=(7,), seed=1)
        pool[0].B[3] = pool[0].B[3] * boost
        auditor = ClairAuditor(solver="fast", dtype=dtype)
        if boost == caught:
            assert {k for k, f in enumerate(auditor.fit(pool, 30).flagged_) if f} == {3, 7}
        else:
            with pytest.raises(ValueError, match=r"adapters \[3\] are too large for float"):
                auditor.fit(pool, 30)


def test_fedavg_of_float64_factors_averages_them_as_given(tmp_path) -> None:
    """FedAvg is defined on the factors: float64 factors are cast as they are, not balanced
    first (found by review: balanced factors are rotated, and FedAvg of the same adapters in
    float64 and float32 differed by the update's own size)."""
    from clair_cli import pipeline
    from clair_cli.io.sources import open_adapters
    from clair_cli.params import AuditParams
    from tests.helpers import MODULES, lora_config, random_factors, write_adapter

    merged = {}
    for dtype in (torch.float32, torch.float64):
        for k in range(4):
            g = torch.Generator().manual_seed(k)
            tensors = {
                key: torch.randn(v.shape, generator=g, dtype=torch.float64).to(dtype)
                for key, v in random_factors(MODULES, seed=k).items()
            }
            write_adapter(tmp_path / str(dtype) / f"a{k}", tensors, lora_config())
        pool = pipeline.build_pool(open_adapters([str(tmp_path / str(dtype))]), method="fedavg")
        merged[dtype] = {
            n: r.B.double() @ r.A.double() for n, r in pipeline.merge(pool, "fedavg", AuditParams()).modules.items()
        }
    for n, single in merged[torch.float32].items():
        assert float((merged[torch.float64][n] - single).norm() / single.norm()) < 1e-5, n


def test_the_content_order_never_sorts_on_nan() -> None:
    """A scale of 0 with factors whose squares overflow: the size is 0, not 0 x inf = NaN, so the
    order stays a function of the content alone."""
    import itertools

    from clair_cli.core.order import content_order, magnitude

    big = torch.full((4, 8), 1e200, dtype=torch.float64)
    assert magnitude(big, big.T, 0.0) == 0.0
    A = [big, torch.ones(4, 8, dtype=torch.float64), big * 2, torch.ones(4, 8, dtype=torch.float64) * 3]
    B = [a.T.clone() for a in A]
    scales = [0.0, 1.0, 1.0, 1.0]
    orders = set()
    for perm in itertools.permutations(range(4)):
        order = content_order([A[j] for j in perm], [B[j] for j in perm], [scales[j] for j in perm])
        orders.add(tuple(perm[j] for j in order))
    assert len(orders) == 1
