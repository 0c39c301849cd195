"""``mean``: the exact (weighted) mean of every adapter, no audit."""

from __future__ import annotations

from typing import TYPE_CHECKING

from clair_cli.methods.base import Baseline, MergePlan

if TYPE_CHECKING:
    from clair_cli.core.audit import ModuleInput
    from clair_cli.core.merge import MergeResult


class Mean(Baseline):
    """``sum_k w_k Theta_k``, written at the smallest rank within ``--merge-tol`` (or ``--merge-rank``)."""

    name = "mean"
    min_adapters = 1
    description = "exact (weighted) mean of every adapter, no audit"
    card = "Exact weighted mean of the updates, sum_k w_k s_k B_k A_k, as a concatenated LoRA."
    exact_mean = True
    function = "mean"

    def merge_module(self, mod: ModuleInput, weights: list[float] | None, plan: MergePlan) -> MergeResult:
        import torch

        from clair_cli.core.baselines import mean
        from clair_cli.core.merge import MergeResult

        res = mean(mod.A, mod.B, mod.scales, weights, plan.options.rank, plan.options.tol, torch.float32)
        return MergeResult(res.A, res.B, self.name, list(plan.used), res.info)
