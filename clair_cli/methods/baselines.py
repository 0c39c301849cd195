"""The baselines without audit (docs/engine.md, section 7): one class each, applying the
function of :mod:`clair_cli.core.baselines` named by its ``function`` to every adapter."""

from __future__ import annotations

from clair_cli.methods.base import Baseline


class FedAvg(Baseline):
    name = "fedavg"
    min_adapters = 1
    description = "naive federated averaging of the A and B factors apart"
    card = "Federated averaging of the factors, (sum_k w_k s_k B_k)(sum_k w_k A_k)."
    function = "fedavg"
    of_factors = True


class Median(Baseline):
    name = "median"
    min_adapters = 2
    description = "coordinate-wise median of the updates"
    card = "Coordinate-wise median of the updates, truncated back to LoRA rank by SVD."
    function = "median"
    weighted = False


class TrimmedMean(Baseline):
    name = "trimmed-mean"
    min_adapters = 3
    description = "coordinate-wise mean without the largest and smallest values"
    card = "Coordinate-wise trimmed mean of the updates, truncated back to LoRA rank by SVD."
    function = "trimmed_mean"
    weighted = False


class Krum(Baseline):
    name = "krum"
    min_adapters = 3
    description = "the adapter of lowest Krum score"
    card = "Krum: the single adapter closest to its neighbours."
    function = "krum"
    weighted = False


class MultiKrum(Baseline):
    name = "multi-krum"
    min_adapters = 3
    description = "mean of the adapters of lowest Krum score"
    card = "Multi-Krum: the mean of the adapters closest to their neighbours."
    function = "multi_krum"
    weighted = False


class Ties(Baseline):
    name = "ties"
    min_adapters = 2
    description = "TIES: trim, elect sign, disjoint mean"
    card = "TIES merging (trim, elect sign, disjoint mean), truncated back to LoRA rank by SVD."
    function = "ties"
