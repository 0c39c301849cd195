"""Low-rank plus block-sparse solvers (docs/engine.md, section 3).

Both work on any matrix ``Y`` whose columns are grouped into blocks (one block
per adapter), so the same code runs on the small factored core (the main path)
and on a dense stack (the reference in the tests). Each iteration is one
singular-value soft-threshold and one block soft-threshold.

- :func:`solve_exact`: ``min ||L||_* + lam sum_k ||S_k||_F  s.t.  Y = L + S``
  (Outlier Pursuit with adapter-sized blocks), by the inexact augmented
  Lagrangian method; stops when ``||Y - L - S||_F <= tol ||Y||_F``.
- :func:`solve_noisy`: ``min 1/2 ||Y - L - S||_F^2 + lam_L ||L||_* + lam_S sum_k ||S_k||_F``
  by accelerated proximal gradient on ``L`` with ``S`` minimised in closed form
  (FISTA, adaptive restart); stops when the relative change of ``L`` falls below ``tol``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch


@dataclass(frozen=True)
class Decomposition:
    """``Y ~ L + S`` with convergence information."""

    L: torch.Tensor
    S: torch.Tensor
    n_iter: int
    converged: bool
    residual: float


def svt(X: torch.Tensor, tau: float) -> tuple[torch.Tensor, int]:
    """Singular-value soft-threshold ``U diag(max(s - tau, 0)) V^T``; returns it and its rank."""
    U, s, Vh = torch.linalg.svd(X, full_matrices=False)
    s = (s - tau).clamp_min(0)
    k = int((s > 0).sum())
    return (U[:, :k] * s[:k]) @ Vh[:k], k


def block_ids(offsets: Sequence[int], device: torch.device) -> torch.Tensor:
    """Each column's block (read-only: the tensor is shared between calls; the solvers ask
    for it at every iteration, and a pool of 10,000 modules has few distinct block layouts)."""
    return _block_ids(tuple(int(o) for o in offsets), str(device))


@lru_cache(maxsize=256)
def _block_ids(offsets: tuple[int, ...], device: str) -> torch.Tensor:
    widths = torch.tensor([offsets[k + 1] - offsets[k] for k in range(len(offsets) - 1)], device=device)
    return torch.repeat_interleave(torch.arange(len(offsets) - 1, device=device), widths)


def block_norms(X: torch.Tensor, offsets: Sequence[int]) -> torch.Tensor:
    """Frobenius norm of each column block."""
    ids = block_ids(offsets, X.device)
    sq = torch.zeros(len(offsets) - 1, dtype=X.dtype, device=X.device).index_add_(0, ids, X.pow(2).sum(dim=0))
    return sq.sqrt()


def block_shrink(X: torch.Tensor, offsets: Sequence[int], tau: float | torch.Tensor) -> torch.Tensor:
    """Per column block: ``max(0, 1 - tau / ||X_k||_F) X_k``."""
    norms = block_norms(X, offsets)
    factor = (1 - tau / norms.clamp_min(torch.finfo(X.dtype).tiny)).clamp_min(0)
    return X * factor[block_ids(offsets, X.device)]


def solve_exact(
    Y: torch.Tensor,
    offsets: Sequence[int],
    lam: float,
    tol: float = 1e-7,
    max_iter: int = 1000,
) -> Decomposition:
    """Outlier Pursuit with column blocks by inexact ALM (Lin, Chen & Ma 2010 schedule).

    Args:
        Y: the matrix, blocks side by side.
        offsets: block column boundaries, ``len = K + 1``.
        lam: weight of the block-sparse term.
        tol: relative residual at which to stop.
        max_iter: iteration cap.
    """
    if lam <= 0:
        raise ValueError(f"lam must be positive, got {lam}")
    norm_y = float(Y.norm())
    if norm_y == 0:
        return Decomposition(torch.zeros_like(Y), torch.zeros_like(Y), 0, True, 0.0)
    spec = float(torch.linalg.matrix_norm(Y, ord=2))
    dual = max(spec, float(block_norms(Y, offsets).max()) / lam)
    Z = Y / dual
    mu, mu_max, rho = 1.25 / spec, 1e7 / spec, 1.5
    L = torch.zeros_like(Y)
    S = torch.zeros_like(Y)
    residual = 1.0
    for it in range(1, max_iter + 1):
        L, _ = svt(Y - S + Z / mu, 1 / mu)
        S = block_shrink(Y - L + Z / mu, offsets, lam / mu)
        R = Y - L - S
        residual = float(R.norm()) / norm_y
        if residual < tol:
            return Decomposition(L, S, it, True, residual)
        Z = Z + mu * R
        mu = min(mu * rho, mu_max)
    return Decomposition(L, S, max_iter, False, residual)


def solve_noisy(
    Y: torch.Tensor,
    offsets: Sequence[int],
    lam_L: float,
    lam_S: float | torch.Tensor,
    tol: float = 1e-7,
    max_iter: int = 2000,
    init: torch.Tensor | None = None,
) -> Decomposition:
    """Noise-aware form by accelerated proximal gradient on ``L`` alone.

    For fixed ``L`` the best ``S`` is ``block_shrink(Y - L, lam_S)``, and what remains
    of the objective is ``h(Y - L) + lam_L ||L||_*`` with ``h`` the block Huber
    function (the Moreau envelope of ``lam_S sum_k ||.||_F``), whose gradient
    ``-(X - block_shrink(X))`` is 1-Lipschitz. So each FISTA step (step size 1,
    adaptive restart after O'Donoghue & Candes 2015) is one block shrink and one
    singular-value threshold; the optimum is that of the joint problem.

    Args:
        Y: the matrix, blocks side by side.
        offsets: block column boundaries.
        lam_L: nuclear-norm weight.
        lam_S: block weight (a scalar, or one per block).
        tol: relative change of ``L`` at which to stop.
        max_iter: iteration cap.
        init: warm start for ``L``.
    """
    if lam_L < 0:
        raise ValueError("lam_L must be non-negative")
    L = init if init is not None else torch.zeros_like(Y)
    yL, t = L, 1.0
    scale = max(float(Y.norm()), 1e-30)
    for it in range(1, max_iter + 1):
        X = Y - yL
        L_new, _ = svt(yL + X - block_shrink(X, offsets, lam_S), lam_L)
        dL = L_new - L
        change = float(dL.norm()) / scale
        if float(((yL - L_new) * dL).sum()) > 0:  # momentum points backwards: restart
            t = 1.0
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        yL = L_new + ((t - 1) / t_next) * dL
        L, t = L_new, t_next
        if change < tol:
            S = block_shrink(Y - L, offsets, lam_S)
            return Decomposition(L, S, it, True, float((Y - L - S).norm()) / scale)
    S = block_shrink(Y - L, offsets, lam_S)
    return Decomposition(L, S, max_iter, False, float((Y - L - S).norm()) / scale)
