"""Rule 6, **duplicates** (``duplicate``): updates with cosine above ``DUPLICATE_COSINE`` over
all modules form a Sybil group (:func:`clair_cli.core.verdict.duplicate_groups`). The first
member stands for the group and is judged on its own signals; every other member is flagged
as a copy, unless it is a trusted reference.

A copy is flagged outright: the rule has no margin, so the adapter's score (the largest margin
of the threshold rules) says nothing about it and may be far below 1. The reason records the
largest cosine with the rest of the group (``value``) and says "identical" only when the
updates agree to rounding (cosine above ``IDENTICAL_COSINE``), "near-identical (cosine x)"
otherwise: two checkpoints 4 % apart have cosine 0.9992. ``ratio`` is the copy's norm over that
of the member its group keeps (the first of ``of``): more than ``SAME_NORM`` apart, it is said as a
scaled copy of that member.
"""

from __future__ import annotations

import math

import torch

from clair_cli.core.rules.base import Reason
from clair_cli.core.rules.context import Pass

DUPLICATE_COSINE = 0.999
IDENTICAL_COSINE = 1 - 1e-7  # the same update, to float rounding
SAME_NORM = 1.01  # copies whose norms agree to 1 % are one update sent twice (else a scaled copy)


def nearest_copy(inner: torch.Tensor | None, k: int, of: list[int]) -> tuple[float | None, float | None]:
    """The largest cosine of update ``k`` with the updates ``of``, and the ratio of ``k``'s norm to that of
    ``of[0]`` (the member its group keeps, where ``k`` is a copy; an update sent again scaled, ``x 3``, has
    cosine 1 and ratio 3), from their Gram matrix."""
    if inner is None or not of:
        return None, None
    g = inner.double()
    cosine = max(float(g[k, j] / (g[k, k] * g[j, j]).clamp_min(1e-300).sqrt()) for j in of)
    ratio = math.sqrt(float(g[k, k]) / float(g[of[0], of[0]])) if float(g[of[0], of[0]]) > 0 else math.inf
    return cosine, ratio if math.isfinite(ratio) else None


class Duplicate:
    name = "duplicate"
    pointing = False

    def apply(self, ctx: Pass) -> None:
        for group in ctx.signals.duplicates:
            for k in group[1:]:
                if k not in ctx.trusted:
                    of = [j for j in group if j != k]
                    ctx.flag(k, self.reason(of, *nearest_copy(ctx.signals.inner, k, of)))

    def reason(self, of: list[int], cosine: float | None = None, ratio: float | None = None) -> Reason:
        """``ratio``: the copy's norm over that of the update it is nearest to (None where not measured)."""
        return Reason(
            kind="duplicate",
            of=tuple(of),
            ratio=ratio,
            rule=self.name,
            value=cosine,
            threshold=DUPLICATE_COSINE,
            compare=">",
            margin=None,
        )
