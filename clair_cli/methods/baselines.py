"""The baselines without audit (CLAIR_SPEC.md section 7): one class each, applying the
function of :mod:`clair_cli.core.baselines` of the same name to every adapter."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from clair_cli.methods.base import Baseline

if TYPE_CHECKING:
    import torch

    from clair_cli.core.merge import MergeResult

Factors = Sequence["torch.Tensor"]


class FedAvg(Baseline):
    name = "fedavg"
    min_adapters = 1
    description = "naive federated averaging of the A and B factors apart"
    of_factors = True

    def combine(
        self,
        A: Factors,
        B: Factors,
        scales: Sequence[float],
        weights: Sequence[float] | None = None,
        rank: int | None = None,
    ) -> MergeResult:
        from clair_cli.core.baselines import fedavg

        return fedavg(A, B, scales, weights, rank)


class Median(Baseline):
    name = "median"
    min_adapters = 2
    description = "coordinate-wise median of the updates"

    def combine(
        self,
        A: Factors,
        B: Factors,
        scales: Sequence[float],
        weights: Sequence[float] | None = None,
        rank: int | None = None,
    ) -> MergeResult:
        from clair_cli.core.baselines import median

        return median(A, B, scales, weights, rank)


class TrimmedMean(Baseline):
    name = "trimmed-mean"
    min_adapters = 3
    description = "coordinate-wise mean without the largest and smallest values"

    def combine(
        self,
        A: Factors,
        B: Factors,
        scales: Sequence[float],
        weights: Sequence[float] | None = None,
        rank: int | None = None,
    ) -> MergeResult:
        from clair_cli.core.baselines import trimmed_mean

        return trimmed_mean(A, B, scales, weights, rank)


class Krum(Baseline):
    name = "krum"
    min_adapters = 3
    description = "the adapter of lowest Krum score"

    def combine(
        self,
        A: Factors,
        B: Factors,
        scales: Sequence[float],
        weights: Sequence[float] | None = None,
        rank: int | None = None,
    ) -> MergeResult:
        from clair_cli.core.baselines import krum

        return krum(A, B, scales, weights, rank)


class MultiKrum(Baseline):
    name = "multi-krum"
    min_adapters = 3
    description = "mean of the adapters of lowest Krum score"

    def combine(
        self,
        A: Factors,
        B: Factors,
        scales: Sequence[float],
        weights: Sequence[float] | None = None,
        rank: int | None = None,
    ) -> MergeResult:
        from clair_cli.core.baselines import multi_krum

        return multi_krum(A, B, scales, weights, rank)


class Ties(Baseline):
    name = "ties"
    min_adapters = 2
    description = "TIES: trim, elect sign, disjoint mean"

    def combine(
        self,
        A: Factors,
        B: Factors,
        scales: Sequence[float],
        weights: Sequence[float] | None = None,
        rank: int | None = None,
    ) -> MergeResult:
        from clair_cli.core.baselines import ties

        return ties(A, B, scales, weights, rank)
