"""Rule 7, **along the others' leading deviation** (``spectral``,
:mod:`clair_cli.core.spectral`): the squared projection of the adapter's whole update, minus
the others' mean, on the leading principal direction of the others' centred updates (DnC's
statistic, exact and leave-one-out), on the log scale under the log-chi-square law at
``SPECTRAL_ALPHA``, together with the share of its own deviation along that direction at
``SPECTRAL_SHARE_ALPHA``. Several adapters pushing the same way (clients sharing a backdoor
trigger) make their common push the direction in which the pool varies most, even when each
alone looks honest. Floor: the projection at least twice the typical.
"""

from __future__ import annotations

import math

import torch

from clair_cli.core.calibration import LOG_CHI2
from clair_cli.core.rules.base import Reason
from clair_cli.core.rules.context import Pass
from clair_cli.core.spectral import leading_direction_scores

SPECTRAL_FLOOR = 4.0  # rule 7: the squared projection at least 4x the typical (2x the projection)
SPECTRAL_ALPHA = 1e-4  # rule 7's projection: norm mixtures (alphas) fatten its tail beyond the law's
SPECTRAL_SHARE_ALPHA = 0.1  # and the share of its own deviation along the direction past this cut


def finite_log(x: torch.Tensor) -> torch.Tensor:
    out = torch.log(x.clamp_min(1e-300))
    return out.where(torch.isfinite(x), torch.full_like(out, math.nan))


class Spectral:
    """The log of each adapter's squared projection on the others' leading deviation
    direction, against the others' values under the log-chi-square law at
    ``SPECTRAL_ALPHA``; and, so that an adapter whose deviation is large in every direction
    (an honest client with a larger alpha) is not flagged for being far along this one too,
    the share of its own deviation along that direction, against the others' shares under
    the same law at ``SPECTRAL_SHARE_ALPHA``. The projection's law assumes one scale for
    every honest adapter; alphas that differ make its tail heavier, which the smaller
    ``SPECTRAL_ALPHA`` allows for (measured: ``benchmarks/detection.py``). The direction is
    fitted on the adapters that set thresholds (not flagged in an earlier pass, not copies;
    the references in a gate), each adapter and its copies left out of its own fit; the
    eigensolves run in the pool's ``order``. Off without the Gram matrix ``inner``."""

    name = "spectral"
    pointing = False

    def apply(self, ctx: Pass) -> None:
        if ctx.signals.inner is None:
            return
        log_s, log_share, shares = self.statistic(ctx, ctx.signals.inner)
        far = ctx.cuts(log_s, SPECTRAL_ALPHA, math.log(SPECTRAL_FLOOR), law=LOG_CHI2)
        along = ctx.cuts(log_share, SPECTRAL_SHARE_ALPHA, 0.0, law=LOG_CHI2)
        for k, (far_cut, along_cut) in enumerate(zip(far, along, strict=True)):
            if far_cut is None or along_cut is None:
                continue
            m = min(far_cut.margin(float(log_s[k])), along_cut.margin(float(log_share[k])))
            if ctx.margin(k, m, self.name):
                # Ratios of the projection (not its square) to the typical one.
                ratio = math.exp(0.5 * (float(log_s[k]) - far_cut.centre))
                bound = math.exp(0.5 * far_cut.width)
                ctx.flag(k, self.reason(ratio, float(shares[k]), bound, m))

    def statistic(self, ctx: Pass, inner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per adapter, the log of its squared projection, the log of its share, and the share."""
        K = len(ctx.verdicts)
        shapes = ctx.basis(torch.zeros(K, dtype=torch.float64), echoes=True)  # a group shapes the fit
        group_of = {k: g for g in ctx.signals.duplicates for k in g}
        order = ctx.signals.order or list(range(K))
        where = {k: p for p, k in enumerate(order)}
        perm = torch.tensor(order)
        back = torch.empty(K, dtype=torch.long)
        back[perm] = torch.arange(K)
        scores, shares = leading_direction_scores(
            inner[perm[:, None], perm[None, :]], shapes[perm], [[where[j] for j in group_of.get(k, [k])] for k in order]
        )
        return finite_log(scores[back]), finite_log(shares[back]), shares[back]

    def reason(self, ratio: float, share: float, bound: float, margin: float) -> Reason:
        return Reason(
            kind="spectral",
            ratio=ratio,
            share=share,
            rule=self.name,
            value=ratio,
            threshold=bound,
            compare=">",
            margin=margin,
        )
