"""The one registry of merge methods: what each is called, needs and does. Stdlib only.

The command line builds its ``--method`` choices and help from it, :func:`clair_cli.pipeline.build_pool`
takes each method's minimum pool size from it, and :func:`clair_cli.pipeline.merge` dispatches on
it (the arithmetic of the baselines is in :mod:`clair_cli.core.baselines`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, StrEnum

from clair_cli.errors import UsageError


@dataclass(frozen=True)
class MergeMethod:
    """One merge method.

    Attributes:
        name: as ``--method`` spells it.
        min_adapters: the fewest adapters it can work with.
        description: one line for ``--help``.
        audits: runs the CLAIR audit first and merges the adapters it does not flag.
        exact_mean: forms the (weighted) mean of its adapters, in the audit's working precision.
        of_factors: defined on the factors as given, not on the updates alone (every other
            method sees canonical factors, :mod:`clair_cli.core.canonical`).
    """

    name: str
    min_adapters: int
    description: str
    audits: bool = False
    exact_mean: bool = False
    of_factors: bool = False


# CLAIR's robust centre (median / MAD) needs a benign majority, and below five adapters
# parallel analysis misses real shared directions often enough to flag benign adapters
# (measured on 16-dim toy pools).
_METHODS = (
    MergeMethod("clair", 5, "audit, then the exact mean of the adapters not flagged", audits=True, exact_mean=True),
    MergeMethod("mean", 1, "exact (weighted) mean of every adapter, no audit", exact_mean=True),
    MergeMethod("fedavg", 1, "naive federated averaging of the A and B factors apart", of_factors=True),
    MergeMethod("median", 2, "coordinate-wise median of the updates"),
    MergeMethod("trimmed-mean", 3, "coordinate-wise mean without the largest and smallest values"),
    MergeMethod("krum", 3, "the adapter of lowest Krum score"),
    MergeMethod("multi-krum", 3, "mean of the adapters of lowest Krum score"),
    MergeMethod("ties", 2, "TIES: trim, elect sign, disjoint mean"),
)
REGISTRY: dict[str, MergeMethod] = {m.name: m for m in _METHODS}
NAMES: tuple[str, ...] = tuple(REGISTRY)

# The ``--method`` choices, one member a registered method (``MergeMethodName("trimmed-mean")``).
MergeMethodName = StrEnum(  # type: ignore[misc]
    "MergeMethodName", {m.name.upper().replace("-", "_"): m.name for m in _METHODS}
)


def get(name: str) -> MergeMethod:
    """The method called ``name``.

    Raises:
        UsageError: unknown name; the message lists the valid ones.
    """
    key = name.value if isinstance(name, Enum) else name
    try:
        return REGISTRY[key]
    except KeyError:
        raise UsageError(f"--method {key}: choose one of: {', '.join(NAMES)}") from None


def help_text() -> str:
    """``--method``'s help: every name, the audited ones with what they do."""
    audited = [f"{m.name} ({m.description})" for m in _METHODS if m.audits]
    others = [m.name for m in _METHODS if not m.audits]
    return f"Merge method: {', '.join(audited)}, or a baseline without audit: {', '.join(others)}."
