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

Members of ``S`` are flagged when ``cos(S, T) < -OPPOSED_COSINE`` and their own cosine with
``T``'s mean is negative, provided ``T`` agrees on a direction: the median cosine of ``T``'s
members with the mean of the other members of ``T`` is at least ``CONSENSUS`` (rule 1's
floor; below it, splits of a pool without a common direction are noise and the rule is
off). Measured (``benchmarks/attacks.py``, six trained pools): no honest pool, nor any
subset of 5 to 12 honest clients, splits at all; sign flips, Fang's trimmed-mean attack and
IPM at 20-33 % split out exactly the attackers at -0.58 to -0.99. On synthetic pools without
a common direction, spurious splits reach -0.24 (hence the consensus gate and the floor).

What an attacker who knows it can still do: keep the group's mean cosine with the rest above
``-OPPOSED_COSINE``; its pull against the honest direction is then at most that cosine times
its norm, which the norm rule and bounded influence (:mod:`clair_cli.core.influence`) bound.
"""

from __future__ import annotations

import torch

from clair_cli.core.decompose import median
from clair_cli.core.rules.base import Reason
from clair_cli.core.rules.context import Pass

OPPOSED_COSINE = 0.2  # the group's mean against the rest's: cosine below -0.2
CONSENSUS = 0.1  # the rest must agree on a direction (rule 1's floor)


class Opposed:
    name = "opposed"
    pointing = False

    def apply(self, ctx: Pass) -> None:
        C = ctx.signals.cosine
        if C is None:
            return
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
        if not 0 < float(s.sum()) < float(t.sum()):
            return
        ss, tt, st = float(s @ sub @ s), float(t @ sub @ t), float(s @ sub @ t)
        if ss <= 0 or tt <= 0:
            return
        group = st / (ss * tt) ** 0.5
        consensus = self.consensus(sub, t)
        if consensus < CONSENSUS:
            return
        margin = -group / OPPOSED_COSINE
        members = [idx[p] for p in torch.nonzero(s).flatten().tolist()]
        for p, k in zip(torch.nonzero(s).flatten().tolist(), members, strict=True):
            own = float(sub[p] @ t) / (float(sub[p, p]) * tt) ** 0.5
            if own >= 0:
                continue
            if ctx.margin(k, margin, self.name):
                ctx.flag(k, self.reason(group, consensus, [j for j in members if j != k], margin))

    @staticmethod
    def consensus(sub: torch.Tensor, t: torch.Tensor) -> float:
        """The median cosine of ``T``'s members with the mean of ``T``'s other members."""
        members = torch.nonzero(t).flatten()
        if len(members) < 3:
            return float("-inf")
        row = sub[members] @ t  # <x_j, sum_T>
        diag = sub.diagonal()[members]
        total = float(t @ sub @ t)
        rest = (total - 2 * row + diag).clamp_min(1e-300)  # ||sum_{T \ j}||^2
        return median((row - diag) / (diag * rest).sqrt())

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
