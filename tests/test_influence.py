"""Centred clipping from the Gram matrix (clair_cli.core.influence) against a dense reference."""

from __future__ import annotations

import math

import pytest
import torch

from clair_cli.core.influence import centred_clipping


def _dense_reference(x: torch.Tensor, w: torch.Tensor, factor: float) -> torch.Tensor:
    """Centred clipping on explicit vectors: the geometric median by Weiszfeld, then the
    clipped steps to their fixed point."""
    v = x.mean(0)
    for _ in range(5000):
        d = (x - v).norm(dim=1).clamp_min(1e-300)
        v = (x / d[:, None]).sum(0) / (1 / d).sum()
    tau = factor * float((x - v).norm(dim=1).median())
    for _ in range(5000):
        diff = x - v
        d = diff.norm(dim=1)
        c = torch.where(d > tau, tau / d.clamp_min(1e-300), torch.ones_like(d))
        v = v + (w[:, None] * c[:, None] * diff).sum(0)
    return v


def _pool(K: int, d: int = 30, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d, generator=g, dtype=torch.float64) + 0.5 * torch.randn(K, d, generator=g, dtype=torch.float64)


def test_clean_pool_keeps_the_weights_exactly() -> None:
    x = _pool(10)
    w = torch.full((10,), 0.1, dtype=torch.float64)
    res = centred_clipping(x @ x.T, w)
    assert bool((res.clipped == 1).all()) and torch.equal(res.weights, w / w.sum())


@pytest.mark.parametrize("boost", [5.0, 50.0, 1e6])
def test_matches_the_dense_reference_and_bounds_the_outliers(boost: float) -> None:
    x = _pool(9, seed=1)
    x[7] = boost * x[7]
    x[8] = -boost * x[8]
    w = torch.linspace(1, 2, 9, dtype=torch.float64)
    w = w / w.sum()
    res = centred_clipping(x @ x.T, w, factor=2.0)
    got = res.weights @ x
    torch.testing.assert_close(got, _dense_reference(x, w, 2.0), rtol=1e-7, atol=1e-9 * float(x.norm()))
    assert float(res.weights.sum()) == pytest.approx(1.0) and bool((res.weights >= 0).all())
    assert res.clipped[7] < 1 and res.clipped[8] < 1
    # Each clipped update moves the result by at most its weight times the radius: the
    # result stays near the honest mean however large the boost.
    honest = (w[:7, None] * x[:7]).sum(0) / w[:7].sum()
    assert float((got - honest).norm()) <= float(w[7:].sum()) * res.radius * 2 + 1e-9


def test_refuses_bad_shapes_and_factors() -> None:
    with pytest.raises(ValueError, match="K x K"):
        centred_clipping(torch.eye(3), torch.ones(4) / 4)
    with pytest.raises(ValueError, match="positive"):
        centred_clipping(torch.eye(3), torch.ones(3) / 3, factor=0.0)


def _pool_with_a_3x_client() -> tuple:
    """Ten clients of one synthetic task, the last at 3x its norm (under the norm rule's 4x
    floor, so the audit lets it through), and the audit's outcome."""
    from benchmarks.synthetic import make_pool
    from clair_cli import pipeline
    from clair_cli.params import AuditParams

    mods = make_pool(M=2, K=10, spread=0.3, seed=2)
    for m in mods:
        m.B[9] = 3.0 * m.B[9]
        m.scales[:] = [1.0] * 10
    pool = pipeline.pool_from_factors(
        {f"c{k}": {m.name: (m.A[k], m.B[k], m.scales[k]) for m in mods} for k in range(10)}
    )
    outcome = pipeline.audit(pool, AuditParams())
    assert not outcome.auditor.flagged_[9]
    return pool, outcome


