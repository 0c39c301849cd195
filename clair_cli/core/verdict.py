"""From per-adapter signals to verdicts (CLAIR_SPEC.md section 5).

Every threshold rule compares an adapter with the *other* adapters (leave-one-out; in
``clair gate``, with the references only) and flags it when its statistic exceeds
``median + max(c * sigma, floor)`` (:mod:`clair_cli.core.calibration`): ``sigma`` is a robust
spread (Rousseeuw and Croux's Qn), ``c`` is computed for the number of adapters it was
measured on so that an honest adapter drawn from the same distribution is flagged with
probability ``ALPHA`` under a Gaussian model (the MAD-style estimates of a dozen values are
noisy, and the normal quantile alone would flag many times more), and ``floor`` is a
minimum effect size in the statistic's own units. The rules:

1. **Direction** (``direction``): the cosine between the adapter's update and the geometric
   median of the other adapters' updates, every module's update scaled to unit norm first so
   that each module counts once. Sign flips, label flips and updates of another task point
   elsewhere. Each module's cosine is taken with that module's centre fitted without the
   adapter, standardised (median, Qn over the pool) and averaged with weight median / Qn,
   so the modules where the pool agrees on a direction carry the evidence. Floor: the raw
   cosine must have dropped by 0.1 and to 0.4 of the typical cosine; where the typical cosine
   is below 0.1 the others agree on no direction, the centre is noise, and the rule is off.
2. **Off-subspace, over all modules** (``off_subspace``): ``logit(o_km)``, the log-odds of
   the share of the update outside the shared subspace, standardised per module and averaged
   over the modules with shared structure. Averaging the evidence over modules is what a
   single honest client with unusual data cannot reach by chance on one module. Floor: the
   mean log-odds must exceed the typical by log 3 (odds 3x).
   **Both at once** (``joint``): the sum of the two standardised statistics of rules 1 and
   2, against the others' sums, when both raw effects are at least half their floors: an
   adapter somewhat atypical on both counts, where neither rule alone would flag it.
3. **Off-subspace, per module**: ``logit(o_km)`` on one module, at ``ALPHA / M`` (Bonferroni
   over the M modules with shared structure), floor odds 10x the typical: contamination
   confined to a few modules, which the average would dilute.
4. **Inside the subspace, per module** (``in_subspace``): the distance of the adapter's
   in-subspace component, over its norm, from the geometric median of the others'
   (:mod:`clair_cli.core.insubspace`), on the log scale, at ``ALPHA / M``. Floor: 3x.
5. **Norm** (``norm``): ``log ||Theta_k||`` over all modules, in both directions: boosted
   updates (model replacement), floor 4x the typical norm, and near-zero ones (free
   riders), floor a tenth of it.
6. **Duplicates** (``duplicate``): updates with cosine above 0.999 over all modules form a
   Sybil group; every member is flagged as such (no threshold).
7. **Along the others' leading deviation** (``spectral``, :mod:`clair_cli.core.spectral`):
   the squared projection of the adapter's whole update, minus the others' mean, on the
   leading principal direction of the others' centred updates (DnC's statistic, exact and
   leave-one-out), on the log scale under the log-chi-square law at ``SPECTRAL_ALPHA``,
   together with the share of its own deviation along that direction at
   ``SPECTRAL_SHARE_ALPHA``. Several adapters pushing the same way (clients sharing a
   backdoor trigger) make their common push the direction in which the pool varies most,
   even when each alone looks honest. Floor: the projection at least twice the typical.

8. **No neighbour** (``isolated``): the adapter's largest cosine with any other adapter
   (every module at unit norm, its copies aside), on the log scale, against the others'
   largest cosines, floor a third of the typical; as the joint rule, it also needs half of
   rule 1's raw effect (off where the others agree on no direction). Another task's adapter
   shares nothing with any client, where honest clients of one task, however skewed their
   data, have a neighbour.

An adapter's ``score`` is its largest margin over rules 1-5, 7 and 8: the distance above the typical
value in units of the distance to the threshold, so a score above 1 means that rule flagged
it (a duplicate is flagged whatever its score). ``threshold`` (the ``--threshold`` option)
replaces rules 2 and 3 by a fixed off-subspace share on any module.

Every reason records the rule that flagged (``rule``), the statistic it compared
(``value``), the bound it was compared with (``threshold``; ``compare`` says which side
flags) and its ``margin``; the adapter's score is the largest margin among its reasons
whenever a rule flagged it. Rules 1 and 2 require two things at once (the standardised
statistic past its calibrated cut and the raw effect past its floor): ``threshold`` is the
bound on the raw statistic (rule 2: the mean log-odds, not the mean share the text quotes)
and ``margin`` the smaller of the two margins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from clair_cli.core.calibration import LOG_CHI2, NORMAL, Cut, critical_value, leave_one_out_cuts, qn_scale
from clair_cli.core.decompose import median
from clair_cli.core.spectral import leading_direction_scores

ALPHA = 1e-3  # per rule: the probability that an honest adapter trips it (Gaussian model)
PASSES = 5  # at most; stops when the flagged set repeats
POINTING = ("direction", "off_subspace", "joint")  # the rules whose near-misses leave their bases
EXCLUDE_ALPHA = 0.02  # how near a miss: past the threshold at this false-flag rate
DUPLICATE_COSINE = 0.999
DIRECTION_FLOOR = 0.1  # of cosine, and at least 0.6 of the typical cosine
DIRECTION_RELATIVE_FLOOR = 0.6
OFF_SUBSPACE_ODDS_FLOOR = 3.0
MODULE_ODDS_FLOOR = 10.0  # one module alone must be decisively off: odds 10x the typical
IN_SUBSPACE_FACTOR = 3.0
NORM_FACTOR_FLOOR = 4.0
NORM_LOW_FACTOR_FLOOR = 10.0  # a small update does little harm: only far below the others
SPECTRAL_FLOOR = 4.0  # rule 7: the squared projection at least 4x the typical (2x the projection)
SPECTRAL_ALPHA = 1e-4  # rule 7's projection: norm mixtures (alphas) fatten its tail beyond the law's
SPECTRAL_SHARE_ALPHA = 0.1  # and the share of its own deviation along the direction past this cut
ISOLATED_FACTOR = 3.0  # rule 8: the nearest neighbour's cosine at most a third of the typical
ISOLATED_MIN_COSINE = 1e-3  # nearest cosines below (or negative) count as this
SHARE_CLAMP = 1e-6  # shares are clamped to [1e-6, 1 - 1e-6] before the log-odds


@dataclass
class AdapterVerdict:
    index: int
    score: float
    flagged: bool
    reasons: list[dict] = field(default_factory=list)
    per_module: dict[str, float] = field(default_factory=dict)
    norm_ratio: float = 1.0
    signals: dict[str, float] = field(default_factory=dict)


def logit(share: torch.Tensor) -> torch.Tensor:
    o = share.double().clamp(SHARE_CLAMP, 1 - SHARE_CLAMP)
    return torch.log(o) - torch.log1p(-o)


def duplicate_groups(cosine: torch.Tensor) -> list[list[int]]:
    """Connected groups of adapters with pairwise cosine above DUPLICATE_COSINE."""
    K = cosine.shape[0]
    parent = list(range(K))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    above = torch.triu(cosine > DUPLICATE_COSINE, diagonal=1)
    for i, j in torch.nonzero(above).tolist():  # in row-major order, as the loop over pairs was
        parent[find(j)] = find(i)
    components: dict[int, list[int]] = {}
    for i in range(K):
        components.setdefault(find(i), []).append(i)
    return [g for g in components.values() if len(g) > 1]


def flag_every_copy(verdicts: list[AdapterVerdict], duplicates: list[list[int]], trusted: set[int]) -> None:
    """Flag the kept member of every duplicate group too (a federated round: two honest
    clients never send the same update), as a copy of the others."""
    for group in duplicates:
        k = group[0]
        if k in trusted or any(r["kind"] == "duplicate" for r in verdicts[k].reasons):
            continue
        verdicts[k].flagged = True
        verdicts[k].reasons.append(
            {"kind": "duplicate", "of": [j for j in group if j != k]}
            | _judged("duplicate", None, DUPLICATE_COSINE, None, ">")
        )


class _Rules:
    """Applies the threshold rules to one pool, recording margins and reasons."""

    def __init__(self, n_adapters: int, trusted: set[int], gated: bool, excluded: set[int]) -> None:
        self.verdicts = [AdapterVerdict(k, 0.0, False) for k in range(n_adapters)]
        self.trusted = trusted
        self.gated = gated
        self.excluded = excluded
        self.extra: set[int] = set()  # also left out of the bases, for the rules that set it

    def cuts(
        self,
        values: torch.Tensor,
        alpha: float,
        floor: float,
        calibration: torch.Tensor | None = None,
        relative: float = 0.0,
        law: str = NORMAL,
        capped: bool = False,
    ) -> list[Cut | None]:
        """Per adapter, the cut from the others' values (finite ones, not ``excluded``; in a
        gate, the references' values, from ``calibration`` where given); ``capped``: with
        the small-pool critical value (:func:`clair_cli.core.calibration.rule_critical_value`)."""
        calib = values if calibration is None else calibration
        cuts = leave_one_out_cuts(calib, self.basis(calib), alpha, floor, relative, law, capped)
        return [cut if bool(torch.isfinite(values[k])) else None for k, cut in enumerate(cuts)]

    def basis(self, calib: torch.Tensor) -> torch.Tensor:
        """Which adapters' values set a threshold: finite, not excluded, references in a gate."""
        basis = torch.isfinite(calib)
        basis[list(self.excluded | self.extra)] = False
        if self.gated:
            basis &= torch.tensor([k in self.trusted for k in range(len(calib))], dtype=torch.bool)
        return basis

    def _full(self, values: torch.Tensor, where: list[int]) -> torch.Tensor:
        full = torch.full((len(self.verdicts),), math.nan, dtype=torch.float64)
        full[where] = values.double()
        return full

    def mean(self, values: dict[str, torch.Tensor], members: dict[str, list[int]]) -> torch.Tensor:
        """Per adapter, the mean of a per-module value over the modules it is in (NaN: none)."""
        rows = torch.stack([self._full(v, members[n]) for n, v in values.items()])
        return rows.nanmean(0)

    def standardised_mean(
        self,
        values: dict[str, torch.Tensor],
        members: dict[str, list[int]],
        calibration: dict[str, torch.Tensor] | None = None,
        by_agreement: bool = False,
    ) -> torch.Tensor:
        """Per adapter, the mean over modules of ``(x - median) / Qn``, centre and spread
        taken per module over the basis (from ``calibration`` where given). Modules whose
        basis has no spread carry no evidence and are left out. Standardising first weights
        each module by how tightly the pool agrees on it.

        With ``by_agreement`` (rule 1, whose values are minus cosines) the mean is weighted
        by ``max(-median / Qn, 0)``: how many spreads the typical cosine lies above zero.
        An adapter that shares nothing with the others sits at zero, so that is how far a
        module lets it fall in units of the module's spread (the weights of the likelihood
        ratio for "no shared component" under independent Gaussian modules); modules on
        which the others agree on no direction carry no weight."""
        rows, weights = [], []
        for name, v in values.items():
            full = self._full(v, members[name])
            calib = self._full((calibration or {}).get(name, v), members[name])
            basis = self.basis(calib)
            if int(basis.sum()) < 3:
                continue
            spread = float(qn_scale(calib[basis]))
            if spread > 0:
                centre = float(median(calib[basis]))
                rows.append((full - centre) / spread)
                weights.append(max(-centre / spread, 0.0) if by_agreement else 1.0)
        if not rows or sum(weights) <= 0:
            return torch.full((len(self.verdicts),), math.nan, dtype=torch.float64)
        z = torch.stack(rows)
        w = torch.tensor(weights, dtype=torch.float64)[:, None].expand_as(z).where(~z.isnan(), 0.0)
        return (z.nan_to_num(0.0) * w).sum(0) / w.sum(0)  # NaN where an adapter has no weighed module

    def margin(self, k: int, margin: float, signal: str) -> bool:
        """Record a margin; whether it flags (never for a trusted reference)."""
        v = self.verdicts[k]
        v.score = max(v.score, margin)
        v.signals[signal] = max(v.signals.get(signal, -math.inf), margin)
        return margin > 1 and k not in self.trusted

    def flag(self, k: int, reason: dict) -> None:
        self.verdicts[k].flagged = True
        self.verdicts[k].reasons.append(reason)


