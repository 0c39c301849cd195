"""Robust aggregators and omniscient attacks on flattened update vectors (numpy, float64).

Used by benchmarks/attacks.py; every function takes an ``(n, d)`` array of client updates
(one row per client) and returns one ``(d,)`` vector. ``f`` is the number of Byzantine
clients the rule is told to tolerate. Re-implemented here (short) after the papers and the
reference implementations named in each docstring; the benchmark does not depend on Flower
or ByzFL.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

# -- aggregators ---------------------------------------------------------------------------


def mean(x: np.ndarray, f: int = 0) -> np.ndarray:
    return x.mean(0)


def median(x: np.ndarray, f: int = 0) -> np.ndarray:
    """Coordinate-wise median (Yin et al. 2018; Flower's ``FedMedian``: ``np.median`` per layer)."""
    return np.median(x, axis=0)


def trimmed_mean(x: np.ndarray, f: int = 0, beta: float = 0.2) -> np.ndarray:
    """Coordinate-wise trimmed mean (Yin et al. 2018; Flower's ``FedTrimmedAvg``, beta = 0.2:
    ``scipy.stats.trim_mean``, which cuts ``int(beta * n)`` values from each end)."""
    n = x.shape[0]
    cut = int(beta * n)
    s = np.sort(x, axis=0)
    return s[cut : n - cut].mean(0)


def _sq_distances(x: np.ndarray) -> np.ndarray:
    sq = (x * x).sum(1)
    d = sq[:, None] + sq[None, :] - 2 * x @ x.T
    np.fill_diagonal(d, 0.0)
    return np.maximum(d, 0.0)


def krum_scores(x: np.ndarray, f: int) -> np.ndarray:
    """Krum's score (Blanchard et al. 2017) as Flower's ``aggregate_krum``: per client, the sum of the
    squared distances to its ``max(1, n - f - 2)`` nearest other clients."""
    d = _sq_distances(x)
    k = max(1, x.shape[0] - f - 2)
    scores = np.empty(x.shape[0])
    for i in range(x.shape[0]):
        others = np.delete(d[i], i)
        scores[i] = np.sort(others)[:k].sum()
    return scores


def krum(x: np.ndarray, f: int) -> np.ndarray:
    """Krum: the update with the lowest score (ties: the first, as ``np.argmin``)."""
    return x[int(np.argmin(krum_scores(x, f)))].copy()


def multi_krum(x: np.ndarray, f: int, m: int | None = None) -> np.ndarray:
    """Multi-Krum: the mean of the ``m`` (default ``n - f``) lowest-score updates (Flower's ``to_keep``)."""
    m = x.shape[0] - f if m is None else m
    keep = np.argsort(krum_scores(x, f), kind="stable")[:m]
    return x[keep].mean(0)


def bulyan_f(n: int, f: int) -> int:
    """The ``f`` Bulyan runs with: the one asked for, or at most ``(n - 3) // 4`` (it needs ``n >= 4 f + 3``)."""
    return min(f, (n - 3) // 4)


def bulyan(x: np.ndarray, f: int) -> np.ndarray:
    """Bulyan (El Mhamdi et al. 2018; Flower's ``aggregate_bulyan`` with Krum): select ``theta = n - 2 f``
    updates by Krum run repeatedly on the remaining ones, then per coordinate average the
    ``beta = theta - 2 f`` selected values closest to their median. Needs ``n >= 4 f + 3``: with
    more attackers than that, ``f`` is lowered to ``bulyan_f(n, f)`` (Flower refuses instead)."""
    n = x.shape[0]
    f = bulyan_f(n, f)
    theta = n - 2 * f
    remaining = list(range(n))
    selected: list[int] = []
    while len(selected) < theta:
        sub = x[remaining]
        i = int(np.argmin(krum_scores(sub, f))) if len(remaining) > 1 else 0
        selected.append(remaining.pop(i))
    s = x[selected]
    beta = theta - 2 * f
    med = np.median(s, axis=0)
    order = np.argsort(np.abs(s - med), axis=0, kind="stable")[:beta]
    return np.take_along_axis(s, order, axis=0).mean(0)


def centered_clipping(
    x: np.ndarray, f: int = 0, tau: float | None = None, iters: int = 3, start: np.ndarray | None = None
) -> np.ndarray:
    """Centred clipping (Karimireddy, He & Jaggi 2021; ByzFL's ``CenteredClipping``):
    ``v <- v + mean_i clip_tau(x_i - v)`` repeated ``iters`` times. With no previous round to start
    from, ``v`` starts at the coordinate-wise median (ByzFL starts at zero, i.e. the previous
    global model); ``tau`` defaults to the median distance of the clients to that start (ByzFL's
    default ``tau = 100`` is an absolute value for gradients and would clip nothing here)."""
    v = np.median(x, axis=0) if start is None else start
    if tau is None:
        tau = float(np.median(np.linalg.norm(x - v, axis=1)))
    for _ in range(iters):
        diff = x - v
        norms = np.linalg.norm(diff, axis=1)
        factor = np.minimum(1.0, tau / np.maximum(norms, 1e-300))
        v = v + (diff * factor[:, None]).mean(0)
    return v


def geometric_median(x: np.ndarray, f: int = 0, nu: float = 1e-12, iters: int = 200, tol: float = 1e-8) -> np.ndarray:
    """Geometric median by smoothed Weiszfeld iterations (Pillutla et al. 2022's RFA; ByzFL's
    ``GeometricMedian`` runs the same update ``z <- sum_i x_i / max(nu, |x_i - z|) / sum_i 1 / max(nu, |x_i - z|)``
    from the mean); ``nu`` and the stopping tolerance are relative to the updates' scale here."""
    scale = float(np.median(np.linalg.norm(x, axis=1))) or 1.0
    z = x.mean(0)
    for _ in range(iters):
        w = 1.0 / np.maximum(np.linalg.norm(x - z, axis=1), nu * scale)
        z_new = (w[:, None] * x).sum(0) / w.sum()
        done = np.linalg.norm(z_new - z) <= tol * scale
        z = z_new
        if done:
            break
    return z


def nnm(x: np.ndarray, f: int) -> np.ndarray:
    """Nearest-neighbour mixing (Allouah et al. 2023; ByzFL's ``NNM``): every update is replaced by the
    mean of its ``n - f`` nearest updates (itself included); returns the mixed ``(n, d)`` array."""
    d = _sq_distances(x)
    k = x.shape[0] - f
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = x[np.argsort(d[i], kind="stable")[:k]].mean(0)
    return out


def nnm_mean(x: np.ndarray, f: int) -> np.ndarray:
    """NNM then the plain mean."""
    return nnm(x, f).mean(0)


AGGREGATORS = {
    "mean": mean,
    "median": median,
    "trimmed-mean": trimmed_mean,
    "krum": krum,
    "multi-krum": multi_krum,
    "bulyan": bulyan,
    "centered-clip": centered_clipping,
    "geomed": geometric_median,
    "nnm+mean": nnm_mean,
}


# -- attacks (omniscient: they see every honest update) -------------------------------------


def alie_z(n: int, f: int) -> float:
    """ALIE's z_max (Baruch et al. 2019): ``s = floor(n / 2 + 1) - f``, ``z = Phi^-1((n - s) / n)``."""
    s = math.floor(n / 2 + 1) - f
    return NormalDist().inv_cdf((n - s) / n)


def alie(honest: np.ndarray, z: float) -> np.ndarray:
    """A little is enough: ``mean - z * std`` per coordinate (population std, as ByzFL)."""
    return honest.mean(0) - z * honest.std(0)


def ipm(honest: np.ndarray, eps: float) -> np.ndarray:
    """Inner-product manipulation (Xie et al. 2020): ``-eps * mean``."""
    return -eps * honest.mean(0)


def perturbation(honest: np.ndarray, kind: str) -> np.ndarray:
    """Shejwalkar & Houmansadr 2021's perturbations: ``unit`` (-mean / |mean|) or ``std`` (-std)."""
    mu = honest.mean(0)
    if kind == "unit":
        return -mu / np.linalg.norm(mu)
    if kind == "std":
        return -honest.std(0)
    raise ValueError(kind)


def min_max_gamma(honest: np.ndarray, p: np.ndarray, kind: str = "max", hi: float = 50.0, tol: float = 1e-5) -> float:
    """The largest ``gamma`` such that ``mean + gamma p`` is no farther from the honest updates than
    they are from each other: its maximum distance within the honest maximum pairwise distance
    (``max``: Min-Max) or its sum of squared distances within the largest honest one (``sum``:
    Min-Sum). The papers' search (halving steps from ``gamma_init``), run here as a bisection."""
    d = _sq_distances(honest)
    bound = d.max() if kind == "max" else d.sum(1).max()
    mu = honest.mean(0)

    def ok(g: float) -> bool:
        dist = ((honest - (mu + g * p)) ** 2).sum(1)
        return (dist.max() if kind == "max" else dist.sum()) <= bound

    while ok(hi) and hi < 1e12:
        hi *= 2
    lo = 0.0
    while hi - lo > tol * max(1.0, hi):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def fang_trim(honest: np.ndarray, m: int, b: float, rng: np.random.Generator) -> np.ndarray:
    """Fang et al. 2020's full-knowledge attack on trimmed mean and median: per coordinate, against
    the honest direction ``s = sign(mean)``, each of the ``m`` attackers samples from
    ``[w_max, b w_max]`` (or ``[w_max / b, w_max]`` when ``w_max <= 0``) where ``s < 0``, and from
    ``[w_min / b, w_min]`` (or ``[b w_min, w_min]`` when ``w_min <= 0``) where ``s > 0``."""
    s = np.sign(honest.mean(0))
    w_max, w_min = honest.max(0), honest.min(0)
    lo = np.where(s < 0, np.where(w_max > 0, w_max, w_max / b), np.where(w_min > 0, w_min / b, b * w_min))
    hi = np.where(s < 0, np.where(w_max > 0, b * w_max, w_max), np.where(w_min > 0, w_min, w_min))
    u = rng.random((m, honest.shape[1]))
    return lo + u * (hi - lo)


def fang_krum_direction(honest: np.ndarray) -> np.ndarray:
    """Fang et al. 2020's attack on Krum crafts ``w_global - lambda s`` with ``s = sign`` of the honest
    change; with a zero global update the crafted update is ``lambda`` times this direction."""
    return -np.sign(honest.mean(0))
