"""Rule 8, **no neighbour** (``isolated``): the adapter's largest cosine with any other
adapter (every module at unit norm; its own copies aside; in a gate, with the references), on
the log scale, against the others' largest cosines, floor a third of the typical. Another
task's adapter shares nothing with any client, where honest clients of one task, however
skewed their data, have a neighbour.

As the joint rule, it also needs half of rule 1's raw effect (the drop of its cosine with the
others' centre in units of rule 1's floor; off where the others agree on no direction) and a
rule-1 margin above a half in this pass: where honest adapters share little, one of them
lacks a close neighbour by chance, but it still points the pool's way.
"""

from __future__ import annotations

import math

import torch

from clair_cli.core.rules.base import ALPHA, Reason
from clair_cli.core.rules.context import Pass

ISOLATED_FACTOR = 3.0  # rule 8: the nearest neighbour's cosine at most a third of the typical
ISOLATED_MIN_COSINE = 1e-3  # nearest cosines below (or negative) count as this
HALF = 0.5  # of rule 1's raw effect and margin


class Isolated:
    name = "isolated"
    pointing = False

    def apply(self, ctx: Pass) -> None:
        cosine, direction = ctx.signals.cosine, ctx.direction
        if cosine is None or direction is None:
            return
        nearest = self.nearest(ctx, cosine)
        x = -torch.log(nearest.clamp_min(ISOLATED_MIN_COSINE))
        x = x.where(torch.isfinite(nearest), torch.full_like(x, math.nan))
        for k, cut in enumerate(ctx.cuts(x, ALPHA, math.log(ISOLATED_FACTOR))):
            pointing = ctx.verdicts[k].signals.get("direction", -math.inf)  # rule 1's margin, this pass
            if cut is None or not bool(direction.effect[k] > HALF) or pointing <= HALF:
                continue
            m = min(cut.margin(float(x[k])), 2 * pointing)
            if ctx.margin(k, m, self.name):
                ctx.flag(k, self.reason(float(nearest[k]), math.exp(-cut.centre), math.exp(-cut.value), m))

    def nearest(self, ctx: Pass, cosine: torch.Tensor) -> torch.Tensor:
        """Per adapter, its largest cosine with another adapter that is not its copy (in a
        gate, with a reference)."""
        K = len(ctx.verdicts)
        group_of = {k: set(g) for g in ctx.signals.duplicates for k in g}
        allowed = torch.ones(K, K, dtype=torch.bool)
        allowed.fill_diagonal_(False)
        for k, group in group_of.items():
            allowed[k, list(group)] = False
        if ctx.gated:
            allowed &= torch.tensor([j in ctx.trusted for j in range(K)], dtype=torch.bool)[None, :]
        c = cosine.double().where(allowed, torch.full((K, K), -math.inf, dtype=torch.float64))
        return c.max(1).values

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
