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
median (the start; with an even count the lower of the two middle distances, ``torch.median``'s):
a scale the collaborators set, which an attacker in the minority cannot inflate. Where every
update lies within ``tau`` of the weighted mean, the fixed point *is* the weighted mean and the
weights come back unchanged: clipping changes nothing on a pool of comparable honest updates.

A **norm bound** (:func:`norm_bound`, on by default: ``NORM_BOUND``) comes first: every update larger
than ``tau_n`` (``factor`` times the collaborators' median norm, widened to ``exp(3 sigma)``
times it where their log norms spread by a robust ``sigma`` that large) is weighted down so
that its share of the mean is that of an update of norm ``tau_n`` (norm thresholding, Sun et
al. 2019, "Can You Really Backdoor Federated Learning?"). Centred clipping bounds distance
from the centre, which a third of the pool can drag; a norm bound needs no centre, and a
minority cannot move the median norm past the honest clients'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from clair_cli.constants import NORM_BOUND
from clair_cli.core.decompose import robust_center_scale
from clair_cli.core.insubspace import centre_weights, combination_distances
from clair_cli.core.merge import check_weights, merged_sq_norm

CLIP_FACTOR = 2.0  # tau = 2 x the median distance from the geometric median
NORM_SPREAD_SDS = 3.0  # ... or exp(3 robust sd of their log norms) x the median, if larger
NORM_SPREAD_CAP = 2.0  # ... but never wider than twice the factor (3x the median at the default 1.5)
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


@dataclass(frozen=True)
class NormBound:
    """The result of :func:`norm_bound`.

    Attributes:
        factors: per update, ``min(1, tau / ||Theta_k||_F)`` (1: untouched).
        radius: ``tau``; infinite where fewer than three updates have a norm.
        relative: ``tau`` in units of the median norm.
    """

    factors: torch.Tensor
    radius: float
    relative: float


def norm_bound(sq_norms: torch.Tensor, factor: float = NORM_BOUND) -> NormBound:
    """How far each update lies above the norm bound of its pool.

    ``tau = median_norm * min(max(factor, exp(NORM_SPREAD_SDS * sigma)), NORM_SPREAD_CAP * factor)``,
    with ``sigma`` the robust (MAD) standard deviation of the non-zero updates' log norms: on a
    pool of comparable updates ``factor`` sets it; where the collaborators' norms legitimately
    spread (other recipes, alphas) it widens with them, up to twice ``factor``. The cap is what a
    minority can do to it: the median of the log norms moves only within the honest ones, but a
    third of the pool placed above them (each at 1.5x, itself under the bound) doubles the MAD,
    and ``exp(3 sigma)`` turns that into a bound 2-4x wider (an outside review: a 3x update then
    merged at full weight); capped, the widest bound is ``2 * factor`` whatever they do.

    Args:
        sq_norms: the updates' squared Frobenius norms (the Gram matrix's diagonal).
        factor: the bound in units of the median norm, at least 1.

    Raises:
        ValueError: a factor below 1 (it would bound half the collaborators).
    """
    if not factor >= 1:
        raise ValueError(f"factor must be at least 1, got {factor}")
    norms = sq_norms.double().clamp_min(0).sqrt()
    positive = norms[norms > 0]
    if positive.numel() < 3:
        return NormBound(torch.ones_like(norms), math.inf, math.inf)
    centre, sigma = robust_center_scale(positive.log())
    relative = min(max(factor, math.exp(NORM_SPREAD_SDS * sigma)), NORM_SPREAD_CAP * factor)
    radius = math.exp(centre) * relative
    factors = torch.where(norms > radius, radius / norms.clamp_min(1e-300), torch.ones_like(norms))
    return NormBound(factors, radius, relative)


def bounded_weights(
    inner: torch.Tensor, members: list[int], weights: list[float] | None, factor: float = NORM_BOUND
) -> tuple[list[float] | None, dict[int, float], float]:
    """The merge weights of ``members`` under :func:`norm_bound`, the factor applied to each
    bounded member, and the bound in units of their median norm: weights
    ``w_k min(1, tau / ||Theta_k||)``, normalised, so a bounded update moves the mean as an
    update of norm ``tau`` with its weight would.

    Returns ``weights`` as given (and no factor) where no member lies above the bound or
    fewer than three are merged. Members of weight 0 do not set the bound (a federated client
    claiming no examples cannot move it for free).
    """
    if len(members) < 3:
        return weights, {}, math.inf
    idx = torch.tensor(members)
    w = torch.tensor(check_weights(weights, len(members)), dtype=torch.float64)
    bound = norm_bound(inner[idx, idx].double() * (w > 0), factor)
    bounded = {
        k: float(c) for k, c, wk in zip(members, bound.factors.tolist(), w.tolist(), strict=True) if c < 1 and wk > 0
    }
    if not bounded:
        return weights, {}, bound.relative
    w = w * bound.factors
    return (w / w.sum()).tolist(), bounded, bound.relative


def module_bounded_weights(  # noqa: PLR0913 - the module's factors, its weights, and the bound's two inputs
    A: list[torch.Tensor],
    B: list[torch.Tensor],
    scales: list[float],
    weights: list[float] | None,
    factor: float = NORM_BOUND,
    whole: list[float] | None = None,
) -> tuple[list[float] | None, dict[int, float]]:
    """One module's merge weights under that module's :func:`norm_bound`, and the factor
    applied to each member bounded there (by position): ``min(1, tau_m / ||Theta_km||)``, with
    ``tau_m`` the bound of the members' norms on this module alone.

    The norm bound over all modules (:func:`bounded_weights`) leaves an update boosted in one
    module of many nearly whole (a module of eight at 4x is about 1.8x over all modules); on
    its own module it is bounded like any update. ``whole``: per member the factor the bound over
    all modules already applied to ``weights`` (1: none). The two bounds are one: a member's
    weight on this module is its original weight times ``min(whole, module factor)``, so the
    weights are multiplied by ``min(1, module factor / whole)`` (an update above both bounds
    counts as one at the stricter, never at their product). Members of weight 0 do not set the
    bound. Weights as given where nothing lies above the bound or fewer than three members have
    an update.
    """
    if len(A) < 3:
        return weights, {}
    w = torch.tensor(check_weights(weights, len(A)), dtype=torch.float64)
    sq = torch.tensor(
        [float(s) ** 2 * merged_sq_norm(a, b) for a, b, s in zip(A, B, scales, strict=True)], dtype=torch.float64
    )
    factors = norm_bound(sq * (w > 0), factor).factors
    already = torch.ones_like(factors) if whole is None else torch.tensor(whole, dtype=torch.float64)
    extra = torch.clamp(factors / already, max=1.0)
    bounded = {j: float(factors[j]) for j in range(len(A)) if extra[j] < 1 and w[j] > 0}
    if not bounded:
        return weights, {}
    w = w * extra  # a member of weight 0 stays at 0
    return (w / w.sum()).tolist(), bounded
