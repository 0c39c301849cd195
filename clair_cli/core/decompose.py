"""The CLAIR decomposer for one module: a scikit-learn style estimator.

``ModuleDecomposer(...).fit(stack)`` takes a :class:`FactoredStack` and learns:

- ``rank_`` and ``spectrum_``: the shared rank and the singular values it was read from.
  With ``rank="auto"`` the rank is chosen by parallel analysis: every adapter's
  block is rotated to a random orientation in the module's full output (or input)
  space (keeping its own singular values, so its norm and shape are unchanged but
  its alignment with the others is lost);
  the shared rank is the number of leading singular values of the pool above the
  mean + 3 sd of the same singular value over up to ``n_null`` such draws
  (:func:`parallel_analysis`: exact Wishart draws, sequential stopping). A rank of
  0 means the adapters share no low-rank structure beyond chance
  (``shared_structure_`` is False) and nothing is flagged on this module.
- ``low_rank_``, ``sparse_``: ``L`` and ``S`` on the normalised core (blocks scaled to
  unit Frobenius norm so that no single large adapter owns the subspace).
- ``residual_``: ``||S_k|| / ||Theta_k||`` per adapter.
- ``subspace_``: ``d x rank`` orthonormal basis of the shared subspace, re-estimated
  on the collaborators (adapters whose residual is not an outlier).
- ``off_subspace_``: ``||(I - U U^T) Theta_k|| / ||Theta_k||`` per adapter.
- ``n_iter_``, ``converged_``.

Defaults. The ``"exact"`` form uses the spec's block weight ``lam = 1.5 sqrt(r / K)``
on unit-norm blocks (r from parallel analysis). The ``"noisy"`` form (default)
adapts both weights to the pool's noise, so that a benign adapter's noise stays
in the fit term instead of being moved into S:

- ``lam_L`` is the median of the singular values that parallel analysis did *not*
  call shared: the scale of unshared energy, which benign noise dominates;
- ``lam_S`` is a robust upper bound of the benign blocks' unshared norm, measured
  against the pool's top-r subspace: ``median + 3 sigma`` (sigma = 1.4826 MAD),
  and never below ``lam_L * 1.5 sqrt(r / K)``.

In a noiseless pool both are tiny and the form approaches the exact one.
Parallel analysis calls singular value i shared when it exceeds ``mean + 3 sd``
of the same singular value over the null draws (about a 0.1-0.5 % chance of
calling structure in a pool that has none).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from typing import Literal

import numpy as np
import torch

from clair_cli.core.reduction import FactoredStack
from clair_cli.core.solvers import block_ids, block_norms, solve_exact, solve_noisy

Method = Literal["noisy", "exact"]
LAM_CONSTANT = 1.5
NULL_SDS = 3.0
# Parallel analysis draws null spectra in batches and stops once the rank is settled.
NULL_BATCH = 5
SETTLE_SES = 3.0
# Top null values of large pools by block Krylov (:func:`top_eigenvalues`).
KRYLOV_OVERSAMPLE = 8
KRYLOV_FIRST_CHECK = 8
KRYLOV_TOL = 1e-5
KRYLOV_TOL_FLOAT64 = 1e-8
KRYLOV_MIN_COLUMNS = 40  # Krylov tried only on draws of at least this many times its block's columns
NULL_WIDTH = 16  # leading null values a large module's draws start with
WISHART_CACHE_BYTES = 2**27  # Wishart matrices kept for the next modules (wishart_draw)
_WISHART_CACHE: dict[tuple, torch.Tensor] = {}
_WISHART_LOCK = threading.Lock()
# A shared direction is carried by more than one adapter (participation ratio, see carriers()).
MIN_CARRIERS = 1.5


def median(x: torch.Tensor) -> float:
    """The sample median: the mean of the two middle values for an even count (torch's
    ``median`` returns the lower one, which biases centres and MADs low on small pools)."""
    n = x.numel()
    if not n:
        return float("nan")
    # torch.quantile(x, 0.5), without its checks (this runs for every module): the same
    # linear interpolation between the middle order statistics, so the same number.
    xs = x.double().flatten().sort().values
    if bool(xs[-1].isnan()):  # sorted last; quantile propagates NaN
        return float("nan")
    rank = 0.5 * (n - 1)
    lo, hi = math.floor(rank), math.ceil(rank)
    return float(torch.lerp(xs[lo], xs[hi], rank - lo))


def robust_center_scale(x: torch.Tensor) -> tuple[float, float]:
    """Median and MAD scaled to a Gaussian's standard deviation (1.4826 * MAD)."""
    med = median(x)
    return med, 1.4826 * median((x - med).abs())


