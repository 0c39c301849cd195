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
from clair_cli.core.rules.base import ALPHA, Reason
from clair_cli.core.rules.context import DirectionEvidence, Pass

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
            typical = self._typical(ctx, k, -centre.centre)
            if typical < DIRECTION_FLOOR:  # the others agree on no direction: nothing to leave
                continue
            floor = max(DIRECTION_FLOOR, DIRECTION_RELATIVE_FLOOR * typical)
            effect[k] = (typical - float(direction[k])) / floor
            m = min(cut.margin(float(z[k])), float(effect[k]))
            if ctx.margin(k, m, self.name):
                ctx.flag(k, self.reason(float(direction[k]), typical, floor, m))
        ctx.direction = DirectionEvidence(z, effect)

    @staticmethod
    def _typical(ctx: Pass, k: int, typical: float) -> float:
        """The others' typical cosine: from ``direction_pairs`` where given (k out of their
        centres too; the median over the same basis), else ``typical`` as given."""
        pairs = ctx.direction_pairs
        if pairs is None:
            return typical
        row = pairs[k]
        basis = ctx.basis(row)
        basis[k] = False
        if int(basis.sum()) < 3:
            return typical
        return float(median(row[basis]))

    def reason(self, cosine: float, typical: float, floor: float, margin: float) -> Reason:
        return Reason(
            kind="direction",
            cosine=cosine,
            typical=typical,
            rule=self.name,
            value=cosine,
            threshold=typical - floor,
            compare="<",
            margin=margin,
        )
