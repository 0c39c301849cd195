"""Rule 1, **direction**: the cosine between the adapter's update and the geometric median of
the other adapters' updates, every module's update scaled to unit norm first so that each
module counts once. Sign flips, label flips and updates of another task point elsewhere.

Each module's cosine is taken with that module's centre fitted without the adapter,
standardised (median, Qn over the pool) and averaged with weight median / Qn, so the modules
where the pool agrees on a direction carry the evidence. Each module's centre weighs the
adapters by their agreement (:func:`clair_cli.core.insubspace.agreement_masses`): a set that
agrees far more closely than the pool does counts as a few adapters, whatever its size. Floor: the raw cosine must have
dropped by ``DIRECTION_FLOOR`` and to 0.4 of the typical cosine; where the typical cosine is
below ``DIRECTION_FLOOR`` the others agree on no direction, the centre is noise, and the rule
is off. ``threshold`` in its reason is the bound on the raw cosine; ``margin`` the smaller
of the two margins. From the verdict's second pass on, every centre (whole-update and
per module) is fitted without the adapters the previous pass flagged and those pulling
past a quarter of rule 11's floor, while they are a minority
(:class:`clair_cli.core.insubspace.DirectionCentres`, :class:`clair_cli.core.audit.ModuleCentre`):
a flagged set that pulls the centre against an honest client (a sign-flipped copy of its
update) does not get it flagged, and a group that drags the centres to itself is measured
against the rest.
Below a dozen adapters the standardised statistic's critical value is capped
(:func:`clair_cli.core.calibration.rule_critical_value`); the raw floor still applies, with
the typical cosine measured with the adapter left out of the others' centres as well
(``direction_pairs``), since one adapter among five shapes a quarter of each centre.
"""

from __future__ import annotations

import math

import torch

from clair_cli.core.decompose import median
from clair_cli.core.rules.base import ALPHA, ModuleHit, Reason
from clair_cli.core.rules.context import CentreLimits, DirectionEvidence, Pass

DIRECTION_FLOOR = 0.1  # of cosine, and at least 0.6 of the typical cosine
DIRECTION_RELATIVE_FLOOR = 0.6


class Direction:
    name = "direction"
    pointing = True

    def apply(self, ctx: Pass) -> None:
        pool = ctx.signals
        direction, module_direction = ctx.direction_cosine, ctx.module_direction
        if direction is None or not module_direction:
            return
        # Per module standardised, averaged with the weight of the others' agreement on it,
        # against the others' averages; the raw cosine must also have dropped by the floor.
        per = {n: -c for n, c in module_direction.items()}
        z = ctx.standardised_mean(per, pool.members, by_agreement=True)
        raw = ctx.cuts(-direction.double(), ALPHA, 0.0)
        effect = torch.full((pool.n_adapters,), math.nan, dtype=torch.float64)
        for k, cut in enumerate(ctx.cuts(z, ALPHA, 0.0, capped=True)):
            centre = raw[k]
            if cut is None or centre is None:
                continue
            typical = typical_cosine(ctx, ctx.direction_pairs, k, -centre.centre)
            if typical < DIRECTION_FLOOR:  # the others agree on no direction: nothing to leave
                continue
            floor = max(DIRECTION_FLOOR, DIRECTION_RELATIVE_FLOOR * typical)
            effect[k] = (typical - float(direction[k])) / floor
            m = min(cut.margin(float(z[k])), float(effect[k]))
            if ctx.margin(k, m, self.name):
                ctx.flag(k, self.reason(float(direction[k]), typical, floor, m))
        ctx.direction = DirectionEvidence(z, effect)

    def reason(self, cosine: float, typical: float, floor: float, margin: float) -> Reason:
        return direction_reason(self.name, cosine, typical, floor, margin)


def direction_reason(rule: str, cosine: float, typical: float, floor: float, margin: float) -> Reason:
    """Rules 1 and 15: the cosine, the others' typical cosine and the bound on the cosine."""
    return Reason(
        kind=rule,
        cosine=cosine,
        typical=typical,
        rule=rule,
        value=cosine,
        threshold=typical - floor,
        compare="<",
        margin=margin,
    )


def typical_cosine(ctx: Pass, pairs: torch.Tensor | None, k: int, typical: float) -> float:
    """The others' typical cosine for adapter k: from ``pairs`` where given (k out of their
    centres too; the median over the same basis), else ``typical`` as given."""
    if pairs is None:
        return typical
    row = pairs[k]
    basis = ctx.basis(row)
    basis[k] = False
    if int(basis.sum()) < 3:
        return typical
    return float(median(row[basis]))


