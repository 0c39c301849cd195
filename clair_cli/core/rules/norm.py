"""Rule 5, **norm** (``norm``): ``log ||Theta_k||`` over all modules, in both directions:
boosted updates (model replacement), floor 4x the typical norm, and near-zero ones (free
riders), floor a tenth of it. Sets every verdict's ``norm_ratio``. Below a dozen adapters
its critical value is capped (:func:`clair_cli.core.calibration.rule_critical_value`): the
floor, not the noisy spread of five values, then decides, so a round of six clients flags a
fivefold update.

An all-zero update (an untrained adapter: PEFT initialises ``lora_B`` to zero) has no log
norm; it sets no threshold and is flagged as a free rider outright (ratio 0, no margin: its
score is that of the other rules), so the rest of the pool is still audited.
"""

from __future__ import annotations

import math

import torch

from clair_cli.core.rules.base import ALPHA, ModuleHit, Reason
from clair_cli.core.rules.context import CentreLimits, Pass

NORM_FACTOR_FLOOR = 4.0
NORM_LOW_FACTOR_FLOOR = 10.0  # a small update does little harm: only far below the others


class Norm:
    name = "norm"
    pointing = False

    def apply(self, ctx: Pass) -> None:
        sq_norms = ctx.signals.sq_norms
        log_norm = torch.where(sq_norms > 0, 0.5 * torch.log(sq_norms.double().clamp_min(1e-300)), math.nan)
        high = ctx.cuts(log_norm, ALPHA, math.log(NORM_FACTOR_FLOOR), capped=True, near_median=True)
        low = ctx.cuts(-log_norm, ALPHA, math.log(NORM_LOW_FACTOR_FLOOR), capped=True, near_median=True)
        for k, (up_cut, down_cut) in enumerate(zip(high, low, strict=True)):
            if float(sq_norms[k]) <= 0:
                ctx.verdicts[k].norm_ratio = 0.0
                if k not in ctx.trusted:
                    ctx.flag(k, self.reason(0.0, 1 / NORM_LOW_FACTOR_FLOOR, None, "<"))
                continue
            if up_cut is None or down_cut is None:
                continue
            ratio = math.exp(float(log_norm[k]) - up_cut.centre)
            ctx.verdicts[k].norm_ratio = ratio
            m_up = up_cut.margin(float(log_norm[k]))
            m_down = down_cut.margin(-float(log_norm[k]))
            up = ctx.margin(k, m_up, self.name)
            down = ctx.margin(k, m_down, self.name)
            if up or down:
                # The ratio to the others' median norm at which the rule flags, on the side it flagged.
                bound = math.exp(up_cut.width) if up else math.exp(-down_cut.width)
                ctx.flag(k, self.reason(ratio, bound, max(m_up, m_down), ">" if up else "<"))

    def reason(self, ratio: float, bound: float, margin: float | None, compare: str) -> Reason:
        return Reason(
            kind="norm", ratio=ratio, rule=self.name, value=ratio, threshold=bound, compare=compare, margin=margin
        )


class ModuleNorm:
    """Rule 13, **norm per module** (``module_norm``): ``log ||Theta_km||`` on each module
    against the others' on it, at ``ALPHA / M`` (Bonferroni over the modules), floor 4x the
    others' median there, the exact critical value at every pool size (capped as rule 5's, the
    Bonferroni cut over a handful of values flagged honest clients in small rounds). Upward only: an update
    boosted in one module of many moves the norm over all modules (rule 5's) by far less than
    its factor (a module boosted 4x of eight: about 1.8x), and a module left small harms the
    merge little.
    """

    name = "module_norm"
    pointing = False

    def apply(self, ctx: Pass) -> None:
        pool = ctx.signals
        if not pool.module_norms:
            return
        values = {
            n: torch.where(x > 0, torch.log(x.double().clamp_min(1e-300)), math.nan)
            for n, x in pool.module_norms.items()
        }
        boosted = ctx.flagged_for(("norm",), ">")  # its size, seen over all modules already
        hits = ctx.per_module(
            values,
            pool.members,
            math.log(NORM_FACTOR_FLOOR),
            signal=self.name,
            skip=boosted,
            centre=CentreLimits(near_median=True),
        )
        for k, items in sorted(hits.items()):
            ctx.flag(k, self.reason(items))

    def reason(self, items: list[ModuleHit]) -> Reason:
        """The ratio to the others' median norm on the module farthest out, and the ratio at
        which the rule flags there."""
        excess, module, value, bound, _m = items[0]
        return Reason(
            kind="module_norm",
            ratio=math.exp(excess),
            modules=tuple(h.module for h in items),
            module=module,
            rule=self.name,
            value=math.exp(excess),
            threshold=math.exp(bound - (value - excess)),
            compare=">",
            margin=max(h.margin for h in items),
        )
