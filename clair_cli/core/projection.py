"""The rank of CLAIR's projection, chosen for reconstruction by cross-validation across adapters.

Detection and merging want different ranks. Detection asks which directions the pool
shares beyond chance (parallel analysis: conservative, often 1-6). A projected merge
``P_q m`` (``P_q = U_q U_q^T`` onto the leading ``q`` directions of the collaborators'
unit-norm updates, ``m = sum_k w_k Theta_k``) asks which directions carry signal that
the adapters have in common; honest updates carry much of theirs outside the detection
subspace, so the detection rank loses it.

:func:`projection_rank` picks ``q`` by V-fold cross-validation across adapters: the basis
and the mean are fitted without the held-out adapters, and ``P_q m`` is scored by its
squared distance to each held-out update ``Theta_k``. A held-out update is the truth plus
noise independent of the fit, so in expectation this is the error of ``P_q m`` plus a
constant: the criterion prefers a projection only where removing directions removes more
noise than signal. The unprojected mean is a candidate too (``rank=None``): when it wins,
projection does not help on that module.

Everything is computed from factors: ``||U^T m||^2`` and ``<U^T m, U^T Theta_k>`` come
from ``U^T B`` (``q x sum r_k``) and the Gram ``A A^T`` of the stacked ``A`` factors
(``sum r_k`` square), never from a ``d_out x d_in`` matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from clair_cli.core.fastpath import shared_basis
from clair_cli.core.merge import check_weights
from clair_cli.core.pairwise import gram

MAX_FOLDS = 10
MAX_PROJECTION_RANK = 256  # directions tried; the unprojected mean is always tried as well


@dataclass
class ProjectionChoice:
    """Outcome of :func:`projection_rank`.

    Attributes:
        rank: the chosen projection rank, or None when the unprojected mean predicted held-out
            adapters best.
        errors: cross-validated error for q = 1, 2, ... (relative to the held-out updates'
            squared norms).
        unprojected: the same error for the plain mean.
    """

    rank: int | None
    errors: list[float]
    unprojected: float


def folds_for(order: Sequence[int], n_folds: int = MAX_FOLDS) -> list[list[int]]:
    """V folds of adapter indices: leave-one-out for up to ``n_folds`` adapters, otherwise
    adapters dealt round-robin in ``order`` (a canonical order, so that the folds, and the
    chosen rank, do not depend on the order the adapters were given in)."""
    if len(order) <= n_folds:
        return [[k] for k in order]
    return [list(order[f::n_folds]) for f in range(n_folds)]


def _oriented(A: Sequence[torch.Tensor], B: Sequence[torch.Tensor], side: str):
    # Side "in" projects the input space: Theta^T = A^T B^T has the roles of the factors swapped.
    if side == "out":
        return list(A), list(B)
    if side == "in":
        return [b.T for b in B], [a.T for a in A]
    raise ValueError(f"side must be 'out' or 'in', got {side!r}")


def projection_rank(
    A: Sequence[torch.Tensor],
    B: Sequence[torch.Tensor],
    scales: Sequence[float],
    folds: Sequence[Sequence[int]],
    weights: Sequence[float] | None = None,
    side: str = "out",
    max_rank: int = MAX_PROJECTION_RANK,
) -> ProjectionChoice:
    """Cross-validated projection rank for the weighted mean of the adapters.

    Args:
        A, B, scales: the collaborators' factors and scales.
        folds: held-out index sets (:func:`folds_for`); each must leave at least one adapter in.
        weights: merge weights (equal when None); the held-out errors are weighted alike.
        side: which space is projected (``"out"``: column space).
        max_rank: largest projection rank tried.
    """
    K = len(A)
    if K < 2:
        raise ValueError("cross-validation needs at least two adapters")
    A, B = _oriented(A, B, side)
    dtype, device = torch.float64, A[0].device
    w = torch.tensor(check_weights(weights, K), dtype=dtype, device=device)
    A = [a.to(dtype) for a in A]
    B = [b.to(dtype) for b in B]
    s = torch.tensor([float(x) for x in scales], dtype=dtype, device=device)
    offsets = [0]
    for a in A:
        offsets.append(offsets[-1] + a.shape[0])
    Acat = torch.cat(A, dim=0)
    Bcat = torch.cat(B, dim=1)
    GA = Acat @ Acat.T
    G = gram(A, B, scales, GA, Bcat.T @ Bcat)
    col_scale = torch.cat([s[k].expand(a.shape[0]) for k, a in enumerate(A)])
    q_max = min(max_rank, min(Bcat.shape), min(Acat.shape))
    errors = torch.zeros(q_max, dtype=dtype, device=device)
    unprojected = 0.0
    total = 0.0
    for held in folds:
        held = list(held)
        train = [k for k in range(K) if k not in set(held)]
        if not train or not held:
            raise ValueError("each fold must hold out some adapters and keep some")
        wt = w[train] / w[train].sum()
        wh = w[held] / w[held].sum() if float(w[held].sum()) > 0 else torch.full_like(w[held], 1 / len(held))
        q = min(q_max, sum(A[k].shape[0] for k in train))
        U = shared_basis([A[k] for k in train], [B[k] for k in train], [float(s[k]) for k in train], q, "out")
        C = (U.to(dtype).T @ Bcat) * col_scale  # q x R: U^T s_k B_k, block by block
        coef = torch.zeros(len(A), dtype=dtype, device=device)
        coef[train] = wt
        col_coef = torch.cat([coef[k].expand(a.shape[0]) for k, a in enumerate(A)])
        X = C * col_coef  # U^T m = X @ Acat
        XG = X @ GA
        m_sq = (XG * X).sum(1)  # per direction i: ||u_i^T m||^2
        # Unprojected: ||m - Theta_k||^2 from the Gram.
        m_norm = float(wt @ G[train][:, train] @ wt)
        for j, k in enumerate(held):
            cols = slice(offsets[k], offsets[k + 1])
            cross = (XG[:, cols] * C[:, cols]).sum(1)  # per direction: <u_i^T m, u_i^T Theta_k>
            t_sq = float(G[k, k])
            per_q = torch.cumsum(m_sq - 2 * cross, 0) + t_sq
            errors[:q] += wh[j] * per_q
            errors[q:] += wh[j] * per_q[-1]  # a fold with fewer directions keeps its last value
            unprojected += float(wh[j]) * (m_norm - 2 * float(wt @ G[train, k]) + t_sq)
            total += float(wh[j]) * t_sq
    scale = total if total > 0 else 1.0
    relative = (errors / scale).cpu()
    unprojected /= scale
    best = int(torch.argmin(relative))
    rank = best + 1 if float(relative[best]) < unprojected else None
    return ProjectionChoice(rank, relative.tolist(), unprojected)


def basis_side(side: str) -> str:
    """The side a refinement or merge projects on: ``in`` for ``in``, else ``out`` (``both``
    audits both sides but projects on the output side)."""
    return "in" if side == "in" else "out"


def projection_basis(
    A: Sequence[torch.Tensor],
    B: Sequence[torch.Tensor],
    scales: Sequence[float],
    side: str,
    rank: int | None,
    weights: Sequence[float] | None = None,
) -> tuple[torch.Tensor | None, int | None]:
    """The projection basis of one module's collaborators (in canonical order), and its rank.

    Args:
        A, B, scales: the collaborators' factors.
        side: ``out`` or ``in`` (:func:`basis_side`).
        rank: the projection's rank; None chooses it by cross-validation (:func:`projection_rank`).
        weights: the merge weights, for that cross-validation.

    Returns:
        ``(basis, rank)``; ``(None, None)`` when the unprojected mean predicts held-out
        adapters better (or there is one collaborator and no fixed rank).
    """
    if rank is None:
        if len(A) < 2:
            return None, None
        rank = projection_rank(A, B, scales, folds_for(list(range(len(A)))), weights, side).rank
        if rank is None:
            return None, None
    return shared_basis(A, B, scales, rank, side), rank
