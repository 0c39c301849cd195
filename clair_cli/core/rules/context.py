"""One pass of the verdict: the pool's signals, the verdicts being built, and the thresholds
every rule takes from the others' values (:mod:`clair_cli.core.verdict`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import torch

from clair_cli.core.calibration import NORMAL, Cut, leave_one_out_cuts, leave_one_out_rows, qn_scale
from clair_cli.core.rules.base import ALPHA, ModuleHit, Reason

if TYPE_CHECKING:
    from clair_cli.core.rules.coordinated import CoordinatedGroup
    from clair_cli.core.rules.opposed import ModuleGroup


@dataclass(frozen=True, kw_only=True)
class PoolSignals:
    """What the verdict judges: per adapter and module, the signals of the whole pool.

    Attributes:
        n_adapters: K.
        shares: per module, off-subspace shares of the adapters in ``members[module]``.
        members: per module, the adapter indices it covers (in ``shares`` order).
        structured: per module, whether a shared structure was found.
        sq_norms: per adapter, ``sum_m ||Theta_km||^2``.
        duplicates: Sybil groups of adapter indices (the first of each is kept).
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
        cosine: the ``K x K`` cosines of the updates with every module at unit norm, for
            rule 8; None leaves the rule out.
        coordinated: groups of adapters that agree far more closely than is typical
            (:mod:`clair_cli.core.rules.coordinated`): each counts as one adapter.
        direction_pairs: in small pools, ``D[k, j]``, adapter j's rule-1 cosine with k left
            out of its centre too (:func:`clair_cli.core.insubspace.direction_pairs`); rule 1
            takes k's typical cosine from row k. None: from ``direction``.
        recentre: ``direction`` and ``direction_pairs`` with the centres fitted without a
            given set of adapters (:class:`clair_cli.core.insubspace.DirectionCentres`); the
            passes after the first judge rule 1 against the centre of the adapters the previous
            pass let through. None: every pass uses ``direction``.
        module_recentre: ``module_direction`` likewise (:class:`clair_cli.core.audit.ModuleCentres`).
        module_norms: per module, each member's update norm (rule 13); None leaves the rule out.
        whole_direction: per adapter, the cosine of its whole update (every module at its own
            norm, not scaled to unit) with the geometric median of the others' (rule 15); None
            where the rule is off (a second population, :func:`clair_cli.core.insubspace.second_population`).
        whole_pairs: ``direction_pairs`` for ``whole_direction``.
        whole_recentre: ``recentre`` for ``whole_direction``.
        module_groups: rule 16's groups, each pointing against the rest on one module
            (:func:`clair_cli.core.rules.opposed.module_groups`); empty leaves the rule silent.
    """

    direction_pairs: torch.Tensor | None = None

    n_adapters: int
    shares: dict[str, torch.Tensor]
    members: dict[str, list[int]]
    structured: dict[str, bool]
    sq_norms: torch.Tensor
    duplicates: list[list[int]]
    threshold: float | None = None
    reference: list[int] | None = None
    in_subspace: dict[str, torch.Tensor | None] | None = None
    held_out: dict[str, torch.Tensor] | None = None
    direction: torch.Tensor | None = None
    module_direction: dict[str, torch.Tensor] | None = None
    inner: torch.Tensor | None = None
    order: list[int] | None = None
    cosine: torch.Tensor | None = None
    coordinated: list[CoordinatedGroup] = field(default_factory=list)
    recentre: Callable[[frozenset[int]], tuple[torch.Tensor, torch.Tensor | None]] | None = None
    module_recentre: Callable[[frozenset[int]], dict[str, torch.Tensor]] | None = None
    module_norms: dict[str, torch.Tensor] | None = None
    whole_direction: torch.Tensor | None = None
    whole_pairs: torch.Tensor | None = None
    whole_recentre: Callable[[frozenset[int]], tuple[torch.Tensor, torch.Tensor | None]] | None = None
    module_groups: list[ModuleGroup] = field(default_factory=list)

    @cached_property
    def effective_modules(self) -> float:
        """How many modules a whole update's cosine averages over: the participation ratio
        ``1 / sum_m p_m^2`` of the modules' shares ``p_m`` of the pool's typical squared update.
        A module's typical squared norm is its median over every adapter, one that does not hold
        the module counting 0 (a module of a minority counts nothing, so that no minority moves
        it), over the references alone in ``gate``; non-finite norms count 0. ``inf`` where the
        module norms are not given."""
        if not self.module_norms:
            return math.inf
        columns = sorted(self.reference) if self.reference else list(range(self.n_adapters))
        names = list(self.module_norms)
        chunk = max(1, EFFECTIVE_MODULES_CHUNK // max(self.n_adapters, 1))
        typical = []
        for start in range(0, len(names), chunk):
            block = torch.zeros(len(names[start : start + chunk]), self.n_adapters, dtype=torch.float64)
            for row, name in enumerate(names[start : start + chunk]):
                norms = self.module_norms[name].double()
                where = self.members.get(name, list(range(norms.numel())))
                block[row, where] = torch.where(torch.isfinite(norms), norms.square(), 0.0)
            ordered = block[:, columns].sort(dim=1).values
            n = len(columns)
            typical.append(0.5 * (ordered[:, (n - 1) // 2] + ordered[:, n // 2]))  # the median, as decompose's
        shares = torch.cat(typical)
        total = float(shares.sum())
        return 1.0 / float((shares / total).square().sum()) if math.isfinite(total) and total > 0 else math.inf


EFFECTIVE_MODULES_CHUNK = 1 << 22  # adapters x modules at a time in PoolSignals.effective_modules (32 MiB)


def kin(duplicates: list[list[int]], coordinated: list[CoordinatedGroup]) -> dict[int, list[int]]:
    """Per adapter in a duplicate or coordinated group, the adapters that share its update
    (itself included: its copies, its group and their copies), which its own centres and
    neighbours leave out."""
    sets: dict[int, set[int]] = {}
    for group in duplicates:
        for k in group:
            sets.setdefault(k, set()).update(group)
    for cg in coordinated:
        together = set().union(*(sets.get(k, {k}) for k in cg.members))
        for k in together:
            sets[k] = sets.get(k, set()) | together
    return {k: sorted(v) for k, v in sets.items()}


@dataclass
class AdapterVerdict:
    index: int
    score: float
    flagged: bool
    reasons: list[Reason] = field(default_factory=list)
    per_module: dict[str, float] = field(default_factory=dict)
    norm_ratio: float = 1.0
    signals: dict[str, float] = field(default_factory=dict)


@dataclass
class DirectionEvidence:
    """Rule 1's, for the joint and isolated rules: the standardised statistic, and the raw
    effect (the drop of the cosine in units of the floor; NaN where the rule is off)."""

    z: torch.Tensor
    effect: torch.Tensor


@dataclass
class OffSubspaceEvidence:
    """Rule 2's, for the joint rule and rule 3: per module the log-odds (and the references'
    held-out ones), the standardised mean (and its calibration), the mean log-odds and the
    raw effect in units of the floor."""

    log_odds: dict[str, torch.Tensor]
    calib_odds: dict[str, torch.Tensor]
    z: torch.Tensor
    z_calib: torch.Tensor
    mean: torch.Tensor
    effect: torch.Tensor


@dataclass(frozen=True)
class CentreLimits:
    """Limits on a per-module rule's centre (:meth:`Pass.per_module`).

    ``at_most``: a module measures an adapter only where the others' centre there is at most this
    value (rule 12: where the others agree on a direction). ``near_median``: no centre more than a
    spread below the module's :meth:`Pass.pool_median` (rule 13)."""

    at_most: float | None = None
    near_median: bool = False