Hit = tuple[float, str, float, float, float]  # excess over the centre, module, value, threshold, margin


def _per_module(
    rules: _Rules,
    values: dict[str, torch.Tensor],
    members: dict[str, list[int]],
    floor: float,
    calibration: dict[str, torch.Tensor] | None = None,
) -> dict[int, list[Hit]]:
    """A per-module rule at ALPHA / M (Bonferroni over the modules measured); hits per adapter."""
    hits: dict[int, list[Hit]] = {}
    alpha = ALPHA / max(len(values), 1)
    K = len(rules.verdicts)
    for name, v in values.items():
        full = torch.full((K,), math.nan, dtype=torch.float64)
        full[members[name]] = v.double()
        calib = None
        if calibration is not None and name in calibration:
            calib = torch.full((K,), math.nan, dtype=torch.float64)
            calib[members[name]] = calibration[name].double()
        for k, cut in enumerate(rules.cuts(full, alpha, floor, calib)):
            if cut is None:
                continue
            m = cut.margin(float(full[k]))
            if rules.margin(k, m, "module"):
                hits.setdefault(k, []).append((float(full[k]) - cut.centre, name, float(full[k]), cut.value, m))
    for items in hits.values():
        items.sort(key=lambda t: (-t[0], t[1]))
    return hits


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
    direction: torch.Tensor | None = None,
    module_direction: dict[str, torch.Tensor] | None = None,
    inner: torch.Tensor | None = None,
    order: list[int] | None = None,
    cosine: torch.Tensor | None = None,
) -> list[AdapterVerdict]:
    """Combine the signals into one verdict per adapter.

    In passes: each recomputes every threshold without the adapters the previous one
    flagged and, for rules 1, 2 and 2b, also without those past the threshold those rules
    would have at ``EXCLUDE_ALPHA`` (until both sets repeat, at most PASSES), so that
    contaminated adapters, which widen the robust spread (a third of the pool may be
    contaminated), do not shield each other. The norm and per-module rules leave out only
    the flagged: honest norms are often multimodal (alphas differ), and leaving out their
    upper mode would tighten the threshold onto the rest of it. A duplicate group's first member
    (the caller orders them) is judged on its own signals; the others are flagged as copies.

    Args:
        n_adapters: K.
        shares: per module, off-subspace shares of the adapters in ``members[module]``.
        members: per module, the adapter indices it covers (in ``shares`` order).
        structured: per module, whether a shared structure was found.
        sq_norms: per adapter, ``sum_m ||Theta_km||^2``.
        duplicates: Sybil groups of adapter indices.
        threshold: fixed share threshold replacing the off-subspace rules' automatic one.
        reference: trusted adapters (``clair gate``). When given, every threshold comes from
            them alone and only the other adapters can be flagged.
        in_subspace: per module, each member's distance from the geometric median of the
            in-subspace components (:mod:`clair_cli.core.insubspace`); None where not measured.
        held_out: with ``reference``, per module, the shares with each reference scored
            against the other references' subspace (as a candidate is scored); the
            off-subspace thresholds come from these instead of the references' in-sample shares.
        direction: per adapter, the cosine of its (module-wise unit) update with the
            geometric median of the others' (references' in a gate); NaN where undefined.
        module_direction: per module, each member's cosine with the module's centre.
        inner: the ``K x K`` Gram matrix of the whole updates (summed over modules), for
            rule 7; None leaves the rule out.
        order: a canonical order of the adapters (their content digests) in which rule 7's
            eigensolves run, so that its last bits do not depend on the order of the sources.
    """
    pool = _PoolSignals(
        n_adapters,
        shares,
        members,
        structured,
        sq_norms,
        duplicates,
        threshold,
        reference,
        in_subspace,
        held_out,
        direction,
        module_direction,
        inner,
        order,
        cosine,
    )
    verdicts = _decide(pool, excluded=set(), suspects=set())
    exclude_above = _exclusion_margin(n_adapters)
    seen: set[tuple[frozenset[int], frozenset[int]]] = set()
    for _ in range(PASSES - 1):
        flagged = frozenset(v.index for v in verdicts if v.flagged)
        suspects = frozenset(  # references are trusted: they always set the thresholds
            v.index
            for v in verdicts
            if max(v.signals.get(r, -math.inf) for r in POINTING) > exclude_above
            and v.index not in set(reference or ())
        )
        if not (flagged or suspects) or (flagged, suspects) in seen:
            break
        seen.add((flagged, suspects))
        verdicts = _decide(pool, excluded=set(flagged), suspects=set(suspects))
    return verdicts


