"""Canonical factors of a LoRA update: what clair measures depends on the update alone.

An update ``Theta = s B A`` has many factorisations: ``(B M, M^{-1} A)`` for any invertible
``M``, extra zero (or negligible) directions that inflate the rank, and any split of the
scale between ``s``, ``B`` and ``A``. A statistic computed from the factors as given (a
rank-revealing QR of stacked ``B`` blocks with a tolerance relative to the largest column,
a concatenation that mixes factors of magnitude ``1e18`` and ``1e-18``) then depends on the
factorisation, and an attacker who re-factors an update steers the verdict for free.

:func:`canonical_factors` maps every factorisation of one update to the same factors, up to
rounding and the signs of singular pairs (which cancel in ``B A``):

    B = Q_B R_B,   A^T = Q_A R_A                    (thin QRs, float64; :func:`triangular_factors`)
    s R_B R_A^T = U Sigma V^T                       (``r x r`` core)
    B' = Q_B U Sigma^{1/2},   A' = Sigma^{1/2} V^T Q_A^T,   scale 1

keeping the singular directions above ``eps * max(r, 8) * sigma_max`` (at least one). The
factors are *balanced* (``||B'||_F = ||A'||_F``, orthogonal columns in ``B'``, orthogonal
rows in ``A'``), so later QRs and Gram products see factors of comparable size whatever the
input's balance; the QRs are scale-equivariant, so ``(c B, A / c)`` gives the same core to
rounding for any ``c`` in the dtype's range. Cost: O((d_out + d_in) r^2) per update, as
much as the factored reduction spends on it anyway: a Gram product and a Cholesky factor
for each well-conditioned factor (the trained LoRA factors of the benchmarks have
condition numbers up to about 30), Householder's QR for the others.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

EPS_RANK = 8  # the cut is eps * max(r, 8) * sigma_max, as the factored reduction's
CHOLESKY_QR_MAX_CONDITION = 1e3  # Cholesky QR up to this condition number, Householder's QR above
MAX_SCALING_EXPONENT = 1000  # beyond 2^+-1000 in the largest entry, Householder's QR


def canonical_factors(
    A: torch.Tensor, B: torch.Tensor, scale: float, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced SVD factors ``(A', B')`` with ``B' A' = scale * B A`` (scale 1).

    Args:
        A: ``r x d_in``.
        B: ``d_out x r``.
        scale: the LoRA scale of the update.
        dtype: precision of the factorisation and of the result (float64 by default, so
            factors whose product would overflow float32's accumulations stay exact).

    Returns:
        ``(A', B')`` of shapes ``rho x d_in`` and ``d_out x rho``, ``rho`` the numerical rank
        of the update (at least 1; an all-zero update gives one zero direction).

    Raises:
        ValueError: factors that are not ``r x d_in`` and ``d_out x r``, or not finite.
    """
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(f"A {tuple(A.shape)} and B {tuple(B.shape)} are not r x d_in and d_out x r")
    (a,), (b,) = _canonical_batch(A[None], B[None], [scale], dtype)
    return a, b


