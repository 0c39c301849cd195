"""Rule 4, **inside the subspace, per module** (``in_subspace``): the distance of the
adapter's in-subspace component, over its norm, from the geometric median of the others'
(:mod:`clair_cli.core.insubspace`), on the log scale, at ``ALPHA / M``. Floor: 3x.

Its margins are recorded with rule 3's, as the ``module`` signal.
"""

from __future__ import annotations

import math

import torch

from clair_cli.core.rules.base import ModuleHit, Reason
from clair_cli.core.rules.context import Pass

IN_SUBSPACE_FACTOR = 3.0


class InSubspace:
    name = "in_subspace"
    pointing = False

    def apply(self, ctx: Pass) -> None:
        pool = ctx.signals
        distances = {
            n: torch.log(d.double().clamp_min(1e-300)).where(d > 0, torch.full_like(d.double(), math.nan))
            for n, d in (pool.in_subspace or {}).items()
            if d is not None and pool.structured[n]
        }
        for k, items in sorted(ctx.per_module(distances, pool.members, math.log(IN_SUBSPACE_FACTOR)).items()):
            ctx.flag(k, self.reason(items))

    def reason(self, items: list[ModuleHit]) -> Reason:
        """The ratio to the typical distance on the module farthest out, and the ratio at
        which the rule flags on that module."""
        excess, _name, value, bound, _m = items[0]
        return Reason(
            kind="in_subspace",
            ratio=math.exp(excess),
            modules=tuple(h.module for h in items),
            rule=self.name,
            value=math.exp(excess),
            threshold=math.exp(bound - (value - excess)),
            compare=">",
            margin=max(h.margin for h in items),
        )
