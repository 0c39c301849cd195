"""Rule 9, **a group against the rest** (``opposed``): evidence combined over a group.

Attacks tuned to pass every per-adapter rule (a third of the clients sign-flipped where the
honest ones agree only weakly, Fang et al.'s trimmed-mean attack, inner-product
manipulation) share one trait: their members, together, point *against* the others. Each
member alone may sit inside the pool's spread, and a third of the pool drags the centre
that rule 1 measures against until the pool looks as if it agreed on nothing; but the
group's mean update has a clearly negative cosine with the mean of the rest, which a split
of one honest pool never has (the honest clients of one task all carry its common
direction, and the mean of several carries it more clearly than any one of them).

The split is the sign pattern of the leading eigenvector of the cosine matrix ``C`` of the
updates (every module at unit norm, copies counted once): the minority side ``S`` against
the majority ``T``. With indicator vectors ``s``, ``t``:

    cos(S, T) = s^T C t / sqrt(s^T C s * t^T C t)

The group side must be a minority of at most a third of the pool (``|S| <= |T| / 2``): a
pool of honest clients without a common direction (updates spread around zero inside a small
subspace) splits into two halves of similar size, each agreeing within itself, which a
larger minority could not be told from. ``T`` must agree on a direction: the consensus, the
median cosine of ``T``'s members with the mean of ``T``'s other members, is at least
``CONSENSUS`` (rule 1's floor; below it, splits of a pool without a common direction are
noise and the rule is off). A member of ``S`` joins the group ``G`` when its cosine with
``T``'s mean lies below the cosines of ``T``'s own members by the calibrated cut (``ALPHA``,
the small-pool critical value) and by at least the consensus (so below zero): a loosely
agreeing honest client that falls on ``S``'s side does not.
``G``'s members are flagged when also ``cos(G, T) < -OPPOSED_COSINE``; the margin is the
smaller of the two.
Measured (``benchmarks/attacks.py``, six trained pools): no honest pool, nor any
subset of 5 to 12 honest clients, splits at all; sign flips, Fang's trimmed-mean attack and
IPM at 20-33 % split out exactly the attackers at -0.58 to -0.99. On synthetic pools without
a common direction, spurious splits reach -0.24 (hence the consensus gate and the floor).

What an attacker who knows it can still do: keep the group's mean cosine with the rest above
``-OPPOSED_COSINE``; its pull against the honest direction is then at most that cosine times
its norm, which the norm rule and bounded influence (:mod:`clair_cli.core.influence`) bound.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from clair_cli.core.calibration import qn_scale, rule_critical_value, rule_tail_probability, upper_cut
from clair_cli.core.decompose import median
from clair_cli.core.insubspace import agreement_masses
from clair_cli.core.rules.base import ALPHA, Reason
from clair_cli.core.rules.context import Pass

if TYPE_CHECKING:
    from clair_cli.core.rules.coordinated import CoordinatedGroup

OPPOSED_COSINE = 0.2  # the group's mean against the rest's: cosine below -0.2
CONSENSUS = 0.1  # the rest must agree on a direction (rule 1's floor)
MINORITY = 0.5  # the group is at most half the rest: a third of the pool


class Opposed:
    name = "opposed"
    pointing = False

    def apply(self, ctx: Pass) -> None:
        C = ctx.signals.cosine
        if C is None:
            return
        # Copies once; a coordinated group with all its members: the split it makes is its own.
        copies = {k for g in ctx.signals.duplicates for k in g[1:]}
        order = ctx.signals.order or list(range(len(ctx.verdicts)))
        idx = [k for k in order if k not in copies]  # canonical order: eigh's signs are reproducible
        if len(idx) < 3:
            return
        sub = C.double()[idx][:, idx]
        v = torch.linalg.eigh(sub).eigenvectors[:, -1]
        if int((v < 0).sum()) > int((v > 0).sum()):
            v = -v
        s, t = (v < 0).double(), (v >= 0).double()
        if not 0 < float(s.sum()) <= MINORITY * float(t.sum()):
            return
        tt = float(t @ sub @ t)
        if tt <= 0:
            return
        consensus = self.consensus(sub, t)
        if consensus < CONSENSUS:
            return
        # Members that point against the rest: their cosine with the rest's mean, against the
        # same cosine of the rest's own members (each with the mean of the others), calibrated
        # as every rule is, and at least the consensus below it (so below zero).
        own = (sub @ t) / (sub.diagonal() * tt).sqrt()
        cut = upper_cut(-self.agreement(sub, t), ALPHA, consensus, capped=True)
        if cut is None:
            return
        margins = torch.tensor([cut.margin(-float(x)) for x in own], dtype=torch.float64)
        against = s.bool() & (margins > 1)
        if not bool(against.any()):
            return
        a = against.double()
        group = float(a @ sub @ t) / (float(a @ sub @ a) * tt) ** 0.5
        members = [idx[p] for p in torch.nonzero(against).flatten().tolist()]
        for p in torch.nonzero(against).flatten().tolist():
            k = idx[p]
            margin = min(-group / OPPOSED_COSINE, float(margins[p]))
            if ctx.margin(k, margin, self.name):
                ctx.flag(k, self.reason(group, consensus, [j for j in members if j != k], margin))

    @staticmethod
    def agreement(sub: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Each member of ``T``'s cosine with the mean of ``T``'s other members; ``t``: ``T``'s
        indicator, or its members' weights in that mean (rule 16)."""
        members = torch.nonzero(t).flatten()
        w = t[members]
        row = sub[members] @ t  # <x_j, sum_T>
        diag = sub.diagonal()[members]
        rest = (float(t @ sub @ t) - 2 * w * row + w * w * diag).clamp_min(1e-300)  # ||sum_{T \ j}||^2
        return (row - w * diag) / (diag * rest).sqrt()

    def consensus(self, sub: torch.Tensor, t: torch.Tensor) -> float:
        """The median of :meth:`agreement` (``-inf`` with fewer than three members)."""
        return median(self.agreement(sub, t)) if int(t.sum()) >= 3 else float("-inf")

    def reason(self, cosine: float, typical: float, others: list[int], margin: float) -> Reason:
        return Reason(
            kind="opposed",
            cosine=cosine,
            typical=typical,
            of=tuple(others),
            rule=self.name,
            value=cosine,
            threshold=-OPPOSED_COSINE,
            compare="<",
            margin=margin,
        )


