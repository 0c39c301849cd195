"""Writing an update as LoRA factors of a chosen rank.

Every merge result is returned as factors ``(A, B)`` with scale 1, so that
``B @ A`` is the merged update. Two ways in:

- :func:`truncate_factored`: the update is already ``B @ A`` with a large inner
  dimension (a concatenation of adapters); its SVD is read from QRs of the two
  factors and a small core, never from the ``d_out x d_in`` product.
- :func:`truncate_dense`: the update exists only as a dense matrix (coordinate-wise
  aggregators); an exact SVD for small matrices, a seeded randomized SVD otherwise.

Both split the singular values evenly between the factors and report the relative
Frobenius error of the result (:func:`truncate_factored` measures it on the factors it
returns, rounding to their dtype included).
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


def _stored_error(a: torch.Tensor, b: torch.Tensor, qa: torch.Tensor, qb: torch.Tensor, core: torch.Tensor) -> float:
    """``||b a - qb core qa^T||_F / ||core||_F`` in float64, without the ``d_out x d_in`` product.

    With ``b = qb Y + Eb`` and ``a = Z qa^T + Ea`` (``Eb`` outside the span of ``qb``, ``Ea``
    outside that of ``qa``) the difference is three mutually orthogonal parts,
    ``qb (Y Z - core) qa^T``, ``qb Y Ea`` and ``Eb a``, whose norms come from small Gram matrices.
    """
    a, b = a.double(), b.double()
    total = float(core.square().sum())
    if total <= 0:
        return 0.0 if not bool(b.any()) or not bool(a.any()) else float("inf")
    y = qb.T @ b
    eb = b - qb @ y
    z = a @ qa
    ea = a - z @ qa.T
    err = float((y @ z - core).square().sum())
    err += float(((eb.T @ eb) * (a @ a.T)).sum()) + float(((y.T @ y) * (ea @ ea.T)).sum())
    return max(err, 0.0) ** 0.5 / total**0.5


def truncate_factored(
    A: torch.Tensor,
    B: torch.Tensor,
    rank: int | None,
    tol: float | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` factors of ``B @ A``; returns ``(A', B', relative_error)``.

    The decomposition runs in float64 whatever the input's dtype: float32 resolves singular
    values only to about ``1e-7 n sigma_max``, so its numerical rank cut and its error estimate
    break tolerances below about ``1e-4``. The error returned is *measured*: the relative
    Frobenius distance between ``B @ A`` and the product of the factors as returned (in
    ``out_dtype``, rounding included), not the truncation's estimate.

    Args:
        A: ``n x d_in``.
        B: ``d_out x n``.
        rank: target rank; ``None`` chooses it from ``tol``.
        tol: with ``rank=None``, the smallest rank whose measured relative error is at most
            ``tol`` (at least :func:`rank_for_tolerance`'s; more where rounding to ``out_dtype``
            adds error; the numerical rank where no rank reaches ``tol``, which the error
            returned then shows); ``None`` keeps the numerical rank of the product.
        out_dtype: dtype of the factors returned (default: ``A``'s).
    """
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be positive, got {rank}")
    out_dtype = out_dtype or A.dtype
    qb, rb = torch.linalg.qr(B.double(), mode="reduced")
    qa, ra = torch.linalg.qr(A.double().T, mode="reduced")
    core = rb @ ra.T
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    eps = torch.finfo(s.dtype).eps * max(s.numel(), 1) * (float(s[0]) if s.numel() else 0.0)
    numerical = max(int((s > eps).sum()), 1)

    def at(t: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        a, b, _ = _split(u, s, vh, t)
        a, b = (a @ qa.T).to(out_dtype), (qb @ b).to(out_dtype)
        return a, b, _stored_error(a, b, qa, qb, core)

    if rank is not None:
        return at(min(rank, s.numel()))
    if tol is None:
        return at(numerical)
    lo = min(rank_for_tolerance(s, tol), numerical)
    best = at(lo)
    if best[2] <= tol or lo == numerical:
        return best
    # Rounding to out_dtype pushed the error past tol: the smallest rank that stays within it.
    best = at(numerical)
    hi = numerical
    if best[2] > tol:
        return best
    while hi - lo > 1:
        mid = (lo + hi) // 2
        cand = at(mid)
        if cand[2] <= tol:
            hi, best = mid, cand
        else:
            lo = mid
    return best


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
