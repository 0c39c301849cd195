"""The detection rules of the verdict, one module each, and their registry.

A rule is a small object (:class:`~clair_cli.core.rules.base.Rule`): a ``name``, its
statistic against the others' (thresholds from :class:`~clair_cli.core.rules.context.Pass`),
its calibrated constants and the :class:`~clair_cli.core.rules.base.Reason` it writes.
:func:`clair_cli.core.verdict.decide` applies ``RULES`` in this order in every pass: later
rules read what earlier ones left (rule 1's and 2's evidence for the joint and isolated
rules; rules 2 and 3 write one reason). Adding a rule is one module and one line here.
"""

from __future__ import annotations

from clair_cli.core.rules.base import ALPHA, ModuleHit, Reason, Rule
from clair_cli.core.rules.context import AdapterVerdict, Pass, PoolSignals
from clair_cli.core.rules.coordinated import Coordinated, CoordinatedGroup, coordinated_groups
from clair_cli.core.rules.direction import Direction, ModuleDirection, ModuleProjection, WholeDirection
from clair_cli.core.rules.duplicate import DUPLICATE_COSINE, Duplicate
from clair_cli.core.rules.in_subspace import InSubspace
from clair_cli.core.rules.isolated import Isolated
from clair_cli.core.rules.joint import Joint
from clair_cli.core.rules.norm import ModuleNorm, Norm
from clair_cli.core.rules.off_subspace import ModuleOffSubspace, OffSubspace
from clair_cli.core.rules.opposed import ModuleOpposed, Opposed
from clair_cli.core.rules.pull import Pull
from clair_cli.core.rules.spectral import Spectral

RULES: tuple[Rule, ...] = (
    Direction(),  # 1
    WholeDirection(),  # 15: rule 1 with every module at its own norm
    OffSubspace(),  # 2
    Joint(),  # 2b: reads 1 and 2
    ModuleOffSubspace(),  # 3, and the reason of 2 and 3
    InSubspace(),  # 4
    Norm(),  # 5
    ModuleDirection(),  # 12: rule 1 per module
    ModuleNorm(),  # 13: rule 5 per module
    ModuleProjection(),  # 14: 12 and 13 together
    Spectral(),  # 7
    Isolated(),  # 8: reads 1
    Opposed(),  # 9: a group against the rest
    ModuleOpposed(),  # 16: rule 9 on each module
    Pull(),  # 11: a group pulling the mean together (after every per-adapter rule)
    Duplicate(),  # 6
    Coordinated(),  # 10: reads every flag above
)


def get(name: str) -> Rule:
    """The registered rule called ``name``."""
    for rule in RULES:
        if rule.name == name:
            return rule
    raise ValueError(f"no rule {name!r}; the rules are: {', '.join(r.name for r in RULES)}")


__all__ = [
    "ALPHA",
    "DUPLICATE_COSINE",
    "RULES",
    "AdapterVerdict",
    "CoordinatedGroup",
    "ModuleHit",
    "Pass",
    "PoolSignals",
    "Reason",
    "Rule",
    "coordinated_groups",
    "get",
]
