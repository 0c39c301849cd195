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
per iteration, linear in K). Where the audit has the factors' Gram matrices (it computes
them for the pairwise statistics anyway), the whole fit runs on ``W^T W``
(``sum r_k``-square products: the spectrum, the null's block spectra, the carriers, the
trimming rounds' shares) and only the final ``d x r`` subspace is formed (:class:`_FromGram`).

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
    _wishart_null,
    block_spectra_from_gram,
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


def top_singular(W: torch.Tensor, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Leading ``k`` left singular vectors and values of ``W`` by randomized subspace iteration
    (:class:`_FromGram` runs the same iteration on ``W^T W``)."""
    ell = min(k + OVERSAMPLE, *W.shape)
    if ell >= min(W.shape):
        U, s, _ = torch.linalg.svd(W, full_matrices=False)
        return U[:, :k], s[:k]
    omega = torch.randn(W.shape[1], ell, generator=generator, dtype=torch.float64).to(W)
    Q = torch.linalg.qr(W @ omega)[0]
    for _ in range(POWER_ITERATIONS):
        Q = torch.linalg.qr(W @ (W.T @ Q))[0]
    u, s, _ = torch.linalg.svd(Q.T @ W, full_matrices=False)
    return (Q @ u)[:, :k], s[:k]


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
    return _leading_null_only(W.shape[0], W.shape[1], k)


def _leading_null_only(d: int, n: int, k: int) -> bool:
    return KRYLOV_MIN_N <= n <= min(d, WISHART_MAX_N) and k < n


class _Formed:
    """The unit-norm stack ``W`` formed (``d x n``): the path without factor Grams. A fitted
    subspace is its orthonormal basis itself."""

    def __init__(self, A: Sequence[torch.Tensor], B: Sequence[torch.Tensor], scales: Sequence[float], side: str):
        W, self.offsets, _ = _stacked(A, B, scales, side)
        self.W, self.norms = normalise_blocks(W, self.offsets)
        self.d, self.n = self.W.shape

    def top(self, k: int, gen: torch.Generator, cols: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return top_singular(self.W if cols is None else self.W[:, cols], k, gen)

    def null_draws(self, n_draws: int, k: int, gen: torch.Generator) -> torch.Tensor:
        return null_top(self.W, self.offsets, n_draws, k, gen)

    def top_null(self, k: int, gen: torch.Generator) -> TopNull:
        return TopNull(self.W, self.offsets, k, gen)

    def carriers(self, fitted: torch.Tensor, i: int) -> float:
        return carriers(self.W, self.offsets, fitted[:, i])

    def shares(self, fitted: torch.Tensor, r: int) -> torch.Tensor:
        U = fitted[:, :r]
        return block_norms(self.W - U @ (U.T @ self.W), self.offsets).clamp(0, 1)

    def basis(self, fitted: torch.Tensor, r: int) -> torch.Tensor:
        return fitted[:, :r]


class _FromGram:
    """The unit-norm stack known through ``G = W^T W`` (``n x n``) alone: every step of the fit
    works on ``n``-sized matrices, and only the final subspace is formed, ``d x r``.

    ``G`` comes from the shared side's factor Gram (:func:`stack_gram`) with the other side's
    frames ``T_k`` (``T_k^T T_k = R_k^T R_k`` for the other side's factor ``R_k``): from its
    factor Gram's diagonal blocks where given (an ``r_k``-square eigensolve each), else from thin
    QRs of its factors. A subspace is held as coefficients ``C`` on ``W``'s columns (``U = W C``):
    from the Rayleigh-Ritz step ``V^T G V = Y Lambda Y^T`` on the subspace iteration's vectors
    ``V``, ``C = V Y Lambda^{-1/2}``, the values ``Lambda^{1/2}`` (the SVD of ``W V`` in exact
    arithmetic). A share off the subspace is ``1 - ||C^T G_k||^2 / tr(G_kk)``, computed in float64
    from ``G``: it is exact to about ``sqrt(eps)`` of ``G``'s precision where it is near 0 (3e-4
    in float32), to rounding where it is not.
    """

    def __init__(
        self,
        A: Sequence[torch.Tensor],
        B: Sequence[torch.Tensor],
        scales: Sequence[float],
        side: str,
        gram: torch.Tensor,
        other_gram: torch.Tensor | None,
    ):
        self.A, self.B, self.side = A, B, side
        cols = list(B) if side == "out" else [a.T for a in A]
        self.d = int(cols[0].shape[0])
        ts = _row_frames(A, B, scales, side, other_gram)
        offsets = [0]
        for t in ts:
            offsets.append(offsets[-1] + t.shape[0])
        self.offsets = tuple(offsets)
        self.n = self.offsets[-1]
        starts = [0]
        for c in cols:
            starts.append(starts[-1] + c.shape[1])
        self.ts = [t.to(gram) for t in ts]
        traces = torch.zeros(len(ts), dtype=gram.dtype, device=gram.device)
        own = [gram[starts[k] : starts[k + 1], starts[k] : starts[k + 1]] for k in range(len(ts))]  # C_k^T C_k
        for ks in _same_shape([tuple(t.shape) for t in self.ts]):  # T_k's shape sets C_k^T C_k's
            T = torch.stack([self.ts[k] for k in ks])
            traces[ks] = ((T @ torch.stack([own[k] for k in ks])) * T).sum(dim=(1, 2))  # tr(T_k C_k^T C_k T_k^T)
        self.norms = traces.clamp_min(0).sqrt()
        self.G = stack_gram(gram, self.ts, self.norms)
        self.G64 = self.G.double()
        ids = block_ids(self.offsets, self.G.device)
        self.ids = ids
        diag = torch.zeros(len(ts), dtype=torch.float64, device=self.G.device)
        self.diag = diag.index_add_(0, ids, self.G64.diagonal())  # tr(G_kk): 1 for a non-zero block
        self._energies: tuple[torch.Tensor, torch.Tensor] | None = None  # the probe's, per direction and block
        self._spectra: list[tuple[list[int], int, torch.Tensor]] | None = None

    def top(
        self, k: int, gen: torch.Generator, cols: torch.Tensor | None = None
    ) -> tuple[tuple[torch.Tensor, torch.Tensor | None], torch.Tensor]:
        G = self.G if cols is None else self.G[cols][:, cols]
        n = G.shape[0]
        ell = min(k + OVERSAMPLE, self.d, n)
        G = (G + G.T) / 2
        if ell >= min(self.d, n):  # every value there is: a dense eigensolve (an SVD of W, as on W itself)
            lam, Y = torch.linalg.eigh(G.double())
            V = None
        else:
            V = torch.linalg.qr(G @ torch.randn(n, ell, generator=gen, dtype=torch.float64).to(G))[0]
            for _ in range(POWER_ITERATIONS):
                V = torch.linalg.qr(G @ V)[0]
            H = V.T.double() @ (G @ V).double()
            lam, Y = torch.linalg.eigh((H + H.T) / 2)
        lam, Y = lam.flip(-1)[:k].clamp_min(0), Y.flip(-1)[:, :k]
        values = lam.sqrt()
        inv = torch.where(values > 0, 1 / values.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(values))
        C = (Y if V is None else V.double() @ Y) * inv
        return (C, cols), values.to(self.G.dtype)

    def spectra(self) -> list[tuple[list[int], int, torch.Tensor]]:
        """The blocks' singular values, for the null (:func:`block_spectra_from_gram`)."""
        if self._spectra is None:
            self._spectra = block_spectra_from_gram(self.G, self.offsets, self.d)
        return self._spectra

    def null_draws(self, n_draws: int, k: int, gen: torch.Generator) -> torch.Tensor:
        if self.n <= min(self.d, WISHART_MAX_N):
            return _wishart_null(self.spectra(), self.d, n_draws, gen, self.G)[:, : min(self.d, self.n)][:, :k]
        return null_top(self.formed(), self.offsets, n_draws, k, gen)

    def top_null(self, k: int, gen: torch.Generator) -> TopNull:
        return TopNull(self.G.new_empty(self.d, 0), self.offsets, k, gen, spectra=self.spectra())

    def formed(self) -> torch.Tensor:
        """``W`` itself (null draws of a stack wider than its rows rotate it)."""
        cols = [b.to(self.G) for b in self.B] if self.side == "out" else [a.T.to(self.G) for a in self.A]
        scale = [1 / n if n > 0 else 0.0 for n in self.norms.tolist()]
        return torch.cat([c @ t.T * f for c, t, f in zip(cols, self.ts, scale, strict=True)], dim=1)

    def _projections(self, fitted: tuple[torch.Tensor, torch.Tensor | None], r: int) -> torch.Tensor:
        """``U^T W`` (``r x n``) for ``U = W[:, cols] C``, from ``G``."""
        C, cols = fitted
        rows = self.G64 if cols is None else self.G64[cols]
        return C[:, :r].T @ rows

    def carriers(self, fitted: tuple[torch.Tensor, torch.Tensor | None], i: int) -> float:
        if self._energies is None or self._energies[0] is not fitted[0]:
            P = self._projections(fitted, fitted[0].shape[1]).square()
            sums = torch.zeros(P.shape[0], len(self.ts), dtype=P.dtype, device=P.device).index_add_(1, self.ids, P)
            self._energies = (fitted[0], sums)
        e = self._energies[1][i]
        total = float(e.sum())
        return total * total / float(e.square().sum()) if total > 0 else 0.0

    def shares(self, fitted: tuple[torch.Tensor, torch.Tensor | None], r: int) -> torch.Tensor:
        inside = torch.zeros(len(self.ts), dtype=torch.float64, device=self.G.device)
        inside.index_add_(0, self.ids, self._projections(fitted, r).square().sum(dim=0))
        share = torch.where(self.diag > 0, 1 - inside / self.diag.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
        return share.clamp(0, 1).sqrt().to(self.G.dtype)

    def basis(self, fitted: tuple[torch.Tensor, torch.Tensor | None], r: int) -> torch.Tensor:
        """``U = W[:, cols] C`` formed (``d x r``) as ``sum_k C_k (s_k T_k^T / |F_k|) C[k]``, with its
        rounding taken out (the orthonormal polar factor, the nearest orthonormal matrix)."""
        C, cols = fitted
        r = min(r, C.shape[1])  # a fit on fewer columns (or rows) than r spans no more directions
        full = torch.zeros(self.n, r, dtype=torch.float64, device=self.G.device)
        if cols is None:
            full[:] = C[:, :r]
        else:
            full[cols] = C[:, :r]
        coef = []
        for k, (t, n) in enumerate(zip(self.ts, self.norms.tolist(), strict=True)):
            block = full[self.offsets[k] : self.offsets[k + 1]]
            coef.append(t.T.double() @ block * (1 / n if n > 0 else 0.0))
        Z = torch.cat(coef).to(self.G)
        if self.side == "out":
            U = torch.cat([b.to(self.G) for b in self.B], dim=1) @ Z
        else:
            U = (Z.T @ torch.cat([a.to(self.G) for a in self.A], dim=0)).T
        left, _, right = torch.linalg.svd(U, full_matrices=False)
        return left @ right


def _stack_rows(A: Sequence[torch.Tensor], B: Sequence[torch.Tensor], side: str) -> int:
    """``d``: the width of the shared side."""
    return int(B[0].shape[0] if side == "out" else A[0].shape[1])


def _stack_columns(A: Sequence[torch.Tensor], B: Sequence[torch.Tensor], side: str) -> int:
    """``n = sum w_k``, ``w_k = min(r_k, the other side's width)``: the stack's columns. Where
    ``n > d`` the fit forms ``W`` (:class:`_Formed`): products with ``W`` then cost less than
    with ``W^T W``, and the null rotates ``W`` itself (:func:`null_top`)."""
    return sum(min(a.shape[0], a.shape[1] if side == "out" else b.shape[0]) for a, b in zip(A, B, strict=True))


def _row_frames(
    A: Sequence[torch.Tensor],
    B: Sequence[torch.Tensor],
    scales: Sequence[float],
    side: str,
    other_gram: torch.Tensor | None,
) -> list[torch.Tensor]:
    """Per block, ``s_k T_k`` (``w_k x r_k``, ``w_k = min(r_k, the other side's width)``) with
    ``T_k^T T_k = R_k^T R_k`` for the other side's factor ``R_k`` (``A_k^T`` for ``side="out"``):
    from ``other_gram``'s diagonal blocks (``R_k^T R_k`` itself; float64 eigensolves, the
    ``w_k`` largest values kept), else from thin QRs of ``R_k``."""
    rows = [a.T for a in A] if side == "out" else list(B)
    if other_gram is None:
        return [float(s) * torch.linalg.qr(r, mode="r")[1] for r, s in zip(rows, scales, strict=True)]
    ranks = [r.shape[1] for r in rows]
    starts = [0]
    for rank in ranks:
        starts.append(starts[-1] + rank)
    blocks = [other_gram[starts[k] : starts[k + 1], starts[k] : starts[k + 1]] for k in range(len(rows))]
    out = {}
    for ks in _same_shape([tuple(b.shape) for b in blocks]):  # one batched eigensolve per rank (LAPACK: each alike)
        block = torch.stack([blocks[k] for k in ks]).double()
        lam, vec = torch.linalg.eigh((block + block.transpose(-1, -2)) / 2)
        width = min(ranks[ks[0]], rows[ks[0]].shape[0])
        lam, vec = lam.flip(-1)[..., :width].clamp_min(0), vec.flip(-1)[..., :width]
        frames = (lam.sqrt()[..., :, None] * vec.transpose(-1, -2)).to(other_gram)
        out.update({k: float(scales[k]) * frames[j] for j, k in enumerate(ks)})
    return [out[k] for k in range(len(rows))]


def _same_shape(shapes: Sequence[tuple[int, ...]]) -> list[list[int]]:
    """The indices of ``shapes``, grouped by shape (in order of first appearance)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, shape in enumerate(shapes):
        groups.setdefault(shape, []).append(k)
    return list(groups.values())


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
        other_gram: torch.Tensor | None = None,
    ) -> FastDecomposer:
        """``gram``: the Gram matrix of the shared side's stacked factors (``B^T B`` for
        ``side="out"``, ``A A^T`` for ``"in"``), where already computed, and ``other_gram`` the
        other side's: the fit then works on ``sum r_k``-square matrices and never forms the
        ``d x sum r_k`` stack (:class:`_FromGram`), wherever the stack has no more columns than
        rows (:func:`_stack_columns`)."""
        if side not in ("out", "in"):
            raise ValueError(f"side must be 'out' or 'in', got {side!r}")
        stack: _Formed | _FromGram = (
            _FromGram(A, B, scales, side, gram, other_gram)
            if gram is not None and _stack_columns(A, B, side) <= _stack_rows(A, B, side)
            else _Formed(A, B, scales, side)
        )
        norms, offsets = stack.norms, stack.offsets
        active = norms > 0
        ids = block_ids(offsets, norms.device)
        gen = torch.Generator().manual_seed(self.random_state)
        probe = min(PROBE, stack.d, stack.n)
        probed, spectrum = stack.top(probe, gen)
        self.spectrum_ = spectrum
        self.null_spectrum_: torch.Tensor | None = None
        if self.rank == "auto":
            top = stack.top_null(probe, gen) if _leading_null_only(stack.d, stack.n, probe) else None
            r, self.null_spectrum_ = parallel_analysis(
                spectrum,
                top if top is not None else lambda n: stack.null_draws(n, probe, gen),
                self.n_null,
                max_rank=probe - 1,
                carried_by=lambda i: stack.carriers(probed, i),  # type: ignore[arg-type]
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
            # Every adapter kept: the probe's leading vectors are this subspace (found with
            # more oversampling than a rank-r_fit iteration would use).
            every = torch.equal(keep, active) and r_fit <= probe
            fitted = probed if every else stack.top(r_fit, gen, keep[ids])[0]
            off = stack.shares(fitted, r_fit)  # type: ignore[arg-type]
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
        self.subspace_ = stack.basis(fitted, r_fit)  # type: ignore[arg-type]
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

    It holds the module's stacked factors (``n = sum r_k`` columns of both sides, a few copies,
    and the canonical factors in float64) and the ``n x n`` Gram matrices of both factors and
    their product, so memory grows with the square of the summed rank:
    ``itemsize (3 n^2 + 4 d n) + 8 d n`` (measured in float32: 22 bytes per ``d n`` on
    lm_head-shaped modules, 64000 x 1024, and 23.5 on 4096 x 4096 ones, ``n`` 128-512).

    Args:
        n: the module's summed adapter rank.
        d: the module's two dimensions together, ``d_out + d_in``.
        itemsize: bytes per value of the working precision.
    """
    return itemsize * (3 * n * n + 4 * d * n) + 8 * d * n


def merge_memory_bytes(n: int, d: int) -> int:
    """Working memory of the factored merge of one module, in bytes: the merged adapters'
    canonical factors and their stacks and QR factors in float64, about 8 copies of ``d x n``
    (``n`` their summed rank, ``d = d_out + d_in``; measured: 52-58 bytes per ``d n`` on 4096 x 4096
    and 64000 x 1024 modules, ``n`` 128-512), and ``n x n`` products: ``8 (8 d n + 4 n^2)``."""
    return 8 * (8 * d * n + 4 * n * n)
