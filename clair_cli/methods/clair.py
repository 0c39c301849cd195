"""``clair``: audit, then merge the adapters the audit does not flag.

By default their exact weighted mean under a norm bound (``--norm-bound``, 1.5x their median
norm over all modules and on each module, widened where their norms spread: with nothing
flagged or bounded, ``mean`` bit for bit); with ``--project``, CLAIR's projection ``U U^T`` of
that mean onto the collaborators' leading directions, at a rank chosen for reconstruction
(never the detection rank); with ``--clip``, their influence also bounded by centred clipping
(:mod:`clair_cli.core.influence`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from clair_cli.methods.base import MergeMethod, MergePlan, Weighting

if TYPE_CHECKING:
    from clair_cli.core.audit import ModuleInput
    from clair_cli.core.merge import MergeResult
    from clair_cli.params import MergeOptions
    from clair_cli.results import AuditOutcome


def _listed(names: list[str]) -> str:
    return f"{', '.join(names[:4])}{', ...' if len(names) > 4 else ''}"


def one_vote_per_group(
    outcome: AuditOutcome, used: list[int], weights: list[float] | None
) -> tuple[list[float] | None, list[str]]:
    """The merge weights with every coordinated group among ``used`` counted as one adapter
    (:mod:`clair_cli.core.rules.coordinated`): its members share one member's weight, so a
    tight minority that passed the audit moves the mean by one adapter's weight, not by its
    size. ``weights`` unchanged (and no note) where no such group is merged."""
    from clair_cli.core.merge import check_weights

    pos = {k: p for p, k in enumerate(used)}
    groups = [[k for k in g.members if k in pos] for g in outcome.auditor.coordinated_groups_]
    groups = [g for g in groups if len(g) > 1]
    if not groups:
        return weights, []
    w = list(check_weights(weights, len(used)))
    for g in groups:
        for k in g:
            w[pos[k]] /= len(g)
    total = sum(w)
    names = outcome.pool.names
    notes = [
        f"coordinated group counted as one adapter in the mean ({len(g)} adapters that agree far more closely "
        f"than the pool does): {_listed(sorted(names[k] for k in g))}"
        for g in groups
    ]
    return [x / total for x in w], notes


class Clair(MergeMethod):
    """CLAIR's merge of the collaborative set."""

    # CLAIR's robust centre (median / MAD) needs a benign majority, and below five adapters
    # parallel analysis misses real shared directions often enough to flag benign adapters
    # (measured on 16-dim toy pools).
    name = "clair"
    min_adapters = 5
    description = "audit, then the exact mean of the adapters not flagged"
    card = (
        "CLAIR merge: the adapters the CLAIR audit did not flag (the collaborative set) are merged "
        "by their exact weighted mean, Theta_bar = sum_k w_k s_k B_k A_k, written with scale 1 at the "
        "smallest rank within the stated relative error."
    )
    audits = True
    exact_mean = True

    def members(self, n_adapters: int, outcome: AuditOutcome | None) -> list[int]:
        """The collaborative set: the adapters the audit did not flag.

        Raises:
            ValueError: no audit outcome.
            UsageError: every adapter was flagged.
        """
        from clair_cli.errors import UsageError

        if outcome is None:
            raise ValueError(f"the {self.name} merge needs an audit outcome")
        used = list(outcome.auditor.collaborative_set_)
        if not used:
            raise UsageError("every adapter was flagged: there is nothing to merge")
        return used

    def merge_weights(
        self, outcome: AuditOutcome | None, used: list[int], weights: list[float] | None, options: MergeOptions
    ) -> Weighting:
        """Each coordinated group the audit let through counted as one adapter; with
        ``--norm-bound``, then updates above the norm bound weighted down to it; with ``--clip``,
        then the weights of the centred clipping of the collaborators' whole updates."""
        if outcome is None:
            return Weighting(weights, {}, [])
        from clair_cli.core.influence import bounded_weights, clipped_weights

        weights, notes = one_vote_per_group(outcome, used, weights)
        names = outcome.pool.names
        bounded: dict[int, float] = {}
        relative: float | None = None
        if options.norm_bound is not None:
            weights, bounded, relative = bounded_weights(outcome.auditor.inner_, used, weights, options.norm_bound)
            if bounded:
                notes.append(
                    f"bounded influence: {len(bounded)} update(s) larger than the norm bound ({relative:.3g}x "
                    f"the collaborators' median norm) weighted down to it: "
                    f"{_listed([names[k] for k in sorted(bounded, key=lambda k: bounded[k])])} "
                    f"(--norm-bound off: merged at their full weight)"
                )
        clipped: dict[int, float] = {}
        if options.clip is not None:
            weights, clipped = clipped_weights(outcome.auditor.inner_, used, weights, options.clip)
            if clipped:
                notes.append(
                    f"bounded influence: {len(clipped)} update(s) more than {options.clip:g}x the collaborators' "
                    f"median distance from their centre were clipped to it: "
                    f"{_listed([names[k] for k in sorted(clipped, key=lambda k: clipped[k])])}"
                )
        finite = relative if relative is not None and math.isfinite(relative) else None
        return Weighting(weights, clipped, notes, bounded, finite)

    def merge_module(self, mod: ModuleInput, weights: list[float] | None, plan: MergePlan) -> MergeResult:
        import torch

        from clair_cli.core.audit import at_working_precision
        from clair_cli.core.baselines import mean
        from clair_cli.core.merge import MergeResult, projected_merge
        from clair_cli.core.projection import projection_basis

        options = plan.options
        bounded: dict[int, float] = {}
        if options.norm_bound is not None:
            # Each module's own norm bound too: a module boosted alone hardly moves the whole update's.
            from clair_cli.core.influence import module_bounded_weights

            whole = [plan.norm_bounded.get(k, 1.0) for k in mod.members]
            weights, at = module_bounded_weights(mod.A, mod.B, mod.scales, weights, options.norm_bound, whole)
            bounded = {mod.members[j]: c for j, c in at.items()}
        if not options.project:
            res = mean(mod.A, mod.B, mod.scales, weights, options.rank, options.tol, torch.float32)
            if bounded:
                res.info["module_norm_bounded"] = bounded
            return MergeResult(res.A, res.B, self.name, list(plan.used), res.info)
        # The basis as refine finds it (working precision); the mean it projects stays in float64.
        work = at_working_precision(mod, plan.dtype, plan.path)
        basis, q = projection_basis(work.A, work.B, work.scales, plan.side, options.project_rank, weights)
        if basis is None:
            res = mean(mod.A, mod.B, mod.scales, weights, options.rank, options.tol, torch.float32)
        else:
            res = projected_merge(mod.A, mod.B, mod.scales, basis, weights, plan.side, options.rank)
        res.info["projection_rank"] = q
        if bounded:
            res.info["module_norm_bounded"] = bounded
        return MergeResult(res.A, res.B, self.name, list(plan.used), res.info)

    def result_notes(self, results: dict[str, MergeResult]) -> list[str]:
        """Modules where a member's update was above that module's norm bound, and modules a
        projected merge left unprojected (their projection did not help)."""
        notes = []
        bounded = [m for m, r in results.items() if r.info.get("module_norm_bounded")]
        if bounded:
            members = sorted({k for m in bounded for k in results[m].info["module_norm_bounded"]})
            notes.append(
                f"bounded influence: on {len(bounded)} module(s), {len(members)} update(s) larger than that "
                f"module's norm bound were weighted down to it there: {_listed(bounded)}"
            )
        unprojected = [
            m for m, r in results.items() if "projection_rank" in r.info and r.info["projection_rank"] is None
        ]
        if not unprojected:
            return notes
        return notes + [
            f"projection did not predict held-out adapters better than the plain mean on {len(unprojected)} "
            f"module(s), which were merged unprojected: {_listed(unprojected)}"
        ]
