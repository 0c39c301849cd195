"""A minority that leaves one module untouched (a zero update there) sets none of that module's
typical values (an outside review of ClairStrategy: a third of a round took it over that way)."""

from __future__ import annotations

import torch

from clair_cli.core.audit import ClairAuditor, ModuleInput
from clair_cli.core.canonical import canonical_factors

D_IN, D_OUT, R = 12, 16, 4


def _factors(seed: int, noise: float, common_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A client's (A, B) of one module: a common direction plus its own noise."""
    gc, g = torch.Generator().manual_seed(common_seed), torch.Generator().manual_seed(1000 + seed)
    A = 0.1 * (torch.randn(R, D_IN, generator=gc) + noise * torch.randn(R, D_IN, generator=g))
    B = 0.1 * (torch.randn(D_OUT, R, generator=gc) + noise * torch.randn(D_OUT, R, generator=g))
    return A.double(), B.double()


def _pool(n_honest: int, n_lazy: int, stacked: bool, seed: int = 0) -> list[ModuleInput]:
    """Module q: honest clients share one direction, the others another (a payload of honest
    size). Module v: honest clients train it; the others send it back untouched, an exact zero
    (``stacked=False``, a first round) or the global's factors minus themselves, as a
    federated round's update is written (``stacked=True``: terms that cancel to rounding)."""
    K = n_honest + n_lazy
    q_A, q_B, v_A, v_B = [], [], [], []
    gA, gB = _factors(-1, 0.0, 77 + seed)  # a global adapter's factors
    for k in range(K):
        honest = k < n_honest
        A, B = _factors(k + 50 * seed, 0.3, seed if honest else 999 + seed)
        q_A.append(A)
        q_B.append(B)
        A, B = _factors(k + 50 * seed + 500, 0.3, 7 + seed) if honest else (gA.clone(), gB.clone())
        if stacked:
            v_A.append(torch.cat([A, gA]))
            v_B.append(torch.cat([B, -gB], 1))
        else:
            v_A.append(A if honest else torch.zeros_like(A))
            v_B.append(B if honest else torch.zeros_like(B))
    members = list(range(K))
    return [ModuleInput("h.0.q", members, q_A, q_B, [2.0] * K), ModuleInput("h.0.v", members, v_A, v_B, [2.0] * K)]


def test_factors_that_cancel_to_rounding_are_a_zero_update() -> None:
    A, B = _factors(3, 0.3, 1)
    ca, cb = canonical_factors(torch.cat([A, A]), torch.cat([B, -B], 1), 2.0)
    assert ca.shape == (1, D_IN) and cb.shape == (D_OUT, 1)
    assert not bool(ca.any()) and not bool(cb.any())
    # A real update of 1e-12 of the factors' size is kept.
    ca, cb = canonical_factors(torch.cat([A * (1 + 1e-12), A]), torch.cat([B, -B], 1), 2.0)
    assert float((cb @ ca).norm()) > 0


def test_a_minority_with_an_untouched_module_flags_no_honest_client() -> None:
    for stacked in (False, True):
        for n_honest, n_lazy in ((4, 3), (6, 3)):
            audit = ClairAuditor().fit(_pool(n_honest, n_lazy, stacked), n_honest + n_lazy)
            flagged = {k for k in range(n_honest + n_lazy) if audit.verdicts_[k].flagged}
            assert not flagged & set(range(n_honest)), (stacked, n_honest, n_lazy, flagged)
