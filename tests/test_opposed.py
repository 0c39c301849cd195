"""Rules 9 (``opposed``) and 16 (``module_opposed``): a group that points against the rest of
the pool, over all modules or on one."""

from __future__ import annotations

import math

import pytest
import torch

import clair_cli.core.audit as audit_module
import clair_cli.core.rules.opposed as opposed
from benchmarks.synthetic import flagged, make_pool
from clair_cli.core.audit import ClairAuditor
from clair_cli.core.calibration import qn_scale, rule_critical_value, rule_tail_probability
from clair_cli.core.insubspace import agreement_masses
from clair_cli.core.rules.base import ALPHA
from clair_cli.core.rules.opposed import (
    MIN_GROUP,
    MODULE_OPPOSED_COSINE,
    SPLITS,
    ModuleCosines,
    _refined,
    group_level,
    largest_minority,
    module_groups,
)
from clair_cli.report.audit import reason_text
from clair_cli.report.modules import ModuleNames


def _flip(mods, members):
    for m in mods:
        for k in members:
            m.B[k] = -m.B[k]
    return mods


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_third_of_the_pool_flipped_is_caught_as_a_group(seed: int) -> None:
    """Six of eighteen honest-looking clients sign-flipped: a third of the pool drags the
    centre rule 1 measures against; as a group they point against the rest."""
    K, bad = 18, tuple(range(12, 18))
    mods = _flip(make_pool(M=3, K=K, spread=1.0, seed=seed), bad)
    aud = ClairAuditor().fit(mods, K)
    assert flagged(aud) == set(bad)
    opposed = [r for k in bad for r in aud.verdicts_[k].reasons if r.rule == "opposed"]
    assert len(opposed) == len(bad)
    for r in opposed:
        assert r.value < -0.2 and len(r.of or ()) == len(bad) - 1


def test_loose_pools_flag_no_honest_client_with_the_group() -> None:
    """Where honest clients agree only loosely (spread 2), some of them sit near or below zero
    against the rest's mean; the group takes only members past the calibrated cut."""
    for seed in range(3):
        mods = _flip(make_pool(M=3, K=18, spread=2.0, seed=seed), tuple(range(12, 18)))
        aud = ClairAuditor().fit(mods, 18)
        assert flagged(aud) <= set(range(12, 18)), seed


@pytest.mark.parametrize("kw", [dict(spread=0.5), dict(spread=2.0), dict(kind="independent"), dict()])
def test_honest_pools_have_no_opposed_group(kw: dict) -> None:
    """Pools with a common direction never split against themselves; pools without one (no
    consensus: independent updates, or coefficients drawn independently inside one
    subspace) may split by chance, and there the rule is off."""
    for seed in range(6):
        aud = ClairAuditor().fit(make_pool(M=3, K=12, seed=seed, **kw), 12)
        assert not any(v.signals.get("opposed", 0.0) > 1 for v in aud.verdicts_), (kw, seed)


def test_a_lone_flipped_client_in_a_small_pool() -> None:
    mods = _flip(make_pool(M=2, K=6, spread=1.0, seed=7), (5,))
    aud = ClairAuditor().fit(mods, 6)
    assert flagged(aud) == {5}
    assert torch.isfinite(torch.tensor(aud.verdicts_[5].score))


# -- rule 16: a group against the rest on one module --------------------------------------


def _turn_one_module(K: int, spread: float, seed: int, M: int = 4):
    """Clients 12.. send honest-looking updates with module 0 sign-flipped (module-flip)."""
    mods = make_pool(M=M, K=K, spread=spread, seed=seed)
    for k in range(12, K):
        mods[0].B[k] = -mods[0].B[k]
    return mods


