"""Rule 6, **duplicates** (``duplicate``): updates with cosine above ``DUPLICATE_COSINE`` over
all modules form a Sybil group (:func:`clair_cli.core.verdict.duplicate_groups`). The first
member stands for the group and is judged on its own signals; every other member is flagged
as a copy, unless it is a trusted reference.

A copy is flagged outright: the rule has no margin, so the adapter's score (the largest margin
of the threshold rules) says nothing about it and may be far below 1. The reason records the
largest cosine with the rest of the group (``value``) and says "identical" only when the
updates agree to rounding (cosine above ``IDENTICAL_COSINE``), "near-identical (cosine x)"
otherwise: two checkpoints 4 % apart have cosine 0.9992.
"""

from __future__ import annotations

import torch

from clair_cli.core.rules.base import Reason
from clair_cli.core.rules.context import Pass

DUPLICATE_COSINE = 0.999
IDENTICAL_COSINE = 1 - 1e-7  # the same update, to float rounding


def group_cosine(inner: torch.Tensor | None, k: int, of: list[int]) -> float | None:
    """The largest cosine of update ``k`` with the updates ``of``, from their Gram matrix."""
    if inner is None or not of:
        return None
    g = inner.double()
    return max(float(g[k, j] / (g[k, k] * g[j, j]).clamp_min(1e-300).sqrt()) for j in of)


class Duplicate:
    name = "duplicate"
    pointing = False

    def apply(self, ctx: Pass) -> None:
        for group in ctx.signals.duplicates:
            for k in group[1:]:
                if k not in ctx.trusted:
                    of = [j for j in group if j != k]
                    ctx.flag(k, self.reason(of, group_cosine(ctx.signals.inner, k, of)))

    def reason(self, of: list[int], cosine: float | None = None) -> Reason:
        return Reason(
            kind="duplicate",
            of=tuple(of),
            rule=self.name,
            value=cosine,
            threshold=DUPLICATE_COSINE,
            compare=">",
            margin=None,
        )