def _exclusion_margin(n_adapters: int) -> float:
    """Margin above which an adapter leaves the bases of rules 1, 2 and 2b in the next pass:
    past the threshold those rules would have at ``EXCLUDE_ALPHA`` instead of ``ALPHA``
    (where the floors do not bind)."""
    n = max(n_adapters - 1, 3)
    return critical_value(n, EXCLUDE_ALPHA) / critical_value(n, ALPHA)


@dataclass
class _PoolSignals:
    """What :func:`decide` was given, for each of its passes."""

    n_adapters: int
    shares: dict[str, torch.Tensor]
    members: dict[str, list[int]]
    structured: dict[str, bool]
    sq_norms: torch.Tensor
    duplicates: list[list[int]]
    threshold: float | None
    reference: list[int] | None
    in_subspace: dict[str, torch.Tensor | None] | None
    held_out: dict[str, torch.Tensor] | None
    direction: torch.Tensor | None
    module_direction: dict[str, torch.Tensor] | None
    inner: torch.Tensor | None
    order: list[int] | None
    cosine: torch.Tensor | None


def _decide(pool: _PoolSignals, excluded: set[int], suspects: set[int]) -> list[AdapterVerdict]:
    K, shares, members, structured = pool.n_adapters, pool.shares, pool.members, pool.structured
    sq_norms, duplicates, threshold, reference = pool.sq_norms, pool.duplicates, pool.threshold, pool.reference
    in_subspace, held_out, direction, module_direction = (
        pool.in_subspace,
        pool.held_out,
        pool.direction,
        pool.module_direction,
    )
    trusted = set(reference or ())
    copies = {k for group in duplicates for k in group[1:]}
    rules = _Rules(K, trusted, reference is not None, excluded | copies)
    calibration = held_out if reference is not None else None
    for name, o in shares.items():
        for pos, k in enumerate(members[name]):
            rules.verdicts[k].per_module[name] = float(o[pos])
    measured = {n: o for n, o in shares.items() if structured[n]}

    rules.extra = suspects  # rules 1, 2 and 2b: also without the adapters they nearly flagged
    # Rule 1: direction, per module standardised, averaged with the weight of the others'
    # agreement on it, against the others' averages; the raw cosine must also have dropped by
    # the floor.
    z_dir = dir_effect = None
    if direction is not None and module_direction:
        per = {n: -c for n, c in module_direction.items()}
        z_dir = rules.standardised_mean(per, members, by_agreement=True)
        raw = rules.cuts(-direction.double(), ALPHA, 0.0)
        dir_effect = torch.full((K,), math.nan, dtype=torch.float64)
        for k, cut in enumerate(rules.cuts(z_dir, ALPHA, 0.0, capped=True)):
            if cut is None or raw[k] is None:
                continue
            typical = -raw[k].centre  # type: ignore[union-attr]
            if typical < DIRECTION_FLOOR:  # the others agree on no direction: nothing to leave
                continue
            floor = max(DIRECTION_FLOOR, DIRECTION_RELATIVE_FLOOR * typical)
            dir_effect[k] = (typical - float(direction[k])) / floor
            m = min(cut.margin(float(z_dir[k])), float(dir_effect[k]))
            if rules.margin(k, m, "direction"):
                rules.flag(
                    k,
                    {"kind": "direction", "cosine": float(direction[k]), "typical": typical}
                    | _judged("direction", float(direction[k]), typical - floor, m, "<"),
                )

    off_hits: dict[int, list[Hit]] = {}
    across: dict[int, tuple[float, float, float]] = {}  # rule 2: mean log-odds, its bound, margin
    joint_reasons: dict[int, dict] = {}
    if threshold is not None:
        for name, o in measured.items():
            for pos, k in enumerate(members[name]):
                share = float(o[pos])
                if rules.margin(k, share / threshold, "module") and share > threshold:
                    off_hits.setdefault(k, []).append((share - threshold, name, share, threshold, share / threshold))
    elif measured:
        # Rule 2: the log-odds, per module standardised, averaged over the modules with
        # shared structure; the mean log-odds must also exceed the others' by the floor.
        floor = math.log(OFF_SUBSPACE_ODDS_FLOOR)
        log_odds = {n: logit(o) for n, o in measured.items()}
        calib_odds = {n: logit((calibration or {}).get(n, o)) for n, o in measured.items()}
        z = rules.standardised_mean(log_odds, members, calib_odds)
        mean = rules.mean(log_odds, members)
        if calibration is None:  # the values are their own calibration
            z_calib, calib_mean = z, mean
        else:
            z_calib = rules.standardised_mean(calib_odds, members, calib_odds)
            calib_mean = rules.mean(calib_odds, members)
        raw = rules.cuts(mean, ALPHA, 0.0, calib_mean)
        off_effect = torch.full((K,), math.nan, dtype=torch.float64)
        for k, cut in enumerate(rules.cuts(z, ALPHA, 0.0, z_calib)):
            if cut is None or raw[k] is None:
                continue
            off_effect[k] = (float(mean[k]) - raw[k].centre) / floor  # type: ignore[union-attr]
            m = min(cut.margin(float(z[k])), float(off_effect[k]))
            if rules.margin(k, m, "off_subspace"):
                off_hits.setdefault(k, [])
                bound = raw[k].centre + floor  # type: ignore[union-attr]
                across[k] = (float(mean[k]), bound, m)
        # Rule 2b: both at once. An adapter somewhat atypical in direction *and* in its share
        # outside the subspace: their standardised sum against the others' sums, each raw
        # effect at least half its floor.
        if z_dir is not None and dir_effect is not None and direction is not None:
            joint, joint_calib = z_dir + z, z_dir + z_calib
            for k, cut in enumerate(rules.cuts(joint, ALPHA, 0.0, joint_calib)):
                if cut is None or not (dir_effect[k] > 0.5 and off_effect[k] > 0.5):
                    continue
                margin = min(cut.margin(float(joint[k])), 2 * float(dir_effect[k]), 2 * float(off_effect[k]))
                seen = k in off_hits or any(r["kind"] == "direction" for r in rules.verdicts[k].reasons)
                own = [rules.verdicts[k].per_module[n] for n in measured if n in rules.verdicts[k].per_module]
                reason = {
                    "kind": "joint",
                    "cosine": float(direction[k]),
                    "log_odds": float(mean[k]),
                    "share": sum(own) / len(own),  # the mean share, as the off-subspace reason quotes it
                } | _judged("joint", float(joint[k]), cut.value, margin, ">")
                if rules.margin(k, margin, "joint"):
                    if not seen:
                        rules.flag(k, reason)
                    else:  # one reason is enough, unless this one set the score (see _score_reasons)
                        joint_reasons[k] = reason
        rules.extra = set()
        # Rule 3: one module at a time, at ALPHA / M.
        hits = _per_module(
            rules,
            log_odds,
            members,
            math.log(MODULE_ODDS_FLOOR),
            {n: calib_odds[n] for n in (calibration or {}) if n in calib_odds},
        )
        for k, items in hits.items():
            off_hits.setdefault(k, []).extend(items)
    for k, items in sorted(off_hits.items()):
        mine = {n: rules.verdicts[k].per_module[n] for n in measured if n in rules.verdicts[k].per_module}
        modules = [t[1] for t in items] or sorted(mine, key=lambda n: (-mine[n], n))
        share = sum(mine.values()) / len(mine) if not items else max(mine[n] for n in modules)
        reason = {"kind": "off_subspace", "share": share, "modules": modules, "across_modules": not items}
        if items:
            # The module quoted: the one with the largest share among those past their threshold.
            top = max(items, key=lambda t: (mine[t[1]], -len(t[1])))
            value, bound = (top[2], top[3]) if threshold is not None else (_sigmoid(top[2]), _sigmoid(top[3]))
            margin = max(t[4] for t in items)
            if k in across:
                margin = max(margin, across[k][2])
            reason |= {"module": top[1]} | _judged("module", value, bound, margin, ">")
        else:
            reason |= _judged("off_subspace", *across[k], ">")
        rules.flag(k, reason)

    rules.extra = set()
    # Rule 4: inside the subspace, per module.
    distances = {
        n: torch.log(d.double().clamp_min(1e-300)).where(d > 0, torch.full_like(d.double(), math.nan))
        for n, d in (in_subspace or {}).items()
        if d is not None and structured[n]
    }
    for k, items in sorted(_per_module(rules, distances, members, math.log(IN_SUBSPACE_FACTOR)).items()):
        excess, _name, value, bound, _m = items[0]
        rules.flag(
            k,
            {"kind": "in_subspace", "ratio": math.exp(excess), "modules": [t[1] for t in items]}
            # The ratio to the typical distance, and the ratio at which the rule flags on that module.
            | _judged(
                "in_subspace", math.exp(excess), math.exp(bound - (value - excess)), max(t[4] for t in items), ">"
            ),
        )

    # Rule 5: norm, both ways.
    log_norm = torch.where(sq_norms > 0, 0.5 * torch.log(sq_norms.double().clamp_min(1e-300)), math.nan)
    high = rules.cuts(log_norm, ALPHA, math.log(NORM_FACTOR_FLOOR), capped=True)
    low = rules.cuts(-log_norm, ALPHA, math.log(NORM_LOW_FACTOR_FLOOR), capped=True)
    for k in range(K):
        if high[k] is None or low[k] is None:
            continue
        ratio = math.exp(float(log_norm[k]) - high[k].centre)  # type: ignore[union-attr]
        rules.verdicts[k].norm_ratio = ratio
        m_up = high[k].margin(float(log_norm[k]))  # type: ignore[union-attr]
        m_down = low[k].margin(-float(log_norm[k]))  # type: ignore[union-attr]
        up = rules.margin(k, m_up, "norm")
        down = rules.margin(k, m_down, "norm")
        if up or down:
            # The ratio to the others' median norm at which the rule flags, on the side it flagged.
            bound = math.exp(high[k].width) if up else math.exp(-low[k].width)  # type: ignore[union-attr]
            rules.flag(
                k,
                {"kind": "norm", "ratio": ratio} | _judged("norm", ratio, bound, max(m_up, m_down), ">" if up else "<"),
            )

    # Rule 7: far along the direction in which the others differ most (a coordinated group).
    if pool.inner is not None:
        _spectral(rules, pool.inner, duplicates, pool.order)
    # Rule 8: no neighbour at all.
    if pool.cosine is not None and dir_effect is not None:
        _isolated(rules, pool.cosine, duplicates, dir_effect)

    # Rule 6: duplicates. The first member stands for the group; the others are copies.
    for group in duplicates:
        for k in group[1:]:
            if k not in trusted:
                rules.flag(
                    k,
                    {"kind": "duplicate", "of": [j for j in group if j != k]}
                    | _judged("duplicate", None, DUPLICATE_COSINE, None, ">"),
                )
    for k, reason in joint_reasons.items():
        _score_reasons(rules.verdicts[k], reason)
    return rules.verdicts


