"""Writing an update as LoRA factors of a chosen rank.

Every merge result is returned as factors ``(A, B)`` with scale 1, so that
``B @ A`` is the merged update. Two ways in:

- :func:`truncate_factored`: the update is already ``B @ A`` with a large inner
  dimension (a concatenation of adapters); its SVD is read from QRs of the two
  factors and a small core, never from the ``d_out x d_in`` product.
- :func:`truncate_dense`: the update exists only as a dense matrix (coordinate-wise
  aggregators); an exact SVD for small matrices, a seeded randomized SVD otherwise.

Both split the singular values evenly between the factors and report the relative
Frobenius error of the truncation.
"""

from __future__ import annotations

import torch

OVERSAMPLE = 10
POWER_ITERATIONS = 4


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    total = float(s.square().sum())
    kept = s[:rank]
    err = max(total - float(kept.square().sum()), 0.0)
    rel = (err / total) ** 0.5 if total > 0 else 0.0
    root = kept.sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root, rel


def rank_for_tolerance(s: torch.Tensor, tol: float) -> int:
    """Smallest rank ``t`` whose truncation error ``sqrt(sum_{i>=t} s_i^2) / sqrt(sum s_i^2)``
    is at most ``tol``, for singular values ``s`` in descending order (at least 1)."""
    if not 0 <= tol < 1:
        raise ValueError(f"tolerance must be in [0, 1), got {tol}")
    energy = s.double().square()
    total = float(energy.sum())
    if total <= 0:
        return 1
    # tail[t] = energy left out when t values are kept.
    tail = (total - torch.cumsum(energy, 0)).clamp_min(0)
    ok = (tail <= (tol * tol) * total).nonzero()
    return max(int(ok[0]) + 1 if ok.numel() else s.numel(), 1)


def truncate_factored(
    A: torch.Tensor, B: torch.Tensor, rank: int | None, tol: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` factors of ``B @ A``; returns ``(A', B', relative_error)``.

    Args:
        A: ``n x d_in``.
        B: ``d_out x n``.
        rank: target rank; ``None`` chooses it from ``tol``.
        tol: with ``rank=None``, the smallest rank whose relative Frobenius error is at most
            ``tol`` (:func:`rank_for_tolerance`); ``None`` keeps the numerical rank of the product.
    """
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be positive, got {rank}")
    qb, rb = torch.linalg.qr(B, mode="reduced")
    qa, ra = torch.linalg.qr(A.T, mode="reduced")
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    if rank is None:
        eps = torch.finfo(s.dtype).eps * max(s.numel(), 1) * (float(s[0]) if s.numel() else 0.0)
        numerical = max(int((s > eps).sum()), 1)
        rank = numerical if tol is None else min(rank_for_tolerance(s, tol), numerical)
    rank = min(rank, s.numel())
    a, b, rel = _split(u, s, vh, rank)
    return a @ qa.T, qb @ b, rel


def truncate_dense(
    M: torch.Tensor, rank: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` factors of a dense ``M``; returns ``(A, B, relative_error)``.

    An exact SVD when ``rank + 10`` reaches the smaller side of ``M``; otherwise a
    randomized range finder with four power iterations (Halko, Martinsson & Tropp),
    seeded by ``generator`` so the result is deterministic.
    """
    if rank < 1:
        raise ValueError(f"rank must be positive, got {rank}")
    small = min(M.shape)
    rank = min(rank, small)
    total = float(M.square().sum())
    if rank + OVERSAMPLE >= small:
        u, s, vh = torch.linalg.svd(M, full_matrices=False)
        return _split(u, s, vh, rank)
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    omega = torch.randn(M.shape[1], rank + OVERSAMPLE, generator=g, dtype=torch.float64).to(M)
    q = torch.linalg.qr(M @ omega)[0]
    for _ in range(POWER_ITERATIONS):
        q = torch.linalg.qr(M.T @ q)[0]
        q = torch.linalg.qr(M @ q)[0]
    u, s, vh = torch.linalg.svd(q.T @ M, full_matrices=False)
    a, b, _ = _split(q @ u, s, vh, rank)
    err = max(total - float(s[:rank].square().sum()), 0.0)
    return a, b, (err / total) ** 0.5 if total > 0 else 0.0