MODULE_OPPOSED_COSINE = 0.4  # rule 16: the group's mean against the rest's on one module
SPLITS = 2  # candidate splits per module (rule 16): the leading eigenvector's and rule 12's signs
SPLIT_STEPS = 5  # at most, refining a split (rule 16)
MIN_GROUP = 3  # rule 16's smallest group: two honest clients of one skew point together on a module
# Rule 16 leaves a group whose core, but for fewer than MIN_GROUP members, these flagged: where
# it points, seen over all modules.
WHOLE_POINTING = ("direction", "whole_direction", "joint", "opposed")


@dataclass(frozen=True)
class ModuleCosines:
    """What rule 16 reads of one module: its members' pool indices, their cosine matrix and
    their cosines with the module's centre (rule 12's), over the members with a nonzero update,
    copies once, in the module's canonical order; ``copies``, per member, the pool indices of the
    other members that send the same update on this module (none where empty)."""

    adapters: tuple[int, ...]
    cosine: torch.Tensor
    centre: torch.Tensor
    copies: tuple[tuple[int, ...], ...] = ()

    def multiplicity(self, once: Collection[int] = ()) -> torch.Tensor:
        """How many adapters each member stands for: itself and its copies, less those in
        ``once`` (copies of a whole update, which count as one adapter everywhere)."""
        counts = [max(sum(1 for k in self.stands_for(j) if k not in once), 1) for j in range(len(self.adapters))]
        return torch.tensor(counts, dtype=torch.float64)

    def stands_for(self, j: int) -> tuple[int, ...]:
        """Member ``j`` and the adapters that copy its update on this module."""
        return (self.adapters[j], *(self.copies[j] if self.copies else ()))


@dataclass(frozen=True)
class ModuleGroup:
    """A group rule 16 found on one module: its members (pool indices) and each one's margin;
    ``core``, the members whose evidence combined shows the group (its mean's cosine with the
    rest's there is ``cosine``), and the rest's consensus."""

    module: str
    members: tuple[int, ...]
    margins: tuple[float, ...]
    core: tuple[int, ...]
    cosine: float
    consensus: float


