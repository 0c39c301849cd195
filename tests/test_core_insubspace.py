"""Rule 5: in-subspace components against a dense reference, the geometric median, and the verdicts."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.synthetic import flagged, make_module, make_pool
from clair_cli.core.audit import ClairAuditor, VerdictOptions
from clair_cli.core.insubspace import centre_cosines, centre_distances, centre_weights, in_subspace_gram


@pytest.mark.parametrize("side", ["out", "in"])
def test_in_subspace_gram_matches_dense(side: str) -> None:
    A, B, s, _ = make_module(K=6, ranks=[2, 4, 3, 4, 1, 2], d_out=20, d_in=16, noise=0.3, seed=4)
    d = 20 if side == "out" else 16
    U = torch.linalg.qr(torch.randn(d, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64))[0]
    P = U @ U.T
    X = [(P @ (sk * b @ a)) if side == "out" else ((sk * b @ a) @ P) for a, b, sk in zip(A, B, s, strict=True)]
    dense = torch.stack([torch.stack([(x * y).sum() for y in X]) for x in X])
    torch.testing.assert_close(in_subspace_gram(A, B, s, U, side), dense)


def _weiszfeld(points: torch.Tensor, iters: int = 5000) -> torch.Tensor:
    m = points.mean(0)
    for _ in range(iters):
        w = 1 / (points - m).norm(dim=1).clamp_min(1e-15)
        m = (w[:, None] * points).sum(0) / w.sum()
    return m


def test_centre_is_the_geometric_median_and_ignores_a_minority() -> None:
    g = torch.Generator().manual_seed(0)
    points = torch.randn(15, 7, generator=g, dtype=torch.float64) * 0.3 + 1.0
    points[:6] = torch.randn(6, 7, generator=g, dtype=torch.float64) * 50  # 40 % far away
    dist, w = centre_distances(points @ points.T)
    ref = _weiszfeld(points)
    torch.testing.assert_close(w @ points, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(dist, (points - ref).norm(dim=1), atol=1e-6, rtol=0)
    assert float((w @ points - 1.0).abs().max()) < 0.5  # the majority decides where the centre is


def test_centre_on_a_subset_only_uses_that_subset() -> None:
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]], dtype=torch.float64)
    fit_on = torch.tensor([True, True, True, False])
    dist, w = centre_distances(points @ points.T, fit_on)
    assert w[3] == 0
    assert float(dist[3]) > 100


CONSENSUS = dict(M=4, K=20, noise=0.3, d_out=64, d_in=48, spread=0.3)


def _flip(mods, ks):
    for m in mods:
        for k in ks:
            m.B[k] = -m.B[k]


@pytest.mark.parametrize("seed", [0, 1, 3])
def test_sign_flipped_updates_are_caught_where_clients_agree(seed: int) -> None:
    mods = make_pool(seed=seed, **CONSENSUS)
    _flip(mods, (5, 6))
    aud = ClairAuditor().fit(mods, 20)
    assert flagged(aud) == {5, 6}
    assert all(any(r.kind == "in_subspace" for r in aud.verdicts_[k].reasons) for k in (5, 6))
    # Without the in-subspace rule, the direction rule (the whole update against the others'
    # centre) sees them too; the off-subspace share alone could not.
    alone = ClairAuditor(verdict=VerdictOptions(in_subspace=False)).fit(mods, 20)
    assert flagged(alone) == {5, 6}
    assert all(any(r.kind == "direction" for r in alone.verdicts_[k].reasons) for k in (5, 6))


@pytest.mark.parametrize("seed", range(4))
def test_rule_5_never_fires_on_clean_pools(seed: int) -> None:
    for pool in (CONSENSUS, dict(CONSENSUS, spread=1.0), dict(CONSENSUS, spread=None)):
        aud = ClairAuditor().fit(make_pool(seed=seed, **pool), 20)
        assert not [r for v in aud.verdicts_ for r in v.reasons if r.kind == "in_subspace"]


def test_without_a_consensus_a_sign_flip_is_invisible() -> None:
    # Benign clients share only the subspace: a flipped update is as plausible as any other.
    mods = make_pool(seed=0, **dict(CONSENSUS, spread=None))
    _flip(mods, (5, 6))
    assert flagged(ClairAuditor().fit(mods, 20)) == set()


def test_gate_scores_candidates_against_the_reference_centre() -> None:
    mods = make_pool(seed=0, **CONSENSUS)
    _flip(mods, (18, 19))
    aud = ClairAuditor().fit(mods, 20, reference=list(range(15)))
    assert flagged(aud) == {18, 19}


def test_batched_centres_match_one_at_a_time() -> None:
    g = torch.Generator().manual_seed(3)
    points = torch.randn(9, 6, generator=g, dtype=torch.float64)
    G = points @ points.T
    masks = torch.rand(5, 9, generator=g) < 0.7
    masks[:, 0] = True
    W = centre_weights(G, masks)
    for p in range(5):
        _, w = centre_distances(G, masks[p])
        assert torch.allclose(W[p], w, atol=1e-9)
        assert bool((W[p][~masks[p]] == 0).all())


def test_centre_cosines_leave_one_out_match_a_centre_fitted_without_each() -> None:
    g = torch.Generator().manual_seed(4)
    points = torch.randn(8, 5, generator=g, dtype=torch.float64)
    G = points @ points.T
    fit_on = torch.ones(8, dtype=torch.bool)
    got = centre_cosines(G, fit_on, {k: [k] for k in range(8)})
    for k in range(8):
        mask = fit_on.clone()
        mask[k] = False
        _, w = centre_distances(G, mask)
        centre = w @ points
        want = float(points[k] @ centre / (points[k].norm() * centre.norm()))
        assert float(got[k]) == pytest.approx(want, abs=1e-9)
    # Without leave_out one centre is shared; a zero update has no cosine.
    points[2] = 0
    shared = centre_cosines(points @ points.T, fit_on)
    assert math.isnan(float(shared[2])) and not bool(shared[[0, 1, 3]].isnan().any())


def test_direction_pairs_leave_both_out() -> None:
    """``D[k, j]`` is j's cosine with the centre fitted without j and k (and their copies)."""
    from clair_cli.core.insubspace import direction_pairs

    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 10, generator=g, dtype=torch.float64) + 2.0
    x = x / x.norm(dim=1, keepdim=True)
    C = x @ x.T
    fit_on = torch.ones(6, dtype=torch.bool)
    D = direction_pairs(C, fit_on, {4: [4, 5], 5: [4, 5]})
    assert bool(D.diagonal().isnan().all())
    for k, j in [(0, 1), (3, 2), (4, 0), (0, 4)]:
        leave = sorted({j, k} | ({4, 5} if {j, k} & {4, 5} else set()))
        want = centre_cosines(C, fit_on, {j: leave})[j]
        assert float(D[k, j]) == pytest.approx(float(want), abs=1e-12)
    assert bool(D[4, 5].isnan()) and bool(D[5, 4].isnan())  # copies are one adapter


