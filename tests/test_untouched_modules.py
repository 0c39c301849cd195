"""A minority that leaves one module untouched (a zero update there) sets none of that module's
typical values, and a client that sends a module back as the global had it sends a zero update
(an outside review of ClairStrategy: a third of a round took it over that way)."""

from __future__ import annotations

from pathlib import Path

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


def test_terms_that_cancel_exactly_are_read() -> None:
    """PiSSA / OLoRA adapters converted by PEFT's save_pretrained hold ``[B', B0] / [A'; -A0]``: a
    module left untrained cancels exactly, and is read (a review: a first version of the fix
    refused such honest files), as an update at float64's rounding of the terms."""
    A, B = _factors(3, 0.3, 1)
    ca, cb = canonical_factors(torch.cat([A, -A]), torch.cat([B, B], 1), 2.0)
    assert float((cb @ ca).norm()) <= 1e-14 * float((B @ A).norm())


def test_float64_factors_are_read_as_peft_loads_them(tmp_path: Path) -> None:
    """A review's attack: pairs of float64 terms ``c + e`` and ``c`` (``e`` below half a float32 ulp
    of ``c``) against rows ``s`` and ``-s`` read as ``B A + e s`` in float64, while PEFT's float32
    cast drops ``e`` and applies ``B A``; clair gate passed a backdoor that way. Refused now, with
    the file and module named; an honest float64 file is read."""
    from helpers import lora_config, run_cli, write_adapter
    from pools import write_pool
    from safetensors.torch import load_file

    pool = write_pool(tmp_path / "pool", k=6, bad=())
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {k: v.double() for k, v in load_file(pool / "client_01" / "adapter_model.safetensors").items()}
    write_adapter(pool / "client_01", tensors, lora_config(lora_alpha=8))  # honest, in float64
    a, b = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
    c = torch.full((b.shape[0], 1), 2.0**20, dtype=torch.float64)
    row = torch.ones(1, a.shape[1], dtype=torch.float64)
    tensors[f"{key}.lora_A.weight"] = torch.cat([a, row, -row])
    tensors[f"{key}.lora_B.weight"] = torch.cat([b, c + 0.05, c], 1)  # 0.05: below float32's 0.0625
    write_adapter(pool / "client_00", tensors, lora_config(rank_pattern={"layers.0.self_attn.q_proj": 6}))
    proc = run_cli("audit", str(pool))
    assert proc.returncode == 2 and "client_00" in proc.stderr and "float32 cast" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    (pool / "client_00" / "adapter_model.safetensors").unlink()
    (pool / "client_00" / "adapter_config.json").unlink()
    (pool / "client_00").rmdir()
    assert run_cli("audit", str(pool), "--exit-zero").returncode == 0


def test_a_minority_with_an_untouched_module_flags_no_honest_client() -> None:
    for stacked in (False, True):
        for n_honest, n_lazy in ((4, 3), (6, 3)):
            audit = ClairAuditor().fit(_pool(n_honest, n_lazy, stacked), n_honest + n_lazy)
            flagged = {k for k in range(n_honest + n_lazy) if audit.verdicts_[k].flagged}
            assert not flagged & set(range(n_honest)), (stacked, n_honest, n_lazy, flagged)


def _tiny_pool(n_honest: int, n_small: int, scale: float, seed: int, every_module: bool = False) -> list[ModuleInput]:
    """:func:`_pool`'s first round, but the minority's module v (with ``every_module``, its whole
    update) is an honest-looking update at ``scale`` of an honest one: tiny, not exactly zero."""
    modules = _pool(n_honest, n_small, stacked=False, seed=seed)
    for module in modules if every_module else modules[1:]:
        for k in range(n_honest, n_honest + n_small):
            A, B = _factors(k + 50 * seed + 500, 0.3, 7 + seed)
            module.A[k], module.B[k] = A, B * scale
    return modules


def test_a_near_half_minority_of_tiny_modules_flags_no_honest_client() -> None:
    """An outside review: four clients of nine whose module v is an honest-looking update at 1e-6
    (to 1e-30) of an honest one, not exactly zero and so not left out as untouched, made each honest
    client's others half tiny and half honest, and their median the midpoint of the two: every
    honest client was flagged for a norm ~1e3x "the others' median" there (rule 13; here in 4 of 4
    seeds at 4 of 9 and 5 of 11 before the fix), on trained pools too, and the payload merged. The
    norm rules' centre is now at most a spread below the median of the whole pool, which lies among
    the honest values while the attackers are fewer than half."""
    for n_honest, n_small in ((5, 4), (6, 5)):
        for seed in (1, 2, 3, 4):
            for scale, every_module in ((1e-6, False), (1e-30, False), (1e-6, True)):
                K = n_honest + n_small
                audit = ClairAuditor().fit(_tiny_pool(n_honest, n_small, scale, seed, every_module), K)
                flagged = {k for k in range(K) if audit.verdicts_[k].flagged}
                assert not flagged & set(range(n_honest)), (n_honest, n_small, seed, scale, every_module, flagged)
