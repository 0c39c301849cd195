"""Rule 11 (``pull``): a group whose deviations add up moves the mean as one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.synthetic import directionless_pool, flagged, make_pool, split_groups_pool, tight_pool
from clair_cli.core import verdict
from clair_cli.core.audit import ClairAuditor
from clair_cli.core.rules.opposed import CONSENSUS, Opposed
from clair_cli.core.rules.pull import JOIN, MIN_ADAPTERS, NORM_SPREAD_MAX, PULL_FLOOR, Pull, group_pulls, pull_floor


def _geometric_median(X: np.ndarray) -> np.ndarray:
    c = X.mean(0)
    for _ in range(5000):
        d = np.maximum(np.linalg.norm(X - c, axis=1), 1e-15)
        new = (X / d[:, None]).sum(0) / (1 / d).sum()
        if np.linalg.norm(new - c) < 1e-14 * np.linalg.norm(c):
            break
        c = new
    return c


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_group_pulls_match_a_dense_reference(seed: int) -> None:
    """Each counted group's ``T`` from the Gram matrix equals the same quantity computed from
    the dense updates (deviations from the geometric median, their part along the median's
    direction removed: the members' mean inner product with the other members' deviations);
    every group is a minority whose members each pull their share."""
    rng = np.random.default_rng(seed)
    K, d = 11, 60
    X = rng.standard_normal((K, d)) + 0.8 * rng.standard_normal(d)
    X[:4] += 1.5 * rng.standard_normal(d)  # a group sharing a push
    members, pulls = group_pulls(torch.from_numpy(X @ X.T))
    assert len(pulls) > 0
    centre = _geometric_median(X)
    dev = X - centre
    unit = centre / np.linalg.norm(centre)
    dev -= np.outer(dev @ unit, unit)  # along the centre's direction: the norm rule's
    s2 = np.median((dev**2).sum(1))
    for row, t in zip(members, pulls, strict=True):
        g = int(row.sum())
        assert 2 <= g < K / 2
        total = dev[row].sum(0)
        others = (dev[row] @ total - (dev[row] ** 2).sum(1)) / s2  # with the other members' sum
        assert t == pytest.approx((float(total @ total) - float((dev[row] ** 2).sum())) / (g * s2), rel=1e-6)
        assert t == pytest.approx(others.mean(), rel=1e-6)
        assert others.mean() > 0 and others.min() >= JOIN * others.mean() - 1e-9
    best = members[int(np.argmax(pulls))]
    assert set(np.flatnonzero(best)) == {0, 1, 2, 3}


@pytest.mark.parametrize("K", [11, 37])
def test_group_pulls_list_each_group_once_in_row_order(K: int) -> None:
    """Groups found from several starts are listed once each, in the boolean rows' lexicographic
    order (as ``np.unique(..., axis=0)`` gives them), whatever number of members (K = 37: rows
    of several packed bytes)."""
    rng = np.random.default_rng(K)
    X = rng.standard_normal((K, 80)) + 0.8 * rng.standard_normal(80)
    X[: K // 3] += 1.5 * rng.standard_normal(80)
    members, pulls = group_pulls(torch.from_numpy(X @ X.T))
    assert members.dtype == bool and members.shape[1] == K and len(members) == len(pulls) > 1
    again, first = np.unique(members, axis=0, return_index=True)
    assert (again == members).all() and (first == np.arange(len(members))).all()


def test_group_pulls_need_enough_adapters_to_set_the_centre() -> None:
    X = np.random.default_rng(0).standard_normal((6, 20))
    fit = torch.tensor([True, True, True, True, False, False])
    members, pulls = group_pulls(torch.from_numpy(X @ X.T), fit=fit)
    assert members.shape == (0, 6) and len(pulls) == 0


@pytest.mark.parametrize("K", [6, 8, 12, 18])
def test_honest_pools_have_no_pulling_group(K: int) -> None:
    for seed in range(4):
        aud = ClairAuditor().fit(tight_pool(K, seed=seed), K)
        assert flagged(aud) == set(), seed
        assert "pull" not in aud.silent_rules_
        assert max(v.signals["pull"] for v in aud.verdicts_) < 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_spread_group_at_twice_the_norm_is_flagged_together(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Six of eighteen: each at twice the honest norm (under the norm rule's 4x), the group's
    members at cosine 0.4 with each other (under rule 10's floor): in the verdict's first pass
    only the group's pull gives it away, and the rule flags exactly it, each member listing
    the others. The later passes measure rule 1 against the centre of the rest, where the
    members point away from the honest clients: the same adapters, flagged by both."""
    K, bad = 18, tuple(range(12, 18))
    aud = ClairAuditor().fit(tight_pool(K, bad, rho=0.4, norm=2.0, seed=seed), K)
    assert flagged(aud) == set(bad)
    # Rule 15 (the whole update's direction against the most aligned two thirds) sees them in
    # the first pass too; without it, what rule 11 alone does:
    monkeypatch.setattr(verdict, "RULES", tuple(r for r in verdict.RULES if r.name != "whole_direction"))
    monkeypatch.setattr(verdict, "PASSES", 1)
    # From a stream: the first verdict alone (no refit, whose second verdict scores the group
    # against subspaces fitted without it, where rules 2 and 2b see it too).
    aud = ClairAuditor().fit(iter(tight_pool(K, bad, rho=0.4, norm=2.0, seed=seed)), K)
    assert flagged(aud) == set(bad)
    for k in bad:
        assert [r.rule for r in aud.verdicts_[k].reasons] == ["pull"]
        (reason,) = aud.verdicts_[k].reasons
        assert set(reason.of or ()) == set(bad) - {k}
        assert reason.value > PULL_FLOOR and reason.margin is not None and reason.margin > 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_honest_clients_on_the_groups_side_are_not_taken_with_it(seed: int) -> None:
    """Two honest clients carry 30 % of the group's push in their own update: they lie on its
    side but do not pull with it (their inner product with the members' sum is their own)."""
    K, bad = 18, tuple(range(12, 18))
    aud = ClairAuditor().fit(tight_pool(K, bad, norm=2.0, seed=seed, lean={0: 0.3, 1: 0.3}), K)
    assert flagged(aud) == set(bad)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_large_update_does_not_take_an_honest_client_with_it(seed: int) -> None:
    """One update at 3x the others' norm (under the norm rule's floor) pulls the mean alone:
    only what its deviation shares with another's counts, so no honest client is flagged
    with it (a statistic with each member's own squared deviation in it flagged such pairs)."""
    for K in (10, 12):
        mods = tight_pool(K, seed=seed)
        for m in mods:
            m.B[0] = 3.0 * m.B[0]
        aud = ClairAuditor().fit(mods, K)
        assert flagged(aud) <= {0}, (seed, K)
        assert all(r.rule != "pull" for v in aud.verdicts_ for r in v.reasons)


