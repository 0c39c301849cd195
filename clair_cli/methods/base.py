"""What a merge method is: one class per method, carrying everything the tool asks of it.

A method says what it is called, how few adapters it can work with, what ``--help`` says
of it, and how it merges: which adapters (:meth:`MergeMethod.members`), with which weights
(:meth:`MergeMethod.merge_weights`), and each module (:meth:`MergeMethod.merge_module`).
:func:`clair_cli.pipeline.merge` streams the modules and calls these; it never asks for a
method by name. The arithmetic is in :mod:`clair_cli.core`. Heavy imports are lazy, so
that the command line can build ``--method`` from the registry instantly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import torch

    from clair_cli.core.audit import ModuleInput
    from clair_cli.core.merge import MergeResult
    from clair_cli.params import MergeOptions
    from clair_cli.results import AuditOutcome


@dataclass(frozen=True)
class MergePlan:
    """What the merge of every module shares.

    Attributes:
        used: the adapters merged (pool indices, ascending).
        options: how the merged update is formed and written.
        side: the side a projection basis spans (``out`` or ``in``).
        dtype: the audit's working precision (a projection basis is found in it, as refine finds it).
        path: the audit's solver path (``settings.path``), for :func:`~clair_cli.core.audit.at_working_precision`.
        norm_bounded: per adapter the norm bound over all modules weighted down, that factor (pool
            index): a module's own bound weighs it down only as far as that factor has not
            (:func:`~clair_cli.core.influence.module_bounded_weights`).
    """

    used: list[int]
    options: MergeOptions
    side: str
    dtype: torch.dtype
    path: str
    norm_bounded: dict[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Weighting:
    """The merge weights a method settled on (:meth:`MergeMethod.merge_weights`).

    Attributes:
        weights: per merged adapter (None: equal weights).
        clipped: per adapter whose influence centred clipping bounded, the factor applied (pool index).
        notes: what a report should say about it.
        norm_bounded: per adapter the norm bound weighted down, the factor applied (pool index).
        norm_bound_relative: the norm bound used over all modules, in units of the collaborators'
            median norm (None: no bound asked for, or fewer than three collaborators).
    """

    weights: list[float] | None
    clipped: dict[int, float]
    notes: list[str]
    norm_bounded: dict[int, float] = field(default_factory=dict)
    norm_bound_relative: float | None = None


class MergeMethod:
    """One merge method (subclass it and add an instance to the registry).

    Attributes:
        name: as ``--method`` spells it.
        min_adapters: the fewest adapters it can work with.
        description: one line for ``--help``.
        card: the paragraph that says what it did in a merged adapter's model card.
        audits: runs the CLAIR audit first and merges the adapters it does not flag.
        exact_mean: forms the (weighted) mean of its adapters, in the audit's working precision.
        of_factors: defined on the factors as given, not on the updates alone (every other
            method sees canonical factors, :mod:`clair_cli.core.canonical`).
        weighted: gives each adapter a share of a weighted merge (an order statistic, which
            refuses ``--weights``, gives none: its model card lists no weights).
    """

    name: ClassVar[str]
    min_adapters: ClassVar[int]
    description: ClassVar[str]
    card: ClassVar[str]
    audits: ClassVar[bool] = False
    exact_mean: ClassVar[bool] = False
    of_factors: ClassVar[bool] = False
    weighted: ClassVar[bool] = True

    def __repr__(self) -> str:
        return f"<merge method {self.name}>"

    def members(self, n_adapters: int, outcome: AuditOutcome | None) -> list[int]:
        """The adapters merged (pool indices, ascending): every adapter."""
        return list(range(n_adapters))

    def merge_weights(
        self, outcome: AuditOutcome | None, used: list[int], weights: list[float] | None, options: MergeOptions
    ) -> Weighting:
        """The weights of ``used``: as given."""
        return Weighting(weights, {}, [])

    def prepare(
        self, mod: ModuleInput, weights: list[float] | None, dtype: torch.dtype, path: str
    ) -> tuple[ModuleInput, list[float] | None]:
        """One module as the method sees it: canonical order (and canonical factors unless
        the method is defined on the factors as given). An exact mean stays in the canonical
        factors' float64, so that ``--merge-tol`` is honoured (and the error measured) on the
        float32 factors written, to any tolerance."""
        from clair_cli.core.audit import canonical_input

        return canonical_input(mod, weights, factors=not self.of_factors)

    def merge_module(self, mod: ModuleInput, weights: list[float] | None, plan: MergePlan) -> MergeResult:
        """Merge one module (from :meth:`prepare`); ``selected`` in pool indices.

        Raises:
            UsageError: the method cannot merge these adapters (too few, bad options).
        """
        raise NotImplementedError

    def result_notes(self, results: dict[str, MergeResult]) -> list[str]:
        """What a report should say about the merged modules: nothing."""
        return []


class Baseline(MergeMethod):
    """A method of :mod:`clair_cli.core.baselines` applied to every adapter, no audit.

    Attributes:
        function: the name of its function in :mod:`clair_cli.core.baselines`.
    """

    function: ClassVar[str]

    def combine(
        self,
        A: Sequence[torch.Tensor],
        B: Sequence[torch.Tensor],
        scales: Sequence[float],
        weights: Sequence[float] | None = None,
        rank: int | None = None,
    ) -> MergeResult:
        """The method on one module's factors (``selected``: positions among them)."""
        from clair_cli.core import baselines

        return getattr(baselines, self.function)(A, B, scales, weights, rank)

    def merge_module(self, mod: ModuleInput, weights: list[float] | None, plan: MergePlan) -> MergeResult:
        from clair_cli.errors import UsageError

        try:
            res = self.combine(mod.A, mod.B, mod.scales, weights, plan.options.rank)
        except ValueError as exc:
            raise UsageError(f"{self.name}: {exc}") from None
        res.selected = [mod.members[j] for j in res.selected]
        return res
