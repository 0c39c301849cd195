"""Centred clipping from the Gram matrix (clair_cli.core.influence) against a dense reference."""

from __future__ import annotations

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


def test_clair_merge_clips_what_the_audit_lets_through() -> None:
    """A client at 3x the others' norm (under the norm rule's 4x floor) passes the audit; with
    --clip its pull on the merge is bounded and the report says so; without, the merge is the
    plain mean of the collaborators."""
    from benchmarks.synthetic import make_pool
    from clair_cli import pipeline
    from clair_cli.params import AuditParams, MergeOptions

    mods = make_pool(M=2, K=10, spread=0.3, seed=2)
    for m in mods:
        m.B[9] = 3.0 * m.B[9]
        m.scales[:] = [1.0] * 10
    pool = pipeline.pool_from_factors(
        {f"c{k}": {m.name: (m.A[k], m.B[k], m.scales[k]) for m in mods} for k in range(10)}
    )
    outcome = pipeline.audit(pool, AuditParams())
    assert not outcome.auditor.flagged_[9]
    plain = pipeline.merge(pool, "clair", AuditParams(), outcome=outcome)
    clipped = pipeline.merge(pool, "clair", AuditParams(), options=MergeOptions(clip=1.5), outcome=outcome)
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
