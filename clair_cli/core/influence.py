"""Bounded influence for the updates a verdict lets through: centred clipping in factored form.

Whatever passes the audit is merged; an attacker who stays just under every threshold
still moves a plain mean by its weight times its distance from the others. Centred
clipping (Karimireddy, He & Jaggi 2021, "Learning from History for Byzantine Robust
Optimization", ICML) bounds that: from a robust start ``v``,

    v <- v + sum_k w_k clip_tau(Theta_k - v),   clip_tau(x) = x min(1, tau / ||x||_F),

iterated to its fixed point, a Huber-type location estimate: each update moves the result
by at most ``w_k tau`` however far it lies. Every iterate is a combination ``v = sum_j beta_j
Theta_j`` of the updates, and ``||Theta_k - v||_F^2 = (e_k - beta)^T G (e_k - beta)`` needs
only their ``K x K`` Gram matrix ``G`` (summed over modules: the whole update is clipped,
as the papers clip the whole model update). So the result is the weighted mean with weights
``beta`` (non-negative, summing to 1: each step is a convex combination), written exactly as
the mean is, with no dense matrix.

``tau`` is ``CLIP_FACTOR`` times the median distance of the updates from their geometric
median (the start): a scale the collaborators set, which an attacker in the minority cannot
inflate. Where every update lies within ``tau`` of the weighted mean, the fixed point *is*
the weighted mean and the weights come back unchanged: clipping changes nothing on a pool
of comparable honest updates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clair_cli.core.insubspace import centre_weights, combination_distances
from clair_cli.core.merge import check_weights

CLIP_FACTOR = 2.0  # tau = 2 x the median distance from the geometric median
MAX_ITERATIONS = 200
TOLERANCE = 1e-12


@dataclass(frozen=True)
class Clipping:
    """The result of :func:`centred_clipping`.

    Attributes:
        weights: ``beta``, the merge weights that realise the clipped centre (sum 1).
        clipped: per update, the factor ``min(1, tau / ||Theta_k - v||)`` at the fixed point
            (1: untouched).
        radius: ``tau``.
        n_iter: iterations run.
    """

    weights: torch.Tensor
    clipped: torch.Tensor
    radius: float
    n_iter: int


def centred_clipping(G: torch.Tensor, weights: torch.Tensor, factor: float = CLIP_FACTOR) -> Clipping:
    """Centred clipping of the updates with Gram matrix ``G`` and merge weights ``weights``.

    Args:
        G: ``K x K`` Gram matrix of the whole updates.
        weights: the merge weights (non-negative, summing to 1).
        factor: ``tau`` in units of the median distance from the geometric median.

    Returns:
        The weights ``beta`` of the clipped centre and what was clipped.

    Raises:
        ValueError: a non-square ``G``, weights of another length, or a non-positive factor.
    """
    K = G.shape[0]
    if G.ndim != 2 or G.shape[1] != K or weights.shape != (K,):
        raise ValueError(f"G must be K x K and weights of length K, got {tuple(G.shape)} and {tuple(weights.shape)}")
    if not factor > 0:
        raise ValueError(f"factor must be positive, got {factor}")
    G, w = G.double(), weights.double()
    beta = centre_weights(G, torch.ones(1, K, dtype=torch.bool))[0]
    radius = factor * float(combination_distances(G, beta[None, :])[0].median())
    clip = torch.ones(K, dtype=torch.float64)
    n_iter = 0
    while n_iter < MAX_ITERATIONS and radius > 0:  # radius 0: half the updates coincide; nothing to bound
        n_iter += 1
        d = combination_distances(G, beta[None, :])[0]
        clip = torch.where(d > radius, radius / d.clamp_min(1e-300), torch.ones_like(d))
        step = w * clip
        new = (1 - float(step.sum())) * beta + step
        moved = float((new - beta).abs().max())
        beta = new
        if moved < TOLERANCE:
            break
    if bool((clip == 1).all()):
        beta = w.clone()  # the fixed point is the weighted mean itself: return it exactly
    return Clipping(beta / beta.sum(), clip, radius, n_iter)


def clipped_weights(
    inner: torch.Tensor, members: list[int], weights: list[float] | None, factor: float = CLIP_FACTOR
) -> tuple[list[float] | None, dict[int, float]]:
    """The merge weights of ``members`` after :func:`centred_clipping`, and the factor applied
    to each clipped member.

    Args:
        inner: the pool's Gram matrix of whole updates (``K x K``, every module).
        members: the adapters merged (indices into ``inner``).
        weights: their merge weights, or None for equal weights.
        factor: as in :func:`centred_clipping`.

    Returns:
        ``weights`` as given where nothing lies beyond the clipping radius (or with fewer than
        three members); otherwise the clipped centre's weights, and per clipped member its
        factor (below 1).
    """
    if len(members) < 3:
        return weights, {}
    idx = torch.tensor(members)
    G = inner[idx[:, None], idx[None, :]]
    result = centred_clipping(G, torch.tensor(check_weights(weights, len(members)), dtype=torch.float64), factor)
    clipped = {k: float(c) for k, c in zip(members, result.clipped.tolist(), strict=True) if c < 1}
    if not clipped:
        return weights, {}
    return result.weights.tolist(), clipped