@pytest.mark.parametrize("kw", [dict(spread=0.5), dict(spread=1.0), dict()])
def test_off_where_honest_norms_spread(kw: dict) -> None:
    """The synthetic pools' mixed alphas (0.5, 1.5, 2.5) spread the norms by a Qn of 0.5-1.5
    in log: larger honest updates would pull together, so the rule is off and says so."""
    for seed in range(3):
        aud = ClairAuditor().fit(make_pool(M=3, K=16, seed=seed, **kw), 16)
        assert "pull" in aud.silent_rules_
        assert all("pull" not in v.signals for v in aud.verdicts_)


def test_a_third_of_the_pool_cannot_widen_the_norm_spread() -> None:
    """Qn breaks down at half the pool: six of eighteen at 0.3x and 3.5x the norm leave the
    spread near the honest clients' own."""
    honest = torch.tensor([0.9, 0.95, 1.0, 1.0, 1.05, 1.1, 0.92, 0.97, 1.02, 1.08, 1.12, 0.88]) ** 2
    attackers = torch.tensor([0.3, 3.5, 0.3, 3.5, 0.3, 3.5]) ** 2
    assert Pull.norm_spread(honest) < 0.15
    assert Pull.norm_spread(torch.cat([honest, attackers])) < NORM_SPREAD_MAX
    assert Pull.norm_spread(torch.tensor([0.5, 1.5, 2.5, 0.5, 1.5, 2.5]) ** 2) > NORM_SPREAD_MAX


