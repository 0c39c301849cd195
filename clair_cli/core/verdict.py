"""From per-adapter signals to verdicts (docs/engine.md, section 5).

Every threshold rule compares an adapter with the *other* adapters (leave-one-out; in
``clair gate``, with the references only) and flags it when its statistic exceeds
``median + max(c * sigma, floor)`` (:mod:`clair_cli.core.calibration`): ``sigma`` is a robust
spread (Rousseeuw and Croux's Qn), ``c`` is computed for the number of adapters it was
measured on so that an honest adapter drawn from the same distribution is flagged with
probability ``ALPHA`` under a Gaussian model (the MAD-style estimates of a dozen values are
noisy, and the normal quantile alone would flag many times more), and ``floor`` is a
minimum effect size in the statistic's own units. The rules, one module each in
:mod:`clair_cli.core.rules` (where each is stated in full), applied in the order of
:data:`clair_cli.core.rules.RULES`:

1. **Direction** (``direction``): the cosine of the adapter's update with the others' centre.
2. **Off-subspace, over all modules** (``off_subspace``): the mean log-odds of the share of
   the update outside the shared subspace. **Both at once** (``joint``): rules 1 and 2
   together, where neither alone would flag.
3. **Off-subspace, per module** (``module``), at ``ALPHA / M``.
4. **Inside the subspace, per module** (``in_subspace``), at ``ALPHA / M``.
5. **Norm** (``norm``), both ways: boosted updates and free riders.
6. **Duplicates** (``duplicate``): cosine above 0.999; every copy but one is flagged.
7. **Along the others' leading deviation** (``spectral``): a coordinated group.
8. **No neighbour** (``isolated``): another task's adapter.
9. **A group against the rest** (``opposed``): a minority whose mean points against the rest's.
10. **A coordinated group** (``coordinated``): adapters that agree far more closely than the
    pool does count as one adapter in every centre, threshold and merge; a flag for where one
    member points flags them all.
11. **A group pulling together** (``pull``): a minority whose deviations from the pool's
    centre add up, moving the mean far more than as many honest clients' would.
12. **Direction per module** (``module_direction``), at ``ALPHA / M``: an update turned in a
    few modules and honest in the rest.
13. **Norm per module** (``module_norm``), at ``ALPHA / M``: an update boosted in a few modules.
14. **Against the others on a module** (``module_projection``), at ``ALPHA / M``: flipped and scaled.
15. **Direction of the whole update** (``whole_direction``): rule 1 with every module at its own
    norm, against a centre fitted on the two thirds of the pool most aligned with it: free
    riders at full norm.
16. **A group against the rest on one module** (``module_opposed``): rule 9 on each module, the
    evidence of the group's members combined: a group turning one module of honest updates.

This module owns what the rules share: the passes (:func:`decide`), the duplicate groups and
the groups of flagged adapters that agree with each other (:func:`groups`).

An adapter's ``score`` is its largest margin over rules 1-5, 7, 8, 9 and 11-16: the distance above the typical
value in units of the distance to the threshold, so a score above 1 means that rule flagged
it; the duplicate rule (a copy) and the norm rule's zero update flag outright, without a
margin, so such an adapter may be flagged with a score below 1 (its reason names the rule).
``threshold`` (the ``--threshold`` option) replaces rules 2 and 3 by a fixed off-subspace share on any module.

Every reason records the rule that flagged (``rule``), the statistic it compared
(``value``), the bound it was compared with (``threshold``; ``compare`` says which side
flags) and its ``margin``; the adapter's score is the largest margin among its reasons
whenever a rule flagged it. Rules 1, 2 and 15 require two things at once (the standardised
statistic past its calibrated cut and the raw effect past its floor): ``threshold`` is the
bound on the raw statistic (rule 2: the mean log-odds, not the mean share the text quotes)
and ``margin`` the smaller of the two margins.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from clair_cli.core.calibration import critical_value
from clair_cli.core.rules import ALPHA, DUPLICATE_COSINE, RULES, AdapterVerdict, Pass, PoolSignals
from clair_cli.core.rules.duplicate import SAME_NORM, Duplicate, nearest_copy

PASSES = 5  # at most; stops when the flagged set repeats
POINTING = tuple(rule.name for rule in RULES if rule.pointing)  # their near-misses leave their bases
EXCLUDE_ALPHA = 0.02  # how near a miss: past the threshold at this false-flag rate

__all__ = ["AdapterVerdict", "Group", "PoolSignals", "decide", "duplicate_groups", "groups"]


def flag_every_copy(
    verdicts: list[AdapterVerdict],
    duplicates: list[list[int]],
    trusted: set[int],
    sq_norms: torch.Tensor,
    inner: torch.Tensor | None = None,
) -> None:
    """Flag the kept member of every group of identical updates too (a federated round: two
    honest clients never send the same update), as a copy of the others. A group whose
    members differ in norm (an update and a scaled copy of it: cosine 1, norms apart) keeps
    its first member (the one whose norm is nearest the pool's median,
    :func:`copy_order`), judged on its own signals: otherwise an attacker who scales a copy of
    an honest client's update would get that client left out."""
    rule = Duplicate()
    for group in duplicates:
        k = group[0]
        norms = sq_norms[group].double().clamp_min(0).sqrt()
        same = float(norms.max()) <= SAME_NORM * float(norms.min())
        if k in trusted or not same or any(r.kind == "duplicate" for r in verdicts[k].reasons):
            continue
        verdicts[k].flagged = True
        of = [j for j in group if j != k]
        verdicts[k].reasons.append(rule.reason(of, *nearest_copy(inner, k, of)))


