"""The refit (``ClairAuditor.refit``): subspaces fitted again without the adapters the first
verdict flagged, where those had helped fit them, and the verdict decided again."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks.synthetic import flagged, make_pool, tight_pool
from clair_cli import pipeline
from clair_cli.core.audit import MAX_REFITS, ClairAuditor, ModuleInput
from clair_cli.core.fastpath import off_subspace_shares
from clair_cli.params import AuditParams

SAMPLES = Path(__file__).parents[1] / "sample_adapters"
K = 15
BAD = (10, 11, 12, 13, 14)  # a tight group: the decomposition takes it in as collaborators


def without(mods: list[ModuleInput], out: set[int]) -> list[ModuleInput]:
    """The pool's modules with the adapters ``out`` removed (members renumbered)."""
    keep = [k for k in range(len(mods[0].members)) if k not in out]
    return [
        ModuleInput(
            m.name, list(range(len(keep))), [m.A[k] for k in keep], [m.B[k] for k in keep], [m.scales[k] for k in keep]
        )
        for m in mods
    ]


@pytest.mark.parametrize("solver", ["convex", "fast"])
def test_honest_shares_are_those_of_the_pool_without_the_flagged(solver: str) -> None:
    mods = tight_pool(K, bad=BAD, rho=0.9, norm=2.0, seed=0)
    aud = ClairAuditor(solver=solver).fit(mods, K)
    assert flagged(aud) == set(BAD)
    assert aud.refit_without_ == list(BAD)
    assert aud.refitted_ == [m.name for m in mods]  # the group shaped every module's subspace
    honest = ClairAuditor(solver=solver).fit(without(mods, set(BAD)), K - len(BAD))
    assert not flagged(honest) and not honest.refitted_
    for got, clean, mod in zip(aud.module_results_, honest.module_results_, mods, strict=True):
        assert got.rank == clean.rank
        torch.testing.assert_close(got.off_subspace[: K - len(BAD)], clean.off_subspace, rtol=1e-9, atol=1e-12)
        # The left-out adapters are scored against the subspace the others fitted.
        out = off_subspace_shares(
            [mod.A[k] for k in BAD], [mod.B[k] for k in BAD], [mod.scales[k] for k in BAD], clean.subspace, "out"
        )
        torch.testing.assert_close(got.off_subspace[list(BAD)], out.double(), rtol=1e-6, atol=1e-9)
        assert got.fitted and not set(BAD) & set(got.fitted)  # the group left out of the fit


def test_the_first_fit_had_the_group_in_the_subspace() -> None:
    """Without the refit (a stream and no ``again``) the group's members are collaborators,
    which is what the refit is for; the verdict's flags are the same on this pool."""
    mods = tight_pool(K, bad=BAD, rho=0.9, norm=2.0, seed=0)
    once = ClairAuditor().fit(iter(mods), K)
    assert not once.refitted_ and once.refit_without_ == []
    assert all(set(BAD) <= set(r.fitted or ()) for r in once.module_results_)
    assert flagged(once) == set(BAD)


def test_no_refit_where_nothing_flagged_or_in_a_gate() -> None:
    clean = ClairAuditor().fit(make_pool(M=2, K=12, r=2), 12)
    assert not flagged(clean) and clean.refitted_ == [] and clean.refit_plan() == ([], frozenset())
    mods = tight_pool(K, bad=BAD, rho=0.9, norm=2.0, seed=1)
    gate = ClairAuditor().fit(mods, K, reference=list(range(8)))
    assert gate.refitted_ == [] and gate.refit_plan() == ([], frozenset())


def test_a_majority_flagged_is_not_refitted() -> None:
    mods = tight_pool(K, bad=BAD, rho=0.9, norm=2.0, seed=2)
    aud = ClairAuditor().fit(iter(mods), K)
    aud.flagged_ = [k < 8 for k in range(K)]  # 8 of 15: not a minority
    assert aud.refit_plan() == ([], frozenset())


