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


def tight_pool(  # noqa: PLR0913 - each keyword is one property of the synthetic pool
    K: int,
    bad: tuple[int, ...] = (),
    rho: float = 0.4,
    norm: float = 2.0,
    seed: int = 0,
    M: int = 3,
    own: float = 2.0,
    jitter: float = 0.1,
    lean: dict[int, float] | None = None,
) -> list[ModuleInput]:
    """Honest clients as trained ones are: one common rank-4 update per module plus each
    client's own rank-4 part ``own`` times as large (pairwise cosine about ``1 / (1 + own^2)``),
    whole-update norms within ``1 +- jitter`` of each other (one alpha, one learning rate).
    ``bad``: a spread group, each member a shared rank-4 push plus its own part, two members
    at cosine about ``rho``, at ``norm`` times the honest median norm. ``lean``: honest clients
    given that share of the group's push in their own update (they lie on the group's side).
    """
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def unit(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return B / (B @ A).norm(), A

    d_out, d_in, r = 48, 40, 4
    lean = lean or {}
    target = {k: norm if k in bad else 1 + jitter * (2 * float(torch.rand(1, generator=g)) - 1) for k in range(K)}
    parts: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
    for _ in range(M):
        common, push = unit(rnd(d_out, r), rnd(r, d_in)), unit(rnd(d_out, r), rnd(r, d_in))
        A, B = [], []
        for k in range(K):
            mine = unit(rnd(d_out, r), rnd(r, d_in))
            if k in bad:
                pieces = [(math.sqrt(rho), push), (math.sqrt(1 - rho), mine)]
            else:
                pieces = [(1.0, common), (own, mine)] + ([(lean[k] * own, push)] if k in lean else [])
            B.append(torch.cat([w * b for w, (b, _) in pieces], 1))
            A.append(torch.cat([a for _, (_, a) in pieces]))
        parts.append((A, B))
    size = [math.sqrt(sum(float((B[k] @ A[k]).norm() ** 2) for A, B in parts)) for k in range(K)]
    mods = []
    for m, (A, B) in enumerate(parts):
        B = [b * target[k] / size[k] for k, b in enumerate(B)]
        mods.append(ModuleInput(f"layers.{m}.q_proj", list(range(K)), A, B, [1.0] * K))
    return mods


def split_groups_pool(  # noqa: PLR0913 - each keyword is one property of the synthetic pool
    seed: int = 0,
    groups: int = 2,
    own: float = 3.6,
    rho: float = 0.4,
    norm: float = 2.0,
    n_bad: int = 6,
    K_honest: int = 12,
    M: int = 3,
) -> tuple[list[ModuleInput], tuple[int, ...]]:
    """The attack benchmark's ``split-groups`` on a synthetic pool: honest clients that agree as
    loosely as trained ones that learned little (a common rank-4 update per module plus their
    own, ``own`` times as large: pairwise cosine about ``1 / (1 + own^2)``), and ``n_bad``
    attackers (the last adapters) in ``groups`` groups, each group along
    ``-0.19 h + 0.98 d_j`` (``h`` the honest mean's direction, ``d_j`` the honest clients'
    ``j``-th direction of disagreement), each member with its own rank-2 noise so that two
    members are at cosine about ``rho``, at ``norm`` times the honest norm. Every update is
    written at rank 8 by truncated SVD, as the benchmark writes its attackers.
    """
    g = torch.Generator().manual_seed(seed)
    d_out, d_in, r = 48, 40, 4

    def lowrank(rank: int) -> torch.Tensor:
        return torch.randn(d_out, rank, generator=g, dtype=torch.float64) @ torch.randn(
            rank, d_in, generator=g, dtype=torch.float64
        )

    def unit(x: torch.Tensor) -> torch.Tensor:
        return x / x.norm()

    def whole(rank: int) -> torch.Tensor:
        return unit(torch.cat([unit(lowrank(rank)).flatten() for _ in range(M)]))

    common = whole(r) * math.sqrt(M)
    honest = torch.stack([unit(common + own * whole(r) * math.sqrt(M)) for _ in range(K_honest)])
    h = unit(honest.mean(0))
    dev = honest - honest.mean(0)
    dev = dev - torch.outer(dev @ h, h)
    directions = torch.linalg.svd(dev, full_matrices=False).Vh
    edge = 0.19  # as benchmarks.attacks.EDGE_COSINE: just above rule 9's -0.2
    bad = [
        norm * unit(-edge * h + math.sqrt(1 - edge**2) * directions[k % groups] + math.sqrt(1 / rho - 1) * whole(2))
        for k in range(n_bad)
    ]
    X = torch.cat([honest, torch.stack(bad)])
    K = len(X)
    mods = []
    for m in range(M):
        A, B = [], []
        for k in range(K):
            U, S, Vh = torch.linalg.svd(X[k, m * d_out * d_in : (m + 1) * d_out * d_in].reshape(d_out, d_in))
            B.append(U[:, :8] * S[:8].sqrt())
            A.append(S[:8].sqrt()[:, None] * Vh[:8])
        mods.append(ModuleInput(f"layers.{m}.q_proj", list(range(K)), A, B, [1.0] * K))
    return mods, tuple(range(K_honest, K))


def directionless_pool(  # noqa: PLR0913 - each keyword is one property of the synthetic pool
    K: int,
    dims: int,
    own: float = 0.0,
    common: float = 0.0,
    seed: int = 0,
    M: int = 3,
) -> list[ModuleInput]:
    """Honest updates without a common direction: per module, random coefficients on ``dims``
    shared rank-4 updates (a pool spread around zero in a subspace), plus ``common`` times a
    shared update all carry and each client's own rank-4 part (``own`` times ``sqrt(dims)``);
    every update at unit norm (one alpha, one learning rate)."""
    g = torch.Generator().manual_seed(seed)
    d_out, d_in, r = 48, 40, 4

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def part() -> tuple[torch.Tensor, torch.Tensor]:
        return rnd(d_out, r) / math.sqrt(d_out * r), rnd(r, d_in)

    mods = []
    for m in range(M):
        basis = [part() for _ in range(dims + 1)]
        A, B = [], []
        for _ in range(K):
            coef = rnd(dims)
            pieces = [(common, basis[dims])] + [(float(coef[j]), basis[j]) for j in range(dims)]
            pieces.append((own * math.sqrt(dims), part()))
            Bk = torch.cat([w * b for w, (b, _) in pieces], 1)
            Ak = torch.cat([a for _, (_, a) in pieces])
            B.append(Bk / (Bk @ Ak).norm())
            A.append(Ak)
        mods.append(ModuleInput(f"layers.{m}.q_proj", list(range(K)), A, B, [1.0] * K))
    return mods