COPY_NORM_TIE = 1e-3  # copies whose log norms differ by less are one update up to rounding: the name decides


def copy_order(sq_norms: torch.Tensor, names: Sequence[str] | None = None, trusted: Iterable[int] = ()):
    """How each group of copies is ordered, its first member standing for the group: a function
    of the group that returns its members in order. A trusted reference first, then the member
    whose norm lies nearest the pool's median norm (in log; a zero update last), then the name. A
    copy scaled by another factor (an attacker's ``x 3`` or ``x 0.2`` of an honest client's update)
    is farther from the median than the update it copies, so it is the one flagged as the copy
    whatever it is called. Members whose distances from the median differ by less than
    ``COPY_NORM_TIE`` (in log) are tied and ordered by name: one update sent twice, or
    re-factored (``B c``, ``A / c``), differs in norm only by the rounding of its factors, which
    must not decide which sender is named the copy."""
    trusted = set(trusted)
    log_norms = 0.5 * torch.log(sq_norms.double().clamp_min(1e-300))
    positive = sq_norms > 0
    centre = float(log_norms[positive].median()) if bool(positive.any()) else 0.0

    def off(k: int) -> float:
        return abs(float(log_norms[k]) - centre) if bool(positive[k]) else math.inf

    def order(group: Iterable[int]) -> list[int]:
        members = list(group)
        # Per rank (trusted or not), the nearest distance of the group's members of that rank.
        nearest = {t: min((off(k) for k in members if (k not in trusted) == t), default=math.inf) for t in (0, 1)}

        def key(k: int) -> tuple[bool, float, str, int]:
            d = off(k)
            tied = d <= nearest[int(k not in trusted)] + COPY_NORM_TIE
            return (k not in trusted, 0.0 if tied else d, names[k] if names else "", k)

        return sorted(members, key=key)

    return order


def connected_components(items: Sequence[int], pairs: Iterable[tuple[int, int]]) -> list[list[int]]:
    """The connected components of ``items`` linked by ``pairs`` (union-find).

    Args:
        items: the nodes.
        pairs: links between nodes of ``items`` (consumed once).

    Returns:
        Every component, its members in the order of ``items``, the components in the order
        of their first member there (singletons included).
    """
    parent = {i: i for i in items}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        parent[find(j)] = find(i)
    components: dict[int, list[int]] = {}
    for i in items:
        components.setdefault(find(i), []).append(i)
    return list(components.values())


def duplicate_groups(cosine: torch.Tensor) -> list[list[int]]:
    """Connected groups of adapters with pairwise cosine above DUPLICATE_COSINE."""
    above = torch.triu(cosine > DUPLICATE_COSINE, diagonal=1)
    pairs = [(i, j) for i, j in torch.nonzero(above).tolist()]
    return [g for g in connected_components(range(cosine.shape[0]), pairs) if len(g) > 1]