def test_the_gate_leaves_the_rule_out() -> None:
    K, bad = 18, tuple(range(12, 18))
    aud = ClairAuditor().fit(tight_pool(K, bad, seed=0), K, reference=list(range(12)))
    assert not any("pull" in v.signals for v in aud.verdicts_)
    assert "pull" in aud.silent_rules_


def _consensus(C: torch.Tensor) -> float:
    return Opposed().consensus(C.double(), torch.ones(C.shape[0], dtype=torch.float64))


@pytest.mark.parametrize("groups", [2, 3])
def test_groups_that_take_away_the_consensus_are_still_judged(groups: int) -> None:
    """Six of eighteen in two or three groups, each along its own direction of the honest
    clients' disagreement and against their mean (the attack benchmark's ``split-groups``),
    among honest clients that agree loosely (pairwise cosine about 0.07): together the groups
    take the whole pool's consensus under 0.1, where the rule would be off; set aside, the rest
    agree, and the groups are judged. Before, no attacker was flagged in these pools."""
    below = 0
    for seed in range(4):
        mods, bad = split_groups_pool(seed, groups=groups)
        aud = ClairAuditor().fit(mods, len(mods[0].A))
        assert flagged(aud) == set(bad), seed
        below += _consensus(torch.as_tensor(aud.cosine_)) < CONSENSUS
    assert below >= 2  # the pools exercise the gate


def _unit_pool(vectors: list[np.ndarray]) -> torch.Tensor:
    X = np.stack(vectors)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return torch.from_numpy(X @ X.T)


def test_without_consensus_leaves_out_one_side_of_a_split() -> None:
    """Updates spread around zero in a plane: the rest agree once a group is set aside, but
    the group stands against them (one side of the split such a pool makes), so nothing is
    judged; a group nearly orthogonal to the rest of a loosely agreeing pool is."""
    angles = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    plane = [np.array([np.cos(a), np.sin(a), 0.0]) for a in angles]
    C = _unit_pool(plane)
    fit = list(range(12))
    assert not Pull.agreed(C, fit)
    side = [0, 1, 2, 11]  # an arc: its mean opposes the rest's
    assert Pull.without_consensus(C, fit, [(side, 1.5, 0.75)]) is None

    rng = np.random.default_rng(0)
    common = rng.standard_normal(400)
    honest = [common + 4.0 * rng.standard_normal(400) for _ in range(12)]  # consensus 0.14
    push = [rng.standard_normal(400) for _ in range(2)]
    bad = [-1.5 * common + 3 * push[k % 2] + 3 * rng.standard_normal(400) for k in range(6)]  # all: 0.06
    C = _unit_pool(honest + bad)
    fit = list(range(18))
    groups = [([12, 14, 16], 1.2, 0.6), ([13, 15, 17], 1.1, 0.55)]
    assert not Pull.agreed(C, fit) and Pull.agreed(C, fit[:12])
    assert Pull.without_consensus(C, fit, groups) == groups
    assert Pull.without_consensus(C, fit, groups[:1]) is None  # one group set aside is not enough here
    assert Pull.without_consensus(C, fit, [(list(range(12, 18)) + [0, 1, 2], 3.0, 1.5)]) is None  # not a minority


def _pulled(aud: ClairAuditor) -> int:
    return sum(any(r.rule == "pull" for r in v.reasons) for v in aud.verdicts_)