def test_refits_stop_at_a_fixed_point_or_the_cap() -> None:
    mods = tight_pool(K, bad=BAD, rho=0.9, norm=2.0, seed=0)
    aud = ClairAuditor().fit(mods, K)
    assert aud.refit_plan() == ([], frozenset())  # flags the same as the refit left out
    # Had the refit's verdict flagged fewer (an honest adapter left out by the first one),
    # the modules refitted before are redone with the new set, once more at most.
    aud.verdicts_[BAD[-1]].flagged = False
    modules, out = aud.refit_plan()
    assert modules == aud.refitted_ and out == frozenset(BAD[:-1])
    aud.refit((aud.audit_module(m, None, out) for m in mods), out)
    assert aud.refit_without_ == sorted(out)
    aud.verdicts_[BAD[0]].flagged = False
    assert (aud.refit_plan()[0] != []) == (MAX_REFITS > 2)


def test_adapters_flagged_for_their_size_alone_stay_in_the_fit() -> None:
    """Blocks enter the fit at unit norm: a boosted update shaped the subspace as one honest
    adapter does, so a pool whose only flags are for size (norm, and spectral for the pair
    boosted one way) is not refitted."""
    mods = tight_pool(12, seed=3)
    for m in mods:
        for k in (10, 11):
            m.B[k] = 10 * m.B[k]
    aud = ClairAuditor().fit(mods, 12)
    assert flagged(aud) == {10, 11}
    assert {r.rule for k in (10, 11) for r in aud.verdicts_[k].reasons} <= {
        "norm",
        "module_norm",
        "in_subspace",
        "spectral",
    }
    assert aud.refitted_ == [] and aud.refit_plan() == ([], frozenset())


def test_audit_module_without_an_adapter_fits_on_the_others() -> None:
    """With three or more others left, the subspace is the one the others alone fit;
    with fewer, the module is fitted as it was."""
    mods = make_pool(M=1, K=6, r=2, bad=(5,))
    aud = ClairAuditor()
    full = aud.audit_module(mods[0]).result
    less = aud.audit_module(mods[0], None, frozenset({5})).result
    alone = aud.audit_module(without(mods, {5})[0]).result
    torch.testing.assert_close(less.off_subspace[:5], alone.off_subspace, rtol=1e-9, atol=1e-12)
    assert 5 not in (less.fitted or [])
    kept = aud.audit_module(mods[0], None, frozenset({0, 1, 2, 3})).result  # 2 left: too few
    torch.testing.assert_close(kept.off_subspace, full.off_subspace)


def test_pipeline_reports_the_refit() -> None:
    from clair_cli.report.audit import audit_report

    outcome = pipeline.audit(pipeline.open_pool([str(SAMPLES)]), AuditParams())
    report = audit_report(outcome)
    flagged_names = report["summary"]["flagged"]
    assert report["refit"]["without"] == sorted(flagged_names)
    assert report["refit"]["modules"] == len(outcome.auditor.refitted_) > 0


def test_an_auditor_for_workers_carries_no_fitted_state() -> None:
    """The Ray executor sends ``unfitted()`` to its workers, also for a refit's second round,
    when the auditor holds the first fit's sums (not picklable)."""
    import pickle

    aud = ClairAuditor(solver="fast", random_state=3)
    aud.n_null = 5
    aud.fit(tight_pool(K, bad=BAD, rho=0.9, norm=2.0, seed=0), K)
    fresh = pickle.loads(pickle.dumps(aud.unfitted()))
    assert (fresh.solver, fresh.random_state, fresh.n_null) == ("fast", 3, 5)
    assert not hasattr(fresh, "verdicts_")


def test_one_flagged_adapter_alone_is_not_refitted() -> None:
    """One adapter carries no shared direction by itself (parallel analysis's MIN_CARRIERS), so
    leaving it out would only score it held out. In this pool of honest adapters (no common
    part, spread over 8 directions) the first verdict flags one by rule 1; refitted without it,
    two more crossed rule 2b's cut."""
    from benchmarks.synthetic import directionless_pool

    aud = ClairAuditor().fit(directionless_pool(12, 8, 0.5, 0.0, 0), 12)
    assert flagged(aud) == {8} and aud.refitted_ == []


def test_a_fitted_auditor_pickles_with_its_verdict_and_its_refit_plan() -> None:
    """A fitted auditor travels between processes (multiprocessing, Ray, a cache): the per-adapter
    digests that order the pool are kept as bytes once the modules are folded."""
    import pickle

    pool = make_pool(M=2, K=12, noise=0.2, bad=(3,))
    fitted = ClairAuditor().fit(pool, 12)
    again = pickle.loads(pickle.dumps(fitted))
    assert again.flagged_ == fitted.flagged_ and again.scores_ == fitted.scores_
    assert again.refit_plan() == fitted.refit_plan()