@pytest.mark.parametrize("seed", [2])
def test_a_group_turning_one_module_is_caught_as_a_group(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A third of the pool flipped in one module of four, where honest clients agree loosely: each
    member alone sits inside rule 12's cut (none flagged without rule 16); on that module,
    together, they point against the rest. (Seeds 0, 4 and 5 of this model pass since the
    reference became every member's: the loose honest spread hides them.)"""
    K, bad = 18, set(range(12, 18))
    aud = ClairAuditor().fit(_turn_one_module(K, 1.0, seed), K)
    caught = flagged(aud)
    assert caught <= bad and len(caught) >= 3, caught
    for k in caught:
        r = next(r for r in aud.verdicts_[k].reasons if r.rule == "module_opposed")
        assert r.module == "layers.0.q_proj" and r.value < -MODULE_OPPOSED_COSINE
        assert set(r.of or ()) == caught - {k}
    r = next(r for r in aud.verdicts_[min(caught)].reasons if r.rule == "module_opposed")
    names = [f"client_{k:02d}" for k in range(K)]
    text = reason_text(r, names, ModuleNames(f"layers.{m}.q_proj" for m in range(4)))
    assert "against the rest of the pool in layer 0 q_proj" in text and f"{r.value:+.2f}" in text
    assert all(names[j] in text for j in sorted(r.of or ())[:3])
    monkeypatch.setattr(audit_module, "module_groups", lambda *args: [])
    without = flagged(ClairAuditor().fit(_turn_one_module(K, 1.0, seed), K))
    assert len(without & bad) < len(caught), without


@pytest.mark.parametrize("kw", [dict(spread=0.5), dict(spread=1.0), dict(spread=2.0), dict(kind="independent")])
def test_honest_pools_have_no_module_group(kw: dict) -> None:
    """Honest pools, loose ones and ones without a common direction included, never hold a group
    against the rest on one module (some split into near-halves: rule 16 leaves those alone)."""
    for seed in range(6):
        aud = ClairAuditor().fit(make_pool(M=4, K=15, seed=seed, **kw), 15)
        assert not any(v.signals.get("module_opposed", 0.0) > 1 for v in aud.verdicts_), (kw, seed)


def test_a_group_seen_over_all_modules_is_left_to_those_rules() -> None:
    """Sign-flipped in every module: rule 9 flags the group over all modules; rule 16 adds no
    reason (nor a member of its own)."""
    K, bad = 18, tuple(range(12, 18))
    aud = ClairAuditor().fit(_flip(make_pool(M=3, K=K, spread=1.0, seed=0), bad), K)
    assert flagged(aud) == set(bad)
    assert not any(r.rule == "module_opposed" for v in aud.verdicts_ for r in v.reasons)


def _unit_rows(n_honest: int, mirrors: int, dim: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(dim, generator=g, dtype=torch.float64)
    honest = common + 0.8 * torch.randn(n_honest, dim, generator=g, dtype=torch.float64) * common.norm() / dim**0.5
    X = torch.cat([honest, -honest[:mirrors]])
    return X / X.norm(dim=1, keepdim=True)


def test_refining_puts_every_mirror_image_on_the_group_side() -> None:
    """Mirror images of honest clients: a split with one on the wrong side drags its original
    against the rest's mean; refined, the mirrors and only they are the group side."""
    X = _unit_rows(12, 4)
    C = X @ X.T
    start = torch.zeros(16, dtype=torch.bool)
    start[[0, 12, 13, 14]] = True  # one original with three mirrors, the fourth mirror with the rest
    assert _refined(C, start).tolist() == [False] * 12 + [True] * 4


def test_the_module_group_against_a_dense_reference() -> None:
    """The group's cosine with the rest and the rest's consensus, recomputed from the unit updates
    (the rest's mean weighs each member by its agreement); the combined levels keep the union
    bound at ALPHA."""
    X = _unit_rows(12, 4, seed=3)
    C = X @ X.T
    groups = module_groups({"m": ModuleCosines(tuple(range(100, 116)), C, torch.zeros(16))})
    assert groups, "four mirror images of a dozen honest clients form a group"
    group = groups[0]
    core = [k - 100 for k in group.core]
    assert core == [12, 13, 14, 15]
    rest = torch.arange(16) < 12
    w = agreement_masses(C, rest)[:12]
    g_mean, t_mean = X[core].sum(0), (w[:, None] * X[:12]).sum(0)
    assert group.cosine == pytest.approx(float(g_mean @ t_mean / (g_mean.norm() * t_mean.norm())), abs=1e-12)
    agreement = sorted(
        float(X[j] @ (t_mean - w[j] * X[j]) / (t_mean - w[j] * X[j]).norm()) for j in range(12)
    )  # each member of the rest with the mean of the others; twelve: the median is the middle two's mean
    assert group.consensus == pytest.approx((agreement[5] + agreement[6]) / 2, abs=1e-12)
    n, G = 16, largest_minority(16)
    for g in range(MIN_GROUP, G + 1):
        level = group_level(n, g, 8)
        assert 8 * SPLITS * (G - MIN_GROUP + 1) * math.comb(n, g) * level**g == pytest.approx(ALPHA, rel=1e-9)


@pytest.mark.parametrize("seed", [1, 3])
def test_the_module_group_members_p_values_and_margins_against_a_dense_reference(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Five noisy mirror images of honest clients among twelve: each member's p-value recomputed
    from the unit updates (its cosine with the rest's weighted mean, against every other member's
    cosine with the mean of the rest less itself), the core as the largest ``g`` with ``g``
    members past ``group_level``, and each margin as the smaller of the group's and the member's
    own. Modules too small to hold a group leave the levels alone."""
    g = torch.Generator().manual_seed(5)
    X = _unit_rows(12, 0, seed=seed)
    mirrors = -X[:5] + 0.9 * torch.randn(5, X.shape[1], generator=g, dtype=torch.float64) / X.shape[1] ** 0.5
    X = torch.cat([X, mirrors / mirrors.norm(dim=1, keepdim=True)])
    C, n = X @ X.T, 17
    small = ModuleCosines((0, 1, 2, 3), torch.eye(4, dtype=torch.float64), torch.zeros(4))
    modules = {"m": ModuleCosines(tuple(range(n)), C, torch.zeros(n)), **{f"small{i}": small for i in range(5)}}
    levels: list[int] = []
    monkeypatch.setattr(opposed, "group_level", lambda n, g, m: levels.append(m) or group_level(n, g, m))
    (group,) = module_groups(modules)
    assert set(levels) == {1}  # the small modules cannot hold a group of three at a third
    rest = torch.arange(n) < 12
    w = agreement_masses(C, rest)
    t_mean = (w[:12, None] * X[:12]).sum(0)
    x = torch.tensor(
        [
            -float(X[j] @ (t_mean - w[j] * X[j]) / (t_mean - w[j] * X[j]).norm())
            if j < 12
            else -float(X[j] @ t_mean / t_mean.norm())
            for j in range(n)
        ],
        dtype=torch.float64,
    )
    consensus = -float(torch.quantile(x[:12], 0.5))
    p, cut = {}, {}
    for j in range(12, n):
        ref = torch.cat([x[:j], x[j + 1 :]])
        c, sigma = float(torch.quantile(ref, 0.5)), float(qn_scale(ref))
        p[j] = rule_tail_probability(n - 1, (float(x[j]) - c) / sigma) if float(x[j]) > c + consensus else 1.0
        cut[j] = (float(x[j]) - c) / max(rule_critical_value(n - 1, ALPHA) * sigma, consensus)
    sizes = [h for h in range(5, MIN_GROUP - 1, -1) if sum(p[j] <= group_level(n, h, 1) for j in p) >= h]
    core = [j for j in p if p[j] <= group_level(n, sizes[0], 1)]
    assert list(group.core) == core and group.consensus == pytest.approx(consensus, abs=1e-12)
    g_mean = X[core].sum(0)
    cosine = float(g_mean @ t_mean / (g_mean.norm() * t_mean.norm()))
    assert group.cosine == pytest.approx(cosine, abs=1e-12)
    judged = sorted(set(core) | {j for j in p if p[j] <= ALPHA})
    assert list(group.members) == judged
    expected = [min(-cosine / MODULE_OPPOSED_COSINE, cut[j]) for j in judged]
    assert list(group.margins) == pytest.approx(expected, abs=1e-9)


def test_a_coordinated_group_in_the_rest_counts_as_one_member() -> None:
    """Rule 10's group inside the rest would set its consensus (its members agree with each other):
    counted once, it does not make loosely agreeing honest clients look opposed (a tight third
    pushing along the honest clients' disagreement flagged two honest clients before)."""
    from tests.test_coordinated import _pool_with_group

    for seed in range(3):
        aud = ClairAuditor().fit(_pool_with_group(seed), 18)
        assert not any(v.signals.get("module_opposed", 0.0) > 1 for v in aud.verdicts_[:12]), seed


def _copies_of_one_flipped_module(seed: int, sources: dict[int, int]):
    """Each attacker ``k`` sends, on module 0, the flipped module of client ``sources[k]`` (the
    same update, cosine 1, at its own norm) and honest-looking other modules."""
    mods = make_pool(M=4, K=18, spread=1.0, seed=seed)
    m = mods[0]
    flipped = {j: (m.A[j].clone(), -m.B[j] * m.scales[j]) for j in set(sources.values())}
    for k, j in sources.items():
        A, B = flipped[j]
        own = float((m.B[k] @ m.A[k]).norm()) * m.scales[k]
        m.A[k], m.B[k] = A.clone(), B * own / float((B @ A).norm()) / m.scales[k]
    return mods


def _mirrors(seed: int, n_mirrors: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    X = _unit_rows(12, 0, seed=seed)
    mirrors = -X[:n_mirrors] + 0.9 * torch.randn(n_mirrors, X.shape[1], generator=g, dtype=torch.float64) / 12**0.5
    return torch.cat([X, mirrors / mirrors.norm(dim=1, keepdim=True)])


def test_copies_are_one_member_of_a_group_and_flagged_with_it() -> None:
    """Copies of one module update are one p-value: one mirror image sent by six adapters is no
    group (an honest family sharing a frozen module, or copies of an honest client's module that an
    attacker sends, would otherwise be one); three distinct mirror images are, and each one's copies
    are flagged with it, the group's mean weighing every copy."""
    X = _mirrors(1, 1)
    one = ModuleCosines(tuple(range(13)), X @ X.T, torch.zeros(13), ((),) * 12 + ((100, 101, 102, 103, 104),))
    assert one.multiplicity().tolist() == [1.0] * 12 + [6.0]
    assert module_groups({"m": one}) == []
    X = _mirrors(1, 3)
    copies = ((),) * 12 + ((100, 101, 102), (), ())
    (group,) = module_groups({"m": ModuleCosines(tuple(range(15)), X @ X.T, torch.zeros(15), copies)})
    assert list(group.core) == [12, 100, 101, 102, 13, 14]
    assert set(group.members) == {12, 13, 14, 100, 101, 102}
    margin = dict(zip(group.members, group.margins, strict=True))
    assert margin[100] == margin[101] == margin[102] == margin[12]
    w = agreement_masses(X @ X.T, torch.arange(15) < 12)
    t_mean, g_mean = (w[:12, None] * X[:12]).sum(0), 4 * X[12] + X[13] + X[14]
    assert group.cosine == pytest.approx(float(g_mean @ t_mean / (g_mean.norm() * t_mean.norm())), abs=1e-12)


def _atypical(seed: int, beta: float, M: int):
    """make_pool with client 0's module 0 turned against the others (its update less ``beta`` times
    their mean's direction at its norm): an unusual honest client, flagged by no rule."""
    mods = make_pool(M=M, K=16, spread=1.0, seed=seed)
    m = mods[0]
    D = [s * b @ a for a, b, s in zip(m.A, m.B, m.scales, strict=True)]
    others = torch.stack(D[1:12]).mean(0)
    U, S, Vh = torch.linalg.svd(D[0] - beta * others * D[0].norm() / others.norm(), full_matrices=False)
    m.A[0], m.B[0] = Vh[:4].clone(), U[:, :4] * S[:4] / m.scales[0]
    return mods


@pytest.mark.parametrize(("M", "beta"), [(4, 1.6), (12, 2.0)])
def test_copies_of_an_unusual_honest_module_flag_no_one(M: int, beta: float) -> None:
    """An outside review's two ways to make one module update count as several adapters: a family of
    honest adapters sharing it (clients 1 and 2 send client 0's module 0), and two sybils sending it at
    1 % of its norm (hub adapters are public). Counted as a group, both got client 0 flagged."""
    family = _atypical(0, beta, M)
    for k in (1, 2):
        family[0].A[k], family[0].B[k] = (
            family[0].A[0].clone(),
            family[0].B[0] * family[0].scales[0] / family[0].scales[k],
        )
    assert not flagged(ClairAuditor().fit(family, 16))
    framed = _atypical(0, beta, M)
    for k in (12, 13):
        framed[0].A[k], framed[0].B[k] = (
            framed[0].A[0].clone(),
            0.01 * framed[0].B[0] * framed[0].scales[0] / framed[0].scales[k],
        )
    assert not flagged(ClairAuditor().fit(framed, 16))


def test_the_auditor_counts_copies_of_a_whole_update_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A re-uploaded adapter is flagged as a copy already; in rule 16's sizes it counts once."""
    mods = _atypical(0, 1.6, 4)
    for m in mods:
        for k in (12, 13):
            m.A[k], m.B[k] = m.A[0].clone(), m.B[0] * m.scales[0] / m.scales[k]
    seen = []
    real = audit_module.module_groups
    monkeypatch.setattr(audit_module, "module_groups", lambda *args: seen.append(args) or real(*args))
    aud = ClairAuditor().fit(mods, 16)
    assert aud.duplicate_groups_ == [[0, 12, 13]] and flagged(aud) == {12, 13}
    ((modules, _coordinated, copies),) = seen
    assert set(copies) == {12, 13}
    assert modules["layers.0.q_proj"].multiplicity(copies).tolist() == [1.0] * 14


def test_a_copy_is_flagged_with_the_member_it_copies() -> None:
    """Clients 12-14 flip their own module 0 and 15-17 copy one each: a flagged member's copies
    are flagged with it, never left to ride free."""
    for seed in (4,):  # seeds 0 and 5 of this model: three distinct flips do not show a group
        mods = _copies_of_one_flipped_module(seed, {12: 12, 13: 13, 14: 14, 15: 12, 16: 13, 17: 14})
        aud = ClairAuditor().fit(mods, 18)
        caught = {k for k, v in enumerate(aud.verdicts_) if any(r.rule == "module_opposed" for r in v.reasons)}
        assert caught and flagged(aud) <= set(range(12, 18)), (seed, flagged(aud))
        assert all((k in caught) == (k + 3 in caught) for k in (12, 13, 14)), (seed, caught)


def test_copies_of_a_whole_update_count_once_in_a_module_group() -> None:
    """A hub pool may hold re-uploads of one adapter: they are flagged as copies already and count
    as one adapter on every module (one p-value is not three)."""
    m = ModuleCosines((0, 1, 2), torch.eye(3), torch.zeros(3), ((5, 6), (), (7,)))
    assert m.multiplicity().tolist() == [3.0, 1.0, 2.0]
    assert m.multiplicity({5, 6}).tolist() == [1.0, 1.0, 2.0]
    assert m.multiplicity({0, 5}).tolist() == [1.0, 1.0, 2.0]  # the first may itself be the whole copy
    assert m.stands_for(0) == (0, 5, 6) and m.stands_for(1) == (1,)


def test_rule_16_is_off_in_a_gate() -> None:
    mods = _turn_one_module(15, 1.0, 0)
    aud = ClairAuditor().fit(mods, 15, reference=list(range(8)))
    assert not any("module_opposed" in v.signals for v in aud.verdicts_)