NO_LIMITS = CentreLimits()


class Pass:
    """One pass over the rules: thresholds from the others' values, margins and reasons.

    ``excluded`` (flagged in the previous pass) and the copies of duplicates never set a
    threshold; ``extra`` (the suspects, while a pointing rule runs) neither.
    """

    def __init__(self, signals: PoolSignals, excluded: set[int], centre_without: frozenset[int] = frozenset()) -> None:
        self.signals = signals
        self.verdicts = [AdapterVerdict(k, 0.0, False) for k in range(signals.n_adapters)]
        self.trusted = set(signals.reference or ())
        self.gated = signals.reference is not None
        self.copies = {k for group in signals.duplicates for k in group[1:]}
        # A coordinated group counts once in every threshold (rule 10); its other members
        # still shape the spectral rule's fit, whose evidence is a group pushing one way.
        self.echoes = {k for group in signals.coordinated for k in group.members[1:]} - self.copies
        self.excluded = excluded | self.copies | self.echoes
        # Rule 1's cosines: against the centres without ``centre_without`` (what the previous
        # pass flagged, and groups pulling together) where that is a minority, else without
        # the flagged alone where they are, else against the whole pool's.
        self.direction_cosine, self.direction_pairs = signals.direction, signals.direction_pairs
        self.module_direction = signals.module_direction
        self.whole_cosine, self.whole_pairs = signals.whole_direction, signals.whole_pairs
        for without in (centre_without | excluded, frozenset(excluded)):
            if signals.recentre is not None and without and 2 * len(without) < signals.n_adapters:
                self.direction_cosine, self.direction_pairs = signals.recentre(without)
                if signals.module_recentre is not None:
                    self.module_direction = signals.module_recentre(without)
                if signals.whole_recentre is not None:
                    self.whole_cosine, self.whole_pairs = signals.whole_recentre(without)
                break
        self.extra: set[int] = set()  # also left out of the bases, for the rules that set it
        self.calibration = signals.held_out if signals.reference is not None else None
        for name, o in signals.shares.items():
            for pos, k in enumerate(signals.members[name]):
                self.verdicts[k].per_module[name] = float(o[pos])
        self.measured = {n: o for n, o in signals.shares.items() if signals.structured[n]}
        # What a rule leaves for the later ones in this pass.
        self.direction: DirectionEvidence | None = None
        self.off_subspace: OffSubspaceEvidence | None = None
        self.off_hits: dict[int, list[ModuleHit]] = {}  # rules 2 and 3; [] for rule 2 alone
        self.across: dict[int, tuple[float, float, float]] = {}  # rule 2: mean log-odds, its bound, margin
        self.held: dict[int, Reason] = {}  # listed only where they set the score
        self.pulling: set[int] = set()  # rule 11: groups pulling past its SUSPECT margin, not flagged

    def cuts(
        self,
        values: torch.Tensor,
        alpha: float,
        floor: float,
        calibration: torch.Tensor | None = None,
        relative: float = 0.0,
        law: str = NORMAL,
        capped: bool = False,
        near_median: bool = False,
    ) -> list[Cut | None]:
        """Per adapter, the cut from the others' values (finite ones, not ``excluded``; in a
        gate, the references' values, from ``calibration`` where given); ``capped``: with
        the small-pool critical value (:func:`clair_cli.core.calibration.rule_critical_value`);
        ``near_median``: no centre more than a spread below :meth:`pool_median` (the norm rules)."""
        calib = values if calibration is None else calibration
        near = float(self.pool_median(calib[None, :])[0]) if near_median else None
        cuts = leave_one_out_cuts(calib, self.basis(calib), alpha, floor, relative, law, capped, near)
        return [cut if bool(torch.isfinite(values[k])) else None for k, cut in enumerate(cuts)]

    def pool_median(self, calib: torch.Tensor) -> torch.Tensor:
        """Per row of ``calib`` (``M x K``), the median of every adapter's finite value but the
        copies' (the references' alone in a gate), the adapter judged and those a previous pass
        flagged included (NaN: none).

        A leave-one-out centre is the median of the others; where nearly half the pool sits far
        below the rest (four of nine clients whose update on a module is 1e-6 of an honest one,
        not exactly zero), each honest client's others are half low and half honest, and their
        median is the midpoint of the two groups: every honest client was flagged at 1e6x "the
        others' median" and the payload merged. The median of the whole pool lies between the
        lowest and the largest honest value whenever the attackers are fewer than half, whatever
        they send, so an upward norm cut centred no more than one spread below it (``near`` of
        :func:`~clair_cli.core.calibration.leave_one_out_rows`; the spread is the others' Qn scale,
        which sees the groups' own spreads) flags an honest value only for its distance from the
        other honest ones (docs/security.md, "Near-zero modules"). In an honest pool the others'
        median is within a spread of it and nothing changes. Those a previous pass flagged count
        here (else one honest client flagged by another rule would reopen the midpoint for the
        rest); the bound only raises a centre, so a boosted group among them raises it at most to
        a spread below the largest honest value."""
        keep = torch.ones(calib.shape[1], dtype=torch.bool)
        keep[list(self.copies)] = False
        if self.gated:
            keep &= torch.tensor([k in self.trusted for k in range(calib.shape[1])], dtype=torch.bool)
        x = calib.double().where(torch.isfinite(calib) & keep[None, :], math.nan)
        return x.nanquantile(0.5, dim=1)

    def basis(self, calib: torch.Tensor, echoes: bool = False) -> torch.Tensor:
        """Which adapters' values set a threshold: finite, not excluded, references in a gate;
        ``echoes``: with the members of coordinated groups counted once for thresholds."""
        return torch.isfinite(calib) & self._setters(len(calib), echoes)

    def _setters(self, K: int, echoes: bool = False) -> torch.Tensor:
        """:meth:`basis` before the values: who may set a threshold at all."""
        setters = torch.ones(K, dtype=torch.bool)
        setters[list((self.excluded - (self.echoes if echoes else set())) | self.extra)] = False
        if self.gated:
            setters &= torch.tensor([k in self.trusted for k in range(K)], dtype=torch.bool)
        return setters

    def table(self, values: dict[str, torch.Tensor], members: dict[str, list[int]]) -> torch.Tensor:
        """Per-module values spread over all K adapters: one row a module, in ``values``'
        order (NaN where a module has no value for an adapter, and where the adapter's update
        there is zero: a member that left a module untouched says nothing about it, and a
        minority of such members must not set the module's typical values). The modules with
        the same members are written together: a pool of 10,000 modules costs a few operations."""
        names = list(values)
        out = torch.full((len(names), len(self.verdicts)), math.nan, dtype=torch.float64)
        alike: dict[tuple[int, ...], list[int]] = {}
        for row, name in enumerate(names):
            alike.setdefault(tuple(members[name]), []).append(row)
        norms = self.signals.module_norms or {}
        for cols, rows in alike.items():
            block = torch.stack([values[names[r]] for r in rows]).double()
            if all(names[r] in norms for r in rows):
                zero = torch.stack([norms[names[r]] for r in rows]) == 0
                block = block.masked_fill(zero.to(block.device), math.nan)
            out[torch.tensor(rows)[:, None], torch.tensor(cols, dtype=torch.long)[None, :]] = block
        return out

    def mean(self, values: dict[str, torch.Tensor], members: dict[str, list[int]]) -> torch.Tensor:
        """Per adapter, the mean of a per-module value over the modules it is in (NaN: none)."""
        return self.table(values, members).nanmean(0)

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
        K = len(self.verdicts)
        nothing = torch.full((K,), math.nan, dtype=torch.float64)
        if not values:
            return nothing
        full = self.table(values, members)
        calib = full if not calibration else self.table({n: calibration.get(n, v) for n, v in values.items()}, members)
        # Centre and spread of every module at once, the modules of one basis together.
        basis = torch.isfinite(calib) & self._setters(K)[None, :]
        centre = torch.full((full.shape[0],), math.nan, dtype=torch.float64)
        spread = torch.zeros(full.shape[0], dtype=torch.float64)
        patterns, which = torch.unique(basis, dim=0, return_inverse=True)
        for p, pattern in enumerate(patterns):
            if int(pattern.sum()) < 3:
                continue
            rows = torch.nonzero(which == p, as_tuple=True)[0]
            x = calib[rows][:, pattern]
            centre[rows] = x.quantile(0.5, dim=1)
            spread[rows] = qn_scale(x)
        kept = spread > 0  # modules whose basis has no spread carry no evidence
        if not bool(kept.any()):
            return nothing
        centre, spread = centre[kept], spread[kept]
        z = (full[kept] - centre[:, None]) / spread[:, None]
        weights = (-centre / spread).clamp_min(0.0) if by_agreement else torch.ones_like(centre)
        if float(weights.sum()) <= 0:
            return nothing
        w = weights[:, None].expand_as(z).where(~z.isnan(), 0.0)
        return (z.nan_to_num(0.0) * w).sum(0) / w.sum(0)  # NaN where an adapter has no weighed module

    def per_module(
        self,
        values: dict[str, torch.Tensor],
        members: dict[str, list[int]],
        floor: float,
        calibration: dict[str, torch.Tensor] | None = None,
        *,
        relative: float = 0.0,
        centre: CentreLimits = NO_LIMITS,
        signal: str = "module",
        skip: frozenset[int] = frozenset(),
    ) -> dict[int, list[ModuleHit]]:
        """A per-module rule at ALPHA / M (Bonferroni over the modules measured); hits per
        adapter, largest excess first. Margins are recorded as the ``signal`` signal.
        The cuts of all modules are computed together (:func:`leave_one_out_rows`).

        ``relative``: as in :meth:`cuts`. ``centre``: limits on the others' centre
        (:class:`CentreLimits`). ``skip``: adapters not judged (no margin recorded), such as
        those a rule over all modules flagged for the same evidence."""
        hits: dict[int, list[ModuleHit]] = {}
        if not values:
            return hits
        names = list(values)
        alpha = ALPHA / len(names)
        full = self.table(values, members)
        calib = full if not calibration else self.table({n: calibration.get(n, values[n]) for n in names}, members)
        setters = self._setters(full.shape[1])[None, :]
        near = self.pool_median(calib) if centre.near_median else None
        at, width = leave_one_out_rows(calib, setters, alpha, floor, relative, near=near)
        if centre.at_most is not None:
            at = at.where(at <= centre.at_most, math.nan)
        margins = torch.where(width > 0, (full - at) / width, torch.where(full > at, math.inf, 0.0).double()).where(
            torch.isfinite(full) & ~at.isnan(), math.nan
        )
        for k in range(full.shape[1]):
            column = margins[:, k]
            measured = ~column.isnan()
            if k in skip or not bool(measured.any()):
                continue
            self.margin(k, float(column[measured].max()), signal)
            if k in self.trusted:
                continue
            for row in torch.nonzero(column > 1, as_tuple=True)[0].tolist():
                x, c, w = float(full[row, k]), float(at[row, k]), float(width[row, k])
                hits.setdefault(k, []).append(ModuleHit(x - c, names[row], x, c + w, float(column[row])))
        for items in hits.values():
            items.sort(key=lambda h: (-h.excess, h.module))
        return hits

    def margin(self, k: int, margin: float, signal: str) -> bool:
        """Record a margin; whether it flags (never for a trusted reference)."""
        v = self.verdicts[k]
        v.score = max(v.score, margin)
        v.signals[signal] = max(v.signals.get(signal, -math.inf), margin)
        return margin > 1 and k not in self.trusted

    def flag(self, k: int, reason: Reason) -> None:
        self.verdicts[k].flagged = True
        self.verdicts[k].reasons.append(reason)

    def flagged_for(self, kinds: tuple[str, ...], compare: str | None = None) -> frozenset[int]:
        """The adapters this pass flagged with a reason of ``kinds`` (on the ``compare`` side)."""
        return frozenset(
            k
            for k, v in enumerate(self.verdicts)
            if any(r.kind in kinds and compare in (None, r.compare) for r in v.reasons)
        )

    def hold(self, k: int, reason: Reason) -> None:
        """A reason for an adapter already flagged for the same evidence: one is enough,
        unless this one sets the score (:meth:`release_held`)."""
        self.held[k] = reason

    def release_held(self) -> None:
        """List each held reason where it set the score: the score shown is then always the
        margin of a listed reason."""
        for k, reason in self.held.items():
            v = self.verdicts[k]
            shown = max((r.margin for r in v.reasons if r.margin is not None), default=-math.inf)
            if reason.margin is not None and reason.margin > shown:
                v.reasons.append(reason)
