"""Rule 2b, **both at once** (``joint``): the sum of the standardised statistics of rules 1
and 2, against the others' sums, when both raw effects are at least half their floors: an
adapter somewhat atypical on both counts, where neither rule alone would flag it.

It runs between rules 2 and 3 (:data:`clair_cli.core.rules.RULES`): an adapter already
flagged by rule 1 or 2 gets its reason only where it sets the score.
"""

from __future__ import annotations

from clair_cli.core.rules.base import ALPHA, Reason
from clair_cli.core.rules.context import Pass

HALF = 0.5  # each raw effect at least half its rule's floor; the margin is at most twice it


class Joint:
    name = "joint"
    pointing = True

    def apply(self, ctx: Pass) -> None:
        d, o, direction = ctx.direction, ctx.off_subspace, ctx.direction_cosine
        if d is None or o is None or direction is None:
            return
        joint, joint_calib = d.z + o.z, d.z + o.z_calib
        for k, cut in enumerate(ctx.cuts(joint, ALPHA, 0.0, joint_calib)):
            if cut is None or not (d.effect[k] > HALF and o.effect[k] > HALF):
                continue
            margin = min(cut.margin(float(joint[k])), 2 * float(d.effect[k]), 2 * float(o.effect[k]))
            v = ctx.verdicts[k]
            seen = k in ctx.off_hits or any(r.kind == "direction" for r in v.reasons)
            own = [v.per_module[n] for n in ctx.measured if n in v.per_module]
            reason = Reason(
                kind="joint",
                cosine=float(direction[k]),
                log_odds=float(o.mean[k]),
                share=sum(own) / len(own),  # the mean share, as the off-subspace reason quotes it
                rule=self.name,
                value=float(joint[k]),
                threshold=cut.value,
                compare=">",
                margin=margin,
            )
            if ctx.margin(k, margin, self.name):
                if not seen:
                    ctx.flag(k, reason)
                else:  # one reason is enough, unless this one sets the score
                    ctx.hold(k, reason)
