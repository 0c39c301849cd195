"""Baseline aggregators of one module's adapters (docs/engine.md, section 7).

Every baseline takes the adapters' factors ``A_k`` (``r_k x d_in``), ``B_k``
(``d_out x r_k``) and scales ``s_k`` of one module and returns a
:class:`MergeResult`: LoRA factors with scale 1 (``B @ A`` is the merged update).
The merge methods of :mod:`clair_cli.methods` apply them, one module at a time.

Which ones stay factored:

- ``mean`` (``sum_k w_k Theta_k``) is exact as a concatenated LoRA of rank
  ``sum_k r_k``; with ``rank`` it is truncated through the SVD of a
  ``sum r_k``-sized core.
- ``fedavg`` averages the factors themselves (``mean(B) @ mean(A)``), as many
  federated LoRA systems do; it is *not* the mean of the updates.
- ``krum`` / ``multi-krum`` need only pairwise distances, which come from the
  ``K x K`` Gram matrix of factored inner products; the result is the mean of
  the selected adapters, again a concatenated LoRA.
- ``median``, ``trimmed-mean`` and ``ties`` act on single coordinates of the
  update, which a factored form cannot express: they **go dense**, one module
  at a time and in row blocks of at most ``CHUNK_ELEMENTS`` values, and the
  dense result is written back as a rank-``rank`` LoRA (default: the largest
  input rank) by SVD. ``info["truncation_error"]`` reports the relative
  Frobenius error of that last step.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch

from clair_cli.core.lowrank import truncate_dense, truncate_factored
from clair_cli.core.merge import MergeResult, check_weights
from clair_cli.core.pairwise import gram

CHUNK_ELEMENTS = 1 << 23  # values of the K x rows x d_in block held at once (32 MiB in float32; a sort
# of it holds three times that again, its int64 indices included)
DEFAULT_TRIM = 0.2
DEFAULT_DENSITY = 0.2


Factors = Sequence[torch.Tensor]


def _check(A: Factors, B: Factors, scales: Sequence[float], need: int = 1) -> None:
    if not (len(A) == len(B) == len(scales)):
        raise ValueError("A, B and scales must have equal lengths")
    if len(A) < need:
        raise ValueError(f"needs at least {need} adapters, got {len(A)}")


def _no_weights(name: str, weights: Sequence[float] | None) -> None:
    if weights is not None:
        raise ValueError(f"{name} does not take weights: it is an order statistic of the adapters")


def _concat(A: Factors, B: Factors, coef: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_k coef_k B_k A_k`` as one LoRA: ``[c_1 B_1 | ...] @ [A_1; ...]``."""
    pairs = [(a, float(c) * b) for a, b, c in zip(A, B, coef, strict=True) if c != 0]
    return torch.cat([a for a, _ in pairs], dim=0), torch.cat([b for _, b in pairs], dim=1)


def _weighted_sum(
    A: Factors,
    B: Factors,
    scales: Sequence[float],
    coef: Sequence[float],
    rank: int | None,
    selected,
    tol: float | None = None,
    out_dtype: torch.dtype | None = None,
) -> MergeResult:
    a, b = _concat(A, B, [c * float(s) for c, s in zip(coef, scales, strict=True)])
    err = 0.0
    if (rank is not None and rank < a.shape[0]) or (rank is None and tol is not None):
        a, b, err = truncate_factored(a, b, rank, tol, out_dtype)
    return MergeResult(a, b, "mean", list(selected), {"truncation_error": err})


def mean(
    A: Factors,
    B: Factors,
    scales: Sequence[float],
    weights: Sequence[float] | None = None,
    rank: int | None = None,
    tol: float | None = None,
    out_dtype: torch.dtype | None = None,
) -> MergeResult:
    """``sum_k w_k Theta_k``: exact as a concatenated LoRA (rank ``sum r_k``), truncated to
    ``rank`` by SVD, or (``tol``) at the smallest rank within relative Frobenius error ``tol``,
    measured on the factors as returned in ``out_dtype`` (:func:`clair_cli.core.lowrank.truncate_factored`)."""
    _check(A, B, scales)
    w = check_weights(weights, len(A))
    return _weighted_sum(A, B, scales, w, rank, range(len(A)), tol, out_dtype)