def test_clair_merge_clips_what_the_audit_lets_through() -> None:
    """A client at 3x the others' norm (under the norm rule's 4x floor) passes the audit; with
    --clip (and no norm bound) its pull on the merge is bounded and the report says so; with
    neither, the merge is the plain mean of the collaborators."""
    from clair_cli import pipeline
    from clair_cli.params import AuditParams, MergeOptions

    pool, outcome = _pool_with_a_3x_client()
    plain = pipeline.merge(pool, "clair", AuditParams(), options=MergeOptions(norm_bound=None), outcome=outcome)
    clipped = pipeline.merge(
        pool, "clair", AuditParams(), options=MergeOptions(clip=1.5, norm_bound=None), outcome=outcome
    )
    assert plain.weights is None and plain.clipped == {}
    assert set(clipped.clipped) == {9} and clipped.weights is not None and clipped.weights[9] < 0.1
    assert any("bounded influence" in n for n in clipped.notes)
    summary = clipped.summary()
    assert summary["clipped"] == {"9": round(clipped.clipped[9], 6)} and summary["options"]["clip"] == 1.5


def test_clip_option_is_checked() -> None:
    from clair_cli.errors import UsageError
    from clair_cli.params import MergeOptions

    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(UsageError, match="--clip"):
            MergeOptions(clip=bad)


# -- the norm bound ----------------------------------------------------------------------


def test_norm_bound_on_comparable_updates_is_the_factor_times_the_median() -> None:
    from clair_cli.core.influence import norm_bound

    norms = torch.tensor([1.0, 0.95, 1.05, 1.1, 0.9, 1.0, 3.0, 0.0], dtype=torch.float64)
    bound = norm_bound(norms.square(), 1.5)
    # The median and spread come from the non-zero norms; the spread is small, so 1.5x sets it.
    median = float(norms[:7].log().median().exp())
    assert bound.relative == 1.5 and bound.radius == pytest.approx(1.5 * median)
    want = torch.where(norms > bound.radius, bound.radius / norms.clamp_min(1e-300), torch.ones_like(norms))
    torch.testing.assert_close(bound.factors, want)
    assert bool((bound.factors[:6] == 1).all()) and float(bound.factors[6]) == pytest.approx(bound.radius / 3.0)
    assert float(bound.factors[7]) == 1.0  # a zero update has nothing to bound


def test_norm_bound_widens_with_the_collaborators_spread() -> None:
    # Updates of other recipes: log norms spread by about 0.7, so exp(3 sigma) >> 1.5: the bound
    # widens, up to its cap (twice the factor), and no update of the spread (up to 2.5x the
    # median) is bounded, while one far beyond it still is.
    from clair_cli.core.decompose import robust_center_scale
    from clair_cli.core.influence import NORM_SPREAD_CAP, NORM_SPREAD_SDS, norm_bound

    norms = torch.tensor([0.3, 0.6, 1.0, 1.6, 2.5, 4.0, 400.0], dtype=torch.float64)
    bound = norm_bound(norms.square(), 1.5)
    _, sigma = robust_center_scale(norms.log())
    assert math.exp(NORM_SPREAD_SDS * sigma) > 4 and bound.relative == NORM_SPREAD_CAP * 1.5
    assert bool((bound.factors[:6] == 1).all()) and float(bound.factors[6]) == pytest.approx(bound.radius / 400.0)
    assert float(bound.factors[6]) < 1
    # A spread under the cap widens it to exp(3 sigma) exactly.
    norms = torch.tensor([0.8, 0.9, 1.0, 1.1, 1.25, 1.4, 0.7], dtype=torch.float64)
    _, sigma = robust_center_scale(norms.log())
    assert 1.5 < math.exp(NORM_SPREAD_SDS * sigma) < 3
    assert norm_bound(norms.square(), 1.5).relative == pytest.approx(math.exp(NORM_SPREAD_SDS * sigma))


