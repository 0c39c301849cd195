"""Rule 10 (``coordinated``): a minority that agrees with itself far more closely than the pool
does counts as one adapter in every centre, threshold and merge."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import bare_signals

from benchmarks.synthetic import flagged, make_pool
from clair_cli.core.audit import ClairAuditor, ModuleInput
from clair_cli.core.rules import coordinated as rule
from clair_cli.core.rules.coordinated import coordinated_groups, group_masses


def _cosines(X: torch.Tensor) -> torch.Tensor:
    U = X / X.norm(dim=1, keepdim=True)
    return U @ U.T


def _loose(n: int, dim: int, common: float, seed: int) -> torch.Tensor:
    """``n`` honest-like vectors: a common direction plus independent noise (pairwise cosine
    about ``common**2 / (1 + common**2)``)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(dim, generator=g, dtype=torch.float64)
    return common * h / h.norm() + torch.randn(n, dim, generator=g, dtype=torch.float64) / math.sqrt(dim)


def _tight(n: int, dim: int, spread: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 99)
    v = torch.randn(dim, generator=g, dtype=torch.float64)
    v = v / v.norm()
    return v + spread * torch.randn(n, dim, generator=g, dtype=torch.float64) / math.sqrt(dim)


@pytest.mark.parametrize("seed", range(5))
def test_a_tight_minority_is_one_group_and_honest_pools_have_none(seed: int) -> None:
    honest = _loose(12, 400, 0.6, seed)
    assert coordinated_groups(_cosines(honest)) == []
    pool = torch.cat([honest, _tight(6, 400, 0.2, seed)])
    groups = coordinated_groups(_cosines(pool))
    assert [g.members for g in groups] == [list(range(12, 18))]
    assert groups[0].within > groups[0].tie > 0


def test_a_tight_majority_is_the_pool_not_a_group() -> None:
    """Honest clients of an i.i.d. federation agree closely; they are the pool, not a minority."""
    pool = torch.cat([_tight(10, 400, 0.2, 0), _loose(5, 400, 0.6, 0)])
    assert coordinated_groups(_cosines(pool)) == []


def test_an_honest_adapter_on_the_groups_side_is_not_pulled_in() -> None:
    """An honest adapter half-way to the group agrees with it more than honest adapters agree,
    but far less than the group agrees within itself: it stays out."""
    honest = _loose(12, 400, 0.6, 3)
    group = _tight(6, 400, 0.1, 3)
    honest[0] = 0.5 * honest[0] / honest[0].norm() + group.mean(0) / group.mean(0).norm()
    groups = coordinated_groups(_cosines(torch.cat([honest, group])))
    assert [g.members for g in groups] == [list(range(12, 18))]


def test_copies_are_left_to_the_duplicate_rule_and_small_pools_have_no_groups() -> None:
    honest = _loose(12, 400, 0.6, 1)
    pool = torch.cat([honest, honest[:1]])  # adapter 12 copies adapter 0
    assert coordinated_groups(_cosines(pool), copies={12}) == []
    assert coordinated_groups(_cosines(torch.cat([honest[:2], _tight(2, 400, 0.1, 1)]))) == []


def test_group_masses_count_each_group_once() -> None:
    g = rule.CoordinatedGroup([1, 2, 3], 0.9, 0.5)
    assert group_masses(5, [g]).tolist() == [1.0, 1 / 3, 1 / 3, 1 / 3, 1.0]


def _pool_with_group(seed: int, n_group: int = 6, scale: float = 2.0, spread: float = 0.2) -> list[ModuleInput]:
    """Twelve loosely agreeing honest adapters and ``n_group`` attackers who each send one
    rank-2 update along the honest clients' main direction of disagreement, slightly against
    their mean, ``scale`` times their median norm, perturbed by ``spread``: each under the
    norm rule, none a copy, together a tight third of the pool."""
    K = 12 + n_group
    mods = make_pool(M=3, K=K, spread=2.0, seed=seed)
    g = torch.Generator().manual_seed(seed)
    for m in mods:
        D = torch.stack([(s * B @ A).flatten() for A, B, s in zip(m.A[:12], m.B[:12], m.scales[:12], strict=True)])
        h = D.mean(0) / D.mean(0).norm()
        dev = D - D.mean(0)
        dev = dev - (dev @ h)[:, None] * h
        d = torch.linalg.svd(dev, full_matrices=False).Vh[0]
        target = (-0.19 * h + 0.98 * d).reshape(m.B[0].shape[0], m.A[0].shape[1]) * D.norm(dim=1).median() * scale
        U, S, Vh = torch.linalg.svd(target, full_matrices=False)
        B, A = U[:, :2] * S[:2].sqrt(), S[:2].sqrt()[:, None] * Vh[:2]
        for k in range(12, K):  # each perturbs the shared factors (the noise survives, unlike a full-rank one)
            m.B[k] = B + spread * B.norm() * torch.randn(B.shape, generator=g, dtype=B.dtype) / B.numel() ** 0.5
            m.A[k] = A + spread * A.norm() * torch.randn(A.shape, generator=g, dtype=A.dtype) / A.numel() ** 0.5
            m.scales[k] = 1.0
    return mods


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_tight_third_is_found_and_no_honest_adapter_pays_for_it(seed: int) -> None:
    """The group is found, counted once, and flagged as a whole (here every member's own
    signals already flag it); no honest adapter is flagged with it. (On the trained pools of
    ``benchmarks/attacks.py``, ``opposed-edge``, such a group captured every centre and got 11
    of 12 honest adapters flagged before rule 10.)"""
    aud = ClairAuditor().fit(_pool_with_group(seed), 18)
    assert [g.members for g in aud.coordinated_groups_] == [list(range(12, 18))]
    assert flagged(aud) >= set(range(12, 18))
    # An honest adapter flagged here is flagged for its own direction, not for the group: in
    # seed 0, client 7's whole update has cosine -0.05 with the honest clients' centre where
    # theirs is +0.13 (rules 1 and 15; without rule 15, rule 1 alone lets it through).
    for k in flagged(aud) - set(range(12, 18)):
        assert {r.rule for r in aud.verdicts_[k].reasons} <= {"direction", "whole_direction"}
        assert any(r.cosine is not None and r.cosine < 0 for r in aud.verdicts_[k].reasons)
    assert len(flagged(aud) - set(range(12, 18))) <= 1


