"""The second signal: where an update sits *inside* the shared subspace.

The off-subspace share cannot see an adapter whose update lies in the shared subspace
but points the wrong way: a sign-flipped update, or a benign update scaled up as in
model-replacement attacks. This module measures, per module, how far each adapter's
in-subspace component ``X_k = U U^T Theta_k`` (``Theta_k V V^T`` on the input side) lies
from the pool's robust centre, the geometric median of the ``X_k``. The auditor divides
each ``X_k`` by ``||Theta_k||`` first, so the test is about direction (a sign flip moves a
unit component by up to 2) and honest differences in alpha or training length do not
count; magnitude is the norm rule's.

- everything runs on the ``K x K`` Gram matrix of the components, which the factors
  give exactly: ``<X_j, X_k> = s_j s_k tr((C_j^T C_k)(A_k A_j^T))`` with ``C_k = U^T B_k``,
  an ``r x r_k`` matrix (:func:`in_subspace_gram`); no update is materialised;
- the geometric median ``M = sum_j w_j X_j`` is found by Weiszfeld's iteration on that
  Gram matrix (:func:`centre_distances`); it tolerates up to half the pool being
  anywhere, so attackers cannot drag it;
- the statistic is ``log ||X_k - M||`` against its robust spread over the pool (median,
  Qn, others only): honest heterogeneity (clients that agree only loosely) widens the spread
  and so raises the bar, which is the price of not flagging honest clients.

:class:`clair_cli.core.rules.in_subspace.InSubspace` flags an adapter when, on some module with shared
structure, its log-distance exceeds the others' median by ``max(c sigma, log
IN_SUBSPACE_FACTOR)`` (rule 4: ``c`` calibrated for the pool size at ``ALPHA / M``, see
:mod:`clair_cli.core.calibration`): at least ``IN_SUBSPACE_FACTOR`` times the typical
distance and a robust outlier.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from clair_cli.core.pairwise import cosine_from_gram, gram

WEISZFELD_ITERATIONS = 200
# Values per (chunk, K, K) temporary of the batched Weiszfeld loop (2^20: 8 MiB in float64).
CHUNK_ENTRIES = 1 << 20


def in_subspace_gram(
    A: Sequence[torch.Tensor],
    B: Sequence[torch.Tensor],
    scales: Sequence[float],
    basis: torch.Tensor,
    side: str,
    grams: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``K x K`` Gram matrix of the components of the updates inside ``span(basis)``.

    Args:
        A, B, scales: the module's factors (``r_k x d_in``, ``d_out x r_k``) and scales.
        basis: orthonormal ``d x r`` basis of the shared subspace on ``side``.
        side: ``"out"`` (``basis`` spans columns: ``X_k = U U^T Theta_k``) or ``"in"``
            (rows: ``X_k = Theta_k V V^T``).
        grams: :func:`~clair_cli.core.pairwise.factor_grams` of ``(A, B)``, when computed
            already; the factor on the other side is reused from it.
    """
    U = basis.to(B[0])
    a_gram, b_gram = grams if grams is not None else (None, None)
    if side == "out":  # ||U U^T Theta|| = ||U^T Theta||: B_k becomes the r x r_k matrix U^T B_k
        C = U.T @ torch.cat(list(B), dim=1)
        return gram(A, B, scales, a_gram=a_gram, b_gram=C.T @ C)
    D = torch.cat(list(A), dim=0) @ U  # A_k becomes A_k V
    return gram(A, B, scales, a_gram=D @ D.T, b_gram=b_gram)


