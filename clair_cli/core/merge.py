"""Refinement and the CLAIR merge in factored form (docs/engine.md, section 6).

With ``U`` the shared basis of the output side (``d_out x r``):

- refined adapter k: ``Theta~_k = U U^T Theta_k``, i.e. ``B~_k = U (U^T B_k)`` and
  ``A~_k = A_k`` (same rank, scale and config as the input adapter);
- merged adapter: ``Theta_bar = sum_k w_k Theta~_k = U M`` with
  ``M = sum_k w_k s_k (U^T B_k) A_k`` (``r x d_in``), written as a rank-r LoRA with
  ``B = U``, ``A = M`` and scale 1 (alpha = r), or rebalanced through the SVD of
  the small ``M`` so that both factors carry the singular values' square roots.

For the input side (basis ``V``, ``d_in x r``) the roles swap:
``A~_k = (A_k V) V^T`` and ``Theta_bar = N V^T`` with ``N = sum_k w_k s_k B_k (A_k V)``.
No dense ``d_out x d_in`` matrix is formed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from clair_cli.core.lowrank import truncate_factored


@dataclass
class MergeResult:
    """Merged LoRA factors with scale 1 (``B @ A`` is the update).

    Attributes:
        A, B: the factors, ``rank x d_in`` and ``d_out x rank``.
        method: the merge that made them.
        selected: the adapters merged (positions among the inputs, or pool indices once the
            pipeline has placed them).
        info: what the merge measured: ``truncation_error`` (relative Frobenius error of
            writing the update at its rank) and method-specific values.
    """

    A: torch.Tensor
    B: torch.Tensor
    method: str
    selected: list[int]
    info: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


def check_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """Non-negative weights normalised to sum to 1; equal weights when ``None``.

    Raises:
        ValueError: wrong length, a negative or non-finite weight, or all zero.
    """
    if n == 0:
        raise ValueError("no adapter to merge")
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise ValueError(f"expected {n} weights, got {len(weights)}")
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("weights must be finite and non-negative")
    top = float(w.max())
    if top <= 0:
        raise ValueError("weights must not all be zero")
    w = w / top  # first, so that the sum of weights near float's largest cannot overflow
    return (w / w.sum()).tolist()


def refine(
    A: torch.Tensor, B: torch.Tensor, basis: torch.Tensor, side: str = "out"
) -> tuple[torch.Tensor, torch.Tensor]:
    """One adapter projected onto the shared subspace; returns ``(A~, B~)``.

    Args:
        A: ``r_k x d_in``.
        B: ``d_out x r_k``.
        basis: orthonormal ``d_out x r`` (side ``"out"``) or ``d_in x r`` (side ``"in"``).
        side: which space ``basis`` spans.
    """
    basis = basis.to(B.dtype)
    if side == "out":
        return A, basis @ (basis.T @ B)
    if side == "in":
        return (A @ basis) @ basis.T, B
    raise ValueError(f"side must be 'out' or 'in', got {side!r}")


def merge(
    A: Sequence[torch.Tensor],
    B: Sequence[torch.Tensor],
    scales: Sequence[float],
    basis: torch.Tensor,
    weights: Sequence[float] | None = None,
    side: str = "out",
    balance: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged LoRA factors ``(A_bar, B_bar)`` with scale 1: ``B_bar @ A_bar = sum_k w_k Theta~_k``.

    Args:
        A, B, scales: the collaborators' factors and scales.
        basis: the shared subspace (see :func:`refine`).
        weights: merge weights (normalised to sum to 1); equal when ``None``.
        side: which space ``basis`` spans.
        balance: split the singular values evenly between the factors (SVD of the
            small ``r x d`` coefficient matrix) instead of ``B = U``.
    """
    w = check_weights(weights, len(A))
    basis = basis.to(B[0].dtype)
    if side == "out":
        M = torch.stack([wk * float(sk) * (basis.T @ b) @ a for wk, sk, a, b in zip(w, scales, A, B, strict=True)])
        left, right = basis, M.sum(0)  # Theta_bar = U @ M
    elif side == "in":
        N = torch.stack([wk * float(sk) * b @ (a @ basis) for wk, sk, a, b in zip(w, scales, A, B, strict=True)])
        left, right = N.sum(0), basis.T  # Theta_bar = N @ V^T
    else:
        raise ValueError(f"side must be 'out' or 'in', got {side!r}")
    if not balance:
        return right, left
    # left has orthonormal columns on one side; factor the small r x r product.
    ql, rl = torch.linalg.qr(left)
    qr_, rr = torch.linalg.qr(right.T)
    u, s, vh = torch.linalg.svd(rl @ rr.T, full_matrices=False)
    root = s.sqrt()
    return root[:, None] * (vh @ qr_.T), (ql @ u) * root


def projected_merge(
    A: Sequence[torch.Tensor],
    B: Sequence[torch.Tensor],
    scales: Sequence[float],
    basis: torch.Tensor,
    weights: Sequence[float] | None = None,
    side: str = "out",
    rank: int | None = None,
) -> MergeResult:
    """CLAIR's projected merge (:func:`merge`), truncated to ``rank`` when that is lower.

    Returns:
        The merged factors; ``info["truncation_error"]`` is the relative Frobenius error of
        the truncation (0 without one). ``selected`` is every input.
    """
    a, b = merge(A, B, scales, basis, weights, side=side)
    # Truncated (at ``rank``, or losslessly) in float64 and measured on the float32 factors written.
    a, b, err = truncate_factored(a, b, rank, out_dtype=torch.float32)
    return MergeResult(a, b, "clair", list(range(len(A))), {"truncation_error": err})


def squared_norms(A: Sequence[torch.Tensor], B: Sequence[torch.Tensor], scales: Sequence[float]) -> list[float]:
    """Each update's squared Frobenius norm ``||s_k B_k A_k||_F^2``, in float64."""
    from clair_cli.core.pairwise import gram

    return gram(A, B, scales).diagonal().double().cpu().tolist()


def merged_sq_norm(A: torch.Tensor, B: torch.Tensor) -> float:
    """``||B @ A||_F^2`` of one merged module, from its factors (float64)."""
    return float(((A.double() @ A.double().T) * (B.double().T @ B.double())).sum())


def median_norm_factor(merged_sq: float, sq_norms: Sequence[float]) -> float:
    """The factor that gives a merged adapter of squared norm ``merged_sq`` (over all modules)
    the median of the merged adapters' norms (``sq_norms``: each one's squared norm); 1.0 for
    a zero merged update."""
    if merged_sq <= 0:
        return 1.0
    norms = torch.tensor(list(sq_norms), dtype=torch.float64)
    return float(torch.median(norms.sqrt())) / merged_sq**0.5