def _spectral(rules: _Rules, inner: torch.Tensor, duplicates: list[list[int]], order: list[int] | None) -> None:
    """Rule 7 (:mod:`clair_cli.core.spectral`): the log of each adapter's squared projection on
    the others' leading deviation direction, against the others' values under the
    log-chi-square law at ``SPECTRAL_ALPHA``; and, so that an adapter whose deviation is large
    in every direction (an honest client with a larger alpha) is not flagged for being far
    along this one too, the share of its own deviation along that direction, against the
    others' shares under the same law at ``SPECTRAL_SHARE_ALPHA``. The projection's law
    assumes one scale for every honest adapter; alphas that differ make its tail heavier,
    which the smaller ``SPECTRAL_ALPHA`` allows for (measured: ``benchmarks/detection.py``).
    The direction is fitted on the adapters that set thresholds (not flagged in an earlier
    pass, not copies; the references in a gate), each adapter and its copies left out of its
    own fit; the eigensolves run in ``order``."""
    K = len(rules.verdicts)
    shapes = rules.basis(torch.zeros(K, dtype=torch.float64))
    group_of = {k: g for g in duplicates for k in g}
    order = order or list(range(K))
    where = {k: p for p, k in enumerate(order)}
    perm = torch.tensor(order)
    back = torch.empty(K, dtype=torch.long)
    back[perm] = torch.arange(K)
    scores, shares = leading_direction_scores(
        inner[perm[:, None], perm[None, :]], shapes[perm], [[where[j] for j in group_of.get(k, [k])] for k in order]
    )
    log_s, log_share = _finite_log(scores[back]), _finite_log(shares[back])
    far = rules.cuts(log_s, SPECTRAL_ALPHA, math.log(SPECTRAL_FLOOR), law=LOG_CHI2)
    along = rules.cuts(log_share, SPECTRAL_SHARE_ALPHA, 0.0, law=LOG_CHI2)
    for k in range(K):
        if far[k] is None or along[k] is None:
            continue
        m = min(far[k].margin(float(log_s[k])), along[k].margin(float(log_share[k])))  # type: ignore[union-attr]
        if rules.margin(k, m, "spectral"):
            # Ratios of the projection (not its square) to the typical one.
            ratio = math.exp(0.5 * (float(log_s[k]) - far[k].centre))  # type: ignore[union-attr]
            bound = math.exp(0.5 * far[k].width)  # type: ignore[union-attr]
            rules.flag(
                k,
                {"kind": "spectral", "ratio": ratio, "share": float(shares[back][k])}
                | _judged("spectral", ratio, bound, m, ">"),
            )