class ModuleOpposed:
    """Rule 16, **a group against the rest on one module** (``module_opposed``): rule 9 on each
    module, with the evidence of the group's members combined.

    A coordinated group that sends honest updates with one module turned against the others
    (the attack benchmark's ``module-flip``: honest clients' updates with one module times
    ``-1``) moves no statistic over all modules by more than one module's worth, and on that
    module each member alone may sit inside the others' spread: mirror images of honest
    clients are as coherent as the honest clients are, drag the module's centre (rule 12's)
    towards zero and widen the spread every per-adapter cut there is measured against.
    Measured on the attack benchmark's six trained pools before this rule: the flipped
    members' rule-12 margins were 0.59-0.84 (the highest of the pool, under the cut at
    ``ALPHA / M``), and a fifth or a third of the pool flipped at the honest norm passed.

    On each module, over its members with a nonzero update (copies of one update once in every
    statistic and in the evidence, which one p-value is however many adapters send it, but as the
    adapters they are in the group side's size, and each copy of a flagged member is flagged with
    it; copies of a whole update, flagged as such already, count as one adapter):

    1. **Two splits, each refined.** The sign pattern of the leading eigenvector of the
       members' cosine matrix (rule 9's split), and the members pointing against the module's
       centre (rule 12's cosine below 0). Refining moves, until the split repeats (at most
       ``SPLIT_STEPS`` times), every member whose cosine with the mean of the rest's side
       (less itself) is negative to the group side ``S``, the others to the rest ``T``: a
       mirror image left on ``T``'s side drags its original against ``T``'s mean; refined,
       every mirror image is on ``S``'s side.
    2. **Rule 9's gates.** ``S`` is a minority of at most half of ``T`` (a third of the module's
       members: a module whose honest clients split into near-halves, which happens in loose
       pools, is left alone) and of at least ``MIN_GROUP`` (three: two honest clients of one
       skew point against the rest on a module together, at -0.2 on ``majority`` seed 1 and at
       -0.41 on revsucc seed 0 with a coordinated third in the rest; one member alone is rule
       12's), and ``T`` agrees (its consensus, the median cosine of ``T``'s members with the
       mean of ``T``'s others, at least ``CONSENSUS``).
    3. **The evidence combined over the group.** ``T``'s mean weighs its members by their
       agreement (:func:`clair_cli.core.insubspace.agreement_masses`, over ``T``), and each of
       rule 10's groups as one member (in the mean, ``1 / g`` each; in the thresholds, one of
       them): a set within ``T`` that agrees far more closely than ``T`` does counts as a few
       members. Without the weights, a coordinated third of the pool pushing one way
       (``opposed-spread-norm`` at 33 %) made ``T``'s mean its own on a module, four honest
       clients pointed against it, and the passes that followed, fitted without them, flagged
       nine honest clients and no attacker. Each member of ``S`` is judged by its cosine with
       ``T``'s mean against the same values of every other member (``T``'s: each one's cosine
       with the mean of ``T``'s others; ``S``'s included: the split has moved an honest module's
       lower tail to ``S``, and ``T`` alone was a trimmed reference that flagged honest clients
       of rank-1 synthetic pools in 8 of 20, found by an outside review), with the calibrated
       law and the consensus as floor (below zero at least), as a p-value. Among ``n`` honest
       members, ``g`` past the level ``a_g`` have probability at most ``C(n, g) a_g^g`` where
       their p-values are independent (approximately: they share one reference), so
       ``a_g = (ALPHA / (M * SPLITS * (G - MIN_GROUP + 1) * C(n, g)))^(1/g)`` keeps the chance
       that an honest module shows a group at ``ALPHA`` over the ``M`` modules that can hold one
       (at least ``MIN_GROUP`` distinct updates at a third), both splits and the group sizes
       ``MIN_GROUP`` to ``G`` (the largest minority), ``n`` and ``g`` counting distinct updates:
       copies of one update are one p-value (counted as several, an outside review got an unusual
       honest client flagged through a family of adapters sharing its module, and through two
       sybils copying it at 1 % of its norm). The core is the largest
       ``g`` with at least ``g`` members past ``a_g``; its mean update must have a cosine below
       ``-MODULE_OPPOSED_COSINE`` with ``T``'s.
    4. **Members at ALPHA.** Where a core shows a group, the members of ``S`` past the cut at
       ``ALPHA`` (the false-flag rate of every rule) are flagged, each with the margin of the
       smaller of the group's cosine (over its bound) and its own cut. A core's level is looser
       than ``ALPHA``, but an honest member that only rides along with the attackers is flagged
       at ``ALPHA`` alone.

    A group whose core, but for fewer than ``MIN_GROUP`` members, rules 1, 15, 2b or 9 already
    flagged (where it points, seen over all modules) is left to them: an honest client that
    points against the rest on one module (``majority`` seed 1 has one) rode along with groups
    of IPM, Min-Max, Fang and trimmed-mean attackers that those rules flag. Off in ``clair
    gate`` (the references' centre judges each upload).

    The group's bound is twice rule 9's: one module's cosines spread more than the whole
    update's. Measured: ``python -m benchmarks.module_groups`` (honest margins on the attack
    benchmark's six trained pools and 180 subsets of them; one module flipped in synthetic pools)
    and ``python -m benchmarks.attacks --attacks module-flip`` (docs/security.md#one-module).
    Where the honest clients agree only loosely on the flipped module (``revsucc`` seed 1,
    consensus 0.12; ``majority`` seed 2) a flipped group still passes. A label-skewed honest
    minority of three or more on a head-like module looks exactly like a flipped group (an
    outside review built one: flagged).

    What an attacker who knows it can do: keep the group's mean cosine with the rest above
    ``-MODULE_OPPOSED_COSINE`` on every module, or each member's cosine with the rest's mean
    above the cuts, or send more than a third of the module's members, or two; it then pulls
    that module of the merge against the others by at most that cosine times its norm, which
    the norm bound (:mod:`clair_cli.core.influence`) limits. Or have one member of three
    flagged over all modules (an obvious one), which leaves the other two to rule 12.
    """

    name = "module_opposed"
    pointing = False

    def apply(self, ctx: Pass) -> None:
        found: dict[int, list[tuple[float, ModuleGroup]]] = {}
        seen = ctx.flagged_for(WHOLE_POINTING)
        for group in ctx.signals.module_groups:
            if len(set(group.core) - seen) < MIN_GROUP:  # where they point, seen over all modules already
                continue
            for k, margin in zip(group.members, group.margins, strict=True):
                if ctx.margin(k, margin, self.name):
                    found.setdefault(k, []).append((margin, group))
        for k, hits in sorted(found.items()):
            hits.sort(key=lambda h: (-h[0], h[1].module))
            ctx.flag(k, self.reason(k, hits))

    def reason(self, k: int, hits: list[tuple[float, ModuleGroup]]) -> Reason:
        """The module where the group is farthest out, and every module where one flagged it."""
        margin, group = hits[0]
        return Reason(
            kind=self.name,
            cosine=group.cosine,
            typical=group.consensus,
            modules=tuple(g.module for _, g in hits),
            module=group.module,
            of=tuple(j for j in dict.fromkeys(group.core + group.members) if j != k),
            rule=self.name,
            value=group.cosine,
            threshold=-MODULE_OPPOSED_COSINE,
            compare="<",
            margin=margin,
        )