@pytest.mark.parametrize("seed", [1, 3])
def test_a_pool_spread_around_zero_draws_no_pull_flag(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Twelve honest updates with random coefficients in a plane (no common direction): the
    greedy search finds a side pulling past the floor, which the consensus gate keeps from
    being flagged."""
    aud = ClairAuditor().fit(directionless_pool(12, dims=2, seed=seed), 12)
    assert _pulled(aud) == 0
    monkeypatch.setattr(Pull, "agreed", staticmethod(lambda C, fit: len(fit) >= 5))
    aud = ClairAuditor().fit(directionless_pool(12, dims=2, seed=seed), 12)
    # Without the gate the side is flagged; or, in a later pass whose centres leave it out, the
    # adapters it leaves look far from the rest by their direction (seed 1: six of them, by rule 1).
    assert sum(v.flagged for v in aud.verdicts_) >= 3


def test_a_side_that_stands_against_the_rest_is_not_set_aside(monkeypatch: pytest.MonkeyPatch) -> None:
    """Eighteen updates spread along one shared direction with both signs: set aside, the
    side the search finds leaves a rest that agrees, but it stands against that rest as a side
    of such a pool does, so nothing is judged."""
    from clair_cli.core.rules import pull

    pool = directionless_pool(18, dims=1, own=0.5, seed=1)
    assert _pulled(ClairAuditor().fit(pool, 18)) == 0
    monkeypatch.setattr(pull, "_group_cosine", lambda C, group, rest: 0.0)
    assert _pulled(ClairAuditor().fit(directionless_pool(18, dims=1, own=0.5, seed=1), 18)) >= 3


def _low_dimensional_pool(K: int, seed: int) -> list:
    """Honest updates that differ along a few directions only: per module ``U (I + 0.2 G_k) V^T``
    (one rank-2 update, each client's 2 x 2 core jittered) plus small rank-2 noise; the shapes of
    an outside review's pools (2026-12-06), where the greedy groups of 150 such clients pulled past
    the floor (43-114 of them flagged by this rule alone)."""
    from clair_cli.core.audit import ModuleInput

    g = torch.Generator().manual_seed(seed)
    mods = []
    for m in range(2):
        d = 64
        U = torch.linalg.qr(torch.randn(d, 2, generator=g, dtype=torch.float64))[0]
        V = torch.linalg.qr(torch.randn(d, 2, generator=g, dtype=torch.float64))[0]
        A, B = [], []
        for _ in range(K):
            core = torch.eye(2, dtype=torch.float64) + 0.2 * torch.randn(2, 2, generator=g, dtype=torch.float64)
            noise_b = 0.3 * torch.randn(d, 2, generator=g, dtype=torch.float64) / d**0.5
            noise_a = torch.randn(2, d, generator=g, dtype=torch.float64) / d**0.5
            B.append(torch.cat([U @ core, noise_b], 1))
            A.append(torch.cat([V.T, noise_a]))
        mods.append(ModuleInput(f"layers.{m}.q_proj", list(range(K)), A, B, [1.0] * K))
    return mods


@pytest.mark.parametrize("seed", [0, 1])
def test_a_large_pool_of_honest_updates_that_differ_along_few_directions_draws_no_pull_flag(seed: int) -> None:
    """The floor was set on pools of 5-24 adapters; the honest updates of 150 farthest along one
    direction of their spread lie farther out, and pull more, than any group of 24 can. The floor
    grows as those extremes' pull does (:func:`pull_floor`), and is unchanged up to 24 adapters."""
    K = 150
    aud = ClairAuditor().fit(_low_dimensional_pool(K, seed), K)
    assert not any("pull" in {r.rule for r in v.reasons} for v in aud.verdicts_)
    assert flagged(aud) == set()
    for pool in range(MIN_ADAPTERS, 25):
        assert np.all(pull_floor(np.arange(2, (pool + 1) // 2), pool) == PULL_FLOOR)
    assert pull_floor(12, 150)[0] == pytest.approx(4.56 * PULL_FLOOR, rel=0.01)


@pytest.mark.parametrize(("K", "share"), [(60, 1 / 3), (90, 0.2)])
def test_a_group_in_a_large_pool_is_flagged_as_in_a_small_one(K: int, share: float) -> None:
    """A third (or a fifth) of a large pool, each at twice the honest norm and cosine 0.4 with each
    other (the group the floor was set for, in pools of 18): still flagged, every member and no
    honest client."""
    bad = tuple(range(K - round(share * K), K))
    aud = ClairAuditor().fit(tight_pool(K, bad, rho=0.4, norm=2.0, seed=0), K)
    assert flagged(aud) == set(bad)