def _canonical_batch(
    A: torch.Tensor, B: torch.Tensor, scales: Sequence[float], dtype: torch.dtype
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """:func:`canonical_factors` of a batch of updates of one shape (``A``: ``n x r x d_in``,
    ``B``: ``n x d_out x r``): the same numbers as one at a time (:func:`triangular_factors`
    factors each matrix on its own; Householder's QR, where it is used, batched, which LAPACK
    runs on each matrix alike)."""
    a, b = A.to(dtype), B.to(dtype)
    if not (all_finite(a) and all_finite(b) and all(map(math.isfinite, scales))):
        raise ValueError("LoRA factors and scale must be finite")
    qb, rb = triangular_factors(b)
    qa, ra = triangular_factors(a.transpose(1, 2))
    out_a, out_b = [], []
    for k, scale in enumerate(scales):
        core = float(scale) * (rb[k] @ ra[k].T)
        if not all_finite(core):  # finite factors whose product is not: an SVD of it is NaN, silently
            raise ValueError(f"the update scale * B @ A is past {dtype}'s range (finite factors, an infinite product)")
        # One SVD at a time: torch's batched SVD can differ from it in the last bits.
        u, s, vh = torch.linalg.svd(core, full_matrices=False)
        top = float(s[0]) if s.numel() else 0.0
        keep = max(int((s > torch.finfo(dtype).eps * max(s.numel(), EPS_RANK) * top).sum()), 1) if top > 0 else 1
        root = s[:keep].sqrt()
        out_a.append(_times_q(a[k].T, qa[k], ra[k], vh[:keep].T * root).T)
        out_b.append(_times_q(b[k], qb[k], rb[k], u[:, :keep] * root))
    return out_a, out_b


def update_difference(
    A: torch.Tensor,
    B: torch.Tensor,
    A2: torch.Tensor,
    B2: torch.Tensor,
    second: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The difference ``B A - B2 A2`` as balanced factors ``(A', B')`` (float64), and its norm over
    the larger of the two updates' (0 where both are zero). Each update is taken in its canonical
    factors first, so the difference is as exact as float64 makes it whatever either factorisation.
    ``second``: ``canonical_factors(A2, B2, 1.0)`` where the caller has them (a federated round's
    global term, the same for every client), else computed here."""
    ca, cb = canonical_factors(A, B, 1.0)
    ga, gb = canonical_factors(A2, B2, 1.0) if second is None else second
    da, db = canonical_factors(torch.cat([ca, ga]), torch.cat([cb, -gb], 1), 1.0)
    larger = max(_norm(ca, cb), _norm(ga, gb))
    if not math.isfinite(larger):  # an update past float64's range is no update's rounding
        return da, db, math.inf
    return da, db, _norm(da, db) / larger if larger > 0 else 0.0


def _norm(A: torch.Tensor, B: torch.Tensor) -> float:
    """``||B A||_F`` from the factors' Gram matrices (``tr(B^T B A A^T)``), never forming ``B A``.
    Where those products overflow (float64 factors near 1e100 and past: the norm came out NaN, and
    an update of 1e200 read as no change from the global), from the factors scaled to their
    largest entry; ``inf`` where the norm itself is past float64's range."""
    norm = math.sqrt(max(float(((B.T @ B) * (A @ A.T)).sum()), 0.0))
    if math.isfinite(norm) or not (A.numel() and B.numel()):
        return norm
    a, b = float(A.abs().max()), float(B.abs().max())
    if not (math.isfinite(a) and math.isfinite(b)) or a == 0 or b == 0:
        return math.inf if a and b else 0.0
    A, B = A / a, B / b
    return a * b * math.sqrt(max(float(((B.T @ B) * (A @ A.T)).sum()), 0.0))


def _times_q(X: torch.Tensor, Q: torch.Tensor | None, R: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``Q M`` for ``X = Q R``: with ``Q`` where it was formed, else ``X (R^{-1} M)``."""
    if Q is not None:
        return Q @ M
    return X @ torch.linalg.solve_triangular(R, M, upper=True)


def triangular_factors(X: torch.Tensor) -> tuple[list[torch.Tensor | None], torch.Tensor]:
    """``X = Q R`` for a batch of matrices (``n x d x r``): per matrix ``Q`` (None where it
    was not formed) and ``R``; each matrix on its own, so a matrix gets the same numbers in
    any batch.

    Where ``X`` is float64, ``d >= r`` and ``X`` is well conditioned (``cond(X)`` at most
    ``CHOLESKY_QR_MAX_CONDITION``, from the singular values of ``R``), ``R`` is the Cholesky
    factor of ``X^T X`` (Cholesky QR) and ``Q = X R^{-1}`` is left implicit: the canonical
    factors need only ``Q M`` for an ``r x k`` matrix ``M``, ``X (R^{-1} M)``. That costs a
    Gram product instead of a Householder QR (about 9x less on factors of 4096 x 16). ``X`` is
    first scaled by the power of two that brings its largest entry into [0.5, 1) (exact), so
    the Gram product neither overflows nor underflows whatever the factors' balance. The
    error grows as ``cond(X)^2`` times the rounding unit (Higham, *Accuracy and Stability of
    Numerical Algorithms*, 19.5), at most about 2e-10 of the update under the bound (2e-13 to
    7e-13 measured at 1e3), against 1e-16 for Householder's QR. Other dtypes, wider matrices,
    zero or rank-deficient ones (rank inflation by zero directions) and worse-conditioned ones
    (``(B M, M^{-1} A)`` with an ill-conditioned ``M``) are factored by Householder's QR.
    """
    n, d, r = X.shape
    Qs: list[torch.Tensor | None] = [None] * n
    if n == 0 or d < r or r == 0 or X.dtype != torch.float64:
        Q, R = torch.linalg.qr(X, mode="reduced")
        return list(Q), R
    R = torch.empty(n, r, r, dtype=X.dtype, device=X.device)
    bad = []
    for k in range(n):
        R_k = _cholesky_r(X[k])
        if R_k is None:
            bad.append(k)
        else:
            R[k] = R_k
    if bad:
        Qh, Rh = torch.linalg.qr(X[bad], mode="reduced")
        R[bad] = Rh
        for j, k in enumerate(bad):
            Qs[k] = Qh[j]
    return Qs, R


def _cholesky_r(x: torch.Tensor) -> torch.Tensor | None:
    """The Cholesky QR factor ``R`` of one tall float64 matrix, or None where Householder's QR
    is needed (see :func:`triangular_factors`)."""
    top = float(x.abs().max())
    if not (top > 0 and math.isfinite(top)):
        return None
    exponent = math.frexp(top)[1]
    if abs(exponent) > MAX_SCALING_EXPONENT:  # 2^exponent itself would leave the float range
        return None
    scaled = x * 2.0**-exponent  # a power of two: exact
    R, info = torch.linalg.cholesky_ex(scaled.T @ scaled, upper=True)
    if int(info) != 0 or not bool(torch.isfinite(R).all()):
        return None
    sv = torch.linalg.svdvals(R)
    if not (float(sv[-1]) > 0 and float(sv[-1]) * CHOLESKY_QR_MAX_CONDITION >= float(sv[0])):
        return None
    return R * 2.0**exponent


def all_finite(x: torch.Tensor) -> bool:
    """Whether every entry of ``x`` is finite.

    A NaN or an infinity makes the sum non-finite, whatever the order of addition, so a finite
    sum proves every entry finite; only a non-finite sum (also the overflow of finite entries
    near the dtype's largest value) needs the entrywise test. On a module's stacked float64
    factors the sum is about 25x cheaper than ``isfinite(x).all()``, which allocates a mask.
    """
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def canonical_module(
    A: Sequence[torch.Tensor], B: Sequence[torch.Tensor], scales: Sequence[float], dtype: torch.dtype = torch.float64
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[float]]:
    """:func:`canonical_factors` of every adapter of one module; the scales become 1. The
    adapters of one rank are factored as one batch."""
    out_a: list[torch.Tensor | None] = [None] * len(A)
    out_b: list[torch.Tensor | None] = [None] * len(A)
    by_shape: dict[tuple, list[int]] = {}
    for k, (a, b) in enumerate(zip(A, B, strict=True)):
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"A {tuple(a.shape)} and B {tuple(b.shape)} are not r x d_in and d_out x r")
        by_shape.setdefault((tuple(a.shape), tuple(b.shape)), []).append(k)
    for ks in by_shape.values():
        a_k, b_k = torch.stack([A[k] for k in ks]).to(dtype), torch.stack([B[k] for k in ks]).to(dtype)
        ca, cb = _canonical_batch(a_k, b_k, [scales[k] for k in ks], dtype)
        for k, a, b in zip(ks, ca, cb, strict=True):
            out_a[k], out_b[k] = a, b
    return [a for a in out_a if a is not None], [b for b in out_b if b is not None], [1.0] * len(A)


def in_dtype(
    A: torch.Tensor, B: torch.Tensor, scale: float, dtype: torch.dtype, balance: bool = True
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(A, B, scale)`` in ``dtype``, the same update whenever it fits there.

    Factors stored in a wider dtype can lie outside ``dtype``'s range while their update does
    not (``(c B, A / c)`` with ``c = 1e39``): cast as they are, one would become Inf and the
    other 0. And factors cast to a dtype of less precision each keep their own relative precision,
    not their product's: ``(B M, M^{-1} A)`` with ``M`` of condition number 1e8, exact in
    float64, is noise in float32 (the terms of ``B A`` cancel to 1e-8 of their size). Factors
    of more precision than ``dtype`` are therefore replaced by their canonical factors (balanced,
    scale 1; computed in float64), whose entries are bounded by the update's singular values and
    whose cast keeps the update to ``dtype``'s rounding. Factors whose values ``dtype`` holds
    exactly (bfloat16 or float16 into float32, float32 values read as float64) are cast as they
    are. ``balance=False`` (for methods defined on the factors as given, such as FedAvg's mean of
    ``A`` and of ``B``): factors are cast as they are wherever each keeps its range, and balanced
    only where one would not.

    Raises:
        ValueError: the update itself does not fit in ``dtype`` (its canonical factors overflow).
    """
    a, b = A.to(dtype), B.to(dtype)
    exact = not balance or all(
        torch.finfo(wide.dtype).eps >= torch.finfo(dtype).eps or torch.equal(narrow.to(wide.dtype), wide)
        for wide, narrow in ((A, a), (B, b))
    )
    if exact and cast_faithfully(A, a) and cast_faithfully(B, b):
        return a, b, scale
    ca, cb = canonical_factors(A, B, scale, torch.float64)
    a, b = ca.to(dtype), cb.to(dtype)
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        raise ValueError(f"the update's entries exceed {dtype}'s range")
    return a, b, 1.0


def cast_faithfully(wide: torch.Tensor, narrow: torch.Tensor) -> bool:
    """Whether ``narrow`` (``wide`` cast) keeps its largest entry to rounding, finite and normal."""
    if wide.numel() == 0:
        return True
    top = float(wide.abs().max())
    if top == 0.0:
        return True
    cast = top if narrow is wide else float(narrow.abs().max())
    return well_scaled(cast, narrow.dtype) and abs(cast - top) <= 1e-3 * top


def well_scaled(top: float, dtype: torch.dtype) -> bool:
    """Whether a factor whose largest |entry| is ``top`` (> 0) is held in ``dtype`` without
    balancing: finite, and far enough above the smallest normal value that products of such
    factors keep their precision."""
    info = torch.finfo(dtype)
    return math.isfinite(top) and top >= info.tiny * 2**info.bits
