"""From per-module scores to per-adapter verdicts (CLAIR_SPEC.md section 5).

The rule, with no tuning on the default path:

1. **Off-subspace, per module.** On module m, adapter k's score is its
   off-subspace share ``o_km``. The module threshold is
   ``t_m = median_m + max(z * sigma_m, 0.10)``: ``median_m`` and ``sigma_m``
   (1.4826 * MAD) are robust centre and scale of the shares on that module, so
   up to half the pool may be contaminated; ``z`` is the normal quantile at
   ``1 - 0.001 / M`` (Bonferroni over the M modules, so a clean adapter is
   falsely flagged by chance with probability about 0.1 % under a Gaussian
   model); the 0.10 floor demands 10 points of share above typical before a
   flag, so numerically identical noiseless adapters are never split. Modules
   where the pool shows no shared structure (rank 0) flag nothing.
2. **Aggregation by maximum.** An adapter is flagged if *any* module exceeds
   its threshold; its score is its largest share over modules. Contamination in
   one or two modules is therefore not averaged away.
3. **Norm.** ``log ||Theta_k||`` (over all modules) against the pool's median:
   flagged when it exceeds ``median + max(z * sigma, log 4)``, i.e. at least four
   times the median norm *and* a robust outlier (model-replacement style boosting).
4. **Duplicates.** Adapters whose updates have cosine similarity above 0.999
   over all modules form a Sybil group; every member is flagged as such.
5. **Inside the subspace, per module.** The distance of the adapter's in-subspace
   component, divided by its update's norm, from the geometric median of the pool's
   (:mod:`clair_cli.core.insubspace`): flagged when ``log`` of it exceeds
   ``median + max(z * sigma, log 3)`` on some module with shared structure. This catches
   sign-flipped updates that rule 1 cannot see, where the benign clients agree; scaled-up
   updates are rule 3's (the division makes rule 5 blind to magnitude).

``threshold`` (the ``--threshold`` option) replaces ``t_m`` by a fixed share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist

import torch

from clair_cli.core.decompose import robust_center_scale

FLOOR = 0.10
NORM_FACTOR_FLOOR = 4.0
FALSE_FLAG_RATE = 1e-3
DUPLICATE_COSINE = 0.999
IN_SUBSPACE_FACTOR = 3.0


def z_bonferroni(n_tests: int) -> float:
    # The standard library's quantile: scipy.stats would add most of a second to start-up.
    return NormalDist().inv_cdf(1 - FALSE_FLAG_RATE / max(n_tests, 1))


@dataclass
class AdapterVerdict:
    index: int
    score: float
    flagged: bool
    reasons: list[dict] = field(default_factory=list)
    per_module: dict[str, float] = field(default_factory=dict)
    norm_ratio: float = 1.0


def module_thresholds(shares: dict[str, torch.Tensor], threshold: float | None) -> dict[str, float]:
    """Per-module flag threshold on off-subspace shares (rule 1)."""
    z = z_bonferroni(len(shares))
    out = {}
    for name, o in shares.items():
        if threshold is not None:
            out[name] = threshold
        else:
            med, sigma = robust_center_scale(o)
            out[name] = med + max(z * sigma, FLOOR)
    return out


def duplicate_groups(cosine: torch.Tensor) -> list[list[int]]:
    """Connected groups of adapters with pairwise cosine above DUPLICATE_COSINE."""
    K = cosine.shape[0]
    parent = list(range(K))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(K):
        for j in range(i + 1, K):
            if cosine[i, j] > DUPLICATE_COSINE:
                parent[find(j)] = find(i)
    groups: dict[int, list[int]] = {}
    for i in range(K):
        groups.setdefault(find(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def _in_subspace_rule(
    verdicts: list[AdapterVerdict],
    distances: dict[str, torch.Tensor | None],
    members: dict[str, list[int]],
    structured: dict[str, bool],
    trusted: set[int],
    gated: bool,
) -> None:
    """Rule 5: an in-subspace component far from the pool's centre on some module."""
    measured = {n: d for n, d in distances.items() if d is not None and structured[n]}
    z = z_bonferroni(len(measured))
    hits: dict[int, list[tuple[float, str]]] = {}
    for name, dist in measured.items():
        ks = members[name]
        basis = [p for p, k in enumerate(ks) if (k in trusted or not gated) and dist[p] > 0]
        if len(basis) < 3:
            continue
        log_d = torch.log(dist.clamp_min(torch.finfo(dist.dtype).tiny))
        med, sigma = robust_center_scale(log_d[basis])
        cut = med + max(z * sigma, math.log(IN_SUBSPACE_FACTOR))
        for p, k in enumerate(ks):
            if dist[p] > 0 and float(log_d[p]) > cut and k not in trusted:
                hits.setdefault(k, []).append((math.exp(float(log_d[p]) - med), name))
    for k, items in hits.items():
        items.sort(key=lambda t: (-t[0], t[1]))
        verdicts[k].flagged = True
        verdicts[k].reasons.append({"kind": "in_subspace", "ratio": items[0][0], "modules": [n for _, n in items]})


