"""Rule 8, **no neighbour** (``isolated``): the adapter's largest cosine with any other
adapter (every module at unit norm; its own copies aside; in a gate, with the references), on
the log scale, against the others' largest cosines, floor a third of the typical. Another
task's adapter shares nothing with any client, where honest clients of one task, however
skewed their data, have a neighbour.

As the joint rule, it also needs half of rule 1's raw effect (the drop of its cosine with the
others' centre in units of rule 1's floor; off where the others agree on no direction) and a
rule-1 margin above a half in this pass: where honest adapters share little, one of them
lacks a close neighbour by chance, but it still points the pool's way.

The typical is capped at twice the others' third-nearest cosine (the width of the cut is the
nearest cosines' own). A nearest cosine is easy to manufacture: an attacker who copies an honest
client's deviation gives itself and that client a close neighbour, and six such attackers
among twelve honest clients made two thirds of the pool "typical" at a nearest cosine of 0.71,
under a third of which the honest clients nobody copied (0.15-0.22) then lay. To raise an
adapter's third-nearest cosine an attacker needs three adapters near it: three attackers per
copied client (a third of the pool then raises fewer than half the values), or attackers that
each mix three clients' deviations (each then nearer to each client by only about
``1 / sqrt(3)``). In pools of 5 or 6 adapters (4 or 5 neighbours) there is no cap: a
third-nearest cosine is then among the farther half, far under the nearest of a pool of
heterogeneous clients (a cap on the second-nearest there let a sign flip of 30 pass on the
small rounds, where rule 8 had caught it). On the trained pools the others' nearest cosine is
1.18-1.68x their third-nearest, so the cap leaves the typical as it was (docs/security.md,
"Free riders posing as a population").
"""

from __future__ import annotations

import math

import torch

from clair_cli.core.calibration import Cut
from clair_cli.core.rules.base import ALPHA, Reason
from clair_cli.core.rules.context import Pass

ISOLATED_FACTOR = 3.0  # rule 8: the nearest neighbour's cosine at most a third of the typical
ISOLATED_MIN_COSINE = 1e-3  # nearest cosines below (or negative) count as this
HALF = 0.5  # of rule 1's raw effect and margin
CAP_RANK = 3  # the typical nearest cosine at most CAP_FACTOR times the others' CAP_RANK-th nearest
# (where that is among the nearer half of each one's neighbours: 6 of them or more)
CAP_FACTOR = 2.0


def log_scale(cosine: torch.Tensor) -> torch.Tensor:
    """``-log`` of the cosines (at least :data:`ISOLATED_MIN_COSINE`); NaN where none (-inf)."""
    x = -torch.log(cosine.clamp_min(ISOLATED_MIN_COSINE))
    return x.where(torch.isfinite(cosine), torch.full_like(x, math.nan))


def capped(cut: Cut | None, cap: Cut | None) -> Cut | None:
    """``cut`` (from the others' nearest cosines) with its typical lowered to ``cap``'s where
    that is lower (on the log scale, the larger centre); its width unchanged."""
    if cut is None or cap is None or cap.centre <= cut.centre:
        return cut
    return Cut(cap.centre, cut.width)


class Isolated:
    name = "isolated"
    pointing = False

    def apply(self, ctx: Pass) -> None:
        cosine, direction = ctx.signals.cosine, ctx.direction
        if cosine is None or direction is None:
            return
        ranked = self.ranked(ctx, cosine)
        nearest = ranked[:, 0]
        x = log_scale(nearest)
        floor = math.log(ISOLATED_FACTOR)
        cuts = ctx.cuts(x, ALPHA, floor)
        neighbours = int(torch.isfinite(ranked).sum(1).max())
        if neighbours >= 2 * CAP_RANK:  # the cap: CAP_FACTOR x the others' CAP_RANK-th nearest
            caps = ctx.cuts(x, ALPHA, floor, calibration=log_scale(ranked[:, CAP_RANK - 1]) - math.log(CAP_FACTOR))
            cuts = [capped(a, b) for a, b in zip(cuts, caps, strict=True)]
        for k, cut in enumerate(cuts):
            pointing = ctx.verdicts[k].signals.get("direction", -math.inf)  # rule 1's margin, this pass
            if cut is None or not bool(direction.effect[k] > HALF) or pointing <= HALF:
                continue
            m = min(cut.margin(float(x[k])), 2 * pointing)
            if ctx.margin(k, m, self.name):
                ctx.flag(k, self.reason(float(nearest[k]), math.exp(-cut.centre), math.exp(-cut.value), m))

    def ranked(self, ctx: Pass, cosine: torch.Tensor) -> torch.Tensor:
        """Per adapter, its cosines with the other adapters that are not its copies (in a
        gate, with the references), largest first (-inf past the last)."""
        K = len(ctx.verdicts)
        group_of = {k: set(g) for g in ctx.signals.duplicates for k in g}
        allowed = torch.ones(K, K, dtype=torch.bool)
        allowed.fill_diagonal_(False)
        for k, group in group_of.items():
            allowed[k, list(group)] = False
        if ctx.gated:
            allowed &= torch.tensor([j in ctx.trusted for j in range(K)], dtype=torch.bool)[None, :]
        c = cosine.double().where(allowed, torch.full((K, K), -math.inf, dtype=torch.float64))
        return c.sort(1, descending=True).values

    def reason(self, cosine: float, typical: float, bound: float, margin: float) -> Reason:
        return Reason(
            kind="isolated",
            cosine=cosine,
            typical=typical,
            rule=self.name,
            value=cosine,
            threshold=bound,
            compare="<",
            margin=margin,
        )
