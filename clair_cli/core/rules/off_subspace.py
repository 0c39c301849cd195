"""Rules 2 and 3, the share of an update **outside the shared subspace** (``off_subspace``).

Rule 2, over all modules: ``logit(o_km)``, the log-odds of the share of the update outside
the shared subspace, standardised per module and averaged over the modules with shared
structure. Averaging the evidence over modules is what a single honest client with unusual
data cannot reach by chance on one module. Floor: the mean log-odds must exceed the typical
by log 3 (odds 3x); ``threshold`` in its reason is the bound on the mean log-odds (not the
mean share the text quotes), ``margin`` the smaller of the two margins.

Rule 3, per module: ``logit(o_km)`` on one module, at ``ALPHA / M`` (Bonferroni over the M
modules with shared structure), floor odds 10x the typical: contamination confined to a few
modules, which the average would dilute. ``--threshold`` replaces both by a fixed share on
any module.

An adapter either rule flags gets one reason, written after both have run (and after the
joint rule, :mod:`clair_cli.core.rules.joint`, which reads rule 2's evidence): the modules
past their threshold, or rule 2's mean share where no single module is.
"""

from __future__ import annotations

import math

import torch

from clair_cli.core.rules.base import ALPHA, ModuleHit, Reason
from clair_cli.core.rules.context import OffSubspaceEvidence, Pass

OFF_SUBSPACE_ODDS_FLOOR = 3.0
MODULE_ODDS_FLOOR = 10.0  # one module alone must be decisively off: odds 10x the typical
SHARE_CLAMP = 1e-6  # shares are clamped to [1e-6, 1 - 1e-6] before the log-odds


def logit(share: torch.Tensor) -> torch.Tensor:
    o = share.double().clamp(SHARE_CLAMP, 1 - SHARE_CLAMP)
    return torch.log(o) - torch.log1p(-o)


def sigmoid(log_odds: float) -> float:
    return 1 / (1 + math.exp(-log_odds))


class OffSubspace:
    """Rule 2: the mean log-odds over the modules with shared structure."""

    name = "off_subspace"
    pointing = True

    def apply(self, ctx: Pass) -> None:
        pool = ctx.signals
        if pool.threshold is not None or not ctx.measured:
            return
        # Per module standardised, averaged over the modules with shared structure; the mean
        # log-odds must also exceed the others' by the floor.
        floor = math.log(OFF_SUBSPACE_ODDS_FLOOR)
        log_odds = {n: logit(o) for n, o in ctx.measured.items()}
        calib_odds = {n: logit((ctx.calibration or {}).get(n, o)) for n, o in ctx.measured.items()}
        z = ctx.standardised_mean(log_odds, pool.members, calib_odds)
        mean = ctx.mean(log_odds, pool.members)
        if ctx.calibration is None:  # the values are their own calibration
            z_calib, calib_mean = z, mean
        else:
            z_calib = ctx.standardised_mean(calib_odds, pool.members, calib_odds)
            calib_mean = ctx.mean(calib_odds, pool.members)
        raw = ctx.cuts(mean, ALPHA, 0.0, calib_mean)
        effect = torch.full((pool.n_adapters,), math.nan, dtype=torch.float64)
        for k, cut in enumerate(ctx.cuts(z, ALPHA, 0.0, z_calib)):
            centre = raw[k]
            if cut is None or centre is None:
                continue
            effect[k] = (float(mean[k]) - centre.centre) / floor
            m = min(cut.margin(float(z[k])), float(effect[k]))
            if ctx.margin(k, m, self.name):
                ctx.off_hits.setdefault(k, [])
                ctx.across[k] = (float(mean[k]), centre.centre + floor, m)
        ctx.off_subspace = OffSubspaceEvidence(log_odds, calib_odds, z, z_calib, mean, effect)


class ModuleOffSubspace:
    """Rule 3 (or ``--threshold``'s fixed share), one module at a time; writes the reason of
    rules 2 and 3 together."""

    name = "module"
    pointing = False

    def apply(self, ctx: Pass) -> None:
        pool = ctx.signals
        evidence = ctx.off_subspace
        if pool.threshold is not None:
            self._fixed(ctx, pool.threshold)
        elif evidence is not None:
            calibration = ctx.calibration or {}
            calib = {n: evidence.calib_odds[n] for n in calibration if n in evidence.calib_odds}
            hits = ctx.per_module(evidence.log_odds, pool.members, math.log(MODULE_ODDS_FLOOR), calib)
            for k, items in hits.items():
                ctx.off_hits.setdefault(k, []).extend(items)
        for k, items in sorted(ctx.off_hits.items()):
            ctx.flag(k, self.reason(ctx, k, items))

    def _fixed(self, ctx: Pass, threshold: float) -> None:
        """A fixed share on any module with shared structure."""
        for name, o in ctx.measured.items():
            for pos, k in enumerate(ctx.signals.members[name]):
                share = float(o[pos])
                if ctx.margin(k, share / threshold, self.name) and share > threshold:
                    hit = ModuleHit(share - threshold, name, share, threshold, share / threshold)
                    ctx.off_hits.setdefault(k, []).append(hit)

    def reason(self, ctx: Pass, k: int, items: list[ModuleHit]) -> Reason:
        """The modules past their threshold (quoting the one with the largest share), or,
        where only rule 2 flagged, the mean share over the modules measured."""
        own = ctx.verdicts[k].per_module
        mine = {n: own[n] for n in ctx.measured if n in own}
        modules = [h.module for h in items] or sorted(mine, key=lambda n: (-mine[n], n))
        if not items:
            value, bound, margin = ctx.across[k]
            return Reason(
                kind="off_subspace",
                share=sum(mine.values()) / len(mine),
                modules=tuple(modules),
                across_modules=True,
                rule=OffSubspace.name,
                value=value,
                threshold=bound,
                compare=">",
                margin=margin,
            )
        top = max(items, key=lambda h: (mine[h.module], -len(h.module)))
        if ctx.signals.threshold is not None:
            value, bound = top.value, top.threshold
        else:
            value, bound = sigmoid(top.value), sigmoid(top.threshold)
        margin = max(h.margin for h in items)
        if k in ctx.across:
            margin = max(margin, ctx.across[k][2])
        return Reason(
            kind="off_subspace",
            share=max(mine[n] for n in modules),
            modules=tuple(modules),
            across_modules=False,
            module=top.module,
            rule=self.name,
            value=value,
            threshold=bound,
            compare=">",
            margin=margin,
        )
