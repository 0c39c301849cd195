"""The attack benchmark's pure aggregators and attacks (benchmarks/aggregators.py) on tiny vectors."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import aggregators as agg


def column(values: list[float]) -> np.ndarray:
    return np.array(values, dtype=float)[:, None]


def test_median_and_trimmed_mean() -> None:
    x = column([1, 2, 3, 4, 100])
    assert agg.median(x)[0] == 3
    assert agg.trimmed_mean(x)[0] == 3  # int(0.2 * 5) = 1 cut per side: mean of 2, 3, 4
    x10 = column([-50, 1, 2, 3, 4, 5, 6, 7, 8, 90])
    assert agg.trimmed_mean(x10)[0] == pytest.approx(4.5)  # 2 cut per side: mean of 2..7


def test_krum_multikrum_pick_the_cluster() -> None:
    x = column([0.0, 0.1, 0.2, 0.3, 10.0, 11.0])
    # n - f - 2 = 2 nearest others: 0.1 and 0.2 have the lowest sums (0.02 each); the first wins
    assert agg.krum(x, 2)[0] == pytest.approx(0.1)
    assert agg.multi_krum(x, 2)[0] == pytest.approx(0.15)  # the 4 lowest scores: 0, 0.1, 0.2, 0.3


def test_bulyan_lowers_f_and_ignores_outliers() -> None:
    assert agg.bulyan_f(15, 3) == 3 and agg.bulyan_f(18, 6) == 3
    rng = np.random.default_rng(0)
    x = np.vstack([rng.normal(0, 0.01, (12, 4)), np.full((3, 4), 50.0)])
    assert np.abs(agg.bulyan(x, 3)).max() < 0.05


def test_geometric_median_and_nnm_and_clipping() -> None:
    x = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]])
    gm = agg.geometric_median(x)
    assert np.linalg.norm(gm) < 1.0  # not dragged to the outlier
    mixed = agg.nnm(column([0.0, 1.0, 2.0, 10.0]), 1)
    assert mixed[:, 0].tolist() == pytest.approx([1.0, 1.0, 1.0, 13 / 3])
    cc = agg.centered_clipping(column([0.0, 0.0, 0.0, 100.0]), tau=1.0, iters=1, start=column([0.0])[0])
    assert cc[0] == pytest.approx(0.25)


def test_attack_formulas() -> None:
    honest = np.array([[1.0, 2.0], [3.0, 2.0]])
    assert agg.alie(honest, 1.0).tolist() == [1.0, 2.0]  # mean 2, 2; std 1, 0
    assert agg.ipm(honest, 2.0).tolist() == [-4.0, -4.0]
    assert agg.alie_z(50, 24) == pytest.approx(1.75, abs=0.01)  # Baruch et al.'s n = 50 example
    p = agg.perturbation(honest, "unit")
    g = agg.min_max_gamma(honest, p, "max")
    far = ((honest - (honest.mean(0) + g * p)) ** 2).sum(1).max()
    assert far == pytest.approx(4.0, rel=1e-4)  # the honest maximum squared distance, (3 - 1)^2
    trim = agg.fang_trim(column([1.0, 2.0, 3.0]), 4, 2.0, np.random.default_rng(0))
    assert ((trim >= 0.5) & (trim <= 1.0)).all()  # honest direction > 0: in [w_min / b, w_min]


@pytest.mark.parametrize(("rho", "c"), [(0.4, 1.0), (0.4, 3.5), (0.9, 2.0)])
def test_spread_attackers_have_the_norm_and_mutual_cosine_asked_for(rho: float, c: float) -> None:
    from benchmarks import attacks as at

    rng = np.random.default_rng(0)
    layout = at.Layout(["m0", "m1"], [(8, 30), (6, 20)])  # rank <= 8: the attack's truncation keeps all
    honest = np.vstack([at.low_rank_noise(layout, rng, rank=2) * s for s in rng.uniform(0.5, 1.5, 12)])
    pool = at.PoolData("t", 0, layout, [], honest, [], np.zeros((0, honest.shape[1])), None)  # type: ignore[arg-type]
    attackers = np.vstack([a.vector for a in at.spread_edge(pool, 6, rho, c, rng)])
    assert np.linalg.norm(attackers, axis=1) == pytest.approx(c * pool.median_norm, rel=1e-6)
    unit = attackers / np.linalg.norm(attackers, axis=1, keepdims=True)
    pairs = (unit @ unit.T)[np.triu_indices(6, 1)]
    assert pairs.mean() == pytest.approx(rho, abs=0.1)
    mean_dir = honest.mean(0) / np.linalg.norm(honest.mean(0))
    assert float(unit.mean(0) @ mean_dir / np.linalg.norm(unit.mean(0))) == pytest.approx(-at.EDGE_COSINE, abs=0.1)


def test_split_groups_pull_alike_along_their_own_directions() -> None:
    """``split-groups``: members of one group at about ``SPREAD_RHO`` with each other, two groups
    nearly orthogonal (their directions share only the pull, cosine 0.19^2), every group at
    cosine about -0.19 with the honest mean."""
    from benchmarks import attacks as at

    rng = np.random.default_rng(1)
    layout = at.Layout(["m0", "m1"], [(8, 30), (6, 20)])
    honest = np.vstack([at.low_rank_noise(layout, rng, rank=2) * s for s in rng.uniform(0.5, 1.5, 12)])
    pool = at.PoolData("t", 0, layout, [], honest, [], np.zeros((0, honest.shape[1])), None)  # type: ignore[arg-type]
    attackers = np.vstack([a.vector for a in at.spread_edge(pool, 6, 0.9, 2.0, rng, groups=2)])
    unit = attackers / np.linalg.norm(attackers, axis=1, keepdims=True)
    C = unit @ unit.T
    same = [C[i, j] for i in range(6) for j in range(i + 1, 6) if i % 2 == j % 2]
    other = [C[i, j] for i in range(6) for j in range(i + 1, 6) if i % 2 != j % 2]
    assert np.mean(same) == pytest.approx(0.9, abs=0.1)
    assert np.mean(other) == pytest.approx(0.9 * at.EDGE_COSINE**2, abs=0.1)
    mean_dir = honest.mean(0) / np.linalg.norm(honest.mean(0))
    for j in (0, 1):
        g = unit[j::2].mean(0)
        assert float(g @ mean_dir / np.linalg.norm(g)) == pytest.approx(-at.EDGE_COSINE, abs=0.1)
    assert {len(at._split_groups(pool, 3, 6.0, rng))} == {3}  # more groups than attackers: one each
    against = np.vstack([a.vector for a in at.spread_edge(pool, 6, 0.9, 2.0, rng, groups=2, cosine=0.45)])
    g = (against / np.linalg.norm(against, axis=1, keepdims=True))[0::2].mean(0)
    assert float(g @ mean_dir / np.linalg.norm(g)) == pytest.approx(-0.45, abs=0.1)


def test_module_flip_copies_send_one_flipped_module_at_each_attackers_norm() -> None:
    """``module-flip-copies``: every attacker's largest module is honest client 0's times -c (one
    update, cosine 1), each at its own honest norm times c; its other modules are its own."""
    import torch

    from benchmarks.attacks import Layout, PoolData, _flip_target, _module_flip_copies

    g = torch.Generator().manual_seed(0)
    layout = Layout(["a", "b"], [(6, 5), (4, 5)])
    factors = [
        {
            m: (
                torch.randn(2, 5, generator=g, dtype=torch.float64),
                torch.randn(o, 2, generator=g, dtype=torch.float64) * (3.0 if m == "a" else 1.0),
                0.5 + k,
            )
            for m, (o, _) in zip(layout.modules, layout.shapes, strict=True)
        }
        for k in range(6)
    ]
    honest = np.stack([layout.flatten(f) for f in factors])
    p = PoolData("t", 0, layout, factors, honest, [], honest[:0], None)  # type: ignore[arg-type]
    target = _flip_target(p)
    assert target == "a"
    out = _module_flip_copies(p, 4, 2.0, np.random.default_rng(0))
    first = factors[0]["a"][2] * factors[0]["a"][1] @ factors[0]["a"][0]
    for k, c in enumerate(out):
        A, B, s = c.factors["a"]
        sent = s * B @ A
        own = factors[k]["a"][2] * factors[k]["a"][1] @ factors[k]["a"][0]
        cosine = float((sent * first).sum() / (sent.norm() * first.norm()))
        assert cosine == pytest.approx(-1.0, abs=1e-12)
        assert float(sent.norm()) == pytest.approx(2.0 * float(own.norm()), rel=1e-12)
        assert c.factors["b"] is factors[k]["b"]
        np.testing.assert_allclose(c.vector, layout.flatten(c.factors))


def test_paired_interval_is_over_the_held_out_strings_within_each_client() -> None:
    """The bar's noise: a 95 % interval of the difference of two updates' accuracies (per-client
    means of per-string scores), the strings resampled together within each client."""
    import torch

    from benchmarks.attacks import Evaluator

    ev = object.__new__(Evaluator)
    ev.owner = torch.arange(4).repeat_interleave(64)
    g = torch.Generator().manual_seed(1)
    a = (torch.rand(256, generator=g) < 0.7).float()
    assert ev.paired_interval(a, a) == (0.0, 0.0)
    b = a.clone()
    b[::32] = 1.0 - b[::32]  # eight strings of 256 differ, in both directions
    lo, hi = ev.paired_interval(a, b)
    d = ev._per_client(a - b, ev.owner)
    assert lo < d < hi and lo < 0 < hi and hi - lo < 0.1
    worse = a.clone()
    worse[a == 1] = 0.0  # every correct string lost: far beyond the noise
    lo, hi = ev.paired_interval(worse, a)
    assert hi < -0.5


def test_loss_ascent_attackers_are_honest_looking_with_a_share_along_the_ascent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``loss-ascent``: each attacker at the honest median norm, ``beta`` of it along the ascent
    direction ``d`` (stubbed: the gradient needs a model), the rest at the honest clients' median
    cosine with their mean, in their span; modules narrower than the attack rank are exact."""

    from benchmarks import attacks

    p = _tiny_pool(1)
    honest = p.honest
    h = honest.mean(0) / np.linalg.norm(honest.mean(0))
    d = np.random.default_rng(0).standard_normal(honest.shape[1])
    d -= (d @ h) * h
    d /= np.linalg.norm(d)
    monkeypatch.setattr(attacks, "loss_ascent_direction", lambda _p: d)
    typical = float(np.median(honest @ h / np.linalg.norm(honest, axis=1)))
    for beta in (0.1, 0.5):
        for c in attacks._loss_ascent(p, 3, beta, np.random.default_rng(2)):
            assert np.linalg.norm(c.vector) == pytest.approx(p.median_norm, rel=1e-9)
            assert c.vector @ d == pytest.approx(beta * p.median_norm, rel=1e-9)
            assert c.vector @ h == pytest.approx(typical * np.sqrt(1 - beta**2) * p.median_norm, rel=1e-9)


