"""Inner products of LoRA updates without dense matrices.

``<Theta_i, Theta_j>_F = s_i s_j trace((B_i^T B_j)(A_j A_i^T))`` costs
O((d_out + d_in) r_i r_j) instead of O(d_out d_in).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from clair_cli.core.solvers import block_ids


def gram(A: Sequence[torch.Tensor], B: Sequence[torch.Tensor], scales: Sequence[float]) -> torch.Tensor:
    """``K x K`` matrix of Frobenius inner products ``<Theta_i, Theta_j>``.

    Args:
        A: per adapter ``r_k x d_in``.
        B: per adapter ``d_out x r_k``.
        scales: per adapter ``s_k``.
    """
    Bcat = torch.cat(list(B), dim=1)
    Acat = torch.cat(list(A), dim=0)
    # out[i, j] = sum over p in block i, q in block j of (B^T B)[p, q] (A A^T)[q, p]:
    # an elementwise product summed within blocks by the block-indicator matrix.
    offsets = [0]
    for a in A:
        offsets.append(offsets[-1] + a.shape[0])
    ind = torch.nn.functional.one_hot(block_ids(offsets, Acat.device), len(A)).to(Bcat.dtype)
    E = (Bcat.T @ Bcat) * (Acat @ Acat.T).T
    s = torch.tensor([float(x) for x in scales], dtype=Bcat.dtype, device=Bcat.device)
    return s[:, None] * (ind.T @ E @ ind) * s[None, :]


def cosine_from_gram(G: torch.Tensor) -> torch.Tensor:
    """Cosine similarities from a Gram matrix; rows of zero norm give 0."""
    norms = G.diagonal().clamp_min(0).sqrt()
    denom = norms[:, None] * norms[None, :]
    return torch.where(denom > 0, G / denom.clamp_min(1e-300), torch.zeros_like(G))