def test_a_minority_cannot_widen_the_norm_bound_past_its_cap() -> None:
    """An outside review: 10 of 30 updates placed just above the honest norms (each at 1.5x,
    under the bound themselves) doubled the MAD of the log norms and widened the bound from
    1.8x to 3.9x the honest median, so a 3x update merged at full weight. Capped at twice the
    factor, no placement of the minority widens it further; and members of weight 0 (a client
    claiming no examples) do not set it."""
    from clair_cli.core.decompose import robust_center_scale
    from clair_cli.core.influence import NORM_SPREAD_CAP, bounded_weights, norm_bound

    gen = torch.Generator().manual_seed(1)
    honest = (0.15 * torch.randn(20, generator=gen, dtype=torch.float64)).exp()
    widest = uncapped = 0.0
    for at in (1.2, 1.4, 1.55, 1.7, 1.8, 2.0, 2.5, 4.0):
        norms = torch.cat([honest, torch.full((10,), at, dtype=torch.float64)])
        widest = max(widest, norm_bound(norms.square(), 1.5).relative)
        uncapped = max(uncapped, math.exp(3 * robust_center_scale(norms.log())[1]))
    assert uncapped > 4 and widest == NORM_SPREAD_CAP * 1.5  # 4.3x without the cap
    # Zero-weight members: 20 claims of weight 0 at 100x do not move the bound or get a factor.
    norms = torch.cat([honest, torch.full((20,), 100.0, dtype=torch.float64), torch.tensor([2.5])])
    G = torch.diag(norms.square())
    weights = [1.0] * 20 + [0.0] * 20 + [1.0]
    got, bounded, relative = bounded_weights(G, list(range(41)), weights, 1.5)
    want = norm_bound(torch.cat([honest, torch.tensor([2.5])]).square(), 1.5)
    assert relative == want.relative and set(bounded) == {40} and bounded[40] == pytest.approx(float(want.factors[-1]))
    assert got is not None and all(g == 0 for g in got[20:40])


def test_norm_bound_needs_three_norms_and_a_factor_of_at_least_one() -> None:
    from clair_cli.core.influence import bounded_weights, norm_bound

    assert bool((norm_bound(torch.tensor([1.0, 100.0, 0.0]), 1.5).factors == 1).all())
    with pytest.raises(ValueError, match="at least 1"):
        norm_bound(torch.ones(5), 0.9)
    G = torch.diag(torch.tensor([1.0, 1.0, 100.0], dtype=torch.float64))
    assert bounded_weights(G, [0, 2], None, 1.5) == (None, {}, math.inf)


@pytest.mark.parametrize("boost", [1.2, 3.0, 1e6])
def test_bounded_weights_match_the_dense_reference(boost: float) -> None:
    # The merge with the bounded weights is the mean of the updates each scaled down to the
    # bound (renormalised): sum_k w_k s_k x_k / sum_k w_k s_k, computed on explicit vectors.
    from clair_cli.core.decompose import median
    from clair_cli.core.influence import bounded_weights

    x = _pool(8, seed=3)
    x[6] = boost * x[6] / x[6].norm() * x[:6].norm(dim=1).median()
    w = torch.linspace(1, 2, 8, dtype=torch.float64)
    w = w / w.sum()
    members = list(range(8))
    weights, bounded, relative = bounded_weights(x @ x.T, members, w.tolist(), 1.5)
    norms = x.norm(dim=1)
    tau = math.exp(median(norms.log())) * relative  # the mean of the middle two of eight
    s = torch.clamp(tau / norms, max=1.0)
    if not bool((s < 1).any()):
        assert weights == w.tolist() and bounded == {}
        return
    want = (w * s)[:, None] * x
    want = want.sum(0) / float((w * s).sum())
    torch.testing.assert_close(torch.tensor(weights, dtype=torch.float64) @ x, want)
    assert set(bounded) == {int(k) for k in torch.nonzero(s < 1).flatten()}
    # A bounded update moves the mean at most as one of norm tau with its weight would.
    assert float(torch.tensor(weights)[6] * norms[6]) <= float(w[6] * tau / (w * s).sum()) * (1 + 1e-12)