def module_groups(
    modules: Mapping[str, ModuleCosines],
    coordinated: Sequence[CoordinatedGroup] = (),
    copies: Collection[int] = (),
) -> list[ModuleGroup]:
    """Rule 16's groups over every module (:class:`ModuleOpposed`), in module order. Each of
    ``coordinated`` (rule 10's groups) counts as one adapter in the rest's mean and thresholds;
    ``copies`` (copies of a whole update, flagged as such) count as one adapter with the one
    they copy; any other copies of a module's update count as the adapters they are."""
    mult = {name: m.multiplicity(copies) for name, m in modules.items()}
    # The union bound runs over the modules that can hold a group of distinct updates at all.
    n_modules = max(sum(largest_minority(len(m.adapters)) >= MIN_GROUP for m in modules.values()), 1)
    out: list[ModuleGroup] = []
    for name, m in modules.items():
        once = (*_counted_once(m.adapters, coordinated), mult[name])
        seen: set[tuple[bool, ...]] = set()
        for s in _splits(m.cosine.double(), m.centre.double()):
            key = tuple(s.tolist())
            if key in seen:
                continue
            seen.add(key)
            group = _judge(name, m, s, n_modules, once)
            if group is not None and all(g.members != group.members for g in out if g.module == name):
                out.append(group)
    return out