def decide(signals: PoolSignals) -> list[AdapterVerdict]:
    """Combine the signals into one verdict per adapter.

    In passes: each recomputes every threshold without the adapters the previous one
    flagged and, for rules 1, 2 and 2b, also without those past the threshold those rules
    would have at ``EXCLUDE_ALPHA`` (until both sets repeat, at most PASSES), so that
    contaminated adapters, which widen the robust spread (a third of the pool may be
    contaminated), do not shield each other; the flagged and those near misses together stay
    a minority of the pool (the largest misses first). From the second pass on, rule 1
    measures its cosines against centres fitted without the adapters the previous pass flagged
    and those pulling past rule 11's ``SUSPECT`` margin, while these are a minority
    (:class:`~clair_cli.core.insubspace.DirectionCentres`). The norm and per-module rules leave out only
    the flagged: honest norms are often multimodal (alphas differ), and leaving out their
    upper mode would tighten the threshold onto the rest of it. A duplicate group's first member
    (the caller orders them) is judged on its own signals; the others are flagged as copies.

    ``signals``: see :class:`~clair_cli.core.rules.context.PoolSignals`.
    """
    verdicts, pulling = _decide(signals, excluded=set(), suspects=set())
    exclude_above = _exclusion_margin(signals.n_adapters)
    trusted = set(signals.reference or ())  # references always set the thresholds
    seen: set[tuple[frozenset[int], ...]] = set()
    for _ in range(PASSES - 1):
        flagged = frozenset(v.index for v in verdicts if v.flagged)
        suspects = _suspects(verdicts, flagged, exclude_above, trusted)
        state = (flagged, suspects, pulling)
        if not (flagged or suspects or pulling) or state in seen:
            break
        seen.add(state)
        verdicts, pulling = _decide(
            signals, excluded=set(flagged), suspects=set(suspects), centre_without=flagged | pulling
        )
    return verdicts


def _suspects(
    verdicts: list[AdapterVerdict], flagged: frozenset[int], exclude_above: float, trusted: set[int]
) -> frozenset[int]:
    """The near misses of the pointing rules (margin above ``exclude_above``), largest first,
    as many as keep the flagged and the suspects together a minority of the pool: the bases
    of the thresholds always rest on most of it (in a pool of five, honest clients measured
    against a centre without the flagged one can all come near their cuts)."""
    pointing = {v.index: max(v.signals.get(r, -math.inf) for r in POINTING) for v in verdicts if v.index not in trusted}
    near = sorted((k for k, m in pointing.items() if m > exclude_above), key=lambda k: (-pointing[k], k))
    room = (len(verdicts) - 1) // 2 - len(flagged - set(near))
    return frozenset(near[: max(room, 0)])


def _decide(
    signals: PoolSignals, excluded: set[int], suspects: set[int], centre_without: frozenset[int] = frozenset()
) -> tuple[list[AdapterVerdict], frozenset[int]]:
    """One pass: every rule in order, the pointing ones also without the ``suspects``; rule 1's
    centres without ``centre_without`` where that is a minority (else without ``excluded``).
    Returns the verdicts and the groups rule 11 set apart (pulling, not flagged)."""
    ctx = Pass(signals, excluded, centre_without)
    for rule in RULES:
        ctx.extra = suspects if rule.pointing else set()
        rule.apply(ctx)
    ctx.release_held()
    return ctx.verdicts, frozenset(ctx.pulling - set(signals.reference or ()))


def _exclusion_margin(n_adapters: int) -> float:
    """Margin above which an adapter leaves the bases of rules 1, 2 and 2b in the next pass:
    past the threshold those rules would have at ``EXCLUDE_ALPHA`` instead of ``ALPHA``
    (where the floors do not bind)."""
    n = max(n_adapters - 1, 3)
    return critical_value(n, EXCLUDE_ALPHA) / critical_value(n, ALPHA)


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
    kinds = {"direction", "whole_direction", "off_subspace", "spectral", "opposed"}
    pointed = [v.index for v in verdicts if v.index not in copies and any(r.kind in kinds for r in v.reasons)]
    honest = [
        k for k, v in enumerate(verdicts) if not v.flagged and k not in copies and bool(torch.isfinite(direction[k]))
    ]
    if len(pointed) < 2 or len(honest) < 3:
        return []
    pairs = cosine[honest][:, honest]
    link = float(pairs[~torch.eye(len(honest), dtype=torch.bool)].double().quantile(0.5))
    linked = ((i, j) for a_pos, i in enumerate(pointed) for j in pointed[a_pos + 1 :] if float(cosine[i, j]) >= link)
    sets = connected_components(pointed, linked)
    out = []
    for flagged in (sorted(g) for g in sets if len(g) > 1):
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