class WholeDirection:
    """Rule 15, **direction of the whole update** (``whole_direction``): the cosine of the
    adapter's whole update, every module at its own norm, with the geometric median of the
    others' whole updates (from the whole updates' Gram matrix), at ``ALPHA`` with rule 1's
    floors: a drop of ``DIRECTION_FLOOR`` and to 0.4 of the typical cosine (towards 0 where a few
    modules carry most of every update: :func:`whole_relative_floor`); off where the typical
    cosine is below ``DIRECTION_FLOOR``. In pools of up to 12 the typical cosine is taken with the
    judged adapter left out of the others' centres too, as rule 1's; the critical value is the
    exact one at every pool size (capped as rule 1's, it added five honest flags to the
    small-round benchmark's rounds of five to eight: 39 of 4,020 against 34).

    The centre is fitted on the two thirds of the pool most aligned with it
    (:func:`clair_cli.core.insubspace.peeled`), each point weighed by its agreement with the
    others, and from the second pass on without what the previous pass flagged. The rule judges
    only where the adapters the peel left out pull against some of the rest (their centre at a
    cosine below -0.1 with a kept adapter) or do not agree with each other: elsewhere they are a
    population of their own (:func:`clair_cli.core.insubspace.second_population`), such as the
    least aligned third of an honest pool, which shares its direction, or another task's honest
    adapters, which the rest's centre would flag as a whole; the rule is then off, silently
    (not a silent rule of the report: it is its usual state in a pool without free riders).

    Rule 1 scales every module to unit norm, so that a module of small updates counts as much
    as a large one; its cosines are noisy where the pool agrees mainly on a few large modules.
    An update that carries nothing along the pool's direction at a full norm (free riders made
    of the honest updates' differences: zero-sum combinations of them, in their subspace and
    at their norm) sat inside rule 1's honest spread and diluted the merge by its share of the
    pool (a third of the pool took a trained pool's merge from 0.76 to 0.39). Those updates
    also drag a centre fitted on everyone towards zero, and against the honest clients they
    subtract; hence the peeled centre.

    What an attacker who knows it can do: keep the whole cosine above its bound, so that each
    update carries at least 0.4 of the typical honest component along the others' centre (the
    attack benchmark's ``free-ride-span`` scans that cosine, docs/security.md); or send free
    riders as more than a third of the pool, which then reach into the peeled centre; or make
    the left-out set look like a population (free riders that agree with each other and subtract
    no honest client by more than a cosine of 0.1). Zero-sum combinations of a dozen honest
    updates subtract some of them by 0.2-0.6, but an adaptive search
    (``benchmarks/adaptive_search.py``) reached it with a dozen: each free rider a copy of one
    honest client's deviation from the honest mean, a little of the mean, a shared direction and
    noise. Such a set is made of the kept adapters (about half of each one's squared norm lies in
    their span, where another task's adapters have almost none), so it is no population now
    (:func:`clair_cli.core.insubspace.second_population`) and the rule judges it; a third of the
    pool at a whole cosine of 0.1-0.2 still passes its cut on some pools (docs/security.md).
    """

    name = "whole_direction"
    pointing = True

    def apply(self, ctx: Pass) -> None:
        cosine = ctx.whole_cosine
        if cosine is None:
            return
        cosine = cosine.double()
        relative = whole_relative_floor(ctx.signals.effective_modules)
        seen = ctx.flagged_for(("direction",))  # where it points, seen by rule 1 already: held
        for k, cut in enumerate(ctx.cuts(-cosine, ALPHA, 0.0)):  # the exact critical value (see above)
            if cut is None:
                continue
            typical = typical_cosine(ctx, ctx.whole_pairs, k, -cut.centre)
            if typical < DIRECTION_FLOOR:
                continue
            floor = max(DIRECTION_FLOOR, relative * typical)
            x = float(cosine[k])
            m = min(cut.margin(-x), (typical - x) / floor)
            if ctx.margin(k, m, self.name):
                reason = direction_reason(self.name, x, typical, floor, m)
                if k in seen:
                    ctx.hold(k, reason)
                else:
                    ctx.flag(k, reason)


def whole_relative_floor(modules: float) -> float:
    """Rule 15's relative floor, a fraction of the typical cosine, over an effective number of
    ``modules`` (:attr:`~clair_cli.core.rules.context.PoolSignals.effective_modules`): rule 1's
    (``DIRECTION_RELATIVE_FLOOR``) where the whole cosine averages many modules, rule 12's
    (``MODULE_DIRECTION_RELATIVE_FLOOR``: below 0) where one module carries the whole update,
    ``0.6 + 0.4 / modules`` between. One module's cosines are skewed (see rule 12), so where one
    module dominates every update's norm the whole cosine is that module's, and an honest client
    that agrees loosely there sits near 0 far more often than a Gaussian model says: with rule 1's
    floor, 5 honest clients of 96 trained pools whose clients' one module was scaled x3 or x10
    were flagged, 1 with this one (it points against the others, at -0.17)."""
    return DIRECTION_RELATIVE_FLOOR + (MODULE_DIRECTION_RELATIVE_FLOOR - DIRECTION_RELATIVE_FLOOR) / max(modules, 1.0)