def test_a_group_that_passes_counts_as_one_adapter_in_the_merge() -> None:
    """Members the audit lets through share one adapter's weight in the mean."""
    from clair_cli.methods.clair import one_vote_per_group

    class _Auditor:
        coordinated_groups_ = [rule.CoordinatedGroup([2, 3, 4], 0.95, 0.6)]

    class _Pool:
        names = ["a", "b", "c", "d", "e"]

    class _Outcome:
        auditor = _Auditor()
        pool = _Pool()

    weights, notes = one_vote_per_group(_Outcome(), [0, 1, 2, 3, 4], None)  # type: ignore[arg-type]
    assert weights == pytest.approx([1 / 3, 1 / 3, 1 / 9, 1 / 9, 1 / 9])
    assert len(notes) == 1 and "c, d, e" in notes[0]
    weights, _ = one_vote_per_group(_Outcome(), [0, 1, 3], [1.0, 1.0, 2.0])  # type: ignore[arg-type]
    assert weights == [1.0, 1.0, 2.0]  # one member left: nothing to share
    shared, _ = one_vote_per_group(_Outcome(), [0, 1, 2, 3], [1.0, 1.0, 2.0, 2.0])  # type: ignore[arg-type]
    assert shared == pytest.approx([0.25, 0.25, 0.25, 0.25])


def test_one_member_flagged_for_its_direction_flags_the_group() -> None:
    from clair_cli.core.rules.base import Reason
    from clair_cli.core.rules.context import Pass

    ctx = Pass(bare_signals(5, coordinated=[rule.CoordinatedGroup([1, 2, 3], 0.95, 0.6)]), set())
    assert ctx.echoes == {2, 3} and ctx.excluded == {2, 3}  # counted once in every threshold
    ctx.flag(2, Reason(kind="norm", rule="norm", value=5.0, threshold=4.0, compare=">", margin=2.0))
    rule.Coordinated().apply(ctx)
    assert [v.flagged for v in ctx.verdicts] == [False, False, True, False, False], "a flag for size stays put"
    ctx.verdicts[1].signals["direction"] = 0.6  # past half-way to rule 1's cut itself
    ctx.flag(3, Reason(kind="direction", rule="direction", value=-0.5, threshold=0.1, compare="<", margin=3.0))
    rule.Coordinated().apply(ctx)
    assert [v.flagged for v in ctx.verdicts] == [False, True, True, True, False]
    (reason,) = ctx.verdicts[1].reasons
    assert reason.kind == "coordinated" and reason.of == (3,) and reason.value == 0.95 and reason.margin is None


def test_a_member_that_points_with_the_honest_is_not_flagged_with_its_group() -> None:
    """Two attackers copy an honest client's deviation and add their own direction: the three
    agree far more closely than the pool does (one group), and the attackers are flagged for their
    direction. The client itself, typical on rule 1 (margin 0.2) and past half-way only on a rule
    that flagged no member, stays: it does not send the group's direction."""
    from clair_cli.core.rules.base import Reason
    from clair_cli.core.rules.context import Pass

    ctx = Pass(bare_signals(6, coordinated=[rule.CoordinatedGroup([1, 2, 3], 0.9, 0.6)]), set())
    ctx.verdicts[1].signals.update(direction=0.2, off_subspace=0.9)
    for k in (2, 3):
        ctx.flag(k, Reason(kind="direction", rule="direction", value=-0.5, threshold=0.1, compare="<", margin=3.0))
    rule.Coordinated().apply(ctx)
    assert [v.flagged for v in ctx.verdicts] == [False, False, True, True, False, False]
    ctx.verdicts[1].signals["direction"] = 0.51
    rule.Coordinated().apply(ctx)
    assert [v.flagged for v in ctx.verdicts] == [False, True, True, True, False, False]


