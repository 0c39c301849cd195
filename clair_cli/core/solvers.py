"""Low-rank plus block-sparse solvers (CLAIR_SPEC.md section 3).

Both work on any matrix ``Y`` whose columns are grouped into blocks (one block
per adapter), so the same code runs on the small factored core (the main path)
and on a dense stack (the reference in the tests). Each iteration is one
singular-value soft-threshold and one block soft-threshold.

- :func:`solve_exact`: ``min ||L||_* + lam sum_k ||S_k||_F  s.t.  Y = L + S``
  (Outlier Pursuit with adapter-sized blocks), by the inexact augmented
  Lagrangian method; stops when ``||Y - L - S||_F <= tol ||Y||_F``.
- :func:`solve_noisy`: ``min 1/2 ||Y - L - S||_F^2 + lam_L ||L||_* + lam_S sum_k ||S_k||_F``
  by accelerated proximal gradient (FISTA, step 1/2, adaptive restart); stops
  when the relative change of ``(L, S)`` falls below ``tol``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

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


def block_shrink(X: torch.Tensor, offsets: Sequence[int], tau: float | torch.Tensor) -> torch.Tensor:
    """Per column block: ``max(0, 1 - tau / ||X_k||_F) X_k``."""
    out = torch.zeros_like(X)
    taus = tau if isinstance(tau, torch.Tensor) else torch.full((len(offsets) - 1,), float(tau))
    for k in range(len(offsets) - 1):
        blk = X[:, offsets[k] : offsets[k + 1]]
        n = blk.norm()
        if n > taus[k]:
            out[:, offsets[k] : offsets[k + 1]] = (1 - taus[k] / n) * blk
    return out


def block_norms(X: torch.Tensor, offsets: Sequence[int]) -> torch.Tensor:
    return torch.stack([X[:, offsets[k] : offsets[k + 1]].norm() for k in range(len(offsets) - 1)])


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
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Decomposition:
    """Noise-aware form by FISTA with gradient-based adaptive restart.

    The smooth term ``1/2 ||Y - L - S||^2`` has a 2-Lipschitz gradient in ``(L, S)``,
    so the step is 1/2 and each step is ``L <- svt(., lam_L / 2)``,
    ``S <- block_shrink(., lam_S / 2)``.

    Args:
        Y: the matrix, blocks side by side.
        offsets: block column boundaries.
        lam_L: nuclear-norm weight.
        lam_S: block weight (a scalar, or one per block).
        tol: relative change of ``(L, S)`` at which to stop.
        max_iter: iteration cap.
        init: warm start ``(L, S)``.
    """
    if lam_L < 0:
        raise ValueError("lam_L must be non-negative")
    half_S = lam_S / 2 if isinstance(lam_S, torch.Tensor) else float(lam_S) / 2
    L, S = init if init is not None else (torch.zeros_like(Y), torch.zeros_like(Y))
    yL, yS, t = L, S, 1.0
    scale = max(float(Y.norm()), 1e-30)
    objective: Callable[[torch.Tensor, torch.Tensor], float]
    change = float("inf")
    for it in range(1, max_iter + 1):
        R = Y - yL - yS
        L_new, _ = svt(yL + R / 2, lam_L / 2)
        S_new = block_shrink(yS + R / 2, offsets, half_S)
        dL, dS = L_new - L, S_new - S
        change = float(torch.sqrt(dL.pow(2).sum() + dS.pow(2).sum())) / scale
        # Restart momentum when it points against the last step (O'Donoghue & Candes 2015).
        if float(((yL - L_new) * dL).sum() + ((yS - S_new) * dS).sum()) > 0:
            t = 1.0
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        beta = (t - 1) / t_next
        yL, yS = L_new + beta * dL, S_new + beta * dS
        L, S, t = L_new, S_new, t_next
        if change < tol:
            return Decomposition(L, S, it, True, float((Y - L - S).norm()) / scale)
    return Decomposition(L, S, max_iter, False, float((Y - L - S).norm()) / scale)