def test_a_pool_without_a_common_direction_says_so() -> None:
    """Independent updates agree on no direction: rule 1 cannot measure anyone, and the
    auditor (and so the report) says which rules were silent."""
    from clair_cli.report.audit import SILENT

    aud = ClairAuditor().fit(make_pool(M=2, K=10, kind="independent", seed=4), 10)
    assert "direction" in aud.silent_rules_
    assert "no common direction" in SILENT["direction"]
    agreeing = ClairAuditor().fit(make_pool(M=2, K=10, spread=0.3, seed=4), 10)
    # Only the pull rule: the synthetic pools' mixed alphas (0.5, 1.5, 2.5) spread the norms.
    assert agreeing.silent_rules_ == ["pull"]


def test_a_centre_with_masses_counts_a_group_once() -> None:
    """``mass``: the geometric median of points with weights; three coincident points of
    mass 1/3 each pull like one point."""
    from clair_cli.core.insubspace import centre_weights

    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 8, generator=g, dtype=torch.float64)
    pts = torch.cat([x, x[3:].expand(2, 8)])  # points 3, 4, 5 coincide
    mass = torch.tensor([1.0, 1.0, 1.0, 1 / 3, 1 / 3, 1 / 3], dtype=torch.float64)
    W = centre_weights(pts @ pts.T, torch.ones(1, 6, dtype=torch.bool), mass=mass)[0]
    want = centre_weights(x @ x.T, torch.ones(1, 4, dtype=torch.bool))[0]
    assert (W[:3] @ pts[:3] + W[3:].sum() * x[3]).tolist() == pytest.approx((want @ x).tolist(), abs=1e-8)


