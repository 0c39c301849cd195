"""CUDA: the same verdicts and merges as on the CPU (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.synthetic import flagged, make_module, make_pool
from clair_cli import methods
from clair_cli.core import baselines
from clair_cli.core.audit import ClairAuditor

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("solver", ["convex", "fast"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_audit_matches_cpu(solver, dtype) -> None:
    mods = make_pool(M=3, K=24, bad=(2, 9), bad_modules=(0, 2), noise=0.2, d_out=96)
    cpu = ClairAuditor(solver=solver, dtype=dtype).fit(mods, 24)
    gpu = ClairAuditor(solver=solver, dtype=dtype, device="cuda").fit(mods, 24)
    assert flagged(gpu) == flagged(cpu) == {2, 9}
    assert gpu.shared_rank_ == cpu.shared_rank_
    for a, b in zip(gpu.scores_, cpu.scores_, strict=True):
        assert a == pytest.approx(b, abs=1e-4)


@pytest.mark.parametrize("name", [m.name for m in methods.REGISTRY.values() if isinstance(m, methods.Baseline)])
def test_cuda_baselines_match_cpu(name) -> None:
    A, B, s, _ = make_module(K=7, ranks=[2, 4, 3, 4, 5, 1, 3], d_out=24, d_in=20, noise=0.5, seed=1)
    cpu = methods.get(name).combine(A, B, s)
    gpu = methods.get(name).combine([a.cuda() for a in A], [b.cuda() for b in B], s)
    assert gpu.A.is_cuda and gpu.B.is_cuda
    torch.testing.assert_close((gpu.B @ gpu.A).cpu(), cpu.B @ cpu.A, atol=1e-9, rtol=1e-7)


def test_cuda_projection_rank_and_tolerance_merge_match_cpu() -> None:
    from clair_cli.core.projection import folds_for, projection_rank

    A, B, s, _ = make_module(K=9, r=2, noise=1.0, d_out=32, d_in=20, seed=4)
    cpu = projection_rank(A, B, s, folds_for(list(range(9))))
    gpu = projection_rank([a.cuda() for a in A], [b.cuda() for b in B], s, folds_for(list(range(9))))
    assert gpu.rank == cpu.rank
    assert gpu.errors == pytest.approx(cpu.errors, rel=1e-9)
    merged = baselines.mean([a.cuda() for a in A], [b.cuda() for b in B], s, tol=1e-3)
    assert merged.rank == baselines.mean(A, B, s, tol=1e-3).rank