def fedavg(
    A: Factors, B: Factors, scales: Sequence[float], weights: Sequence[float] | None = None, rank: int | None = None
) -> MergeResult:
    """Factor averaging: ``(sum_k w_k s_k B_k) @ (sum_k w_k A_k)``.

    With a common scale ``s`` this is ``s * mean(B) @ mean(A)``, the naive federated
    average. Adapters of lower rank are zero-padded to the largest rank (as in
    heterogeneous-rank federated LoRA). ``rank`` truncates the result.
    """
    _check(A, B, scales)
    w = check_weights(weights, len(A))
    r = max(a.shape[0] for a in A)
    a_bar = torch.zeros(r, A[0].shape[1], dtype=A[0].dtype, device=A[0].device)
    b_bar = torch.zeros(B[0].shape[0], r, dtype=B[0].dtype, device=B[0].device)
    for wk, sk, a, b in zip(w, scales, A, B, strict=True):
        a_bar[: a.shape[0]] += wk * a
        b_bar[:, : b.shape[1]] += wk * float(sk) * b
    err = 0.0
    if rank is not None and rank < r:
        a_bar, b_bar, err = truncate_factored(a_bar, b_bar, rank)
    return MergeResult(a_bar, b_bar, "fedavg", list(range(len(A))), {"truncation_error": err})


def krum_scores(G: torch.Tensor, f: int) -> torch.Tensor:
    """Krum score of each adapter: sum of squared distances to its ``K - f - 2`` nearest others.

    Args:
        G: ``K x K`` Gram matrix of the updates.
        f: assumed number of Byzantine adapters.
    """
    K = G.shape[0]
    sq = G.diagonal()
    dist = (sq[:, None] + sq[None, :] - 2 * G).clamp_min(0)
    n = max(K - f - 2, 1)
    dist = dist + torch.diag(torch.full((K,), float("inf"), dtype=dist.dtype, device=dist.device))
    return dist.sort(dim=1).values[:, :n].sum(dim=1)


