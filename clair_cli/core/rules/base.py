"""What every rule of the verdict shares: the ``Rule`` protocol, the ``Reason`` it writes,
a per-module hit and the false-flag rate ``ALPHA`` (:mod:`clair_cli.core.verdict`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

if TYPE_CHECKING:
    from clair_cli.core.rules.context import Pass

ALPHA = 1e-3  # per rule: the probability that an honest adapter trips it (Gaussian model)

# The rule-specific fields of a reason, in the order ``Reason.to_dict`` writes them (one order
# serves every rule: each writes a subsequence of it).
DETAILS = ("cosine", "typical", "log_odds", "ratio", "share", "modules", "across_modules", "module", "of", "parts")


@dataclass(frozen=True, kw_only=True)
class Reason:
    """Why a rule flagged an adapter.

    ``kind`` is what the reports describe (rules 2 and 3 both write ``off_subspace``);
    ``rule`` the rule that compared ``value`` with ``threshold`` (``compare``: the side that
    flags), by ``margin``. A duplicate has neither value nor margin. The other fields are
    those of its rule, None where the rule has none: ``cosine`` (with the others' centre, or
    with the nearest other adapter), ``typical`` (the others' value), ``log_odds`` and
    ``share`` (off the shared subspace), ``ratio`` (to the typical value), ``modules`` (past
    their threshold, or all measured), ``across_modules`` (rule 2 rather than 3), ``module``
    (the one quoted), ``of`` (the adapters a duplicate copies), ``parts`` (what a gate's
    candidate holds that PEFT applies and clair does not analyse: ``unanalysed``, no rule of the
    verdict's).
    """

    kind: str
    rule: str
    value: float | None
    threshold: float
    compare: str
    margin: float | None
    cosine: float | None = None
    typical: float | None = None
    log_odds: float | None = None
    ratio: float | None = None
    share: float | None = None
    modules: tuple[str, ...] | None = None
    across_modules: bool | None = None
    module: str | None = None
    of: tuple[int, ...] | None = None
    parts: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: ``kind``, the rule's own fields, then what was compared."""
        out: dict[str, Any] = {"kind": self.kind}
        for key in DETAILS:
            value = getattr(self, key)
            if value is not None:
                out[key] = list(value) if isinstance(value, tuple) else value
        return out | {
            "rule": self.rule,
            "value": self.value,
            "threshold": self.threshold,
            "compare": self.compare,
            "margin": self.margin,
        }


class ModuleHit(NamedTuple):
    """One module on which a per-module rule flagged an adapter."""

    excess: float  # the value over the others' centre
    module: str
    value: float
    threshold: float
    margin: float


class Rule(Protocol):
    """A detection rule: its statistic against the others' (:class:`Pass` gives the cuts),
    recording its margins and flagging with a :class:`Reason`.

    ``name``: the ``rule`` of its reasons. ``pointing``: whether the adapters it nearly
    flags also leave its bases in the next pass (the rules on where an update points:
    :func:`clair_cli.core.verdict.decide`).
    """

    name: str
    pointing: bool

    def apply(self, ctx: Pass) -> None: ...
