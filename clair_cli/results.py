"""What the pipeline returns and the reports read: the pool, the user's settings, the
audit outcome, merge options and the merged adapter.

They live below both :mod:`clair_cli.pipeline` and :mod:`clair_cli.report`, so a report
never imports the pipeline. Heavy libraries are imported lazily.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from clair_cli.errors import UsageError
from clair_cli.types import AuditParams, Rescale

if TYPE_CHECKING:
    from clair_cli.core.audit import ClairAuditor
    from clair_cli.core.baselines import MergeResult
    from clair_cli.io.adapter import Adapter


@dataclass
class Pool:
    """Adapters that can be analysed together.

    Attributes:
        adapters: opened adapters, in source order.
        modules: the modules analysed (sorted).
        dropped: modules left out by ``--intersect`` (not targeted by every adapter).
        base_model: the common base model (None when no config names one).
        notes: what the checks decided that a report should say (base model names that
            differ but were taken as the same model).
    """

    adapters: list[Adapter]
    modules: list[str]
    dropped: list[str] = field(default_factory=list)
    base_model: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.adapters]


# The audit's parameters (clair_cli.types.AuditParams); the name the library used before.
Settings = AuditParams


@dataclass
class AuditOutcome:
    pool: Pool
    settings: AuditParams
    auditor: ClairAuditor
    timing: dict[str, float]
    reference: list[int] | None = None


# Relative Frobenius error allowed when the merged update is written at a lower rank
# (--merge-tol): far below the differences between adapters, and below bf16 rounding (4e-3).
DEFAULT_MERGE_TOL = 1e-3
RESCALE_CHOICES = tuple(r.value for r in Rescale)


@dataclass(frozen=True)
class MergeOptions:
    """How the merged update is formed and written (the ``merge`` section of the JSON report).

    Attributes:
        rank: rank of the written LoRA (``--merge-rank``); None: the smallest rank whose
            relative Frobenius error is at most ``tol``.
        tol: that tolerance (``--merge-tol``).
        project: CLAIR's projected merge ``U U^T`` (``--project``) instead of the exact mean.
        project_rank: the projection's rank (``--project-rank``); None: chosen per module by
            cross-validation across the collaborators (:mod:`clair_cli.core.projection`).
        rescale: ``"norm"`` scales the merged update so its norm is the median of the merged
            adapters' norms (averaging separately trained updates shrinks them); ``"none"``.
        clip: bounded influence of the adapters the audit lets through (``--clip``): centred
            clipping at this many times their median distance from their geometric median
            (:mod:`clair_cli.core.influence`); None merges their plain weighted mean.
    """

    rank: int | None = None
    tol: float = DEFAULT_MERGE_TOL
    project: bool = False
    project_rank: int | None = None
    rescale: str = "none"
    clip: float | None = None

    def __post_init__(self) -> None:
        if self.clip is not None and not (math.isfinite(self.clip) and self.clip > 0):
            raise UsageError(f"--clip {self.clip}: expected a positive number, or off")
        if self.rank is not None and self.rank < 1:
            raise UsageError(f"--merge-rank {self.rank}: expected a positive integer")
        if not 0 <= self.tol < 1:
            raise UsageError(f"--merge-tol {self.tol}: expected a number in [0, 1)")
        if self.project_rank is not None and self.project_rank < 1:
            raise UsageError(f"--project-rank {self.project_rank}: expected a positive integer")
        rescale = getattr(self.rescale, "value", self.rescale)
        if rescale not in RESCALE_CHOICES:
            raise UsageError(f"--rescale {rescale}: expected one of {', '.join(RESCALE_CHOICES)}")
        object.__setattr__(self, "rescale", rescale)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _sig(x: float) -> float:
    """``x`` to 6 significant digits (a measured error of 3.6e-8 stays 3.6e-8)."""
    return float(f"{x:.6g}")


@dataclass
class MergedAdapter:
    """One merged LoRA: per module ``(A, B)`` with scale 1, and how it was made.

    ``scale`` is the factor ``--rescale`` applied (1.0 otherwise); per module,
    ``modules[name].info`` holds ``truncation_error`` (relative Frobenius error of the factors
    written, measured on them: rank truncation and float32 rounding) and, for a projected merge, ``projection_rank``.
    """

    method: str
    modules: dict[str, MergeResult]
    used: list[int]
    weights: list[float] | None
    notes: list[str] = field(default_factory=list)
    options: MergeOptions = field(default_factory=MergeOptions)
    scale: float = 1.0
    clipped: dict[int, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The ``merge`` section of the JSON report."""
        ranks = {m: r.rank for m, r in self.modules.items()}
        errors = {m: float(r.info.get("truncation_error", 0.0)) for m, r in self.modules.items()}
        out: dict[str, Any] = {
            "method": self.method,
            "options": self.options.as_dict(),
            "weights": None if self.weights is None else [round(w, 6) for w in self.weights],
            "rank": ranks,
            "max_relative_error": _sig(max(errors.values(), default=0.0)),
            "relative_error": {m: _sig(e) for m, e in errors.items()},
            "scale": round(self.scale, 6),
        }
        if self.options.clip is not None:
            out["clipped"] = {str(k): round(c, 6) for k, c in sorted(self.clipped.items())}
        if self.options.project:
            out["projection_rank"] = {m: r.info.get("projection_rank") for m, r in self.modules.items()}
        return out
