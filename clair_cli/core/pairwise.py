"""Inner products of LoRA updates without dense matrices.

``<Theta_i, Theta_j>_F = s_i s_j trace((B_i^T B_j)(A_j A_i^T))`` costs
O((d_out + d_in) r_i r_j) instead of O(d_out d_in).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def gram(A: Sequence[torch.Tensor], B: Sequence[torch.Tensor], scales: Sequence[float]) -> torch.Tensor:
    """``K x K`` matrix of Frobenius inner products ``<Theta_i, Theta_j>``.

    Args:
        A: per adapter ``r_k x d_in``.
        B: per adapter ``d_out x r_k``.
        scales: per adapter ``s_k``.
    """
    K = len(A)
    Bcat = torch.cat(list(B), dim=1)
    Acat = torch.cat(list(A), dim=0)
    BB = Bcat.T @ Bcat  # blocks B_i^T B_j
    AA = Acat @ Acat.T  # blocks A_i A_j^T
    offs = [0]
    for a in A:
        offs.append(offs[-1] + a.shape[0])
    out = torch.empty(K, K, dtype=Bcat.dtype)
    for i in range(K):
        for j in range(i, K):
            bij = BB[offs[i] : offs[i + 1], offs[j] : offs[j + 1]]
            aji = AA[offs[j] : offs[j + 1], offs[i] : offs[i + 1]]
            out[i, j] = out[j, i] = float(scales[i]) * float(scales[j]) * (bij * aji.T).sum()
    return out


def cosine_from_gram(G: torch.Tensor) -> torch.Tensor:
    """Cosine similarities from a Gram matrix; rows of zero norm give 0."""
    norms = G.diagonal().clamp_min(0).sqrt()
    denom = norms[:, None] * norms[None, :]
    return torch.where(denom > 0, G / denom.clamp_min(1e-300), torch.zeros_like(G))