def _loose_pool_with_a_tight_set(n_loose: int, n_tight: int, rho: float, seed: int = 0) -> torch.Tensor:
    """Unit vectors: ``n_loose`` around a shared direction at pairwise cosine about 0.15, and
    ``n_tight`` around another direction (cosine -0.2 with the first) at pairwise cosine ``rho``."""
    g = torch.Generator().manual_seed(seed)
    d = 4000
    h = torch.randn(d, generator=g, dtype=torch.float64)
    h /= h.norm()
    v = torch.randn(d, generator=g, dtype=torch.float64)
    v -= (v @ h) * h
    v = -0.2 * h + math.sqrt(1 - 0.04) * v / v.norm()

    def around(c: torch.Tensor, cos: float, n: int) -> torch.Tensor:
        noise = torch.randn(n, d, generator=g, dtype=torch.float64)
        noise /= noise.norm(dim=1, keepdim=True)
        x = math.sqrt(cos) * c + math.sqrt(1 - cos) * noise
        return x / x.norm(dim=1, keepdim=True)

    return torch.cat([around(h, 0.15, n_loose), around(v, rho, n_tight)])


def test_agreement_masses_count_a_tight_set_about_once() -> None:
    from clair_cli.core.insubspace import agreement_masses

    X = _loose_pool_with_a_tight_set(12, 6, 0.5)
    C = X @ X.T
    mass = agreement_masses(C, torch.ones(18, dtype=torch.bool))
    loose, tight = mass[:12], mass[12:]
    # Loosely agreeing adapters keep about their weight; the six of the tight set together
    # weigh about one to two adapters.
    assert float(loose.min()) > 0.7 and 1 < float(tight.sum()) < 2.5, mass
    # Outside fit_on, or in a pool too small to have a typical level: weight 1.
    fit_on = torch.ones(18, dtype=torch.bool)
    fit_on[[0, 12]] = False
    partial = agreement_masses(C, fit_on)
    assert float(partial[0]) == 1.0 and float(partial[12]) == 1.0
    assert bool((agreement_masses(C[:5, :5], torch.ones(5, dtype=torch.bool)) == 1).all())


def test_a_spread_minority_no_longer_captures_the_centre() -> None:
    # A third of the pool agreeing at cosine 0.4 among themselves, against a loosely agreeing
    # majority (0.15): with equal weights the geometric median leans to them, so that they look
    # closer to the others' centre than the majority does; counted by their agreement, they
    # fall below every honest adapter.
    from clair_cli.core.insubspace import agreement_masses, direction_cosines

    X = _loose_pool_with_a_tight_set(12, 6, 0.4, seed=3)
    C = X @ X.T
    everyone = torch.ones(18, dtype=torch.bool)
    plain = direction_cosines(C, everyone)
    soft = direction_cosines(C, everyone, mass=agreement_masses(C, everyone))
    assert float(plain[12:].mean()) > float(plain[:12].mean())
    assert float(soft[12:].max()) < float(soft[:12].min())