def decide(
    n_adapters: int,
    shares: dict[str, torch.Tensor],
    members: dict[str, list[int]],
    structured: dict[str, bool],
    sq_norms: torch.Tensor,
    duplicates: list[list[int]],
    threshold: float | None = None,
    reference: list[int] | None = None,
    in_subspace: dict[str, torch.Tensor | None] | None = None,
    held_out: dict[str, torch.Tensor] | None = None,
) -> list[AdapterVerdict]:
    """Combine the signals into one verdict per adapter.

    Args:
        n_adapters: K.
        shares: per module, off-subspace shares of the adapters in ``members[module]``.
        members: per module, the adapter indices it covers (in ``shares`` order).
        structured: per module, whether a shared structure was found.
        sq_norms: per adapter, ``sum_m ||Theta_km||^2``.
        duplicates: Sybil groups of adapter indices.
        threshold: fixed share threshold replacing the automatic one.
        reference: trusted adapters (``clair gate``). When given, the thresholds and the
            norm centre come from them alone and only the other adapters can be flagged.
        in_subspace: per module, each member's distance from the geometric median of the
            in-subspace components (:mod:`clair_cli.core.insubspace`); None where not measured.
        held_out: with ``reference``, per module, the shares with each reference scored
            against the other references' subspace (as a candidate is scored); the
            thresholds come from these instead of the references' in-sample shares.
    """
    trusted = set(reference or ())
    if reference is not None:
        calibration = held_out or shares
        basis = {
            name: calibration.get(name, o)[[p for p, k in enumerate(members[name]) if k in trusted]]
            for name, o in shares.items()
        }
        thresholds = module_thresholds({n: o for n, o in basis.items() if o.numel()}, threshold)
        for name in shares:
            thresholds.setdefault(name, threshold if threshold is not None else FLOOR)
    else:
        thresholds = module_thresholds(shares, threshold)
    verdicts = [AdapterVerdict(k, 0.0, False) for k in range(n_adapters)]
    excess: dict[int, list[tuple[float, str, float]]] = {k: [] for k in range(n_adapters)}
    for name, o in shares.items():
        for pos, k in enumerate(members[name]):
            share = float(o[pos])
            verdicts[k].per_module[name] = share
            verdicts[k].score = max(verdicts[k].score, share)
            if structured[name] and share > thresholds[name] and k not in trusted:
                excess[k].append((share - thresholds[name], name, share))
    for k, items in excess.items():
        if items:
            items.sort(key=lambda t: (-t[0], t[1]))
            verdicts[k].flagged = True
            verdicts[k].reasons.append(
                {
                    "kind": "off_subspace",
                    "share": max(s for _, _, s in items),
                    "modules": [n for _, n, _ in items],
                }
            )

    _in_subspace_rule(verdicts, in_subspace or {}, members, structured, trusted, reference is not None)

    positive = sq_norms > 0
    centre = positive.clone()
    if reference is not None:
        centre[[k for k in range(n_adapters) if k not in trusted]] = False
    if int(centre.sum()) >= 3:
        log_norm = 0.5 * torch.log(sq_norms[centre])
        med, sigma = robust_center_scale(log_norm)
        cut = med + max(z_bonferroni(1) * sigma, math.log(NORM_FACTOR_FLOOR))
        for k in range(n_adapters):
            if sq_norms[k] <= 0:
                continue
            ln = 0.5 * math.log(float(sq_norms[k]))
            verdicts[k].norm_ratio = math.exp(ln - med)
            if ln > cut and k not in trusted:
                verdicts[k].flagged = True
                verdicts[k].reasons.append({"kind": "norm", "ratio": verdicts[k].norm_ratio})

    for group in duplicates:
        for k in group:
            if k in trusted:
                continue
            verdicts[k].flagged = True
            verdicts[k].reasons.append({"kind": "duplicate", "of": [j for j in group if j != k]})
    return verdicts
