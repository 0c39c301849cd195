"""The fast path for large pools: randomized subspace iteration with trimming.

The convex path factors the stacked column spaces exactly (cost
O(d (sum r_k)^2)) and runs a solver whose every iteration is an SVD of a
``sum r_k``-sized core; past a few hundred adapter ranks that dominates. The fast
path never forms that core. With ``F_k = s_k C_k T_k^T`` (``d x r_k``), where
``C_k`` is the factor on the shared side and ``R_k = P_k T_k`` a thin QR of the
other, ``Theta_k Theta_k^T = F_k F_k^T``, so ``Y Y^T = W W^T`` for the
``d x sum r_k`` matrix ``W = [F_1 | ... | F_K]`` (blocks scaled to unit norm, as
on the convex path). Its leading singular subspace is found by randomized
subspace iteration (matrix products with ``W`` and ``W^T`` only: O(d sum r_k l)
per iteration, linear in K).

Same decisions as the convex path, computed differently:

- rank: parallel analysis (:func:`~clair_cli.core.decompose.rotated_draws`), each
  block rotated in the full ``d``-dimensional space, threshold ``mean + 3 sd``;
- collaborators by **iterative trimming**: estimate the top-r subspace on the
  kept adapters, drop adapters whose off-subspace share is an upper outlier
  (median + max(3.5 sigma, 0.1), the convex path's collaborator rule), repeat
  until the kept set no longer changes (at most ``max_trim`` rounds);
- ``off_subspace_`` against the final subspace; ``residual_`` is the same share
  (there is no ``S`` on this path).

:class:`FastDecomposer` exposes the attributes of
:class:`~clair_cli.core.decompose.ModuleDecomposer` that the auditor reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from clair_cli.core.decompose import (
    TopNull,
    carriers,
    normalise_blocks,
    null_spectrum,
    parallel_analysis,
    robust_center_scale,
    rotated_draws,
)
from clair_cli.core.solvers import block_ids, block_norms

PROBE = 48  # singular values estimated; the shared rank is found among them
OVERSAMPLE = 10
POWER_ITERATIONS = 6
WISHART_MAX_N = 2048  # exact null draws up to this many columns (about 0.5 s a draw on 2 cores)
KRYLOV_MIN_N = 640  # from here, exact draws' leading values only (TopNull, its Wishart matrices shared)


def stacked_factors(
    A: Sequence[torch.Tensor], B: Sequence[torch.Tensor], scales: Sequence[float], side: str
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``W = [F_1 | ... | F_K]`` with ``F_k F_k^T = Theta_k Theta_k^T`` (side orientation), and block offsets."""
    W, offsets, _ = _stacked(A, B, scales, side)
    return W, offsets


def _stacked(
    A: Sequence[torch.Tensor], B: Sequence[torch.Tensor], scales: Sequence[float], side: str
) -> tuple[torch.Tensor, tuple[int, ...], list[torch.Tensor]]:
    """:func:`stacked_factors` and each block's ``s_k T_k`` (``F_k = C_k (s_k T_k)^T``)."""
    cols, rows = (list(B), [a.T for a in A]) if side == "out" else ([a.T for a in A], list(B))
    blocks, offsets, ts = [], [0], []
    for c, r, s in zip(cols, rows, scales, strict=True):
        t = torch.linalg.qr(r, mode="r")[1]  # r = P T with P orthonormal
        blocks.append(float(s) * c @ t.T)
        ts.append(float(s) * t)
        offsets.append(offsets[-1] + t.shape[0])
    return torch.cat(blocks, dim=1), tuple(offsets), ts


def stack_gram(gram: torch.Tensor, ts: Sequence[torch.Tensor], norms: torch.Tensor) -> torch.Tensor:
    """``W^T W`` of the unit-norm stack from the Gram of the shared side's factors (``C^T C``,
    ``sum r_k`` square): block ``(j, k)`` is ``T_j (C_j^T C_k) T_k^T / (|F_j| |F_k|)``. O((sum r_k)^2 r)
    instead of the ``d (sum r_k)^2`` of the product itself, which the audit has already paid.
    ``T_k`` is ``w_k x r_k``, ``w_k = min(r_k, the other side's width)``."""
    scale = torch.where(norms > 0, 1 / norms.clamp_min(torch.finfo(norms.dtype).tiny), torch.zeros_like(norms))
    if len({tuple(t.shape) for t in ts}) == 1:  # every block of one shape: two batched products
        K, (w, r) = len(ts), ts[0].shape
        T = torch.stack(list(ts)) * scale[:, None, None].to(gram)
        G = (T @ gram.reshape(K, r, K * r)).reshape(K * w, K * r)  # T gram
        return (T @ G.T.reshape(K, r, K * w)).reshape(K * w, K * w).T  # (T (T gram)^T)^T
    T = torch.block_diag(*[t * float(c) for t, c in zip(ts, scale.tolist(), strict=True)]).to(gram)
    return T @ gram @ T.T


