"""The one registry of merge methods: one object per method, keyed by its name.

Each method is a class (:class:`~clair_cli.methods.base.MergeMethod`) that carries its
name, minimum pool size, ``--help`` line, flags and its merge. The command line builds its
``--method`` choices and help from this registry, :func:`clair_cli.pipeline.build_pool`
takes each method's minimum pool size from it, and :func:`clair_cli.pipeline.merge` calls
the method it returns. Adding a method is one class and one line in ``_METHODS``.
Importing this package imports no tensor library.
"""

from __future__ import annotations

from enum import Enum, StrEnum

from clair_cli.errors import UsageError
from clair_cli.methods.base import Baseline, MergeMethod, MergePlan, Weighting
from clair_cli.methods.baselines import FedAvg, Krum, Median, MultiKrum, Ties, TrimmedMean
from clair_cli.methods.clair import Clair
from clair_cli.methods.mean import Mean

__all__ = ["NAMES", "REGISTRY", "Baseline", "MergeMethod", "MergeMethodName", "MergePlan", "Weighting", "get"]

_METHODS: tuple[MergeMethod, ...] = (Clair(), Mean(), FedAvg(), Median(), TrimmedMean(), Krum(), MultiKrum(), Ties())
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