def test_a_rule_held_behind_another_still_sets_the_bar() -> None:
    """A member flagged by rule 1 and rule 15 lists rule 1's reason only (rule 15's is held:
    one reason is enough), and one flagged by rules 2 and 3 lists rule 3's: the rule held, or
    folded in, flagged it all the same, and a member past half-way on it leans the group's way."""
    from clair_cli.core.rules.base import Reason
    from clair_cli.core.rules.context import Pass
    from clair_cli.core.rules.direction import direction_reason

    ctx = Pass(bare_signals(6, coordinated=[rule.CoordinatedGroup([1, 2], 0.9, 0.6)]), set())
    ctx.margin(2, 3.0, "direction")
    ctx.flag(2, direction_reason("direction", -0.5, 0.4, 0.1, 3.0))
    ctx.margin(2, 2.0, "whole_direction")
    ctx.hold(2, direction_reason("whole_direction", -0.4, 0.4, 0.1, 2.0))
    ctx.verdicts[1].signals.update(direction=0.1, whole_direction=0.9)
    rule.Coordinated().apply(ctx)
    assert [v.flagged for v in ctx.verdicts] == [False, True, True, False, False, False]

    ctx = Pass(bare_signals(6, coordinated=[rule.CoordinatedGroup([1, 2], 0.9, 0.6)]), set())
    ctx.margin(2, 2.5, "off_subspace")
    ctx.margin(2, 1.5, "module")
    ctx.flag(2, Reason(kind="off_subspace", rule="module", value=0.9, threshold=0.5, compare=">", margin=2.5))
    ctx.verdicts[1].signals.update(module=0.2, off_subspace=0.8)
    rule.Coordinated().apply(ctx)
    assert [v.flagged for v in ctx.verdicts] == [False, True, True, False, False, False]


def test_neighbour_levels_reach_half_the_pool() -> None:
    assert rule.neighbour_levels(5) == [1]
    assert rule.neighbour_levels(18) == list(range(1, 9))
    levels = rule.neighbour_levels(1000)
    assert levels[:8] == list(range(1, 9)) and levels[-1] == 499 and len(levels) < 25
    assert all(b <= 1.5 * a + 1 for a, b in zip(levels, levels[1:], strict=False))


def test_a_group_whose_nearest_cosines_look_ordinary_shows_at_a_deeper_rank() -> None:
    """Honest clients in twins (each has one close neighbour, cosine about 0.6) and a group of
    six at about 0.5 among themselves: by nearest neighbours alone the group is ordinary; its
    fifth neighbour is not."""
    g = torch.Generator().manual_seed(11)
    dim = 2000
    h = torch.randn(dim, generator=g, dtype=torch.float64)
    h = 0.6 * h / h.norm()
    twins = []
    for _ in range(6):
        shared = torch.randn(dim, generator=g, dtype=torch.float64) / math.sqrt(dim)
        for _ in range(2):
            twins.append(h + 1.1 * shared + 0.8 * torch.randn(dim, generator=g, dtype=torch.float64) / math.sqrt(dim))
    honest = torch.stack(twins)
    group = _tight(6, dim, 1.0, 11)  # pairwise cosine about 0.5
    C = _cosines(torch.cat([honest, group]))
    off = C - 2 * torch.eye(18, dtype=C.dtype)
    nearest = off.max(1).values
    assert float(nearest[12:].median()) <= float(nearest[:12].max())  # nothing unusual at rank 1
    assert [g.members for g in coordinated_groups(C)] == [list(range(12, 18))]


def test_zero_updates_neither_join_nor_make_a_group_a_minority() -> None:
    """Five untrained adapters (zero updates: cosine 0 everywhere, their diagonal too) and three
    that carry an update, two of them close: the two were a 'coordinated group' of a pool of 8 and
    shared one adapter's weight in the merge, so a sign-flipped third carried half of it (an
    outside review). Three updates are too few to tell a group from the pool."""
    from clair_cli.core.pairwise import cosine_from_gram

    rng = np.random.default_rng(0)
    honest = rng.standard_normal(50)
    X = np.zeros((8, 50))
    X[5] = -honest + 0.3 * rng.standard_normal(50)
    X[6] = honest + 0.3 * rng.standard_normal(50)
    X[7] = honest + 0.3 * rng.standard_normal(50)
    cosine = cosine_from_gram(torch.from_numpy(X @ X.T))
    assert coordinated_groups(cosine) == []
    X[:5] = rng.standard_normal((5, 50))  # the same with five loose updates: the two close ones are a group
    assert [g.members for g in coordinated_groups(cosine_from_gram(torch.from_numpy(X @ X.T)))] == [[6, 7]]
