"""Thresholds with a stated false-flag rate on small pools (docs/engine.md, section 5).

Every rule of the verdict compares an adapter's statistic ``x`` with the same statistic of
the *other* adapters (leave-one-out; in ``clair gate``, of the references): it is flagged when

    x > median(others) + max(c(n, alpha) * sigma(others), floor)

with ``sigma`` Rousseeuw and Croux's Qn (:func:`qn_scale`: a quantile of the pairwise
distances, robust to half the values being anywhere, and with 82 % of the standard
deviation's efficiency against the MAD's 37 %). On a pool of a dozen adapters the median and
the spread are themselves noisy, so the normal quantile ``z(1 - alpha)`` would flag far more
than ``alpha`` of honest adapters. The critical
value ``c(n, alpha)`` is chosen so that, when the ``n`` others and the new adapter are
independent draws of one Gaussian, the flag has probability exactly ``alpha``
(:func:`critical_value`). It is computed, not tabulated: for ``N`` simulated sets of ``n``
values, the tail probability of the new value given the set is known in closed form,
``P(x > m + c s | m, s) = Phi(-(m + c s))``, so

    alpha(c) = mean_i Phi(-(m_i + c s_i))

is smooth and decreasing in ``c`` and is solved by bisection. This averaging (rather than
counting simulated exceedances) makes tail probabilities of 1e-5 as cheap as 1e-2. Above
``LARGE_N`` values the median and Qn are close to independent Gaussians (Qn's mean
``(n + 1.4) / n`` for odd ``n``, ``(n + 3.8) / n`` for even, Croux and Rousseeuw 1992; variances
``pi / 2n`` and ``0.6077 / n``), and the same tail is ``Phi(-c mu / sqrt(1 + v_m + c^2 v_s))``
in closed form: simulating Qn of thousands of values would cost O(n^2) a set.
``floor`` is a minimum effect size in the statistic's own units: honest pools whose
adapters are numerically identical (MAD near 0) are never split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from clair_cli.core.decompose import median

SIMULATED_SETS = 20_000  # at most; fewer for large n, where the median and Qn vary less
SIMULATED_PAIRS = 4_000_000  # pairwise distances simulated in all (at least 2,000 sets)
QN_TO_SIGMA = 2.2219  # Qn's consistency constant for Gaussian data (large n)
LARGE_N = 100  # above: the Gaussian approximation of the median and Qn, in closed form
QN_VARIANCE = 0.6077  # n Var(Qn) / sigma^2 for Gaussian data (82.27 % efficiency)
SMALL_POOL_N = 11  # below: the critical value is capped at this many values' (see rule_critical_value)


def qn_scale(x: torch.Tensor) -> torch.Tensor:
    """Qn over the last dimension: ``2.2219`` times the ``C(h, 2)``-th smallest pairwise
    distance, ``h = n // 2 + 1`` (Rousseeuw and Croux 1993). O(n^2), for pools of adapters."""
    n = x.shape[-1]
    i, j = torch.triu_indices(n, n, 1)
    pairs = (x[..., i] - x[..., j]).abs()
    h = n // 2 + 1
    return QN_TO_SIGMA * pairs.kthvalue(h * (h - 1) // 2, dim=-1).values


NORMAL = "normal"
LOG_CHI2 = "log_chi2"  # the log of a chi-square with one degree of freedom: a squared Gaussian's scale


def _draw(law: str, shape: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    return x if law == NORMAL else torch.log(x * x)


def _upper_tail(law: str, t: torch.Tensor) -> torch.Tensor:
    """``P(X > t)`` for one draw of the law, elementwise."""
    if law == NORMAL:
        return torch.special.ndtr(-t)
    return torch.special.erfc(torch.sqrt(0.5 * torch.exp(t)))  # P(chi2_1 > e^t)


@lru_cache(maxsize=64)
def _simulated(n: int, law: str = NORMAL) -> tuple[torch.Tensor, torch.Tensor]:
    """Median and Qn of simulated sets of ``n`` values of the law (fixed generator)."""
    g = torch.Generator().manual_seed(n)
    pairs = n * (n - 1) // 2
    n_sets = max(2_000, min(SIMULATED_SETS, SIMULATED_PAIRS // pairs))
    chunk = max(1, SIMULATED_PAIRS // (4 * pairs))  # bounded memory
    ms, ss = [], []
    for start in range(0, n_sets, chunk):
        x = _draw(law, (min(chunk, n_sets - start), n), g)
        ms.append(x.quantile(0.5, dim=1))
        ss.append(qn_scale(x))
    return torch.cat(ms), torch.cat(ss)


@lru_cache(maxsize=256)
def critical_value(n: int, alpha: float, law: str = NORMAL) -> float:
    """``c`` with ``P(x > median + c * Qn) = alpha`` for ``n`` + 1 independent draws of the law.

    ``law``: ``"normal"`` (a Gaussian, any location and scale), or ``"log_chi2"``: the log of a
    scaled chi-square with one degree of freedom, ``log(sigma^2 Z^2)``, which is what the log
    of a squared Gaussian projection is. Its right tail is much shorter than a Gaussian's
    with the same median and Qn, so the normal law would be very conservative for it. Above
    ``LARGE_N`` values the log-chi-square law uses the critical value for ``LARGE_N``
    (conservative: ``c`` falls with ``n``), as simulating Qn of thousands of values costs
    O(n^2) a set. Deterministic (a fixed generator). ``n`` below 3 has no usable spread: ``inf``.
    """
    if n < 3:
        return math.inf
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha must lie in (0, 0.5), got {alpha}")
    if law not in (NORMAL, LOG_CHI2):
        raise ValueError(f"unknown law {law!r}")
    if law == LOG_CHI2 and n > LARGE_N:
        return critical_value(LARGE_N, alpha, law)
    if n > LARGE_N:
        mu = (n + (1.4 if n % 2 else 3.8)) / n

        def tail(c: float) -> float:
            return 0.5 * math.erfc(c * mu / math.sqrt(2 * (1 + (math.pi / 2 + c * c * QN_VARIANCE) / n)))

    else:
        m, s = _simulated(n, law)

        def tail(c: float) -> float:
            return float(_upper_tail(law, m + c * s).mean())

    lo, hi = 0.0, 1.0
    while tail(hi) > alpha:
        hi *= 2
        if hi > 1e6:
            return math.inf
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if tail(mid) > alpha else (lo, mid)
    return hi


def rule_critical_value(n: int, alpha: float, law: str = NORMAL) -> float:
    """The critical value of the rules with a real floor (norm, direction): ``c(n, alpha)``,
    capped at ``c(SMALL_POOL_N, alpha)``.

    Below a dozen values the median and Qn are so noisy that the exact ``c`` explodes
    (``c(4, 1e-3) = 13``, ``c(5, 1e-3) = 20``, ``c(2) = inf``): calibrated that way, a rule
    at five or six adapters cannot flag even a tenfold update. A round of five clients
    does not tell an honest spread of norms from a boosted update by its own numbers
    alone; it needs one assumption, and this is the one made: the honest spread in a small
    pool is taken to be as well measured as in a pool of ``SMALL_POOL_N + 1``. The honest
    flag rate under the Gaussian model then exceeds ``alpha`` (``honest_flag_rate`` gives
    it; the documentation tabulates it), and every rule's floor (a minimum effect size in
    its own units: 4x the norm, a drop of the cosine by 0.6 of the typical one, ...) bounds
    what a tight honest pool can trip.
    """
    c = critical_value(n, alpha, law)
    return c if n >= SMALL_POOL_N else min(c, critical_value(SMALL_POOL_N, alpha, law))


def honest_flag_rate(n: int, c: float, law: str = NORMAL) -> float:
    """``P(x > median + c * Qn)`` for ``n`` + 1 independent draws of ``law`` (no floor)."""
    if n < 3:
        return 1.0
    m, s = _simulated(n, law)
    return float(_upper_tail(law, m + c * s).mean())


@dataclass(frozen=True)
class Cut:
    """One rule's threshold: flag above ``centre + width``."""

    centre: float
    width: float

    @property
    def value(self) -> float:
        return self.centre + self.width

    def margin(self, x: float) -> float:
        """How far past the threshold, in units of ``width``: above 1 is flagged."""
        return (x - self.centre) / self.width if self.width > 0 else (math.inf if x > self.centre else 0.0)


def upper_cut(
    basis: torch.Tensor, alpha: float, floor: float, relative: float = 0.0, law: str = NORMAL, capped: bool = False
) -> Cut | None:
    """Threshold for a value independent of ``basis`` (the others' values); None below 3 values.

    The width is at least ``floor`` and at least ``relative`` times the centre's magnitude.
    ``capped``: the critical value of :func:`rule_critical_value` (small pools), for rules
    whose floor is a real effect size; else the exact ``c(n, alpha)``.
    """
    basis = basis[torch.isfinite(basis)]
    if basis.numel() < 3:
        return None
    centre = median(basis)
    sigma = float(qn_scale(basis.double()))
    c = (rule_critical_value if capped else critical_value)(int(basis.numel()), alpha, law)
    return Cut(centre, max(c * sigma, floor, relative * abs(centre)))


def leave_one_out_cuts(
    values: torch.Tensor,
    basis: torch.Tensor,
    alpha: float,
    floor: float,
    relative: float = 0.0,
    law: str = NORMAL,
    capped: bool = False,
) -> list[Cut | None]:
    """For every adapter, :func:`upper_cut` on the values in ``basis`` (a mask) other than its
    own, computed together: one sort and one batch of pairwise distances instead of one per
    adapter (the same numbers; ``tests/test_calibration.py`` checks them against the loop).
    """
    K = values.numel()
    idx = torch.nonzero(basis & torch.isfinite(values), as_tuple=True)[0]
    x = values[idx].double()
    n = x.numel()
    shared = upper_cut(x, alpha, floor, relative, law, capped)  # for adapters outside the basis
    out: list[Cut | None] = [shared] * K
    if n < 4:  # leaving one out leaves fewer than 3
        for k in idx.tolist():
            out[k] = None
        return out
    m = n - 1
    # Medians without each member: the sorted values without its position q.
    xs, order = torch.sort(x)
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n)
    lo_i, hi_i = (m - 1) // 2, m // 2  # the middle one or two of m sorted values

    def without(i: int) -> torch.Tensor:  # the i-th smallest remaining value, for each member
        return torch.where(rank > i, xs[i], xs[min(i + 1, n - 1)])

    centres = 0.5 * (without(lo_i) + without(hi_i))
    spreads = QN_TO_SIGMA * _kth_distance_without_each(x, (m // 2 + 1) * (m // 2) // 2)
    c = (rule_critical_value if capped else critical_value)(m, alpha, law)
    for k, centre, spread in zip(idx.tolist(), centres.tolist(), spreads.tolist(), strict=True):
        out[k] = Cut(centre, max(c * spread, floor, relative * abs(centre)))
    return out


def _kth_distance_without_each(x: torch.Tensor, t: int) -> torch.Tensor:
    """For each member k, the ``t``-th smallest pairwise distance among the others: O(n^2).

    In the sorted list of all pairwise distances, member k's answer is the ``t``-th entry not
    involving k. At most ``n - 1`` entries involve k, so it lies among the ``n`` entries from
    position ``t - 1`` on; how many entries before that window involve k is one count.
    """
    n = x.numel()
    i, j = torch.triu_indices(n, n, 1)
    dist, order = torch.sort((x[i] - x[j]).abs())
    i, j = i[order], j[order]
    before = torch.bincount(torch.cat([i[: t - 1], j[: t - 1]]), minlength=n)  # involve k, before the window
    window = torch.arange(t - 1, min(t - 1 + n, dist.numel()))
    out = torch.empty(n, dtype=x.dtype)
    members = torch.arange(n)
    for start in range(0, n, 1024):  # bounded memory: at most 1024 x n flags at a time
        k = members[start : start + 1024, None]
        free = ~((i[window][None, :] == k) | (j[window][None, :] == k))
        count = (t - 1 - before[start : start + 1024, None]) + free.cumsum(1)  # not involving k, so far
        first = ((count >= t) & free).int().argmax(1)
        out[start : start + 1024] = dist[window][first]
    return out