def _isolated(rules: _Rules, cosine: torch.Tensor, duplicates: list[list[int]], dir_effect: torch.Tensor) -> None:
    """Rule 8: the adapter's largest cosine with any other adapter (every module at unit
    norm; its own copies aside; in a gate, with the references), on the log scale, against
    the others' largest cosines: an adapter that shares nothing with any other (another
    task's), where honest clients of one task, however skewed their data, have a neighbour.
    Floor: at most a third of the typical nearest cosine. As the joint rule, it also needs
    half of rule 1's raw effect (``dir_effect``: the drop of its cosine with the others'
    centre in units of rule 1's floor; NaN where the others agree on no direction, and the
    rule is off): where honest adapters share little, one of them lacks a close neighbour
    by chance, but it still points the pool's way."""
    K = len(rules.verdicts)
    group_of = {k: set(g) for g in duplicates for k in g}
    allowed = torch.ones(K, K, dtype=torch.bool)
    allowed.fill_diagonal_(False)
    for k, group in group_of.items():
        allowed[k, list(group)] = False
    if rules.gated:
        allowed &= torch.tensor([j in rules.trusted for j in range(K)], dtype=torch.bool)[None, :]
    c = cosine.double().where(allowed, torch.full((K, K), -math.inf, dtype=torch.float64))
    nearest = c.max(1).values
    x = -torch.log(nearest.clamp_min(ISOLATED_MIN_COSINE))
    x = x.where(torch.isfinite(nearest), torch.full_like(x, math.nan))
    for k, cut in enumerate(rules.cuts(x, ALPHA, math.log(ISOLATED_FACTOR))):
        pointing = rules.verdicts[k].signals.get("direction", -math.inf)  # rule 1's margin, this pass
        if cut is None or not bool(dir_effect[k] > 0.5) or pointing <= 0.5:
            continue
        m = min(cut.margin(float(x[k])), 2 * pointing)
        if rules.margin(k, m, "isolated"):
            rules.flag(
                k,
                {"kind": "isolated", "cosine": float(nearest[k]), "typical": math.exp(-cut.centre)}
                | _judged("isolated", float(nearest[k]), math.exp(-cut.value), m, "<"),
            )


