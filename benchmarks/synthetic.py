"""Synthetic pools with known structure, for benchmarks and tests (not part of the package;
tests import it from here, benchmarks never import tests).

Benign adapters: ``B_k = U Gamma_k + noise`` with one shared orthonormal ``U``
(``d_out x r``), so ``Theta_k = s B_k A_k`` has its column space in ``span(U)``.
"""

from __future__ import annotations

import math

import torch

from clair_cli.core.audit import ModuleInput


def make_module(  # noqa: PLR0913 - each keyword is one property of the synthetic pool
    K: int = 20,
    bad: tuple[int, ...] = (),
    r: int = 2,
    ranks: list[int] | None = None,
    d_out: int = 48,
    d_in: int = 40,
    noise: float = 0.0,
    seed: int = 0,
    kind: str = "random",
    dtype: torch.dtype = torch.float64,
    spread: float | None = None,
    strengths: tuple[float, ...] | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[float], torch.Tensor]:
    """One module: (A, B, scales, U). ``bad`` adapters get random directions.

    ``spread``: ``None`` gives each benign adapter independent coefficients inside
    ``span(U)`` (no consensus); a number gives them a common update plus a deviation of
    ``spread`` times its size (``A_k = A_0 + spread E_k``, ``B_k = U (Gamma_0 + spread F_k)``),
    so small values model clients that agree and large ones honest heterogeneity.
    ``strengths`` (one per shared direction) scales the benign coefficients along each
    direction of ``U``: unequal directions, as trained pools have.
    """
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(d_out, r, generator=g, dtype=torch.float64))[0]
    if strengths is not None:
        if len(strengths) != r:
            raise ValueError(f"strengths needs {r} values, got {len(strengths)}")
        U = U * torch.tensor(strengths, dtype=torch.float64)  # column scales; span unchanged
    ranks = ranks or [4] * K
    if spread is not None:  # drawn only here, so pools without a consensus are unchanged
        a0 = torch.randn(max(ranks), d_in, generator=g, dtype=torch.float64) / math.sqrt(d_in)
        c0 = torch.randn(r, max(ranks), generator=g, dtype=torch.float64)
    A, B, s = [], [], []
    for k in range(K):
        rk = ranks[k]
        a = torch.randn(rk, d_in, generator=g, dtype=torch.float64) / math.sqrt(d_in)
        if spread is not None and k not in bad:
            a = a0[:rk] + spread * a
        if k in bad or kind == "independent":
            b = torch.randn(d_out, rk, generator=g, dtype=torch.float64)
        else:
            c = torch.randn(r, rk, generator=g, dtype=torch.float64)
            b = U @ (c if spread is None else c0[:, :rk] + spread * c)
            e = torch.randn(d_out, rk, generator=g, dtype=torch.float64)
            b = b + noise * b.norm() / e.norm() * e
        A.append(a.to(dtype))
        B.append(b.to(dtype))
        s.append(0.5 + (k % 3))  # mixed scales (alphas)
    return A, B, s, U if strengths is None else torch.linalg.qr(U)[0]


def make_pool(
    M: int = 3, K: int = 20, bad: tuple[int, ...] = (), bad_modules: tuple[int, ...] | None = None, **kw
) -> list[ModuleInput]:
    mods = []
    for m in range(M):
        b = bad if bad_modules is None or m in bad_modules else ()
        A, B, s, _ = make_module(
            K=K, bad=b, seed=1000 * kw.get("seed", 0) + m, **{k: v for k, v in kw.items() if k != "seed"}
        )
        mods.append(ModuleInput(f"layers.{m}.q_proj", list(range(K)), A, B, s))
    return mods


def flagged(auditor) -> set[int]:
    return {k for k, f in enumerate(auditor.flagged_) if f}


def coordinated_push(mods: list[ModuleInput], bad: tuple[int, ...], strength: float, seed: int = 0) -> None:
    """Give the ``bad`` adapters one common extra rank-1 term in every module, inside the
    span of the honest updates' columns, ``strength`` times the module's median update norm:
    a group pushing the same way (clients sharing a backdoor), each otherwise honest."""
    g = torch.Generator().manual_seed(10_000 + seed)
    for m in mods:
        updates = torch.stack([s * b @ a for a, b, s in zip(m.A, m.B, m.scales, strict=True)])
        typical = updates.norm(dim=(1, 2)).median()
        u = m.B[0][:, :1] / m.B[0][:, :1].norm()
        v = torch.randn(1, m.A[0].shape[1], generator=g, dtype=m.A[0].dtype)
        v = v / v.norm()
        for k in bad:
            m.A[k] = torch.cat([m.A[k], v])
            m.B[k] = torch.cat([m.B[k], u * strength * typical / m.scales[k]], dim=1)