# On one module alone an update must point against the others' centre (cosine below 0), not
# only away from it: one module's cosines are skewed (bounded by 1), and a loosely agreeing
# honest client sits near 0 on some module of many far more often than a Gaussian model says.
MODULE_DIRECTION_RELATIVE_FLOOR = 1.0


class ModuleDirection:
    """Rule 12, **direction per module** (``module_direction``): on each module, the cosine of
    the adapter's update with that module's centre of the others (the cosines rule 1 averages),
    at ``ALPHA / M`` (Bonferroni over the modules), with floors on that module: the cosine must
    have dropped by ``DIRECTION_FLOOR`` and below 0 (``MODULE_DIRECTION_RELATIVE_FLOOR``: rule 1
    asks 0.6 of the typical cosine), and the module is off where the others agree on no
    direction (typical under ``DIRECTION_FLOOR``). The exact critical value at every pool size.

    An update sign-flipped (or turned elsewhere) in one module of many and honest in the rest
    moves rule 1's average by one module's worth and no whole-update statistic at all; this is
    the per-module view, as rule 3 is rule 2's. An attacker who knows it keeps every module's
    cosine above its cut, which bounds how far that module points away from the others'.
    """

    name = "module_direction"
    pointing = False

    def apply(self, ctx: Pass) -> None:
        pool = ctx.signals
        if not ctx.module_direction:
            return
        values = {n: -c.double() for n, c in ctx.module_direction.items()}
        hits = ctx.per_module(
            values,
            pool.members,
            DIRECTION_FLOOR,
            relative=MODULE_DIRECTION_RELATIVE_FLOOR,
            centre=CentreLimits(at_most=-DIRECTION_FLOOR),
            signal=self.name,
            skip=ctx.flagged_for(("direction", "joint")),  # where it points, seen over all modules already
        )
        for k, items in sorted(hits.items()):
            ctx.flag(k, self.reason(items))

    def reason(self, items: list[ModuleHit]) -> Reason:
        """The module farthest out: its cosine, the others' typical cosine there and the bound."""
        return downward_reason(self.name, items, cosine=True)


def downward_reason(rule: str, items: list[ModuleHit], cosine: bool = False) -> Reason:
    """The reason of a per-module rule run on minus its statistic (rules 12 and 14): on the
    module farthest out, the statistic, the others' typical value there and the bound, back in
    the statistic's own sign."""
    excess, module, value, bound, _m = items[0]
    return Reason(
        kind=rule,
        cosine=-value if cosine else None,
        typical=excess - value,
        modules=tuple(h.module for h in items),
        module=module,
        rule=rule,
        value=-value,
        threshold=-bound,
        compare="<",
        margin=max(h.margin for h in items),
    )


PROJECTION_RELATIVE_FLOOR = 1 + DIRECTION_RELATIVE_FLOOR  # below -0.6 of the typical: pulling against it


class ModuleProjection:
    """Rule 14, **against the others on a module** (``module_projection``): on each module, the
    component of the adapter's update along that module's centre of the others (rule 12's
    cosine times the update's norm), in units of the module's median norm, at ``ALPHA / M``;
    downward only, floor: below ``-0.6`` times the others' typical component there (an update
    orthogonal to the centre, at 0, is never flagged), off where that typical component is
    under ``DIRECTION_FLOOR``.

    Rule 12 reads the direction alone and rule 13 the size alone, each with its own floor: a
    module sign-flipped and boosted just under the norm floor (x -3.9) passed both where the
    others' cosines spread, while it pulled that module of the merge back by nearly four
    honest updates. This is their product, which an attacker cannot keep typical while
    pulling against the others.
    """

    name = "module_projection"
    pointing = False

    def apply(self, ctx: Pass) -> None:
        pool = ctx.signals
        if not ctx.module_direction or not pool.module_norms:
            return
        values = {}
        for name, cosine in ctx.module_direction.items():
            norms = pool.module_norms.get(name)
            if norms is None:
                continue
            norms = norms.double()
            positive = norms[norms > 0]
            if positive.numel() < 3:
                continue
            values[name] = -cosine.double() * norms / float(positive.median())
        hits = ctx.per_module(
            values,
            pool.members,
            DIRECTION_FLOOR,
            relative=PROJECTION_RELATIVE_FLOOR,
            centre=CentreLimits(at_most=-DIRECTION_FLOOR),
            signal=self.name,
            skip=ctx.flagged_for(("direction", "joint", "module_direction")),
        )
        for k, items in sorted(hits.items()):
            ctx.flag(k, self.reason(items))

    def reason(self, items: list[ModuleHit]) -> Reason:
        """The module farthest out: the component along the others' centre (in the module's
        median norms), the others' typical component there and the bound."""
        return downward_reason(self.name, items)