def _finite_log(x: torch.Tensor) -> torch.Tensor:
    out = torch.log(x.clamp_min(1e-300))
    return out.where(torch.isfinite(x), torch.full_like(out, math.nan))


def _judged(rule: str, value: float | None, threshold: float, margin: float | None, compare: str) -> dict:
    """The part of a reason that says what was compared with what."""
    return {"rule": rule, "value": value, "threshold": threshold, "compare": compare, "margin": margin}


def _sigmoid(log_odds: float) -> float:
    return 1 / (1 + math.exp(-log_odds))


def _score_reasons(v: AdapterVerdict, joint: dict) -> None:
    """Add the joint rule's reason where it set the score: the score shown is then always
    the margin of a listed reason."""
    shown = max((r["margin"] for r in v.reasons if r.get("margin") is not None), default=-math.inf)
    if joint["margin"] > shown:
        v.reasons.append(joint)


@dataclass
class Group:
    """Flagged adapters that agree with each other but not with the rest of the pool."""

    members: list[int]
    flagged: list[int]
    cosine_within: float
    cosine_to_rest: float


def groups(
    verdicts: list[AdapterVerdict], cosine: torch.Tensor, direction: torch.Tensor, copies: set[int] | None = None
) -> list[Group]:
    """Separate groups among the adapters flagged for where their update points.

    ``cosine``: the adapters' cosines with every module at unit norm; ``direction``: each
    adapter's cosine with the others' centre. Two adapters flagged by the direction or
    off-subspace rules are linked when their cosine is at least the median cosine between
    two unflagged adapters: they agree with each other as well as honest adapters agree
    among themselves. Linked sets of two or more are groups (another task's
    adapters, or a coordinated attack). An unflagged adapter closer on average to a group's
    members than to the pool's centre is listed with it, so the report shows the whole group
    rather than the members that happened to cross a threshold. ``copies`` (the members of
    duplicate groups other than the one kept) are left out: they are reported as copies.
    """
    copies = copies or set()
    kinds = {"direction", "off_subspace", "spectral"}
    pointed = [v.index for v in verdicts if v.index not in copies and any(r["kind"] in kinds for r in v.reasons)]
    honest = [
        k for k, v in enumerate(verdicts) if not v.flagged and k not in copies and bool(torch.isfinite(direction[k]))
    ]
    if len(pointed) < 2 or len(honest) < 3:
        return []
    pairs = cosine[honest][:, honest]
    link = float(pairs[~torch.eye(len(honest), dtype=torch.bool)].double().quantile(0.5))
    parent = {k: k for k in pointed}

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for a_pos, i in enumerate(pointed):
        for j in pointed[a_pos + 1 :]:
            if float(cosine[i, j]) >= link:
                parent[find(j)] = find(i)
    sets: dict[int, list[int]] = {}
    for k in pointed:
        sets.setdefault(find(k), []).append(k)
    out = []
    for flagged in (sorted(g) for g in sets.values() if len(g) > 1):
        close = [j for j in honest if float(cosine[j, flagged].mean()) > float(direction[j])]
        rest_of_pool = [k for k in range(len(verdicts)) if k not in copies]
        members = sorted(flagged + close)
        rest = [k for k in rest_of_pool if k not in members]
        within = cosine[members][:, members]
        n = len(members)
        out.append(
            Group(
                members=members,
                flagged=flagged,
                cosine_within=float((within.sum() - within.diagonal().sum()) / (n * (n - 1))),
                cosine_to_rest=float(cosine[members][:, rest].mean()) if rest else math.nan,
            )
        )
    return out