def centre_distances(G: torch.Tensor, fit_on: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances of every point to the geometric median of the points in ``fit_on``.

    The points are known only through their Gram matrix ``G``; the median is
    ``M = sum_j w_j x_j`` with Weiszfeld's weights ``w_j ~ 1 / ||x_j - M||``.

    Returns:
        ``(distances, weights)``: ``||x_k - M||`` for every k, and ``w`` (zero outside ``fit_on``).
    """
    G = G.double()
    mask = torch.ones(G.shape[0], dtype=torch.bool) if fit_on is None else fit_on
    w = centre_weights(G, mask[None, :])[0]
    return combination_distances(G, w[None, :])[0], w


def combination_distances(G: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Row p: every point's distance to ``sum_j W[p, j] x_j``, from the points' Gram matrix ``G``."""
    GW = W @ G  # G is symmetric: row p is G w_p
    return (G.diagonal()[None, :] - 2 * GW + (GW * W).sum(1, keepdim=True)).clamp_min(0).sqrt()


def centre_weights(
    G: torch.Tensor, masks: torch.Tensor, start: torch.Tensor | None = None, mass: torch.Tensor | None = None
) -> torch.Tensor:
    """Weiszfeld's weights of the geometric median of the points in each row of ``masks``
    (``P x K``, at least one point a row), all rows iterated at once; ``P x K``, zero
    outside the row's mask. Each row stops moving once it has converged. ``start``: weights
    to begin from (restricted to each row's mask), such as the median of a superset.
    ``mass``: per point, its weight in the median (the minimiser of ``sum_k mass_k ||x - x_k||``;
    default 1 each)."""
    G = G.double()
    masks = masks.bool()
    m = torch.ones(G.shape[0], dtype=torch.float64) if mass is None else mass.double()
    mass_in = masks.double() * m  # a point's mass in its row's median, 0 outside the row
    W = mass_in if start is None else torch.where(masks, start.double().expand_as(masks), 0.0)
    W = W / W.sum(1, keepdim=True)
    eps = 1e-12 * (float(G.diagonal().clamp_min(0).sqrt().max()) or 1.0)
    # The loop runs in NumPy: a few dozen iterations of a dozen operations on K x K
    # matrices for every module, where torch's fixed cost per call is most of the time
    # (NumPy's matrix product may round differently in the last bit: far below the 1e-10
    # at which a row stops).
    return torch.from_numpy(_weiszfeld(G.cpu().numpy(), mass_in.cpu().numpy(), W.cpu().numpy().copy(), eps)).to(G)


def _weiszfeld(G: np.ndarray, mass_in: np.ndarray, W: np.ndarray, eps: float) -> np.ndarray:
    """:func:`centre_weights`' iterations from the weights ``W`` (changed in place)."""
    diag = np.diagonal(G)[None, :]
    active = np.ones(W.shape[0], dtype=bool)
    rows: np.ndarray | None = None  # None: every row still moves (no gather or scatter needed)
    for _ in range(WEISZFELD_ITERATIONS):
        current = W if rows is None else W[rows]
        GW = current @ G  # :func:`combination_distances`, inlined
        d = np.sqrt(np.maximum(diag - 2 * GW + (GW * current).sum(1, keepdims=True), 0.0))
        inv = (mass_in if rows is None else mass_in[rows]) / np.maximum(d, eps)
        new = inv / inv.sum(1, keepdims=True)
        done = np.abs(new - current).max(1) < 1e-10
        if rows is None:
            W = new
            active = ~done
        else:
            W[rows] = new
            active[rows[done]] = False
        moving = int(active.sum())
        if not moving:
            break
        rows = None if moving == active.size else np.flatnonzero(active)
    return W


def batched_centre_cosines(C: np.ndarray, fit_on: np.ndarray, rep: np.ndarray, mass: np.ndarray) -> np.ndarray:
    """:func:`centre_cosines` for a batch of modules with the same number of members, each
    member's centre fitted without the member it copies (``rep``; itself if none), as
    rule 1's per-module cosines are: ``C`` (B, K, K) cosine matrices, ``fit_on`` (B, K) who
    shapes the centres, ``rep`` (B, K), ``mass`` (B, K) each point's weight; (B, K) cosines,
    NaN where undefined. One Weiszfeld loop for a chunk of modules: the verdict refits every
    module's centres in a few operations (thousands of expert modules), with at most about
    ``CHUNK_ENTRIES`` values in each of the loop's (chunk, K, K) temporaries, so memory stays
    bounded whatever the number of modules (each module's rows are computed as in one batch,
    bit for bit). Equal to :func:`centre_cosines` module by module up to the last bits of rounding."""
    B, K, _ = C.shape
    step = max(1, CHUNK_ENTRIES // max(K * K, 1))
    if step < B:
        return np.concatenate(
            [
                batched_centre_cosines(C[b : b + step], fit_on[b : b + step], rep[b : b + step], mass[b : b + step])
                for b in range(0, B, step)
            ]
        )
    norms = np.sqrt(np.maximum(np.diagonal(C, axis1=1, axis2=2), 0.0))
    fit_on = fit_on & (norms > 0)
    masks = fit_on[:, None, :] & (np.arange(K)[None, None, :] != rep[:, :, None])  # (B, K rows, K points)
    eps = 1e-12 * np.where(norms.max(1) > 0, norms.max(1), 1.0)
    whole = _batched_weiszfeld(C, fit_on[:, None, :] * mass[:, None, :], eps)  # the median of all of fit_on
    start = np.where(masks, whole, 0.0)
    W = _batched_weiszfeld(C, masks * mass[:, None, :], eps, start)
    WC = W @ C
    centre_sq = (WC * W).sum(-1)
    cos = np.diagonal(WC, axis1=1, axis2=2) / (np.sqrt(np.maximum(centre_sq, 1e-300)) * np.maximum(norms, 1e-300))
    ok = masks.any(-1) & (centre_sq > 0) & (norms > 0)
    return np.where(ok, cos, np.nan)


def _batched_weiszfeld(
    G: np.ndarray, mass_in: np.ndarray, eps: np.ndarray, start: np.ndarray | None = None
) -> np.ndarray:
    """Weiszfeld's weights for every row of every module (``G`` (B, K, K), ``mass_in`` (B, P, K):
    each point's mass in the row's median, 0 outside its row), as :func:`_weiszfeld` iterates
    them; a row stops moving once it has converged; a row without points stays 0."""
    has = mass_in.sum(-1, keepdims=True) > 0
    W = mass_in.copy() if start is None else start.copy()
    total = W.sum(-1, keepdims=True)
    W = np.divide(W, total, out=np.zeros_like(W), where=total > 0)
    diag = np.diagonal(G, axis1=1, axis2=2)[:, None, :]
    active = has[..., 0].copy()
    for _ in range(WEISZFELD_ITERATIONS):
        if not active.any():
            break
        GW = W @ G
        d = np.sqrt(np.maximum(diag - 2 * GW + (GW * W).sum(-1, keepdims=True), 0.0))
        inv = mass_in / np.maximum(d, eps[:, None, None])
        norm = inv.sum(-1, keepdims=True)
        new = np.divide(inv, norm, out=np.zeros_like(inv), where=norm > 0)
        done = np.abs(new - W).max(-1) < 1e-10
        W = np.where(active[..., None], new, W)
        active &= ~done
    return W


def unit_centre_distances(Gx: torch.Tensor, norms: torch.Tensor, fit_on: torch.Tensor) -> torch.Tensor | None:
    """Rule 4's statistic: each in-subspace component over its update's norm (directions only;
    magnitudes are rule 3's), its distance from the geometric median of those in ``fit_on``.
    None when no adapter with a non-zero update is in ``fit_on``."""
    fit_on = fit_on & (norms > 0)
    if not bool(fit_on.any()):
        return None
    inv = torch.where(norms > 0, 1 / norms.clamp_min(1e-300), torch.zeros_like(norms))
    return centre_distances(inv[:, None] * Gx * inv[None, :], fit_on)[0]


def direction_cosines(
    C: torch.Tensor,
    fit_on: torch.Tensor,
    groups: Mapping[int, Sequence[int]] | None = None,
    mass: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rule 1's raw statistic (its floor): each adapter's cosine with the geometric median of the *others*.

    ``C`` is the Gram matrix of the adapters' updates with every module scaled to unit norm
    (the sum over modules of their cosine matrices), so each module counts once whatever its
    scale. Adapter k's centre is fitted on ``fit_on`` without k and without ``groups[k]`` (its
    copies and coordinated group), so nothing that shares its update shapes what it is
    measured against; ``mass`` weighs the points of the median (a coordinated group's members
    ``1 / |group|`` each: the group counts as one adapter). NaN for an adapter with a zero
    update or an empty centre.
    """
    groups = groups or {}
    return centre_cosines(C, fit_on, {k: groups.get(k, [k]) for k in range(C.shape[0])}, mass)


def direction_pairs(
    C: torch.Tensor,
    fit_on: torch.Tensor,
    groups: Mapping[int, Sequence[int]] | None = None,
    mass: torch.Tensor | None = None,
) -> torch.Tensor:
    """``D[k, j]``: adapter j's cosine with the geometric median of ``fit_on`` without j, k and
    their copies (NaN on the diagonal): the others' statistic of rule 1 with k taken out of
    their centres too. In a pool of five, one adapter is a quarter of each other adapter's
    centre: a sign-flipped one drags every honest cosine towards zero and makes the pool look
    as if it agreed on no direction. ``K^2`` Weiszfeld fits: for small pools."""
    group_of = groups or {}
    K = C.shape[0]
    out = torch.full((K, K), float("nan"), dtype=torch.float64)
    for k in range(K):
        gk = set(group_of.get(k, [k]))
        leave = {j: sorted(gk | set(group_of.get(j, [j]))) for j in range(K) if j not in gk}
        row = centre_cosines(C, fit_on, leave, mass)
        out[k, list(leave)] = row[list(leave)]
    return out


class DirectionCentres:
    """Rule 1's raw statistics (:func:`direction_cosines` and, in small pools,
    :func:`direction_pairs`) with the centres fitted without a given set of adapters.

    The verdict's later passes judge every adapter against the centre of the adapters the
    previous pass let through: a flagged set that pulls the centre against one honest client
    (a sign-flipped copy of its update, say) would otherwise get that client flagged too.
    Computed in ``order`` (a canonical order of the adapters, so the last bits do not depend
    on the order of the sources) and returned in the adapters' own; cached per set.

    Args:
        C: the unit-module Gram matrix (:func:`direction_cosines`), in the adapters' order
            (rule 15: the whole updates' Gram matrix).
        fit_on: who may shape a centre at all.
        order: the canonical order.
        groups: per adapter, what its centres leave out with it (its copies and group).
        mass: per adapter, its weight in the median.
        pairs: compute :func:`direction_pairs` too (small pools).
        peel: fit the centres on :func:`peeled` ``fit_on`` only, each point weighed by its
            :func:`agreement_masses` among them as well (rule 15).
    """

    def __init__(
        self,
        C: torch.Tensor,
        fit_on: torch.Tensor,
        order: Sequence[int],
        groups: Mapping[int, Sequence[int]],
        mass: torch.Tensor,
        pairs: bool,
        peel: bool = False,
    ) -> None:
        self._perm = torch.tensor(list(order), dtype=torch.long)
        where = {k: p for p, k in enumerate(order)}
        self._back = torch.tensor([where[k] for k in range(len(order))], dtype=torch.long)
        self._C = C[self._perm[:, None], self._perm[None, :]].double()
        self._fit_on = fit_on[self._perm]
        self._groups = {where[k]: [where[j] for j in v] for k, v in groups.items()}
        self._mass = mass[self._perm].double()
        self._pairs = pairs
        self._peel = peel
        self.population: frozenset[int] = frozenset()  # rule 15: a second population (the rule is off)
        if peel:
            whole = self._fit_on.clone()
            self._fit_on = peeled(self._C, whole, self._mass)
            second = second_population(self._C, whole & ~self._fit_on, self._fit_on)
            self.population = frozenset(int(self._perm[p]) for p in second)
        self._cache: dict[frozenset[int], tuple[torch.Tensor, torch.Tensor | None]] = {}

    def __call__(self, without: frozenset[int] = frozenset()) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(cosines, pairs or None) with every centre fitted without ``without``."""
        if without not in self._cache:
            fit_on = self._fit_on.clone()
            if without:
                fit_on[self._back[sorted(without)]] = False
            back = self._back
            mass = self._mass
            if self._peel:
                mass = mass * agreement_masses(cosine_from_gram(self._C), fit_on)
            cos = direction_cosines(self._C.clone(), fit_on, self._groups, mass)[back]
            pairs = None
            if self._pairs:
                pairs = direction_pairs(self._C.clone(), fit_on, self._groups, mass)[back[:, None], back[None, :]]
            self._cache[without] = (cos, pairs)
        return self._cache[without]


def combination_cosines(G: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """Every point's cosine with ``sum_j w_j x_j``, from the points' Gram matrix ``G`` (float64);
    None where that combination is zero."""
    centre = float(w @ G @ w)
    if centre <= 0:
        return None
    return (G @ w) / (G.diagonal().clamp_min(0).sqrt().clamp_min(1e-300) * math.sqrt(centre))


PEEL_KEEP = 2 / 3  # rule 15's centre: the two thirds of the pool that agree with it most


def peeled(G: torch.Tensor, fit_on: torch.Tensor, mass: torch.Tensor | None = None) -> torch.Tensor:
    """The adapters of ``fit_on`` that rule 15's centre is fitted on: ``fit_on`` less those least
    aligned with the centre, down to ``PEEL_KEEP`` of it (at least 3).

    Each step fits the geometric median of the current set (its points weighed by ``mass``
    times their :func:`agreement_masses` among the set), and drops the members with the lowest
    cosine with it: half of the excess, at least one (a few steps at any pool size).
    A third of the pool that carries nothing along the others' direction (free riders at full
    norm, made of the honest updates' differences) drags a centre fitted on everyone towards
    zero and, through the honest updates it subtracts, against chosen honest clients; each
    step leaves the least aligned out, and the honest clients it had dragged down recover in
    the next. Nothing is flagged here: the adapters left out are measured against the centre
    like everyone else. ``G``: the whole updates' Gram matrix.
    """
    G = G.double()
    norms = G.diagonal().clamp_min(0).sqrt()
    cosine = cosine_from_gram(G)
    base = torch.ones(G.shape[0], dtype=torch.float64) if mass is None else mass.double()
    keep_set = fit_on.clone() & (norms > 0)
    keep = max(3, math.ceil(PEEL_KEEP * int(keep_set.sum())))
    while int(keep_set.sum()) > keep:
        w = centre_weights(G, keep_set[None, :], mass=base * agreement_masses(cosine, keep_set))[0]
        cos = combination_cosines(G, w)
        if cos is None:
            break
        members = torch.nonzero(keep_set, as_tuple=True)[0]
        drop = max(1, math.ceil((len(members) - keep) / 2))
        order = sorted(members.tolist(), key=lambda k: (float(cos[k]), k))
        keep_set[order[:drop]] = False
    return keep_set


POPULATION_AGREEMENT = 0.1  # the left-out set's typical cosine with its own centre, at least
POPULATION_AGAINST = -0.1  # its centre's cosine with every kept adapter, at least
POPULATION_IN_SPAN = 0.3  # the share of a typical member's squared norm in the kept adapters' span, at most


def second_population(G: torch.Tensor, left_out: torch.Tensor, kept: torch.Tensor) -> list[int]:
    """The adapters :func:`peeled` left out, where they are a population of their own: they agree
    with each other (the median of each one's cosine with the geometric median of the others is at
    least ``POPULATION_AGREEMENT``) and their centre points against none of the kept adapters (its
    cosine with each is at least ``POPULATION_AGAINST``). Else none.

    Honest adapters of another task or another population (a third of a pool of two tasks) agree
    with each other and are orthogonal to the rest; the peel leaves them out, and the centre of the
    rest would have rule 15 flag them all (an outside review: 25 honest flags in 15 draws of five
    clients of one task beside nine of another, none without rule 15). Free riders made of the
    honest updates' differences subtract some honest clients: their centre points against those
    (cosine -0.19 to -0.59 on the trained pools, where the two-task pools' stay within +-0.05),
    or, sent in opposite pairs, they do not agree with each other. ``G``: the whole updates' Gram
    matrix; ``left_out``, ``kept``: masks.

    A population of its own is also not made of the kept adapters: the typical member (the
    upper median) has at most ``POPULATION_IN_SPAN`` of its squared norm in the span of the kept
    adapters' updates (:func:`span_shares`). Another task's honest adapters have 0.002-0.12 there
    on the trained pools, the least aligned third of an honest pool 0.03-0.15; an adaptive
    search (``benchmarks/adaptive_search.py``) found free riders that pass as a population
    with 0.44-0.77: each a copy of one honest client's deviation from the honest mean (which
    keeps it in the honest subspace), a small shared direction (which makes them agree with
    each other) and noise, at a cosine of 0.1 with the honest mean; a third of a trained pool
    of them took the merge from 0.761 to 0.491, none flagged. Refused as a population, they are
    judged by rule 15: caught on revsucc seed 2, while on seed 0 the same point still passes
    (0.491-0.640), where the rule's calibrated cut lies under their cosine."""
    G = G.double()
    out = torch.nonzero(left_out & (G.diagonal() > 0), as_tuple=True)[0].tolist()
    inside = torch.nonzero(kept, as_tuple=True)[0].tolist()
    if len(out) < 2 or not inside:
        return []
    mask = torch.zeros(G.shape[0], dtype=torch.bool)
    mask[out] = True
    own = centre_cosines(G, mask, {k: [k] for k in out})[out]
    if not bool(torch.isfinite(own).all()) or float(own.median()) < POPULATION_AGREEMENT:
        return []
    against = combination_cosines(G, centre_weights(G, mask[None, :])[0])
    if against is None:
        return []
    if float(against[inside].min()) < POPULATION_AGAINST:
        return []
    # The upper median: torch's median of an even count is the lower middle value, so half the
    # set as decoys of no share in the span (noise and the shared direction) carried the other
    # half, copies of honest deviations, past the test.
    shares = span_shares(G, out, inside).sort().values
    return out if float(shares[len(out) // 2]) <= POPULATION_IN_SPAN else []


def span_shares(G: torch.Tensor, points: list[int], basis: list[int], rcond: float = 1e-10) -> torch.Tensor:
    """Per point of ``points``, the share of its squared norm that lies in the span of the
    ``basis`` points (``g^T G_BB^+ g / G_kk``, from the Gram matrix ``G`` alone: directions of
    ``G_BB`` under ``rcond`` of its largest eigenvalue left out)."""
    G = G.double()
    evals, evecs = torch.linalg.eigh(G[basis][:, basis])
    keep = evals > rcond * float(evals.max().clamp_min(0))
    if not bool(keep.any()):
        return torch.zeros(len(points), dtype=torch.float64)
    proj = (evecs[:, keep].T @ G[basis][:, points]) / evals[keep].sqrt()[:, None]  # coordinates in the span
    return (proj**2).sum(0) / G.diagonal()[points].clamp_min(1e-300)


AGREEMENT_MIN_POOL = 6  # below, the pool's typical cosine is too noisy to weigh agreement by


def agreement_masses(cosine: torch.Tensor, fit_on: torch.Tensor) -> torch.Tensor:
    """Per adapter, its weight in a centre that counts agreement beyond the pool's typical
    level softly: ``1 / (1 + sum_j e_kj)`` over the others j in ``fit_on``, with
    ``e_kj = max(0, c_kj - t) / (1 - t)`` and ``t`` the median cosine of the pairs of
    ``fit_on``. An adapter as close to the others as the pool typically is keeps weight
    about 1; a set of ``g`` that agrees far more closely than that weighs
    ``g / (1 + (g - 1) e)`` together: one adapter's weight for copies (``e = 1``), about 2.4
    for six at cosine 0.4 where the pool agrees at 0.14 (a coordinated group spread just
    enough not to be found as one), whatever its size beyond that. 1 for every adapter
    outside ``fit_on`` or in pools smaller than ``AGREEMENT_MIN_POOL``.
    """
    # In NumPy: a few operations on a K x K matrix, once per module.
    C = cosine.detach().double().cpu().numpy()
    idx = np.flatnonzero(fit_on.cpu().numpy())
    mass = np.ones(C.shape[0])
    n = idx.size
    if n >= AGREEMENT_MIN_POOL:
        sub = C[np.ix_(idx, idx)]
        off = ~np.eye(n, dtype=bool)
        t = float(np.median(sub[off]))  # the mean of the middle two for an even count, as ``median``
        if t < 1:
            excess = np.where(off, np.clip(sub - t, 0.0, None), 0.0) / (1 - t)
            mass[idx] = 1 / (1 + excess.sum(1))
    return torch.from_numpy(mass)


def centre_cosines(
    C: torch.Tensor,
    fit_on: torch.Tensor,
    leave_out: Mapping[int, Sequence[int]] | None = None,
    mass: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each adapter's cosine with the geometric median of the unit updates in ``fit_on``.

    ``C`` is a cosine (or unit-update Gram) matrix. For an adapter k in ``leave_out`` the
    centre is fitted without ``leave_out[k]`` (the references of a gate, which would otherwise
    be measured against a centre they shaped; every adapter, and its copies, for rule 1).
    ``mass``: per adapter, its weight in the median (:func:`centre_weights`). NaN for a zero
    update or an empty centre.
    """
    C = C.double()
    norms = C.diagonal().clamp_min(0).sqrt()
    fit_on = fit_on & (norms > 0)
    leave_out = leave_out or {}
    out = torch.full((C.shape[0],), float("nan"), dtype=torch.float64)
    K = C.shape[0]
    left = list(leave_out)
    plain = [k for k in range(K) if k not in leave_out]
    masks = [fit_on] if plain else []  # one centre for everyone else, one per adapter left out
    for k in left:
        mask = fit_on.clone()
        mask[list(leave_out[k])] = False
        masks.append(mask)
    if not masks:
        return out
    M = torch.stack(masks)
    W = torch.zeros(M.shape, dtype=torch.float64)
    fitted = M.any(1)
    if bool(fitted.any()):
        # From the median of all of fit_on (every row's points lie in it, with positive
        # weight): leaving one point out moves it by O(1/K).
        W[fitted] = centre_weights(C, M[fitted], centre_weights(C, fit_on[None, :], mass=mass)[0], mass)
    WC = W @ C
    centre_sq = (WC * W).sum(1)
    cos = WC / (centre_sq.clamp_min(1e-300).sqrt()[:, None] * norms.clamp_min(1e-300)[None, :])
    owner = torch.zeros(K, dtype=torch.long)  # the row of M each adapter is measured against
    owner[left] = torch.arange(len(masks) - len(left), len(masks))
    ok = (fitted & (centre_sq > 0))[owner] & (norms > 0)
    return torch.where(ok, cos[owner, torch.arange(K)], out)