def default_byzantine(K: int) -> int:
    """The largest ``f`` Krum tolerates: ``K > 2 f + 2``."""
    return max((K - 3) // 2, 0)


def multi_krum(
    A: Factors,
    B: Factors,
    scales: Sequence[float],
    weights: Sequence[float] | None = None,
    rank: int | None = None,
    f: int | None = None,
    m: int | None = None,
) -> MergeResult:
    """Multi-Krum (Blanchard et al. 2017): the mean of the ``m`` adapters of lowest Krum score.

    Args:
        f: assumed Byzantine count, default the largest Krum tolerates, ``(K - 3) // 2``.
        m: adapters averaged, default ``K - f``.
    """
    _no_weights("multi-krum", weights)
    _check(A, B, scales, need=3)
    K = len(A)
    f = default_byzantine(K) if f is None else f
    if f < 0 or 2 * f + 2 >= K:
        raise ValueError(f"krum needs K > 2f + 2; got K={K}, f={f}")
    m = K - f if m is None else m
    if not 1 <= m <= K:
        raise ValueError(f"m must be between 1 and {K}, got {m}")
    scores = krum_scores(gram(A, B, scales).double(), f)
    chosen = sorted(torch.argsort(scores, stable=True)[:m].tolist())
    coef = [1.0 / m if k in chosen else 0.0 for k in range(K)]
    res = _weighted_sum(A, B, scales, coef, rank, chosen)
    res.method = "multi-krum" if m > 1 else "krum"
    res.info.update(f=f, m=m, krum_scores=scores.tolist())
    return res


def krum(
    A: Factors,
    B: Factors,
    scales: Sequence[float],
    weights: Sequence[float] | None = None,
    rank: int | None = None,
    f: int | None = None,
) -> MergeResult:
    """Krum: the single adapter of lowest Krum score."""
    return multi_krum(A, B, scales, weights, rank, f=f, m=1)


def _chunks(A: Factors, B: Factors, scales: Sequence[float]):
    """Row blocks ``(start, stop, X)`` with ``X[k] = Theta_k[start:stop]``."""
    K, d_out, d_in = len(A), B[0].shape[0], A[0].shape[1]
    step = max(1, CHUNK_ELEMENTS // max(K * d_in, 1))
    # (the dtype torch.stack gave the products: adapters of other dtypes are promoted, as they were)
    dtype = functools.reduce(torch.promote_types, (a.dtype for a in A))
    block = torch.empty(K, min(step, d_out), d_in, dtype=dtype, device=A[0].device)
    for start in range(0, d_out, step):
        stop = min(start + step, d_out)
        X = block[:, : stop - start]
        for k, (a, b, s) in enumerate(zip(A, B, scales, strict=True)):
            if a.dtype == dtype:
                torch.matmul(float(s) * b[start:stop], a, out=X[k])
            else:
                X[k] = float(s) * b[start:stop] @ a
        yield start, stop, X


def _dense_merge(name: str, A: Factors, B: Factors, scales, rank: int | None, combine: Callable) -> MergeResult:
    out = torch.empty(B[0].shape[0], A[0].shape[1], dtype=A[0].dtype, device=A[0].device)
    for start, stop, X in _chunks(A, B, scales):
        out[start:stop] = combine(X)
    r = rank if rank is not None else max(a.shape[0] for a in A)
    a, b, err = truncate_dense(out, r)
    return MergeResult(a, b, name, list(range(len(A))), {"truncation_error": err})


def median(
    A: Factors, B: Factors, scales: Sequence[float], weights: Sequence[float] | None = None, rank: int | None = None
) -> MergeResult:
    """Coordinate-wise median of the updates (Yin et al. 2018); dense, see the module docstring.

    With an even number of adapters the two middle values are averaged.
    """
    _no_weights("median", weights)
    _check(A, B, scales)
    K = len(A)

    def combine(X: torch.Tensor) -> torch.Tensor:
        v = X.sort(dim=0).values
        return 0.5 * (v[(K - 1) // 2] + v[K // 2])

    return _dense_merge("median", A, B, scales, rank, combine)


def trimmed_mean(
    A: Factors,
    B: Factors,
    scales: Sequence[float],
    weights: Sequence[float] | None = None,
    rank: int | None = None,
    trim: float = DEFAULT_TRIM,
) -> MergeResult:
    """Coordinate-wise trimmed mean: drop the ``floor(trim * K)`` largest and smallest values.

    Dense, see the module docstring.
    """
    _no_weights("trimmed-mean", weights)
    _check(A, B, scales)
    if not 0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    K = len(A)
    t = math.floor(trim * K)

    def combine(X: torch.Tensor) -> torch.Tensor:
        return X.sort(dim=0).values[t : K - t].mean(dim=0)

    res = _dense_merge("trimmed-mean", A, B, scales, rank, combine)
    res.info["trimmed_each_side"] = t
    return res


def ties(
    A: Factors,
    B: Factors,
    scales: Sequence[float],
    weights: Sequence[float] | None = None,
    rank: int | None = None,
    density: float = DEFAULT_DENSITY,
) -> MergeResult:
    """TIES merging (Yadav et al. 2023): trim, elect sign, disjoint merge.

    Each update keeps its ``density`` share of largest-magnitude entries; the sign
    of each coordinate is elected by the sum of the trimmed updates (PEFT's
    ``majority_sign_method="total"``); the result is the weighted mean of the
    entries that agree with the elected sign (mergekit's normalised form). Dense,
    see the module docstring.
    """
    _check(A, B, scales)
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    w = torch.tensor(check_weights(weights, len(A)), dtype=A[0].dtype, device=A[0].device)
    thresholds = []
    for a, b, s in zip(A, B, scales, strict=True):
        mag = (float(s) * b @ a).abs().flatten()
        keep = int(density * mag.numel())
        thresholds.append(mag.kthvalue(mag.numel() - keep + 1).values if keep > 0 else mag.max() + 1)
    thr = torch.stack(thresholds)[:, None, None]

    def combine(X: torch.Tensor) -> torch.Tensor:
        X = torch.where(X.abs() >= thr, X, torch.zeros_like(X))
        elected = torch.where(X.sum(dim=0) >= 0, 1.0, -1.0).to(X)
        agree = (X.sign() == elected).to(X) * w[:, None, None]
        return (X * agree).sum(dim=0) / agree.sum(dim=0).clamp_min(torch.finfo(X.dtype).tiny)

    res = _dense_merge("ties", A, B, scales, rank, combine)
    res.info["density"] = density
    return res