def test_dilute_spread_attackers_are_the_mean_less_b_plus_honest_deviations() -> None:
    """``dilute-spread``: each attacker is the honest mean less ``b`` median norms along its own
    direction, plus a combination of the honest deviations from the mean at ``DILUTE_SPREAD`` median
    norms; modules narrower than the attack rank are exact."""

    from benchmarks import attacks

    p = _tiny_pool(3)
    honest, layout = p.honest, p.layout
    h = honest.mean(0)
    unit = h / np.linalg.norm(h)
    deviations = honest - h
    for b in (0.25, 0.55):
        out = attacks._dilute_spread(p, 4, b, np.random.default_rng(5))
        assert len(out) == 4
        for c in out:
            rest = c.vector - (h - b * p.median_norm * unit)
            assert np.linalg.norm(rest) == pytest.approx(attacks.DILUTE_SPREAD * p.median_norm, rel=1e-9)
            weights, *_ = np.linalg.lstsq(deviations.T, rest, rcond=None)
            np.testing.assert_allclose(deviations.T @ weights, rest, atol=1e-9 * p.median_norm)
            np.testing.assert_allclose(c.vector, layout.flatten(c.factors), atol=1e-12)
        assert not np.allclose(out[0].vector, out[1].vector)


def _tiny_pool(seed: int, n: int = 12):
    """A pool of ``n`` honest rank-2 float64 clients on two modules narrower than the attack rank."""
    import torch

    from benchmarks import attacks

    g = torch.Generator().manual_seed(seed)
    layout = attacks.Layout(["a", "b"], [(6, 5), (4, 5)])
    factors = [
        {
            m: (
                torch.randn(2, 5, generator=g, dtype=torch.float64),
                torch.randn(o, 2, generator=g, dtype=torch.float64),
                1.0,
            )
            for m, (o, _) in zip(layout.modules, layout.shapes, strict=True)
        }
        for _ in range(n)
    ]
    honest = np.stack([layout.flatten(f) for f in factors])
    return attacks.PoolData("t", 0, layout, factors, honest, [], honest[:0], None)  # type: ignore[arg-type]
