"""A minority that leaves one module untouched (a zero update there) sets none of that module's
typical values, and a client that sends a module back as the global had it sends a zero update
(an outside review of ClairStrategy: a third of a round took it over that way)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clair_cli.core.audit import ClairAuditor, ModuleInput
from clair_cli.core.canonical import CancellingFactors, canonical_factors

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
    (``stacked=False``, a first round) or the global's factors, whose update a federated round
    takes against the global's (``stacked=True``, :func:`client_update`)."""
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
            from clair_cli.federated.rounds import client_update

            ((a, b, _),) = client_update({"v": (A, B)}, {"v": (gA, gB)}, {"v": 2.0}).values()
            v_A.append(a)
            v_B.append(b)
        else:
            v_A.append(A if honest else torch.zeros_like(A))
            v_B.append(B if honest else torch.zeros_like(B))
    members = list(range(K))
    return [ModuleInput("h.0.q", members, q_A, q_B, [2.0] * K), ModuleInput("h.0.v", members, v_A, v_B, [2.0] * K)]


def test_the_global_sent_back_is_an_exact_zero_update() -> None:
    """As it was, re-factored by a power of two or with its rank permuted: zero, not the rounding
    of the stacked difference (norm 1e-17, a direction of its own)."""
    from clair_cli.federated.rounds import client_update

    gA, gB = _factors(3, 0.3, 1)
    perm = torch.randperm(R, generator=torch.Generator().manual_seed(0))
    for A, B in ((gA, gB), (gA / 2, gB * 2), (gA[perm], gB[:, perm])):
        ((a, b, s),) = client_update({"m": (A, B)}, {"m": (gA, gB)}, {"m": 2.0}).values()
        assert not bool(a.any()) and not bool(b.any()) and s == 2.0
    # A real change of 1e-6 of the factors' size is kept: the difference, exactly enough.
    A = gA * (1 + 1e-6)
    ((a, b, _),) = client_update({"m": (A, gB)}, {"m": (gA, gB)}, {"m": 2.0}).values()
    assert torch.allclose(b @ a, gB @ (A - gA), rtol=0, atol=1e-6 * float((gB @ (A - gA)).norm()))


def _cancelling(big: float) -> tuple[torch.Tensor, torch.Tensor]:
    """An update with pairs of huge rank-one terms that cancel (PEFT's float32 product cancels
    them exactly; float64 holds the rest only to about eps times their size)."""
    A, B = _factors(3, 0.3, 1)
    g = torch.Generator().manual_seed(5)
    u = torch.randint(0, 2, (D_OUT, 1), generator=g).double() * 2 - 1
    v = torch.randint(0, 2, (1, D_IN), generator=g).double() * 2 - 1
    return torch.cat([A, big * v, -big * v]), torch.cat([B, u, u], 1)


def test_factors_whose_terms_cancel_are_refused() -> None:
    """An outside review hid a payload behind such pairs (a cut scaled by the terms' sizes read
    it as rounding). Past MAX_CANCELLATION they are refused; below it the update is kept exactly."""
    A, B = _factors(3, 0.3, 1)
    ca, cb = canonical_factors(*_cancelling(2.0**6), 2.0)
    assert torch.allclose(cb @ ca, 2.0 * B @ A, rtol=0, atol=1e-9 * float((B @ A).norm()))
    for big in (2.0**30, 2.0**47):
        with pytest.raises(CancellingFactors, match="rank-one terms are"):
            canonical_factors(*_cancelling(big), 2.0)


def test_a_file_or_reply_whose_terms_cancel_is_refused_by_name(tmp_path: Path) -> None:
    from helpers import lora_config, run_cli, write_adapter
    from pools import write_pool

    from clair_cli.errors import AdapterFormatError
    from clair_cli.federated.rounds import check_factors

    pool = write_pool(tmp_path / "pool", k=6, bad=())
    from safetensors.torch import load_file

    key = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = load_file(pool / "client_00" / "adapter_model.safetensors")
    a, b = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
    u, v = torch.ones(b.shape[0], 1), torch.ones(1, a.shape[1])
    tensors[f"{key}.lora_A.weight"] = torch.cat([a, 2.0**30 * v, -(2.0**30) * v])
    tensors[f"{key}.lora_B.weight"] = torch.cat([b, u, u], 1)
    write_adapter(pool / "client_00", tensors, lora_config(rank_pattern={"layers.0.self_attn.q_proj": 6}))
    proc = run_cli("audit", str(pool))
    assert proc.returncode == 2 and "client_00" in proc.stderr and "rank-one terms" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    g_a, g_b = torch.randn(6, a.shape[1]), torch.zeros(b.shape[0], 6)
    reply = {"q": (tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"])}
    with pytest.raises(AdapterFormatError, match="node-3: module q: its factors' rank-one terms"):
        check_factors("node-3", reply, {"q": (g_a, g_b)}, {"q": 6}, {"q": 2.0})


def test_a_minority_with_an_untouched_module_flags_no_honest_client() -> None:
    for stacked in (False, True):
        for n_honest, n_lazy in ((4, 3), (6, 3)):
            audit = ClairAuditor().fit(_pool(n_honest, n_lazy, stacked), n_honest + n_lazy)
            flagged = {k for k in range(n_honest + n_lazy) if audit.verdicts_[k].flagged}
            assert not flagged & set(range(n_honest)), (stacked, n_honest, n_lazy, flagged)
