"""What the pipeline returns and the reports read: the pool, the audit outcome and the
merged adapter (the parameters they were made with are in :mod:`clair_cli.params`).

They live below both :mod:`clair_cli.pipeline` and :mod:`clair_cli.report`, so a report
never imports the pipeline. Heavy libraries are imported lazily.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from clair_cli.params import AuditParams, MergeOptions

if TYPE_CHECKING:
    from clair_cli.core.audit import ClairAuditor
    from clair_cli.core.merge import MergeResult
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


@dataclass
class AuditOutcome:
    pool: Pool
    settings: AuditParams
    auditor: ClairAuditor
    timing: dict[str, float]
    reference: list[int] | None = None


def _sig(x: float) -> float:
    """``x`` to 6 significant digits (a measured error of 3.6e-8 stays 3.6e-8)."""
    return float(f"{x:.6g}")


@dataclass
class MergedAdapter:
    """One merged LoRA: per module ``(A, B)`` with scale 1, and how it was made.

    ``scale`` is the factor ``--rescale`` applied (1.0 otherwise); ``streamed``: the factors were
    written as they were merged (:class:`clair_cli.pipeline.MergeSink`), and ``modules`` hold
    ``meta`` tensors of their shapes; per module,
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
    norm_bounded: dict[int, float] = field(default_factory=dict)
    streamed: bool = False  # the factors went to a sink as they were merged; ``modules`` keep their shapes only
    norm_bound_relative: float | None = None  # the norm bound used, in units of the collaborators' median norm

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
        if self.options.norm_bound is not None:
            out["norm_bounded"] = {str(k): round(c, 6) for k, c in sorted(self.norm_bounded.items())}
            relative = self.norm_bound_relative
            out["norm_bound_relative"] = None if relative is None else round(relative, 6)
            out["module_norm_bounded"] = {
                m: {str(k): round(c, 6) for k, c in sorted(r.info["module_norm_bounded"].items())}
                for m, r in self.modules.items()
                if r.info.get("module_norm_bounded")
            }
        if self.options.project:
            out["projection_rank"] = {m: r.info.get("projection_rank") for m, r in self.modules.items()}
        return out
