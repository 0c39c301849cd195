"""Inner products of LoRA updates without dense matrices.

``<Theta_i, Theta_j>_F = s_i s_j trace((B_i^T B_j)(A_j A_i^T))`` costs
O((d_out + d_in) r_i r_j) instead of O(d_out d_in).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def gram(
    A: Sequence[torch.Tensor],
    B: Sequence[torch.Tensor],
    scales: Sequence[float],
    a_gram: torch.Tensor | None = None,
    b_gram: torch.Tensor | None = None,
) -> torch.Tensor:
    """``K x K`` matrix of Frobenius inner products ``<Theta_i, Theta_j>``.

    Args:
        A: per adapter ``r_k x d_in``.
        B: per adapter ``d_out x r_k``.
        scales: per adapter ``s_k``.
        a_gram, b_gram: ``[A_1; ...; A_K] [A_1; ...; A_K]^T`` and ``[B_1 | ...]^T [B_1 | ...]``
            when already computed (the costly part: O(d (sum r_k)^2) each).
    """
    if a_gram is None:
        Acat = torch.cat(list(A), dim=0)
        a_gram = Acat @ Acat.T
    if b_gram is None:
        Bcat = torch.cat(list(B), dim=1)
        b_gram = Bcat.T @ Bcat
    # out[i, j] = sum over p in block i, q in block j of (B^T B)[p, q] (A A^T)[q, p]:
    # an elementwise product summed within blocks, O((sum r_k)^2) (a product with the
    # block-indicator matrix would cost K times that).
    return _block_sums(b_gram * a_gram.T, [a.shape[0] for a in A], scales)


def _block_sums(E: torch.Tensor, ranks: Sequence[int], scales: Sequence[float]) -> torch.Tensor:
    """``s_i s_j`` times the sum of ``E`` over block ``(i, j)`` of the partition by ``ranks``."""
    K = len(ranks)
    ids = torch.repeat_interleave(torch.arange(K, device=E.device), torch.tensor(list(ranks), device=E.device))
    rows = torch.zeros(K, E.shape[1], dtype=E.dtype, device=E.device).index_add_(0, ids, E)
    sums = torch.zeros(K, K, dtype=E.dtype, device=E.device).index_add_(1, ids, rows)
    s = torch.tensor([float(x) for x in scales], dtype=E.dtype, device=E.device)
    return s[:, None] * sums * s[None, :]


def factor_grams(A: Sequence[torch.Tensor], B: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A A^T, B^T B)`` of the stacked factors, to share between :func:`gram` calls."""
    Acat = torch.cat(list(A), dim=0)
    Bcat = torch.cat(list(B), dim=1)
    return Acat @ Acat.T, Bcat.T @ Bcat


def cosine_from_gram(G: torch.Tensor) -> torch.Tensor:
    """Cosine similarities from a Gram matrix; rows of zero norm give 0."""
    norms = G.diagonal().clamp_min(0).sqrt()
    denom = norms[:, None] * norms[None, :]
    return torch.where(denom > 0, G / denom.clamp_min(1e-300), torch.zeros_like(G))