def _counted_once(
    adapters: tuple[int, ...], coordinated: Sequence[CoordinatedGroup]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per member of a module: its weight (``1 / g`` in a coordinated group of ``g`` there) and
    whether it sets thresholds (one member of each such group does, the first)."""
    mass = torch.ones(len(adapters), dtype=torch.float64)
    setter = torch.ones(len(adapters), dtype=torch.bool)
    where = {a: i for i, a in enumerate(adapters)}
    for group in coordinated:
        present = [where[a] for a in group.members if a in where]
        if len(present) > 1:
            mass[present] = 1.0 / len(present)
            setter[present[1:]] = False
    return mass, setter


def _splits(C: torch.Tensor, centre: torch.Tensor) -> Iterator[torch.Tensor]:
    """The two candidate group sides of a module, each refined (:class:`ModuleOpposed`)."""
    if C.shape[0] < 3:
        return
    v = torch.linalg.eigh(C).eigenvectors[:, -1]
    if int((v < 0).sum()) > int((v > 0).sum()):
        v = -v
    yield _refined(C, v < 0)
    yield _refined(C, centre < 0)


def _refined(C: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``s`` moved, until it repeats, to the members whose cosine with the mean of the others on
    the rest's side (less themselves) is negative."""
    diag = C.diagonal()
    for _ in range(SPLIT_STEPS):
        t = (~s).double()
        row = C @ t
        rest = (float(t @ C @ t) - 2 * row * t + diag * t).clamp_min(1e-300)  # ||sum_T - [k in T] x_k||^2
        new = (row - diag * t) / (diag * rest).sqrt() < 0
        if bool((new == s).all()):
            break
        s = new
    return s


def largest_minority(n: int) -> int:
    """The largest group of ``n`` members that is at most ``MINORITY`` times the rest."""
    return int(math.floor(MINORITY * n / (1 + MINORITY) + 1e-9))


def group_level(n: int, g: int, n_modules: int) -> float:
    """Rule 16's level for each of ``g`` members among ``n`` (:class:`ModuleOpposed`)."""
    groups = max(largest_minority(n) - MIN_GROUP + 1, 1)
    return min((ALPHA / (n_modules * SPLITS * groups * math.comb(n, g))) ** (1 / g), 0.25)


def _judge(
    name: str,
    m: ModuleCosines,
    s: torch.Tensor,
    n_modules: int,
    once: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> ModuleGroup | None:
    """The group of side ``s`` that points against the rest on module ``m``, if any; ``n_modules``:
    the modules that can hold a group; ``once``: :func:`_counted_once` and how many adapters each
    member stands for (its copies on ``m``)."""
    C = m.cosine.double()
    mass, setter, mult = once
    # Sizes count copies of one module update as the adapters they are (the group side is at most
    # a third of the module's adapters); the evidence counts each distinct update once.
    n, h = round(float(mult.sum())), round(float(mult[s].sum()))
    if not MIN_GROUP <= h <= MINORITY * (n - h):
        return None
    # T's mean weighs its members by their agreement: a set within T that agrees far more closely
    # than T does (a coordinated third of the pool) counts as a few members, not as the rest; a
    # group rule 10 found counts as one member, in the mean and in the thresholds.
    t = (~s).double() * agreement_masses(C, ~s) * mass
    tt = float(t @ C @ t)
    if tt <= 0:
        return None
    # Each member of S against T's own members (each one's cosine with the mean of T's others):
    # p-values of the calibrated law, past the floor (the consensus: below zero at least).
    basis = -Opposed.agreement(C, t)[setter[~s]]
    if basis.numel() < 3:
        return None
    consensus = -median(basis)
    if consensus < CONSENSUS:
        return None
    own = (C @ t) / (C.diagonal() * tt).sqrt()
    # Each member of S against every other member (S's own included): the split has moved the
    # lower tail of an honest module to S, so T alone is a trimmed reference.
    x = -own.clone()
    x[~s] = -Opposed.agreement(C, t)
    side = torch.nonzero(s).flatten().tolist()
    p, cuts = {}, {}
    for j in side:
        others = setter.clone()
        others[j] = False
        ref = x[others]
        c_j, sigma = median(ref), float(qn_scale(ref))
        cuts[j] = (c_j, max(rule_critical_value(ref.numel(), ALPHA) * sigma, consensus))
        if float(x[j]) > c_j + consensus:
            p[j] = rule_tail_probability(ref.numel(), (float(x[j]) - c_j) / sigma) if sigma > 0 else 0.0
    # The largest g with at least g distinct updates past the level of g (S is a minority: at most
    # G). Copies of one update are one p-value, never a group: a family of adapters that share a
    # module, or copies of an honest client's module that an attacker sends, are no independent
    # members (counted as such, an outside review got an atypical honest client flagged both ways).
    for g in range(len(side), MIN_GROUP - 1, -1):
        members = [j for j in side if p.get(j, 1.0) <= group_level(len(m.adapters), g, n_modules)]
        if len(members) >= g:
            break
    else:
        return None
    a = torch.zeros(len(m.adapters), dtype=torch.float64)
    a[members] = mult[members]
    cosine = float(a @ C @ t) / (float(a @ C @ a) * tt) ** 0.5
    # The group shows that this module holds one; each member is then judged at ALPHA, and its
    # copies with it.
    judged = sorted(set(members) | {j for j in side if p.get(j, 1.0) <= ALPHA})
    flagged: list[int] = []
    margins: list[float] = []
    for j in judged:
        margin = min(-cosine / MODULE_OPPOSED_COSINE, (float(x[j]) - cuts[j][0]) / cuts[j][1])
        flagged += m.stands_for(j)
        margins += [margin] * len(m.stands_for(j))
    core = tuple(k for j in members for k in m.stands_for(j))
    return ModuleGroup(name, tuple(flagged), tuple(margins), core, cosine, consensus)
