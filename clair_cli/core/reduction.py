"""Exact factored reduction of one module's stacked updates (docs/engine.md, section 4).

For adapters with updates ``Theta_k = s_k B_k A_k`` the side-by-side stack
``Y = [Theta_1 | ... | Theta_K]`` (``d_out x sum_k d_in``) is never built. With

    [B_1 | ... | B_K] = Q R              Q: d_out x rho, orthonormal columns
    A_k^T = P_k C_k                      P_k: d_in x r_k, orthonormal columns
    G_k = s_k R[:, block k] C_k^T        rho x r_k

``Theta_k = Q G_k P_k^T`` and ``Y = Q G P^T`` with ``P = blockdiag(P_k)``. Both maps
are isometries, so singular values, the nuclear norm, each block's Frobenius norm
and both proximal operators of the decomposition are the same on ``G`` as on
``Y``: solving on the core and mapping back *is* the dense solution. Cost is
O((d_out + d_in) (sum r_k)^2) per module instead of a dense ``d_out x K d_in`` SVD.

``side="in"`` analyses the shared *input* space: it stacks the transposes
``Theta_k^T = s_k A_k^T B_k^T``, i.e. swaps the roles of A and B.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

Side = Literal["out", "in"]


@dataclass(frozen=True)
class FactoredStack:
    """``Y = Q @ [G_1 | ... | G_K] @ blockdiag(P_k)^T`` for one module and side.

    Attributes:
        Q: ``d x rho`` orthonormal basis of the stacked column spaces.
        G: ``rho x sum(r_k)`` core; adapter k owns columns ``offsets[k]:offsets[k+1]``.
        P: per adapter, ``d_k' x r_k`` orthonormal bases of the row spaces.
        offsets: column offsets of each adapter's block in ``G``.
    """

    Q: torch.Tensor
    G: torch.Tensor
    P: tuple[torch.Tensor, ...]
    offsets: tuple[int, ...]

    @property
    def n_adapters(self) -> int:
        return len(self.P)

    def block(self, k: int) -> torch.Tensor:
        """Adapter k's core block ``G_k`` (``rho x r_k``)."""
        return self.G[:, self.offsets[k] : self.offsets[k + 1]]

    def block_norms(self) -> torch.Tensor:
        """``||Theta_k||_F`` for every adapter (equal to ``||G_k||_F``)."""
        return torch.stack([self.block(k).norm() for k in range(self.n_adapters)])

    def dense_block(self, k: int) -> torch.Tensor:
        """``Theta_k`` in the stacked orientation (``d x d_k'``). Tests and small modules only."""
        return self.Q @ self.block(k) @ self.P[k].T


def _orth_factor(M: torch.Tensor, rtol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``M = Q @ R`` with orthonormal ``Q`` of numerical rank ``rho <= min(M.shape)``.

    A thin QR, then an SVD of the small triangular factor drops directions whose
    singular value is below ``rtol * s_max``: a rank-revealing factorisation at
    O(d r^2) cost.
    """
    q, r = torch.linalg.qr(M, mode="reduced")
    u, s, vh = torch.linalg.svd(r, full_matrices=False)
    keep = int((s > rtol * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    keep = max(keep, 1)
    return q @ u[:, :keep], s[:keep, None] * vh[:keep]


def reduce_module(
    A: Sequence[torch.Tensor],
    B: Sequence[torch.Tensor],
    scales: Sequence[float],
    side: Side = "out",
    rtol: float | None = None,
) -> FactoredStack:
    """Factor one module's stacked updates exactly.

    Args:
        A: per adapter, ``r_k x d_in`` factors.
        B: per adapter, ``d_out x r_k`` factors (same ``d_out`` and ``d_in`` for all).
        scales: per adapter, the LoRA scale ``s_k``.
        side: ``"out"`` shares the column (output) space, ``"in"`` the row (input) space.
        rtol: relative singular-value cut-off of the stacked basis; default is
            the dtype's epsilon times the stacked rank, which keeps the factorisation
            exact to rounding.

    Returns:
        The factored stack.

    Raises:
        ValueError: empty input, mismatched lengths or shapes.
    """
    if not (len(A) == len(B) == len(scales)) or not A:
        raise ValueError("A, B and scales must be non-empty and of equal length")
    if side not in ("out", "in"):
        raise ValueError(f"side must be 'out' or 'in', got {side!r}")
    for k, (a, b) in enumerate(zip(A, B, strict=True)):
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"adapter {k}: A {tuple(a.shape)} and B {tuple(b.shape)} are not r x d_in and d_out x r")
        if a.shape[1] != A[0].shape[1] or b.shape[0] != B[0].shape[0]:
            raise ValueError(f"adapter {k}: shape differs from adapter 0")
    # Column factors span the shared side; row factors are per adapter.
    cols, rows = (list(B), [a.T for a in A]) if side == "out" else ([a.T for a in A], list(B))
    dtype = cols[0].dtype
    total = sum(c.shape[1] for c in cols)
    if rtol is None:
        rtol = torch.finfo(dtype).eps * max(total, 8)
    Q, R = _orth_factor(torch.cat(cols, dim=1), rtol)
    blocks, bases, offsets = [], [], [0]
    col = 0
    for k, row in enumerate(rows):
        r_k = row.shape[1]
        P_k, C_k = torch.linalg.qr(row, mode="reduced")  # row = P_k C_k; P_k is d' x min(d', r_k)
        blocks.append(float(scales[k]) * R[:, col : col + r_k] @ C_k.T)
        bases.append(P_k)
        col += r_k
        offsets.append(offsets[-1] + P_k.shape[1])
    return FactoredStack(Q=Q, G=torch.cat(blocks, dim=1), P=tuple(bases), offsets=tuple(offsets))
