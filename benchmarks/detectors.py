"""Baseline contamination detectors from the robust-aggregation literature, on dense LoRA updates.

Each detector takes the pool's updates as a ``K x d`` float64 matrix (row k: adapter k's full
LoRA update, ``Theta_m = scale_m * B_m @ A_m`` flattened and concatenated over the modules
``m``; see ``load_updates``) and returns a ``Detection``: the flagged row indices and, where
the method has one, a continuous suspicion score (higher = more suspicious) for
threshold-free comparisons. The parameters are the papers' defaults; where a paper assumes a
known number of attackers the choice made here is stated. Nothing is tuned to the pools.

- ``multi_krum``: Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant
  Gradient Descent", NeurIPS 2017.
- ``flame``: Nguyen et al., "FLAME: Taming Backdoors in Federated Learning", USENIX Security
  2022 (its filtering step: HDBSCAN on cosine distances).
- ``dnc``: Shejwalkar & Houmansadr, "Manipulating the Byzantine: Optimizing Model Poisoning
  Attacks and Defenses for Federated Learning", NDSS 2021 (Divide-and-Conquer, Algorithm 2).
- ``foolsgold``: Fung, Yoon & Beschastnikh, "The Limitations of Federated Learning in Sybil
  Settings", RAID 2020 (FoolsGold, Algorithm 1).
- ``dnc_exact``: DnC's statistic without its subsampling, on the whole updates, each adapter
  scored on the leading direction of the others (a score, no rule of its own).
- ``norm_outlier``: the norm check of norm-clipping servers (e.g. Sun et al., "Can You Really
  Backdoor Federated Learning?", 2019): flag updates far above the median norm.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

DNC_B = 10_000  # coordinates per subsample (the paper's b)
DNC_NITERS = 5  # subsamples (the paper's niters)
DNC_C = 1.0  # filtering fraction (the paper's c)
DNC_ASSUMED_SHARE = 0.3  # assumed attacker share when the count is not given: m = floor(0.3 K)
NORM_FACTOR = 3.0  # norm outlier: norm > 3 x the median norm
FOOLSGOLD_KAPPA = 1.0  # confidence of FoolsGold's logit


@dataclass
class Detection:
    """Flagged adapter indices, an optional per-adapter suspicion score (higher = more suspicious)
    and method details for the raw results."""

    flagged: set[int]
    score: np.ndarray | None = None
    info: dict = field(default_factory=dict)


# -- loading -------------------------------------------------------------------------------


def load_updates(pool_dir: Path | str) -> tuple[list[str], list[str], np.ndarray]:
    """Adapter names, module names and the ``K x d`` matrix of dense updates (float64), read with
    clair's own loader (``open_adapters`` on the directory lists the adapter folders only; a
    ``base_model/`` folder without an adapter config is not an adapter)."""
    from clair_cli import pipeline
    from clair_cli.io.sources import open_adapters

    pool = pipeline.build_pool(open_adapters([str(pool_dir)]))
    blocks: list[list[np.ndarray]] = [[] for _ in pool.adapters]
    for mod in pipeline.iter_modules(pool, dtype=torch.float64):
        for j, k in enumerate(mod.members):
            theta = float(mod.scales[j]) * (mod.B[j].double() @ mod.A[j].double())
            blocks[k].append(theta.reshape(-1).numpy())
    X = np.stack([np.concatenate(b) for b in blocks])
    return pool.names, list(pool.modules), X


# -- helpers -------------------------------------------------------------------------------


def _sq_distances(X: np.ndarray) -> np.ndarray:
    G = X @ X.T
    sq = np.diag(G)
    return np.maximum(sq[:, None] + sq[None, :] - 2 * G, 0.0)


def _cosine(X: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(X, axis=1)
    unit = X / np.where(norms > 0, norms, 1.0)[:, None]
    return np.clip(unit @ unit.T, -1.0, 1.0)


# -- detectors -----------------------------------------------------------------------------


def default_byzantine(K: int) -> int:
    """The largest f Krum tolerates (K > 2f + 2): floor((K - 3) / 2)."""
    return max((K - 3) // 2, 0)


def multi_krum(X: np.ndarray, f: int | None = None) -> Detection:
    """Multi-Krum (Blanchard et al. 2017, Section 5): each update's Krum score is the sum of its
    squared Euclidean distances to its ``K - f - 2`` nearest other updates; the ``m = K - f``
    updates of lowest score are selected (one pass over the scores, as in the paper's
    definition) and the other ``f`` are flagged.

    Args:
        f: assumed number of Byzantine adapters; default ``floor((K - 3) / 2)``, the largest
            Krum tolerates (``K > 2f + 2``), as a server that does not know the count uses.
            The benchmark also runs it at the true contaminated count for reference.

    Score: the Krum score (ties in the selection go to the lower index).
    """
    K = X.shape[0]
    f = default_byzantine(K) if f is None else f
    if f < 0 or 2 * f + 2 >= K:
        raise ValueError(f"Krum needs K > 2f + 2, got K={K}, f={f}")
    D = _sq_distances(X)
    np.fill_diagonal(D, np.inf)
    n = K - f - 2
    scores = np.sort(D, axis=1)[:, :n].sum(axis=1)
    m = K - f
    selected = set(np.argsort(scores, kind="stable")[:m].tolist())
    return Detection(set(range(K)) - selected, scores, {"f": f, "m": m, "neighbours": n})


def flame(X: np.ndarray, min_samples: int = 2) -> Detection:
    """FLAME's filtering (Nguyen et al. 2022, Algorithm 1, lines 1-6): pairwise cosine distances
    ``1 - cos(Theta_i, Theta_j)`` between the updates, HDBSCAN on them with
    ``min_cluster_size = K // 2 + 1`` (so at most one cluster, the majority), a single cluster
    allowed; updates HDBSCAN labels as noise (outside that cluster) are flagged. FLAME's later
    steps (clipping to the median norm, adaptive noise) change the aggregate, not the verdict.

    FLAME clusters local models; a LoRA adapter *is* the local update on a shared base, so the
    updates are used (full weights would be dominated by the common base). HDBSCAN is
    scikit-learn's (>= 1.3). FLAME's reference setting is ``min_samples = 1`` in the
    scikit-learn-contrib ``hdbscan`` package, which does not count the point itself; scikit-learn
    counts it (its documentation: "must be 1 greater"), so the equivalent here is
    ``min_samples = 2`` (core distance = distance to the nearest other update). No score.
    """
    from sklearn.cluster import HDBSCAN  # scikit-learn >= 1.3

    K = X.shape[0]
    D = np.maximum(1.0 - _cosine(X), 0.0)
    D = (D + D.T) / 2
    np.fill_diagonal(D, 0.0)
    mcs = K // 2 + 1
    labels = HDBSCAN(
        min_cluster_size=mcs, min_samples=min_samples, metric="precomputed", allow_single_cluster=True
    ).fit_predict(D)
    return Detection(
        {k for k in range(K) if labels[k] == -1},
        None,
        {"min_cluster_size": mcs, "min_samples_sklearn": min_samples, "labels": labels.tolist()},
    )


def dnc(
    X: np.ndarray,
    m: int | None = None,
    *,
    c: float = DNC_C,
    niters: int = DNC_NITERS,
    b: int = DNC_B,
    seed: int = 0,
) -> Detection:
    """Divide-and-Conquer (Shejwalkar & Houmansadr 2021, Algorithm 2). For each of ``niters``
    iterations: a random sorted subset of ``b`` coordinates (all when ``d <= b``), the
    subsampled updates centred on their mean, the top right singular vector ``v`` of the
    centred matrix, outlier scores ``s_i = <Theta_i[r] - mu, v>^2``, and the ``K - c m``
    updates of smallest score kept; the good set is the intersection of the kept sets over the
    iterations, and every update outside it (the union of the removed ones) is flagged.

    Args:
        m: assumed number of malicious adapters (the paper takes it as known); default
            ``floor(0.3 K)`` (a server expecting up to 30 % attackers). The benchmark also
            runs it at the true count for reference.
        c: filtering fraction, the paper's 1; niters: 5; b: 10,000 coordinates.
        seed: seeds the coordinate subsamples (numpy ``default_rng``).

    Score: each iteration's ``s`` divided by its mean over the pool, averaged over the
    iterations (so every subsample weighs the same).
    """
    K, d = X.shape
    m = int(np.floor(DNC_ASSUMED_SHARE * K)) if m is None else m
    n_remove = int(np.floor(c * m))
    rng = np.random.default_rng(seed)
    good = set(range(K))
    score = np.zeros(K)
    removed_per_iter = []
    for _ in range(niters):
        r = np.sort(rng.choice(d, size=min(b, d), replace=False))
        sub = X[:, r]
        mu = sub.mean(axis=0)
        centred = sub - mu
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        s = (centred @ vt[0]) ** 2
        order = np.argsort(s, kind="stable")
        kept = set(order[: K - n_remove].tolist())
        removed_per_iter.append(sorted(set(range(K)) - kept))
        good &= kept
        score += s / max(s.mean(), np.finfo(float).tiny)
    return Detection(
        set(range(K)) - good,
        score / niters,
        {"m": m, "c": c, "niters": niters, "b": min(b, d), "seed": seed, "removed_per_iteration": removed_per_iter},
    )


def foolsgold(X: np.ndarray, kappa: float = FOOLSGOLD_KAPPA) -> Detection:
    """FoolsGold (Fung et al. 2020, Algorithm 1), one round: each client's history is its one
    update. Pairwise cosine similarities ``cs_ij`` (i != j), ``v_i = max_j cs_ij``; pardoning:
    ``cs_ij *= v_i / v_j`` where ``v_j > v_i``; ``alpha_i = 1 - max_j cs_ij`` clipped to [0, 1];
    rescaled by ``max alpha`` (1 set to 0.99); logit ``kappa (ln(alpha / (1 - alpha)) + 0.5)``
    clipped to [0, 1] is the learning-rate weight (as in the authors' reference code; no
    importance feature weighting). Adapters of weight 0 are flagged (the weight rounds them
    out of the aggregate).

    Score: ``max_j cs_ij`` after pardoning (``1 - alpha_i`` before clipping): the weight is a
    non-increasing function of it, clipped at 0 and 1, so thresholds on this score include every
    threshold on the weight and also order the adapters the clipping ties.
    """
    K = X.shape[0]
    cs = _cosine(X) - np.eye(K)
    maxcs = cs.max(axis=1)
    pardoned = cs.copy()
    for i in range(K):
        for j in range(K):
            if i != j and maxcs[i] < maxcs[j]:
                pardoned[i, j] = cs[i, j] * maxcs[i] / maxcs[j]
    np.fill_diagonal(pardoned, -np.inf)
    top = pardoned.max(axis=1)
    alpha = np.clip(1.0 - top, 0.0, 1.0)
    if alpha.max() > 0:
        alpha = alpha / alpha.max()
    alpha[alpha == 1.0] = 0.99
    with np.errstate(divide="ignore"):
        weight = kappa * (np.log(alpha / (1.0 - alpha)) + 0.5)
    weight = np.clip(np.nan_to_num(weight, nan=0.0, neginf=0.0, posinf=1.0), 0.0, 1.0)
    return Detection({k for k in range(K) if weight[k] == 0.0}, top, {"weight": weight.tolist(), "kappa": kappa})


def dnc_exact(X: np.ndarray) -> Detection:
    """DnC's spectral statistic computed exactly and leave-one-out: for each adapter k, the
    leading principal direction ``u`` of the other adapters' updates centred on their mean,
    and the score ``<Theta_k - mu_(-k), u>^2`` divided by the others' variance along ``u``.
    Computed from the ``K x K`` Gram matrix (``u`` is a combination of the others' centred
    updates), so every coordinate counts, not a subsample. Flags nothing by itself: it is
    here to be judged at thresholds (per pool and one for all pools)."""
    K = X.shape[0]
    G = X @ X.T
    score = np.zeros(K)
    for k in range(K):
        others = [j for j in range(K) if j != k]
        n = len(others)
        Go = G[np.ix_(others, others)]
        H = np.eye(n) - 1.0 / n
        evals, evecs = np.linalg.eigh(H @ Go @ H)
        lead = max(evals[-1], np.finfo(float).tiny)
        c = H @ evecs[:, -1] / np.sqrt(lead)  # u = sum_j c_j Theta_j, unit norm
        projection = (G[k, others] - Go.mean(axis=0)) @ c
        score[k] = projection**2 / (lead / n)
    return Detection(set(), score, {})


def norm_outlier(X: np.ndarray, factor: float = NORM_FACTOR) -> Detection:
    """Norm outlier: flag updates whose L2 norm exceeds ``factor`` (3) x the median norm of the
    pool (the median is what FLAME and norm-clipping servers clip to; 3x is a common rule of
    thumb for "far above", not a paper's constant). Score: norm / median norm. It cannot see
    updates smaller than typical (a free rider) by design."""
    norms = np.linalg.norm(X, axis=1)
    ratio = norms / np.median(norms)
    return Detection({k for k in range(X.shape[0]) if ratio[k] > factor}, ratio, {"factor": factor})
