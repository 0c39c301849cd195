"""Rule 6, **duplicates** (``duplicate``): updates with cosine above ``DUPLICATE_COSINE`` over
all modules form a Sybil group (:func:`clair_cli.core.verdict.duplicate_groups`). The first
member stands for the group and is judged on its own signals; every other member is flagged
as a copy (no threshold, no margin), unless it is a trusted reference.
"""

from __future__ import annotations

from clair_cli.core.rules.base import Reason
from clair_cli.core.rules.context import Pass

DUPLICATE_COSINE = 0.999


class Duplicate:
    name = "duplicate"
    pointing = False

    def apply(self, ctx: Pass) -> None:
        for group in ctx.signals.duplicates:
            for k in group[1:]:
                if k not in ctx.trusted:
                    ctx.flag(k, self.reason([j for j in group if j != k]))

    def reason(self, of: list[int]) -> Reason:
        return Reason(
            kind="duplicate",
            of=tuple(of),
            rule=self.name,
            value=None,
            threshold=DUPLICATE_COSINE,
            compare=">",
            margin=None,
        )
