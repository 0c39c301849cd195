"""Rule 10, **a coordinated group** (``coordinated``): adapters that agree with each other far
more closely than the pool's adapters agree with their nearest neighbours count as one.

Honest clients of one task agree only loosely (on the trained pools of ``benchmarks/``, an
honest adapter's largest cosine with another is 0.1-0.6), while attackers who send one
crafted vector, each slightly perturbed so that none is a copy, agree at 0.9 or more. Such a
tight minority captures every robust centre the other rules measure against: in high
dimension the geometric median of loosely spread honest updates moves almost all the way to
a tight third of the pool, the honest adapters then look like the outliers, and the merge
keeps the attackers (``opposed-edge`` in ``benchmarks/attacks.py``: 11 of 12 honest flagged).

The statistic, at each neighbour rank ``m`` (:func:`neighbour_levels`), is each adapter's
distance to its ``m``-th nearest neighbour in log form, ``t_k = -log(1 - cos)`` (copies
counted once), against the others' values with the calibrated cut of every rule (``ALPHA``
over the ranks) and a floor of ``log 1.5`` (neighbours 1.5x closer, in ``1 - cos``, than is
typical). A group of ``g`` shows at rank ``g - 1``, where honest adapters' neighbours are
far, even when its members' nearest cosines alone look ordinary. Adapters past the cut at
some rank are *tight*. Tight adapters form a group when every pair of them is tied past both
members' cuts and each joins at least half as tightly (in ``t``) as the group agrees within
itself, so an honest adapter that merely lies on the group's side is not pulled in; a group
must be a minority (fewer than half of the adapters judged). Groups are built from the
tightest adapter down.

What a group changes:

- Centres count it as one adapter: rule 1's geometric median weighs each member by
  ``1 / |group|`` (:func:`clair_cli.core.insubspace.centre_cosines`), and every member but
  the first leaves the thresholds of every rule, as copies do (rule 7's fit and rule 9's
  split keep every member: their evidence is the group pushing one way).
- Its members are judged on their own signals; if any member is flagged for where its update
  points (``POINTING_RULES``), the others are flagged too (:class:`Coordinated`) where they
  lean that way themselves: past half-way from the typical to the cut (margin above
  :data:`SHARED`) on a rule that flagged a member. They send one direction between them. A
  flag for size (norm) stays with its member, so a scaled near-copy of an honest client cannot
  take that client down with it; nor can near-copies that add a direction of their own and are
  flagged for it, while the client itself points as honest clients do (two attackers per copied
  client framed it so: docs/security.md, "Groups that agree too closely"). What passes of a
  group this way still counts as one adapter in the merge.
- If none is flagged, ``clair merge`` counts the group as one adapter in the mean
  (:meth:`clair_cli.methods.clair.Clair.merge_weights`): a tight minority moves the merge by
  one adapter's weight, not by its size.

What an attacker who knows it can do: spread its members until their nearest-neighbour
cosines look honest. They then capture the centres less, and face rules 1-9 as independent
adapters; ``opposed-spread`` in the attack benchmark scans that spread, and at a third of the
pool it still costs the merge (docs/security.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from clair_cli.core.calibration import leave_one_out_cuts
from clair_cli.core.rules.base import ALPHA, Reason
from clair_cli.core.rules.context import Pass

MIN_ADAPTERS = 5  # below, the others' neighbour cosines set no threshold
TIGHT_FLOOR = math.log(1.5)  # neighbours at least 1.5x as close (in 1 - cos) as is typical
JOIN = 0.5  # a member joins at least half as tightly (in t) as the group agrees within itself
MAX_COSINE = 1 - 1e-12
SHARED = 0.5  # an unflagged member is flagged with its group past half-way to a cut that flagged a member
# The rules whose flag on one member flags its group: they judge where an update points, which
# the members share; the norm, in-subspace and spectral rules also judge its size, which they
# need not share. Not the rules of single modules (12, 14): a copy of an honest client's
# update flipped in one module agrees with the original far more closely than the pool does, and
# would have the original flagged with it; every member of a real group trips them on its own.
POINTING_RULES = ("direction", "whole_direction", "off_subspace", "joint", "module", "isolated", "opposed")


def log_distance(cosine: torch.Tensor) -> torch.Tensor:
    """``-log(1 - cos)``: a cosine as the log of its distance from identity (larger: closer)."""
    return -torch.log1p(-cosine.double().clamp(max=MAX_COSINE))


@dataclass(frozen=True)
class CoordinatedGroup:
    """A group: its members, the smallest cosine between two of them (``within``) and the
    cosine past which two adapters are tied (``tie``: the largest of the members' cuts)."""

    members: list[int]
    within: float
    tie: float


def coordinated_groups(cosine: torch.Tensor, copies: set[int] | None = None) -> list[CoordinatedGroup]:
    """Minority groups of adapters that agree with each other far more than is typical.

    Args:
        cosine: the ``K x K`` cosines of the adapters' whole updates.
        copies: adapters left out (the copies of duplicate groups: the kept member stands
            for its group); zero updates are left out too.

    Returns:
        The groups (two or more members, fewer than half of the adapters judged), members
        sorted, in the order of their smallest member.
    """
    copies = copies or set()
    # A zero update (an untrained adapter) has no direction (:func:`cosine_from_gram` gives it 0
    # everywhere, its own diagonal included): it neither joins a group nor counts among the
    # adapters that make one a minority.
    directed = cosine.diagonal().nan_to_num(nan=0.0) > 0
    idx = [k for k in range(cosine.shape[0]) if k not in copies and bool(directed[k])]
    n = len(idx)
    if n < MIN_ADAPTERS:
        return []
    c = cosine.double()[idx][:, idx].nan_to_num(nan=-1.0)
    c.fill_diagonal_(-math.inf)
    bound = tight_bounds(c)
    tight = [p for p in range(n) if math.isfinite(float(bound[p]))]
    if len(tight) < 2:
        return []
    t = log_distance(c.max(1).values)
    T = log_distance(c.clamp(min=-1.0))
    built: list[list[int]] = []
    inner: list[float] = []  # per group, the smallest t between two of its members (inf: one member)
    for p in sorted(tight, key=lambda p: (-float(t[p]), p)):
        for g, group in enumerate(built):
            ties = T[p, group]
            joins = inner[g] == math.inf or float(ties.min()) >= JOIN * inner[g]
            if joins and bool((ties > torch.maximum(bound[group], bound[p])).all()):
                group.append(p)
                inner[g] = min(inner[g], float(ties.min()))
                break
        else:
            built.append([p])
            inner.append(math.inf)
    out = []
    for found in (g for g in built if 1 < len(g) < n / 2):
        members = sorted(idx[p] for p in found)
        tie = -math.expm1(-float(bound[found].max()))  # back from t to a cosine
        out.append(CoordinatedGroup(members, _min_cosine(cosine, members), tie))
    return sorted(out, key=lambda g: g.members)


def neighbour_levels(n: int) -> list[int]:
    """The neighbour ranks judged among ``n`` adapters: every one up to 8, then about 1.5x
    apart, up to ``n // 2 - 1`` (a minority group's size less one); a group of ``g`` is seen
    at the level nearest below ``g - 1`` (the same members, a slightly weaker contrast)."""
    top = max(1, n // 2 - 1)
    levels = set(range(1, min(top, 8) + 1))
    m = 8.0
    while m < top:
        m *= 1.5
        levels.add(min(top, int(m)))
    return sorted(levels)


def tight_bounds(c: torch.Tensor) -> torch.Tensor:
    """Per adapter, the smallest cut (in ``t``) it is past at any level ``m``, inf where none.

    Level ``m`` (:func:`neighbour_levels`) judges the ``m``-th nearest neighbour's ``t`` against the
    others' at ``ALPHA`` over the number of levels: a group of ``g`` shows at level ``g - 1``,
    where honest adapters' ``m``-th neighbours are far, even when its members' nearest
    cosines alone look ordinary. ``c``: cosines with ``-inf`` on the diagonal.
    """
    n = c.shape[0]
    nearest = c.sort(1, descending=True).values
    levels = neighbour_levels(n)
    bound = torch.full((n,), math.inf, dtype=torch.float64)
    for m in levels:
        t = log_distance(nearest[:, m - 1].clamp(min=-1.0))
        for p, cut in enumerate(leave_one_out_cuts(t, torch.isfinite(t), ALPHA / len(levels), TIGHT_FLOOR)):
            if cut is not None and cut.margin(float(t[p])) > 1:
                bound[p] = min(float(bound[p]), cut.value)
    return bound


def _min_cosine(cosine: torch.Tensor, group: list[int]) -> float:
    within = cosine.double()[group][:, group]
    return float(within[~torch.eye(len(group), dtype=torch.bool)].min())


def group_masses(n_adapters: int, groups: list[CoordinatedGroup]) -> torch.Tensor:
    """Per adapter, its weight in a centre that counts each group as one adapter."""
    mass = torch.ones(n_adapters, dtype=torch.float64)
    for g in groups:
        mass[g.members] = 1.0 / len(g.members)
    return mass


class Coordinated:
    name = "coordinated"
    pointing = False

    def apply(self, ctx: Pass) -> None:
        for group in ctx.signals.coordinated:
            flagged = [k for k in group.members if self.evidence(ctx, k)]
            if not flagged:
                continue
            rules = set().union(*(self.pointed(ctx, k) for k in flagged))
            for k in group.members:
                if k in flagged or k in ctx.trusted or ctx.verdicts[k].flagged:
                    continue
                if self.shares(ctx, k, rules):
                    ctx.flag(k, self.reason(flagged, group))

    @staticmethod
    def pointed(ctx: Pass, k: int) -> set[str]:
        """The pointing rules that flagged ``k``: those of its listed reasons, and those whose margin
        on it passed the cut without a reason of their own (rule 15's or 2b's held behind rule 1's,
        :meth:`~clair_cli.core.rules.context.Pass.hold`; rule 2's written as rule 3's reason)."""
        v = ctx.verdicts[k]
        listed = {r.rule for r in v.reasons if r.rule in POINTING_RULES}
        return listed | {rule for rule in POINTING_RULES if v.signals.get(rule, -math.inf) > 1}

    @staticmethod
    def shares(ctx: Pass, k: int, rules: set[str]) -> bool:
        """Whether ``k`` itself leans where its flagged members point: past half-way from the typical
        to the cut (margin above :data:`SHARED`) on a rule that flagged one of them. A member that
        sits with the honest adapters on every such rule does not send the group's direction: an
        honest client whose deviation two attackers copied (they then agree with it and each other
        far more than the pool does) was flagged with them for the direction they added."""
        return max((ctx.verdicts[k].signals.get(rule, -math.inf) for rule in rules), default=-math.inf) > SHARED

    @staticmethod
    def evidence(ctx: Pass, k: int) -> bool:
        """Flagged for where its update points (not for its size: a scaled near-copy of an
        honest client's update, flagged by the norm rule, must not take that client with it)."""
        v = ctx.verdicts[k]
        return v.flagged and any(r.rule in POINTING_RULES for r in v.reasons)

    def reason(self, of: list[int], group: CoordinatedGroup) -> Reason:
        """Flagged with ``of`` (members flagged on their own signals), whose update it shares:
        ``value`` the group's smallest cosine within, ``threshold`` the tie cosine."""
        return Reason(
            kind="coordinated",
            cosine=group.within,
            of=tuple(of),
            rule=self.name,
            value=group.within,
            threshold=group.tie,
            compare=">",
            margin=None,
        )