def normalise_blocks(G: torch.Tensor, offsets: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale each block to unit Frobenius norm; zero blocks stay zero. Returns (G, norms)."""
    norms = block_norms(G, offsets)
    inverse = torch.where(norms > 0, 1 / norms.clamp_min(torch.finfo(G.dtype).tiny), torch.zeros_like(norms))
    return G * inverse[block_ids(offsets, G.device)], norms


def _block_spectra(W: torch.Tensor, offsets: tuple[int, ...]) -> list[tuple[list[int], int, torch.Tensor]]:
    """Blocks grouped by width: ``(blocks, width, singular values (n_blocks x min(d, width)))``."""
    widths = [offsets[k + 1] - offsets[k] for k in range(len(offsets) - 1)]
    groups = []
    for width in sorted(set(widths)):
        ks = [k for k, w in enumerate(widths) if w == width]
        sv = torch.linalg.svdvals(torch.stack([W[:, offsets[k] : offsets[k + 1]] for k in ks]))
        groups.append((ks, width, sv))
    return groups


def block_spectra_from_gram(
    G: torch.Tensor, offsets: tuple[int, ...], d: int
) -> list[tuple[list[int], int, torch.Tensor]]:
    """:func:`_block_spectra` of a ``d``-row ``W`` from ``G = W^T W``: each block's singular
    values are the square roots of the eigenvalues of its diagonal block of ``G`` (computed in
    float64, returned in ``G``'s dtype)."""
    widths = [offsets[k + 1] - offsets[k] for k in range(len(offsets) - 1)]
    groups = []
    for width in sorted(set(widths)):
        ks = [k for k, w in enumerate(widths) if w == width]
        diag = torch.stack([G[offsets[k] : offsets[k + 1], offsets[k] : offsets[k + 1]] for k in ks]).double()
        values = torch.linalg.eigvalsh((diag + diag.transpose(-1, -2)) / 2).flip(-1).clamp_min(0).sqrt()
        groups.append((ks, width, values[:, : min(d, width)].to(G.dtype)))
    return groups


def rotated_draws(
    W: torch.Tensor, offsets: tuple[int, ...], n_draws: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """``n_draws`` copies of ``W`` with every block given a random orientation.

    Each block keeps its own singular values (so its norm and shape), but its left
    singular vectors become a random orthonormal frame in the ``W.shape[0]``-dimensional
    space, destroying its alignment with the other blocks. Only ``W W^T`` matters to the
    spectrum, so the right singular vectors are dropped. Block spectra are computed once;
    blocks of equal width are rotated in one batched QR.
    """
    d = W.shape[0]
    groups = [
        (len(ks), width, sv, torch.cat([torch.arange(offsets[k], offsets[k + 1]) for k in ks]).to(W.device))
        for ks, width, sv in _block_spectra(W, offsets)
    ]
    for _ in range(n_draws):
        out = torch.zeros_like(W)
        for n, width, sv, cols in groups:
            omega = torch.randn(n, d, sv.shape[1], generator=generator, dtype=W.dtype).to(W.device)
            frames = torch.linalg.qr(omega)[0] * sv[:, None, :]
            if sv.shape[1] < width:  # a block wider than the space: its extra columns are zero
                frames = torch.nn.functional.pad(frames, (0, width - sv.shape[1]))
            out[:, cols] = frames.permute(1, 0, 2).reshape(d, n * width)
        yield out


def rotate_blocks(W: torch.Tensor, offsets: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """One draw of :func:`rotated_draws`."""
    return next(rotated_draws(W, offsets, 1, generator))


def _wishart_null(
    groups: list[tuple[list[int], int, torch.Tensor]],
    d: int,
    n_draws: int,
    generator: torch.Generator,
    like: torch.Tensor,
) -> torch.Tensor:
    """Null spectra through the Bartlett decomposition, in ``n = sum r_k`` dimensions.

    A block rotated to a random frame is ``F_k S_k`` with ``F_k = G_k (G_k^T G_k)^{-1/2}``
    for a Gaussian ``d x r_k`` matrix ``G_k`` (the polar factor of a Gaussian matrix is a
    uniformly random frame). The spectrum depends on ``W_rot^T W_rot = T^T (G^T G) T`` only,
    with ``T = blockdiag((G_k^T G_k)^{-1/2} S_k)``, and ``G^T G`` is Wishart(d, I_n):
    ``L L^T`` with ``L`` lower triangular, ``L_ii^2 ~ chi^2(d - i)`` and standard normals below
    the diagonal (Bartlett 1933). So a draw costs O(n^3) whatever ``d``, never a ``d x n``
    matrix, with exactly the distribution of :func:`rotated_draws`.
    """
    n = sum(len(ks) * width for ks, width, _ in groups)
    rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=generator)))
    dof = torch.from_numpy(rng.chisquare(d - np.arange(n), size=(n_draws, n)))
    draws = []
    for draw in range(n_draws):  # one draw at a time from the generator; the algebra batched over draws
        L = torch.randn(n, n, generator=generator, dtype=like.dtype).tril_(-1)
        L.diagonal().copy_(dof[draw].sqrt())
        draws.append(L)
    X = bartlett_factors(groups, torch.stack(draws).to(like.device), like)
    # Squared singular values: the eigenvalues of X^T X (twice as fast as an SVD).
    return torch.linalg.eigvalsh(X.transpose(-1, -2) @ X).flip(-1).clamp_min(0).sqrt()


def bartlett_factor(seed: int, d: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """The Bartlett factor ``L`` (``n x n``, see :func:`_wishart_null`) drawn from ``seed`` alone."""
    dof = np.random.default_rng(seed).chisquare(d - np.arange(n))
    L = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=dtype).tril_(-1)
    L.diagonal().copy_(torch.from_numpy(dof).sqrt())
    return L


def wishart_draw(seed: int, d: int, n: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """The Wishart(d, I_n) matrix ``L L^T`` of the Bartlett factor ``L`` drawn from ``seed``
    (see :func:`_wishart_null`; ``L``'s own generators, so a draw is rebuilt from its seed alone),
    kept in the draws' cache (:func:`_cached`)."""
    return _cached((seed, d, n, dtype, str(device)), lambda: _wishart(seed, d, n, dtype, device))


def _wishart(seed: int, d: int, n: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    L = bartlett_factor(seed, d, n, dtype).to(device)
    return L @ L.T


def whitened_draw(
    seed: int, d: int, layout: tuple[tuple[int, int], ...], dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """``N = P S P`` for the Wishart matrix ``S`` of ``seed`` (:func:`wishart_draw`) and
    ``P = blockdiag(S_kk^{-1/2})`` over the blocks of ``layout`` (``(width, count)`` per group of
    blocks of one width, in :func:`_block_spectra`'s order), kept in the draws' cache.

    A null draw's Gram matrix is ``X^T X = T^T S T`` with ``T = P Sigma`` (:func:`_frames`:
    ``T_k = S_kk^{-1/2} Sigma_k``, ``Sigma`` the blocks' singular values on the diagonal), so
    ``X^T X = Sigma N Sigma``: ``N`` depends on the seed and the block layout alone, and every
    module of one layout (the modules of one width and adapter ranks draw the same seeds) scales
    the same ``N`` by its own block spectra, ``O(n^2)``, instead of ``O(n^2 r)`` block products.
    """
    n = sum(width * count for width, count in layout)

    def build() -> torch.Tensor:
        S = _wishart(seed, d, n, dtype, device)
        unit = [(list(range(count)), width, torch.ones(count, width, dtype=dtype)) for width, count in layout]
        return null_gram(unit, S[None])[0]

    return _cached(("whitened", seed, d, layout, dtype, str(device)), build)


def _cached(key: tuple, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The null draws' matrices, kept in a small least-recently-used cache.

    Every module of one width and summed rank draws the same seeds (each module's generator
    starts from the audit's seed), so the matrices of those draws (:func:`wishart_draw`,
    :func:`whitened_draw`) are kept (``WISHART_CACHE_BYTES`` in all, on the device they were
    drawn for; thread-safe): a pool's modules then share their ``n^3`` products, and only their
    block spectra change. A cached matrix is the one a fresh draw would give, bit for bit: the
    cache changes speed, never results.
    """
    with _WISHART_LOCK:
        cached = _WISHART_CACHE.pop(key, None)
        if cached is not None:
            _WISHART_CACHE[key] = cached  # the most recently used last
            return cached
    made = build()
    size = made.numel() * made.element_size()
    if size <= WISHART_CACHE_BYTES:
        with _WISHART_LOCK:
            while _WISHART_CACHE and sum(v.numel() * v.element_size() for v in _WISHART_CACHE.values()) + size > (
                WISHART_CACHE_BYTES
            ):
                _WISHART_CACHE.pop(next(iter(_WISHART_CACHE)))  # the least recently used
            _WISHART_CACHE[key] = made
    return made


def null_gram(groups: list[tuple[list[int], int, torch.Tensor]], S: torch.Tensor) -> torch.Tensor:
    """``X^T X = T^T S T`` of null draws (:func:`bartlett_factors`) from their Wishart matrices
    ``S = L L^T`` (``n_draws x n x n``): ``T``'s blocks come from the eigendecompositions of
    ``S``'s diagonal blocks (``G_k^T G_k``), and the block-diagonal products cost O(n^2 r)."""
    n_draws, n = S.shape[0], S.shape[1]
    ST = torch.empty_like(S)
    ts = []
    start = 0
    for ks, width, sv in groups:
        stop = start + len(ks) * width
        g = len(ks)
        diag = S[:, start:stop, start:stop].reshape(n_draws, g, width, g, width).diagonal(dim1=1, dim2=3)
        t = _frames(diag.permute(0, 3, 1, 2), sv, width, S)
        ST[:, :, start:stop] = torch.einsum(
            "dngw,dgwv->dngv", S[:, :, start:stop].reshape(n_draws, n, g, width), t
        ).reshape(n_draws, n, stop - start)
        ts.append((start, stop, g, width, t))
        start = stop
    M = torch.empty_like(S)
    for start, stop, g, width, t in ts:
        M[:, start:stop] = torch.einsum("dgwv,dgwn->dgvn", t, ST[:, start:stop].reshape(n_draws, g, width, n)).reshape(
            n_draws, stop - start, n
        )
    return M


def bartlett_factors(
    groups: list[tuple[list[int], int, torch.Tensor]], L: torch.Tensor, like: torch.Tensor
) -> torch.Tensor:
    """``X = L^T T`` for a batch of Bartlett factors ``L`` (``n_draws x n x n``): the null draws'
    spectra are the singular values of ``X`` (:func:`_wishart_null`)."""
    n_draws, n = L.shape[0], L.shape[1]
    X = torch.empty_like(L)  # L^T T, so that X^T X = T^T (L L^T) T
    start = 0
    for ks, width, sv in groups:
        stop = start + len(ks) * width
        rows = L[:, start:stop].reshape(n_draws, len(ks), width, n)
        t = _frames(rows @ rows.transpose(-1, -2), sv, width, like)
        X[:, :, start:stop] = torch.einsum("dgwn,dgwv->dngv", rows, t).reshape(n_draws, n, stop - start)
        start = stop
    return X


def _frames(C: torch.Tensor, sv: torch.Tensor, width: int, like: torch.Tensor) -> torch.Tensor:
    """``T_k = (G_k^T G_k)^{-1/2} S_k`` for each block and draw, from ``C = G_k^T G_k``
    (``n_draws x blocks x width x width``) and the blocks' singular values ``sv``."""
    evals, evecs = torch.linalg.eigh(C)
    # A block of fewer rows than columns has fewer singular values than its width.
    sv_w = torch.nn.functional.pad(sv, (0, width - sv.shape[1])) if sv.shape[1] < width else sv[:, :width]
    return (evecs * evals.rsqrt()[..., None, :]) @ evecs.transpose(-1, -2) * sv_w[:, None, :].to(like)


def top_eigenvalues(M: torch.Tensor, m: int, generator: torch.Generator) -> torch.Tensor | None:
    """The ``m`` largest eigenvalues of each symmetric positive semi-definite ``M``
    (``batch x n x n``) by a block Krylov method, or None where it would not pay.

    Block Lanczos with full reorthogonalisation: a block of ``m + KRYLOV_OVERSAMPLE`` random
    vectors, the basis grown by ``M`` times its last block, and the Rayleigh quotient ``H`` on
    it kept up to date block by block. The Ritz values (eigenvalues of ``H``) rise to the top
    eigenvalues from below (Cauchy interlacing); iteration stops once the ``m`` largest change
    by at most ``KRYLOV_TOL`` of the largest between two steps (``KRYLOV_TOL_FLOAT64`` in
    float64): within about 1e-5 of the largest (up to 7e-6 measured on null draws of 1024-2048
    columns in float32, m up to 32). Returns None when the basis would pass half of ``n`` before
    that (a flat spectrum needs that many steps; a dense eigensolve is then as cheap).

    The basis is kept one vector a row in a buffer sized for the largest basis (no copies as it
    grows), and ``basis^T (M Q)``, which is ``H``'s new block column, is also the first
    reorthogonalisation pass of the next block; the second pass is Kahan and Parlett's "twice
    is enough".
    """
    batch, n, _ = M.shape
    b = m + KRYLOV_OVERSAMPLE
    tol = KRYLOV_TOL if M.dtype != torch.float64 else KRYLOV_TOL_FLOAT64
    cap = n // 2
    if b > cap:
        return None
    Q = torch.linalg.qr(torch.randn(n, b, generator=generator, dtype=M.dtype).to(M.device).expand(batch, n, b))[0]
    rows = torch.empty(batch, cap, n, dtype=M.dtype, device=M.device)  # the basis, one vector a row
    H = torch.empty(batch, cap, cap, dtype=M.dtype, device=M.device)
    k = 0
    previous: torch.Tensor | None = None
    step = 0
    while True:
        P = M @ Q
        rows[:, k : k + b] = Q.transpose(-1, -2)
        k += b
        basis_t = rows[:, :k]
        W = basis_t @ P  # H's new block column: [C; Q^T P]
        H[:, : k - b, k - b : k] = W[:, : k - b]
        H[:, k - b : k, : k - b] = W[:, : k - b].transpose(-1, -2)
        last = W[:, k - b :]
        H[:, k - b : k, k - b : k] = (last + last.transpose(-1, -2)) / 2
        if step >= KRYLOV_FIRST_CHECK:
            ritz = torch.linalg.eigvalsh(H[:, :k, :k]).flip(-1)[..., :m]
            if previous is not None and bool(((ritz - previous).abs() <= tol * ritz[..., :1]).all()):
                return ritz
            previous = ritz
        if k + b > cap:
            return None
        step += 1
        Y = P - basis_t.transpose(-1, -2) @ W  # first pass, with the product just made
        Y = Y - basis_t.transpose(-1, -2) @ (basis_t @ Y)  # twice is enough (Kahan, Parlett)
        Q = torch.linalg.qr(Y)[0]


def null_spectrum(
    W: torch.Tensor, offsets: tuple[int, ...], n_null: int, generator: torch.Generator, ambient: int | None = None
) -> torch.Tensor:
    """Singular values of ``W`` with each block randomly rotated in ``ambient`` dimensions.

    Returns ``n_null x min(W.shape)`` values. ``ambient`` is the dimension of the space the
    blocks live in (default ``W.shape[0]``). For the reduced core of a module (``rho`` rows)
    that is the module's width ``d``, not ``rho``: the core's rows are the span of the pool
    itself, and blocks rotated inside it align with one another far more than blocks
    rotated in the space the adapters could have used, which made the null conservative
    (rank 1 for pools that share 2 or 3 directions). When the blocks' total width ``n`` is at
    most ``ambient`` (the usual case: adapter ranks sum to less than the width), the draws
    come from :func:`_wishart_null` at O(n^3) each; otherwise the rotated ``ambient x n``
    matrices are built.
    """
    d, n = W.shape
    ambient = d if ambient is None else max(int(ambient), d)
    if n_null <= 0:
        return torch.empty(0, min(d, n), dtype=W.dtype, device=W.device)
    if n <= ambient:
        return _wishart_null(_block_spectra(W, offsets), ambient, n_null, generator, W)[:, : min(d, n)]
    if d < ambient:  # zero rows stand for the directions of the space that W does not use
        W = torch.nn.functional.pad(W, (0, 0, 0, ambient - d))
    values = torch.stack([torch.linalg.svdvals(R) for R in rotated_draws(W, offsets, n_null, generator)])
    return values[:, : min(d, n)]


def carriers(W: torch.Tensor, offsets: tuple[int, ...], u: torch.Tensor) -> float:
    """How many blocks carry direction ``u``: the participation ratio ``(sum e_k)^2 / sum e_k^2``
    of the blocks' energies ``e_k = ||u^T W_k||^2`` (1 when one block holds it all, K when
    all hold it equally)."""
    e = block_norms((u @ W)[None, :], offsets).square()
    total = float(e.sum())
    return total * total / float(e.square().sum()) if total > 0 else 0.0


def null_bound(null: torch.Tensor) -> torch.Tensor:
    """Per index, the level a singular value must exceed to be called shared."""
    return null.mean(dim=0) + NULL_SDS * null.std(dim=0)


def parallel_analysis_rank(
    spectrum: torch.Tensor, null: torch.Tensor, max_rank: int, carried_by: Callable[[int], float] | None = None
) -> int:
    """Number of leading singular values above :func:`null_bound`.

    ``carried_by(i)`` (:func:`carriers` of direction i): a direction that fewer than
    ``MIN_CARRIERS`` adapters' worth of blocks carry is one adapter's own, never shared,
    however the null falls (a single block's singular values do not change under rotation,
    so the null cannot tell them from chance).
    """
    bound = null_bound(null)
    r = 0
    while r < min(max_rank, spectrum.numel(), bound.numel()) and spectrum[r] > bound[r]:
        if carried_by is not None and carried_by(r) < MIN_CARRIERS:
            break
        r += 1
    return r


def _settled(spectrum: torch.Tensor, null: torch.Tensor, r: int) -> bool:
    """Whether more draws could change the rank ``r`` read from ``null``.

    Each decision ``spectrum[i] > bound[i]`` for ``i <= r`` must clear the bound by
    ``SETTLE_SES`` standard errors of the bound itself (of ``mean + 3 sd`` over ``n``
    draws: ``sd * sqrt(1/n + 9 / (2 (n - 1)))``).
    """
    n = null.shape[0]
    if n < 2:
        return False
    top = min(r + 1, spectrum.numel(), null.shape[1])
    sd = null[:, :top].std(dim=0)
    se = sd * math.sqrt(1 / n + NULL_SDS**2 / (2 * (n - 1)))
    gap = (spectrum[:top].to(null) - null_bound(null[:, :top])).abs()
    return bool((gap > SETTLE_SES * se).all())


def parallel_analysis(
    spectrum: torch.Tensor,
    draw: Callable[[int], torch.Tensor],
    n_null: int,
    max_rank: int,
    carried_by: Callable[[int], float] | None = None,
    widen: Callable[[], torch.Tensor | None] | None = None,
) -> tuple[int, torch.Tensor]:
    """Horn's parallel analysis with sequential stopping.

    Null spectra are drawn ``NULL_BATCH`` at a time (``draw(n)`` returns ``n`` of them);
    drawing stops at ``n_null`` draws or as soon as no decision is close
    (:func:`_settled`). Clear modules, the common case, need one batch.

    ``widen``: where draws hold only their leading values (:class:`TopNull`), returns every
    draw so far with more of them (None when there are no more); called while all the values
    drawn are above the bound, so that the rank is never cut by the number of values drawn.

    Returns:
        The shared rank and the null spectra drawn.
    """
    if n_null < 1:
        raise ValueError("rank='auto' needs n_null > 0")
    parts: list[torch.Tensor] = []
    while True:
        done = sum(p.shape[0] for p in parts)
        parts.append(draw(min(NULL_BATCH, n_null - done)))
        null = torch.cat(parts)
        r = parallel_analysis_rank(spectrum, null, max_rank, carried_by)
        while widen is not None and r == null.shape[1] < min(max_rank, spectrum.numel()):
            wider = widen()
            if wider is None:
                break
            parts, null = [wider], wider
            r = parallel_analysis_rank(spectrum, null, max_rank, carried_by)
        if null.shape[0] >= n_null or _settled(spectrum, null, r):
            return r, null


class TopNull:
    """The leading null singular values of a large module's draws, as many as the rank test reads.

    Each draw is Bartlett's (:func:`_wishart_null`'s distribution), rebuilt from its own seed
    when more of its values are needed; its ``width`` leading values come from
    :func:`top_eigenvalues` of ``X^T X`` (a dense eigensolve where that does not pay), which is
    the draw's whitened Wishart matrix (:func:`whitened_draw`, shared by the modules of one
    layout) scaled by the module's block spectra, ``Sigma N Sigma``, in O(n^2). A draw then costs
    a few dozen block products instead of ``X^T X`` and its full eigensolve. Starts with
    ``NULL_WIDTH`` values; :meth:`widen` doubles them, up to ``k``.
    Used as ``draw`` and ``widen`` of :func:`parallel_analysis`.
    """

    def __init__(
        self,
        W: torch.Tensor,
        offsets: tuple[int, ...],
        k: int,
        generator: torch.Generator,
        spectra: list[tuple[list[int], int, torch.Tensor]] | None = None,
    ) -> None:
        """``spectra``: the blocks' spectra (:func:`block_spectra_from_gram`) where ``W`` is not
        formed; ``W`` is then any tensor of ``d`` rows, the dtype and the device."""
        self.groups = _block_spectra(W, offsets) if spectra is None else spectra
        self.d, self.like, self.k, self.generator = W.shape[0], W, k, generator
        self.layout = tuple((width, len(ks)) for ks, width, _ in self.groups)
        # Each block's singular values, padded with zeros to its width (a block of fewer rows
        # than columns has fewer values), in the order of the draws' columns.
        self.sigma = torch.cat(
            [
                torch.nn.functional.pad(sv[:, :width], (0, width - min(width, sv.shape[1]))).reshape(-1)
                for _, width, sv in self.groups
            ]
        ).to(W)
        self.width = min(NULL_WIDTH, k)
        self.batches: list[list[int]] = []  # the seeds of each call's draws

    def __call__(self, n_draws: int) -> torch.Tensor:
        seeds = [int(torch.randint(2**62, (1,), generator=self.generator)) for _ in range(n_draws)]
        self.batches.append(seeds)
        return self._values(seeds)

    def widen(self) -> torch.Tensor | None:
        if self.width >= self.k:
            return None
        self.width = min(2 * self.width, self.k)
        return torch.cat([self._values(seeds) for seeds in self.batches])

    def _values(self, seeds: list[int]) -> torch.Tensor:
        n = sum(len(ks) * width for ks, width, _ in self.groups)
        N = torch.stack([whitened_draw(seed, self.d, self.layout, self.like.dtype, self.like.device) for seed in seeds])
        M = N * (self.sigma[:, None] * self.sigma[None, :])  # Sigma N Sigma = T^T S T (whitened_draw)
        top = None
        if n >= KRYLOV_MIN_COLUMNS * (self.width + KRYLOV_OVERSAMPLE):  # else it would not converge in time
            top = top_eigenvalues(M, self.width, torch.Generator().manual_seed(seeds[0]))
        if top is None:
            top = torch.linalg.eigvalsh(M).flip(-1)[..., : self.width]
        return top.clamp_min(0).sqrt()


class ModuleDecomposer:
    """Low-rank plus block-sparse decomposition of one module's adapters.

    Args:
        method: ``"noisy"`` (default) or ``"exact"``.
        rank: ``"auto"`` (parallel analysis) or a fixed shared rank.
        lam: block weight relative to unit-norm blocks; default ``1.5 sqrt(r / K)``.
        n_null: random rotations for parallel analysis.
        tol, max_iter: solver stopping rule.
        random_state: seed of the rotations (results are deterministic given it).
    """

    def __init__(
        self,
        method: Method = "noisy",
        rank: int | Literal["auto"] = "auto",
        lam: float | None = None,
        n_null: int = 20,
        tol: float = 1e-7,
        max_iter: int = 1000,
        random_state: int = 0,
    ) -> None:
        self.method = method
        self.rank = rank
        self.lam = lam
        self.n_null = n_null
        self.tol = tol
        self.max_iter = max_iter
        self.random_state = random_state

    def fit(self, stack: FactoredStack) -> ModuleDecomposer:
        if self.method not in ("noisy", "exact"):
            raise ValueError(f"method must be 'noisy' or 'exact', got {self.method!r}")
        offsets = stack.offsets
        # The core is small (rho x sum r_k): solve it in float64 whatever the working
        # dtype, so stopping tolerances are far above rounding and results do not
        # depend on the input precision.
        Y, norms = normalise_blocks(stack.G.double(), offsets)
        active = norms > 0
        self.norms_ = norms
        U_all, spectrum, _vh = torch.linalg.svd(Y, full_matrices=False)
        self.spectrum_ = spectrum
        gen = torch.Generator().manual_seed(self.random_state)
        self.null_spectrum_: torch.Tensor | None = None
        if self.rank == "auto":
            r, self.null_spectrum_ = parallel_analysis(
                spectrum,
                lambda n: null_spectrum(Y, offsets, n, gen, ambient=stack.Q.shape[0]),
                self.n_null,
                max_rank=spectrum.numel(),
                carried_by=lambda i: carriers(Y, offsets, U_all[:, i]),
            )
        else:
            if int(self.rank) < 1:
                raise ValueError(f"rank must be 'auto' or a positive integer, got {self.rank!r}")
            r = int(self.rank)
        self.shared_structure_ = r > 0
        r_fit = max(r, 1)
        n_active = int(active.sum())
        lam = self.lam if self.lam is not None else LAM_CONSTANT * math.sqrt(r_fit / max(n_active, 1))
        self.lam_ = lam

        if self.method == "exact":
            dec = solve_exact(Y, offsets, lam, tol=self.tol, max_iter=self.max_iter)
        else:
            tail = spectrum[r_fit:]
            tail = tail[tail > 1e-9 * float(spectrum[0])]
            lam_L = float(tail.median()) if tail.numel() else 0.0
            lam_L = max(lam_L, 1e-6 * float(spectrum[0]))
            U0 = U_all[:, :r_fit]
            unshared = self._off_subspace(Y, offsets, U0, active)[active]
            med, sigma = robust_center_scale(unshared)
            lam_S = max(med + 3 * sigma, lam_L * lam)
            self.lam_L_, self.lam_S_ = lam_L, lam_S
            # Started from Y's own singular-value threshold (the optimum where no block is shrunk),
            # not from zero: where the updates share a subspace exactly, both weights are tiny
            # (lam_L is 1e-6 of the top singular value) and FISTA from zero crept towards that point
            # for ~sqrt(1 / lam) iterations, past the cap of 1000 on every module (an outside review:
            # 16 adapters x 64 modules, rank 8, 1024 wide, 152 s against 3 s with noise). Where the
            # optimum is there, the first step confirms it.
            dec = solve_noisy(
                Y, offsets, lam_L, lam_S, self.tol, self.max_iter, init=(U_all * (spectrum - lam_L).clamp_min(0)) @ _vh
            )
        self.low_rank_, self.sparse_ = dec.L, dec.S
        self.n_iter_, self.converged_ = dec.n_iter, dec.converged
        residual = block_norms(dec.S, offsets)
        residual[~active] = 0.0
        self.residual_ = residual.clamp(0, 1)

        # Collaborators: adapters whose residual share is not an upper outlier.
        med, scale = robust_center_scale(self.residual_[active]) if n_active else (0.0, 0.0)
        cut = med + max(3.5 * scale, 0.1)
        collab = active & (self.residual_ <= cut)
        if int(collab.sum()) == 0:
            collab = active.clone()
        self.collaborators_ = collab
        U_core = self._subspace(Y, offsets, collab, r_fit)
        self.subspace_core_ = U_core
        self.subspace_ = stack.Q @ U_core.to(stack.Q.dtype)
        self.rank_ = r
        self.off_subspace_ = self._off_subspace(Y, offsets, U_core, active)
        return self

    @staticmethod
    def _subspace(Y: torch.Tensor, offsets: tuple[int, ...], mask: torch.Tensor, r: int) -> torch.Tensor:
        cols = [Y[:, offsets[k] : offsets[k + 1]] for k in range(len(offsets) - 1) if mask[k]]
        U, _s, _vh = torch.linalg.svd(torch.cat(cols, dim=1), full_matrices=False)
        return U[:, :r]

    @staticmethod
    def _off_subspace(Y: torch.Tensor, offsets: tuple[int, ...], U: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        resid = Y - U @ (U.T @ Y)
        off = block_norms(resid, offsets)
        off[~active] = 0.0
        return off.clamp(0, 1)
