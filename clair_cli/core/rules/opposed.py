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

import torch

from clair_cli.core.calibration import upper_cut
from clair_cli.core.decompose import median
from clair_cli.core.rules.base import ALPHA, Reason
from clair_cli.core.rules.context import Pass

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
        """Each member of ``T``'s cosine with the mean of ``T``'s other members."""
        members = torch.nonzero(t).flatten()
        row = sub[members] @ t  # <x_j, sum_T>
        diag = sub.diagonal()[members]
        rest = (float(t @ sub @ t) - 2 * row + diag).clamp_min(1e-300)  # ||sum_{T \ j}||^2
        return (row - diag) / (diag * rest).sqrt()

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