def test_clair_merge_norm_bound_weights_down_what_the_audit_lets_through() -> None:
    """The 3x client of the clipping test, under --norm-bound 1.5 (the default): weighted down to
    1.5x the median norm, reported, and composed with --clip; with --norm-bound off the merge is
    the plain mean."""
    from clair_cli import pipeline
    from clair_cli.params import AuditParams, MergeOptions

    pool, outcome = _pool_with_a_3x_client()
    bounded = pipeline.merge(pool, "clair", AuditParams(), options=MergeOptions(norm_bound=1.5), outcome=outcome)
    assert set(bounded.norm_bounded) == {9} and bounded.clipped == {}
    assert bounded.weights is not None and bounded.weights[9] < 0.1 / 1.5
    assert any("norm bound" in n for n in bounded.notes)
    summary = bounded.summary()
    assert summary["norm_bounded"] == {"9": round(bounded.norm_bounded[9], 6)} and "clipped" not in summary
    both = pipeline.merge(pool, "clair", AuditParams(), options=MergeOptions(norm_bound=1.5, clip=1.5), outcome=outcome)
    assert set(both.norm_bounded) == {9} and both.summary()["clipped"] is not None
    default = pipeline.merge(pool, "clair", AuditParams(), outcome=outcome)
    assert default.weights == bounded.weights and default.norm_bounded == bounded.norm_bounded
    plain = pipeline.merge(pool, "clair", AuditParams(), options=MergeOptions(norm_bound=None), outcome=outcome)
    assert plain.weights is None and plain.norm_bounded == {} and "norm_bounded" not in plain.summary()
    mean = pipeline.merge(pool, "mean", AuditParams())  # a baseline: no audit, no bound
    assert mean.options.norm_bound is None and "norm_bounded" not in mean.summary()
    for m, r in plain.modules.items():
        torch.testing.assert_close(r.B @ r.A, mean.modules[m].B @ mean.modules[m].A, rtol=0, atol=1e-4)


def test_norm_bound_option_is_checked() -> None:
    from clair_cli.errors import UsageError
    from clair_cli.params import MergeOptions

    for bad in (0.5, 0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(UsageError, match="--norm-bound"):
            MergeOptions(norm_bound=bad)
    assert MergeOptions(norm_bound=1.0).norm_bound == 1.0


def test_rounds_bound_norms_and_clip_by_default() -> None:
    from clair_cli.core.influence import CLIP_FACTOR, NORM_BOUND
    from clair_cli.federated.rounds import _round_merge_options

    options = _round_merge_options()
    assert options.norm_bound == NORM_BOUND and options.clip == CLIP_FACTOR


def test_the_whole_and_the_module_bound_are_one_bound() -> None:
    """An update above the bound over all modules and on a module counts as one at the stricter
    of the two, never at their product (an outside review: a 3.5x update merged at 0.65x the
    median norm, not 1.5x): each module's merge is the mean with weights ``min(c_whole, c_module)``,
    computed here on dense updates."""
    from clair_cli import pipeline
    from clair_cli.core.influence import norm_bound
    from clair_cli.core.merge import merged_sq_norm
    from clair_cli.params import AuditParams

    pool, outcome = _pool_with_a_3x_client()
    merged = pipeline.merge(pool, "clair", AuditParams(), outcome=outcome)
    c_whole = merged.norm_bounded[9]
    assert merged.used == list(range(10)) and c_whole < 1
    for mod in pipeline.iter_modules(pool, merged.used, dtype=torch.float64):
        sq = torch.tensor([s**2 * merged_sq_norm(a, b) for a, b, s in zip(mod.A, mod.B, mod.scales, strict=True)])
        c_module = norm_bound(sq, 1.5).factors
        effective = torch.tensor(
            [min(c_whole if k == 9 else 1.0, float(c_module[j])) for j, k in enumerate(mod.members)]
        )
        w = effective / effective.sum()
        want = sum(float(w[j]) * s * b @ a for j, (a, b, s) in enumerate(zip(mod.A, mod.B, mod.scales, strict=True)))
        res = merged.modules[mod.name]
        torch.testing.assert_close(res.B.double() @ res.A.double(), want, rtol=0, atol=2e-6 * float(want.norm()))