def top_singular(
    W: torch.Tensor, k: int, generator: torch.Generator, gram: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Leading ``k`` left singular vectors and values of ``W`` by randomized subspace iteration.

    ``gram``: ``W^T W`` (:func:`stack_gram`). The iteration then runs on it (``n x n`` products
    instead of ``d x n`` ones, for ``d`` rows and ``n`` columns), and the values and vectors
    come from the SVD of ``W V`` for the iteration's ``k + OVERSAMPLE`` vectors ``V``, as on
    ``W`` itself (an orthonormal basis, values not squared).
    """
    ell = min(k + OVERSAMPLE, *W.shape)
    if gram is not None:
        return _top_from_gram(W, gram, k, ell, generator)
    if ell >= min(W.shape):
        U, s, _ = torch.linalg.svd(W, full_matrices=False)
        return U[:, :k], s[:k]
    omega = torch.randn(W.shape[1], ell, generator=generator, dtype=torch.float64).to(W)
    Q = torch.linalg.qr(W @ omega)[0]
    for _ in range(POWER_ITERATIONS):
        Q = torch.linalg.qr(W @ (W.T @ Q))[0]
    u, s, _ = torch.linalg.svd(Q.T @ W, full_matrices=False)
    return (Q @ u)[:, :k], s[:k]


def _top_from_gram(
    W: torch.Tensor, gram: torch.Tensor, k: int, ell: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`top_singular` through ``W^T W``: subspace iteration with as many products as on ``W``."""
    G = (gram + gram.T) / 2
    if ell >= G.shape[0]:
        V = torch.linalg.eigh(G)[1]
    else:
        V = torch.linalg.qr(G @ torch.randn(G.shape[0], ell, generator=generator, dtype=torch.float64).to(G))[0]
        for _ in range(POWER_ITERATIONS):
            V = torch.linalg.qr(G @ V)[0]
    U, s, _ = torch.linalg.svd(W @ V, full_matrices=False)
    return U[:, :k], s[:k]


def null_top(
    W: torch.Tensor, offsets: tuple[int, ...], n_draws: int, k: int, generator: torch.Generator
) -> torch.Tensor:
    """The ``k`` leading null singular values of ``n_draws`` random-rotation draws (``n_draws x k``).

    Exact Wishart draws (:func:`~clair_cli.core.decompose.null_spectrum`, about ``3 n^3``
    flops for ``n = sum r_k`` columns) up to ``WISHART_MAX_N`` columns; past that, the
    rotated ``d x n`` matrices are built and their top values found by randomized subspace
    iteration, linear in K. On the flat spectra of a null that estimate runs low (about 2 %
    at n = 540, a test measures it), so the exact route is kept wherever it is affordable.
    From ``KRYLOV_MIN_N`` columns the fast path reads the exact draws' leading values only
    (:class:`~clair_cli.core.decompose.TopNull`).
    """
    d, n = W.shape
    if n <= min(d, WISHART_MAX_N):
        return null_spectrum(W, offsets, n_draws, generator)[:, :k]
    return torch.stack([top_singular(R, k, generator)[1] for R in rotated_draws(W, offsets, n_draws, generator)])


def leading_null_only(W: torch.Tensor, k: int) -> bool:
    """Whether the fast path reads only the leading values of the null draws of ``W``
    (:class:`TopNull`): exact draws (at most ``WISHART_MAX_N`` columns, no more than rows) of at
    least ``KRYLOV_MIN_N`` columns, where a full eigensolve of every draw costs more than the
    rest of the module."""
    d, n = W.shape
    return KRYLOV_MIN_N <= n <= min(d, WISHART_MAX_N) and k < n


class FastDecomposer:
    """Shared subspace and off-subspace shares of one module without the convex solver.

    Args:
        rank: ``"auto"`` (parallel analysis) or a fixed shared rank.
        n_null: random rotations for parallel analysis.
        max_trim: trimming rounds.
        random_state: seed (results are deterministic given it).
    """

    def __init__(
        self, rank: int | Literal["auto"] = "auto", n_null: int = 20, max_trim: int = 10, random_state: int = 0
    ) -> None:
        self.rank = rank
        self.n_null = n_null
        self.max_trim = max_trim
        self.random_state = random_state

    def fit(
        self,
        A: Sequence[torch.Tensor],
        B: Sequence[torch.Tensor],
        scales: Sequence[float],
        side: str = "out",
        gram: torch.Tensor | None = None,
    ) -> FastDecomposer:
        """``gram``: the Gram matrix of the shared side's stacked factors (``B^T B`` for
        ``side="out"``, ``A A^T`` for ``"in"``), where already computed: the subspace iterations
        then run on ``sum r_k``-square matrices instead of ``d x sum r_k`` ones."""
        if side not in ("out", "in"):
            raise ValueError(f"side must be 'out' or 'in', got {side!r}")
        W, offsets, ts = _stacked(A, B, scales, side)
        W, norms = normalise_blocks(W, offsets)
        G = None if gram is None else stack_gram(gram.to(W), ts, norms)
        active = norms > 0
        ids = block_ids(offsets, W.device)
        gen = torch.Generator().manual_seed(self.random_state)
        probe = min(PROBE, *W.shape)
        U_probe, spectrum = top_singular(W, probe, gen, G)
        self.spectrum_ = spectrum
        self.null_spectrum_: torch.Tensor | None = None
        if self.rank == "auto":
            top = TopNull(W, offsets, probe, gen) if leading_null_only(W, probe) else None
            r, self.null_spectrum_ = parallel_analysis(
                spectrum,
                top if top is not None else lambda n: null_top(W, offsets, n, probe, gen),
                self.n_null,
                max_rank=probe - 1,
                carried_by=lambda i: carriers(W, offsets, U_probe[:, i]),
                widen=None if top is None else top.widen,
            )
        else:
            if int(self.rank) < 1:
                raise ValueError(f"rank must be 'auto' or a positive integer, got {self.rank!r}")
            r = int(self.rank)
        r_fit = max(r, 1)

        keep = active.clone()
        converged = False
        rounds = 0
        for rounds in range(1, self.max_trim + 1):  # noqa: B007 - rounds is reported
            if torch.equal(keep, active) and r_fit <= probe:
                # Every adapter kept: the probe's leading vectors are this subspace (found with
                # more oversampling than a rank-r_fit iteration would use).
                U = U_probe[:, :r_fit]
            else:
                cols = keep[ids]
                U = top_singular(W[:, cols], r_fit, gen, None if G is None else G[cols][:, cols])[0]
            off = block_norms(W - U @ (U.T @ W), offsets).clamp(0, 1)
            off[~active] = 0.0
            med, sigma = robust_center_scale(off[active])
            new = active & (off <= med + max(3.5 * sigma, 0.1))
            if int(new.sum()) == 0:
                new = active.clone()
            if torch.equal(new, keep):
                converged = True
                break
            keep = new
        self.rank_ = r
        self.shared_structure_ = r > 0
        self.norms_ = norms
        self.collaborators_ = keep
        self.subspace_ = U
        self.off_subspace_ = off
        self.residual_ = off.clone()
        self.n_iter_ = rounds
        self.converged_ = converged
        return self


def off_subspace_shares(
    A: Sequence[torch.Tensor], B: Sequence[torch.Tensor], scales: Sequence[float], basis: torch.Tensor, side: str
) -> torch.Tensor:
    """``||(I - U U^T) Theta_k|| / ||Theta_k||`` per adapter for a given orthonormal basis (0 for zero updates)."""
    W, offsets = stacked_factors(A, B, scales, side)
    U = basis.to(W)
    norms = block_norms(W, offsets)
    off = block_norms(W - U @ (U.T @ W), offsets)
    return torch.where(norms > 0, off / norms.clamp_min(torch.finfo(W.dtype).tiny), torch.zeros_like(off)).clamp(0, 1)


def shared_basis(
    A: Sequence[torch.Tensor], B: Sequence[torch.Tensor], scales: Sequence[float], rank: int, side: str
) -> torch.Tensor:
    """Orthonormal ``d x rank`` basis of the adapters' shared subspace (unit-norm blocks, leading singular vectors)."""
    W, offsets = stacked_factors(A, B, scales, side)
    unit = normalise_blocks(W, offsets)[0]
    return top_singular(unit, min(rank, *W.shape), torch.Generator().manual_seed(0))[0].to(W.dtype)


def audit_memory_bytes(n: int, d: int, itemsize: int) -> int:
    """Working memory of the audit of one module on the fast path, in bytes.

    It holds the module's stacked factors (``d x n`` for ``n = sum r_k``, a few copies) and
    the ``n x n`` Gram matrices of both factors and their product, so memory grows with the
    square of the summed rank: ``itemsize (3 n^2 + 4 d n)``.

    Args:
        n: the module's summed adapter rank.
        d: the larger of the module's two dimensions.
        itemsize: bytes per value of the working precision.
    """
    return itemsize * (3 * n * n + 4 * d * n)
