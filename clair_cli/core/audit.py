"""CLAIR over a whole pool: stream modules, decompose each, decide per adapter.

``ClairAuditor(...).fit(modules, n_adapters)`` consumes an iterable of
:class:`ModuleInput` one module at a time (memory is bounded by one module's
factors plus small per-module results) and learns:

- ``module_results_``: per module, rank, spectrum, residual and off-subspace shares,
  subspace basis, solver iterations and convergence;
- ``verdicts_``: per adapter, score, flag and reasons (see :mod:`clair_cli.core.verdict`);
- ``shared_rank_``, ``collaborative_set_``, ``duplicate_groups_``, ``shared_structure_``;
- ``coordinated_groups_``: adapters that agree far more closely than the pool does, each
  group counted as one adapter (:mod:`clair_cli.core.rules.coordinated`);
- ``groups_``: flagged adapters that agree with each other but not with the rest
  (:func:`clair_cli.core.verdict.groups`);
- ``silent_rules_``: the rules of ``WATCHED_RULES`` that could measure no adapter of the pool
  (no common direction, no shared structure, too few adapters), so that a report says
  what it could not check;
- ``refitted_``, ``refit_without_``: the modules whose subspaces were fitted again without
  the adapters the first verdict flagged for where they point, and those adapters
  (:meth:`ClairAuditor.refit`).

Within a module, adapters whose updates are identical up to rounding (cosine
above 0.999) enter the decomposition once, so a group of copies cannot pose as
a shared subspace; the copies then receive their representative's scores.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields, replace
from functools import partial
from typing import Literal

import numpy as np
import torch

from clair_cli.core.calibration import SMALL_POOL_N
from clair_cli.core.canonical import canonical_module
from clair_cli.core.decompose import Method, ModuleDecomposer, null_bound
from clair_cli.core.fastpath import FastDecomposer, off_subspace_shares, shared_basis
from clair_cli.core.insubspace import (
    DirectionCentres,
    agreement_masses,
    batched_centre_cosines,
    centre_cosines,
    in_subspace_gram,
    unit_centre_distances,
)
from clair_cli.core.order import content_keys, content_order, inverse
from clair_cli.core.pairwise import cosine_from_gram, factor_grams, gram
from clair_cli.core.reduction import reduce_module
from clair_cli.core.rules.base import Reason
from clair_cli.core.rules.context import kin
from clair_cli.core.rules.coordinated import POINTING_RULES, coordinated_groups, group_masses
from clair_cli.core.rules.opposed import ModuleCosines, module_groups
from clair_cli.core.verdict import (
    AdapterVerdict,
    PoolSignals,
    copy_order,
    decide,
    duplicate_groups,
    flag_every_copy,
    groups,
)

# Rules whose silence over a whole pool is reported: each measures every adapter where it can.
WATCHED_RULES = ("direction", "off_subspace", "norm", "spectral", "pull")

SideOption = Literal["out", "in", "both"]
Solver = Literal["auto", "convex", "fast"]

# Above this total adapter rank per module, solver="auto" takes the fast path
# (randomized subspace iteration with trimming) instead of the convex solver. Measured
# (make bench, 4096-wide modules, r = 16, 2 cores): at a total rank of 128 the fast path
# takes 0.06 s against 0.15 s, at 512 0.29 s against 3.7 s, at 1024 0.87 s against 10.8 s.
FAST_PATH_MIN_SUM_RANK = 128


def uses_fast_path(A: list[torch.Tensor], solver: str = "auto") -> bool:
    """Whether a module with factors ``A`` goes to the fast path under ``solver``."""
    if solver == "auto":
        return sum(a.shape[0] for a in A) > FAST_PATH_MIN_SUM_RANK
    return solver == "fast"


def working_dtype(A: list[torch.Tensor], dtype: torch.dtype, solver: str = "auto") -> torch.dtype:
    """Precision for one module: float64 on the convex path, ``dtype`` on the fast path.

    Convex-path modules are small (adapter ranks summing to at most
    ``FAST_PATH_MIN_SUM_RANK``), so float64 costs little there, and it makes results
    independent of the thread count: float32 BLAS reductions differ in their last bits
    between thread counts, which is enough to change a printed digit. Fast-path modules
    use ``dtype`` (``--dtype float64`` makes them thread-count independent too).
    """
    return dtype if uses_fast_path(A, solver) else torch.float64


class EmptyUpdates(ValueError):
    """The adapters that set the shared subspace of a module all have a zero update there."""


@dataclass
class ModuleInput:
    """One module's factors for the adapters that target it."""

    name: str
    members: list[int]
    A: list[torch.Tensor]
    B: list[torch.Tensor]
    scales: list[float]


def canonical_input(
    mod: ModuleInput, weights: list[float] | None = None, factors: bool = True
) -> tuple[ModuleInput, list[float] | None]:
    """The module (and its weights) in the canonical order of :mod:`clair_cli.core.order`;
    with ``factors``, also in canonical factors (:mod:`clair_cli.core.canonical`, float64), so
    that what is computed from it depends on each update alone, not on how it was factored
    or on the order of the sources."""
    if factors:
        mod = ModuleInput(mod.name, mod.members, *canonical_module(mod.A, mod.B, mod.scales))
    order = content_order(mod.A, mod.B, mod.scales)
    return (
        ModuleInput(
            mod.name,
            [mod.members[j] for j in order],
            [mod.A[j] for j in order],
            [mod.B[j] for j in order],
            [mod.scales[j] for j in order],
        ),
        None if weights is None else [weights[j] for j in order],
    )


def at_working_precision(mod: ModuleInput, dtype: torch.dtype, solver: str = "auto") -> ModuleInput:
    """The module in the audit's working precision (:func:`working_dtype`: float64 where the
    convex path ran)."""
    work = working_dtype(mod.A, dtype, solver)
    if work == mod.A[0].dtype:
        return mod
    return ModuleInput(mod.name, mod.members, [a.to(work) for a in mod.A], [b.to(work) for b in mod.B], mod.scales)


@dataclass
class ModuleResult:
    name: str
    members: list[int]
    rank: int
    spectrum: torch.Tensor
    null_bound: torch.Tensor | None
    residual: torch.Tensor
    off_subspace: torch.Tensor
    norms: torch.Tensor
    subspace: torch.Tensor
    shared_structure: bool
    n_iter: int
    converged: bool
    solver: str = "convex"
    null_draws: int = 0
    in_subspace: torch.Tensor | None = None
    held_out: torch.Tensor | None = None
    direction: torch.Tensor | None = None
    fitted: list[int] | None = None  # pool indices of the collaborators that shaped the subspace


Copies = Literal["keep-one", "flag-all"]
NULL_DRAWS = 20  # random rotations for parallel analysis
# Rules whose flag leaves an adapter out of a refitted subspace (ClairAuditor.refit_plan): those
# that judge where an update points, and the groups pointing one way together.
REFIT_WITHOUT = frozenset(POINTING_RULES) | {"coordinated", "pull"}
# Flagged collaborators of a module that make it refitted: one adapter alone carries no shared
# direction (parallel analysis's MIN_CARRIERS), so leaving it out would only score it held out.
MIN_CARRIERS_GROUP = 2
MAX_REFITS = 2  # verdicts decided again with subspaces fitted without the flagged (ClairAuditor.refit)
MIN_REFIT = 3  # adapters with an update a refitted subspace needs (fewer: the module is fitted as it was)


@dataclass(frozen=True)
class VerdictOptions:
    """How the audit decides, beyond the decomposition.

    Attributes:
        threshold: fixed off-subspace share threshold (default None: the automatic rule).
        in_subspace: also test where each update sits inside the shared subspace
            (rule 4, :mod:`clair_cli.core.insubspace`: sign-flipped updates).
        copies: ``"keep-one"`` (default): in a group of identical updates one member is
            judged on its own signals and the others are flagged as copies (a hub pool may
            hold one adapter twice); ``"flag-all"``: every member of a group of one update
            sent several times (norms within 1 %) is flagged (a federated round, where two
            honest clients never send the same update); a scaled copy still leaves the first
            member to be judged (:func:`clair_cli.core.verdict.flag_every_copy`).
    """

    threshold: float | None = None
    in_subspace: bool = True
    copies: Copies = "keep-one"


@dataclass
class _Tally:
    """What the audit sums over modules, per pair or per adapter of the pool."""

    inner: torch.Tensor  # K x K Gram matrix of the whole updates
    unit: torch.Tensor  # K x K sum over modules of the cosine matrices
    digests: list  # per adapter, a sha256 over its modules' content keys (its bytes once sealed)

    @classmethod
    def empty(cls, K: int) -> _Tally:
        z = torch.zeros(K, K, dtype=torch.float64)
        return cls(z, z.clone(), [hashlib.sha256() for _ in range(K)])

    def add(self, members: list[int], G: torch.Tensor) -> None:
        idx = torch.tensor(members)
        self.inner[idx[:, None], idx[None, :]] += G
        self.unit[idx[:, None], idx[None, :]] += cosine_from_gram(G)

    def seal(self) -> None:
        """End the folding: each adapter's digest becomes its bytes (a fitted auditor then pickles)."""
        self.digests = [h.digest() if not isinstance(h, bytes) else h for h in self.digests]

    def fold(self, done: ModuleAudit) -> None:
        """Add one module's share; modules are folded in the pool's module order, whoever
        computed them, so the sums are the same bit for bit."""
        for k, key in zip(done.given_members, done.keys, strict=True):
            self.digests[k].update(key)
        self.add(done.work_members, done.G)


@dataclass
class ModuleAudit:
    """One module's audit, a function of that module's factors and the auditor's settings
    alone (so it can be computed in any process): its result and its share of the pool-wide
    sums, which :meth:`_Tally.fold` adds in module order.

    Attributes:
        result: the module's result.
        given_members, keys: the members as given and each one's content key.
        work_members, G: the members in canonical order and their updates' Gram matrix
            (float64, CPU).
        centre: rule 1's per-module cosines refitted without given adapters (outside a gate).
    """

    result: ModuleResult
    given_members: list[int]
    keys: list[bytes]
    work_members: list[int]
    G: torch.Tensor
    centre: ModuleCentre | None = None


@dataclass
class ModuleCentre:
    """What a module's rule-1 cosines come from, in the canonical order of its members, so
    that the verdict's later passes can refit them without the adapters a pass flagged.

    Attributes:
        adapters: the pool index of each member, in canonical order.
        cosine: the members' cosine matrix.
        fit_on: the members that shape the centre (the representatives of copies).
        rep: per member, the member whose update it copies (itself if none).
        back: undoes the canonical order (the cosines are returned in the members' given order).
        first: :meth:`cosines`, as the module's audit computed them (rule 16 starts a split from
            their signs).
    """

    adapters: list[int]
    cosine: torch.Tensor
    fit_on: list[int]
    rep: list[int]
    back: torch.Tensor
    first: torch.Tensor | None = None

    def cosines(self) -> torch.Tensor:
        """Each member's cosine with the module's centre of the others (the first pass's;
        :class:`ModuleCentres` refits them without given adapters)."""
        centre = torch.zeros(len(self.adapters), dtype=torch.bool)
        centre[self.fit_on] = True
        leave_out = {j: [self.rep[j]] for j in range(len(self.adapters))}
        mass = agreement_masses(self.cosine, centre)
        return centre_cosines(self.cosine, centre, leave_out, mass)[self.back]

    def for_groups(self) -> ModuleCosines:
        """What rule 16 reads (:class:`~clair_cli.core.rules.opposed.ModuleCosines`): the members
        with a nonzero update, copies once (and named with the one they copy)."""
        C = self.cosine.double()
        diag = C.diagonal().tolist()
        idx = [j for j in range(len(self.adapters)) if self.rep[j] == j and diag[j] > 0]
        copied: dict[int, list[int]] = {}  # per adapter, its copies in order (one pass, not one per adapter)
        for i, r in enumerate(self.rep):
            if r != i:
                copied.setdefault(r, []).append(self.adapters[i])
        copies = {j: tuple(copied.get(j, ())) for j in idx}
        first = self.cosines() if self.first is None else self.first
        canonical = first.double()[torch.argsort(self.back)]  # given order back to canonical
        keep = torch.tensor(idx, dtype=torch.long)
        # Every member kept (the usual case): the cosine matrix itself, not a copy of it (a pool of many
        # modules keeps one per module until the verdict ends).
        kept = C if len(idx) == C.shape[0] else C[keep][:, keep]
        return ModuleCosines(tuple(self.adapters[j] for j in idx), kept, canonical[keep], tuple(copies[j] for j in idx))


class ModuleCentres:
    """Every module's rule-1 cosines refitted without a set of adapters (as
    :meth:`ModuleCentre.cosines` with those out of the centre, to rounding), cached per set. The modules with the same
    number of members are refitted as one batch (:func:`batched_centre_cosines`)."""

    def __init__(self, centres: dict[str, ModuleCentre]) -> None:
        by_size: dict[int, list[str]] = {}
        for name, c in centres.items():
            by_size.setdefault(len(c.adapters), []).append(name)
        self._batches = []
        for names in by_size.values():
            cs = [centres[n] for n in names]
            fit_on = np.zeros((len(cs), len(cs[0].adapters)), dtype=bool)
            for b, c in enumerate(cs):
                fit_on[b, c.fit_on] = True
            stacked = np.stack([c.cosine.double().numpy() for c in cs])
            for b, c in enumerate(cs):  # each centre's matrix becomes a view of the stack: one copy kept, not two
                c.cosine = torch.from_numpy(stacked[b])
            self._batches.append(
                (
                    names,
                    np.array([c.adapters for c in cs]),
                    stacked,
                    fit_on,
                    np.array([c.rep for c in cs]),
                    [c.back for c in cs],
                )
            )
        self._cache: dict[frozenset[int], dict[str, torch.Tensor]] = {}

    def __call__(self, without: frozenset[int]) -> dict[str, torch.Tensor]:
        if without not in self._cache:
            out: dict[str, torch.Tensor] = {}
            for names, adapters, C, fit_on, rep, backs in self._batches:
                centre = fit_on & ~np.isin(adapters, list(without))
                mass = np.stack(
                    [
                        agreement_masses(torch.from_numpy(C[b]), torch.from_numpy(centre[b])).numpy()
                        for b in range(len(names))
                    ]
                )
                cos = torch.from_numpy(batched_centre_cosines(C, centre, rep, mass))
                out |= {name: cos[b][back] for b, (name, back) in enumerate(zip(names, backs, strict=True))}
            self._cache[without] = out
        return self._cache[without]


def _ordinary(done: ModuleAudit) -> ModuleAudit:
    """``done`` with every tensor copied out of inference mode (an inference tensor cannot be
    changed in place, or recorded by autograd, outside it: a caller may do either)."""

    r = done.result
    tensors = {f.name: getattr(r, f.name) for f in fields(r) if isinstance(getattr(r, f.name), torch.Tensor)}
    result = replace(r, **{name: t.clone() for name, t in tensors.items()})
    c = done.centre
    first = None if c is None or c.first is None else c.first.clone()
    centre = None if c is None else replace(c, cosine=c.cosine.clone(), back=c.back.clone(), first=first)
    return replace(done, result=result, G=done.G.clone(), centre=centre)


@dataclass
class _ModuleWork:
    """One module during its audit, in canonical order of its members.

    Attributes:
        mod: the module in canonical factors and order; ``back`` undoes the order.
        keys: per member as given, its content key.
        A, B: its factors on the device, in the working precision.
        grams: the factor Gram matrices of ``A`` and ``B``.
        G: the updates' Gram matrix (float64, CPU); ``norms`` their norms.
        rep: per member, the first member with an identical update (itself if none).
        keep: the representatives; ``pos`` their position among them.
        fit_on: the members the subspace is fitted on (representatives, or references).
    """

    mod: ModuleInput
    back: torch.Tensor
    keys: list[bytes]
    A: list[torch.Tensor]
    B: list[torch.Tensor]
    grams: tuple[torch.Tensor, torch.Tensor]
    G: torch.Tensor
    norms: torch.Tensor
    rep: list[int]
    keep: list[int]
    pos: dict[int, int]
    fit_on: list[int]


def _in_content_order(given: ModuleInput) -> tuple[ModuleInput, torch.Tensor, list[bytes]]:
    """The module in canonical factors and a canonical order of its members, the
    permutation back, and each member's content key (in the given order)."""
    # Every statistic is of the update alone: canonical factors first
    # (:mod:`clair_cli.core.canonical`), whatever the factorisation given.
    cA, cB, cs = canonical_module(given.A, given.B, given.scales)
    # Work in a canonical order of the members; per-member results are put back
    # into the given order, so the sources' order changes nothing.
    keys = content_keys(cA, cB, cs)
    order = content_order(cA, cB, cs, keys)
    mod = ModuleInput(
        given.name,
        [given.members[j] for j in order],
        [cA[j] for j in order],
        [cB[j] for j in order],
        [cs[j] for j in order],
    )
    return mod, inverse(order), list(keys)


def _finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite, from its largest and smallest (NaN propagates
    through both, +Inf is the largest, -Inf the smallest): no mask of its size is allocated."""
    return not t.numel() or bool(torch.isfinite(t.amax()) & torch.isfinite(t.amin()))


def _check_finite(
    mod: ModuleInput, G: torch.Tensor, grams: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype
) -> None:
    """Refuse a module whose updates overflow the working precision's products (an update whose
    norm passes about 1.8e19 in float32, 1.3e154 in float64): every statistic after them would be
    NaN or Inf, and no rule could flag the adapter that caused it.

    Raises:
        ValueError: naming the module and the adapters (pool indices) whose updates overflow.
    """
    if all(_finite(t) for t in (G, *grams)):
        return
    rows = [j for j in range(G.shape[0]) if not bool(torch.isfinite(G[j]).all())]
    bad = [j for j in rows if not math.isfinite(float(G[j, j]))] or rows or list(range(G.shape[0]))
    raise ValueError(
        f"module {mod.name}: the updates of adapters {sorted(mod.members[j] for j in bad)} are too large for "
        f"{str(dtype).removeprefix('torch.')} products (their Gram matrices overflow); clair's readers refuse "
        "factors whose update passes 1e12 an entry"
    )


def _sub_grams(w: _ModuleWork) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's factor Grams restricted to the members the subspace is fitted on."""
    if len(w.fit_on) == len(w.A):
        return w.grams
    starts = [0]
    for a in w.A:
        starts.append(starts[-1] + a.shape[0])
    idx = torch.cat([torch.arange(starts[j], starts[j + 1]) for j in w.fit_on]).to(w.grams[0].device)
    return w.grams[0][idx][:, idx], w.grams[1][idx][:, idx]


def _representatives(G: torch.Tensor) -> list[int]:
    """Per member, the first member of its group of identical updates (itself if none)."""
    rep = list(range(G.shape[0]))
    for group in duplicate_groups(cosine_from_gram(G)):
        for j in group[1:]:
            rep[j] = group[0]
    return rep


def _named(modules: list[ModuleInput], wanted: list[str]) -> list[ModuleInput]:
    """The modules named in ``wanted``, in their order in ``modules``."""
    names = set(wanted)
    return [given for given in modules if given.name in names]


def _fit_on(
    mod: ModuleInput,
    keep: list[int],
    reference: list[int] | None,
    norms: torch.Tensor,
    without: frozenset[int] = frozenset(),
) -> list[int]:
    """The members the subspace is fitted on: the representatives, or (gate) the references;
    ``without`` (pool indices) leaves adapters out of the fit where at least ``MIN_REFIT`` others
    with a non-zero update remain (:meth:`ClairAuditor.refit`).

    Raises:
        ValueError: no reference adapter targets the module.
        EmptyUpdates: every one of them has a zero update there.
    """
    fit_on = keep
    if reference is not None:
        trusted = set(reference)
        fit_on = [j for j in keep if mod.members[j] in trusted]
        if not fit_on:
            raise ValueError(f"module {mod.name}: no reference adapter targets it")
    if all(float(norms[j]) == 0 for j in fit_on):
        whose = "reference adapter's" if reference is not None else "adapter's"
        raise EmptyUpdates(f"module {mod.name}: every {whose} update is zero there, so they span no shared subspace")
    rest = [j for j in fit_on if mod.members[j] not in without]
    if len(rest) < len(fit_on) and sum(float(norms[j]) > 0 for j in rest) >= MIN_REFIT:
        return rest
    return fit_on


class ClairAuditor:
    """Audit a pool of adapters with CLAIR.

    Args:
        method: decomposition form, ``"noisy"`` (default) or ``"exact"``.
        side: ``"out"`` (shared output space, default), ``"in"``, or ``"both"``
            (off-subspace share is the larger of the two).
        rank: ``"auto"`` or a fixed shared rank.
        dtype: working precision of the fast path (float32 or float64); modules on the
            convex path are always computed in float64 (see :func:`working_dtype`).
        device: torch device for the decompositions.
        random_state: seed of the parallel analysis.
        solver: ``"convex"`` (the decomposition of docs/engine.md, section 3), ``"fast"``
            (:mod:`clair_cli.core.fastpath`), or ``"auto"``: fast when a module's
            adapter ranks sum to more than ``FAST_PATH_MIN_SUM_RANK``.
        verdict: the threshold, the in-subspace rule and how copies are judged
            (:class:`VerdictOptions`).

    Attributes:
        n_null: random rotations drawn for parallel analysis (``NULL_DRAWS``; a class
            attribute, which an experiment may set on an instance).
    """

    n_null: int = NULL_DRAWS

    def __init__(
        self,
        method: Method = "noisy",
        side: SideOption = "out",
        rank: int | Literal["auto"] = "auto",
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        random_state: int = 0,
        solver: Solver = "auto",
        verdict: VerdictOptions | None = None,
    ) -> None:
        self.method = method
        self.side = side
        self.rank = rank
        self.dtype = dtype
        self.device = device
        self.random_state = random_state
        self.solver = solver
        self.verdict = verdict if verdict is not None else VerdictOptions()

    def unfitted(self) -> ClairAuditor:
        """An auditor with these parameters and none of a fit's state: what a worker needs to
        audit a module (:meth:`audit_module`), small and picklable after a fit too."""
        fresh = ClairAuditor(
            self.method, self.side, self.rank, self.dtype, self.device, self.random_state, self.solver, self.verdict
        )
        if "n_null" in vars(self):  # set on the instance (an experiment's)
            fresh.n_null = self.n_null
        return fresh

    def _use_fast(self, A: list[torch.Tensor]) -> bool:
        return uses_fast_path(A, self.solver)

    def _decompose(
        self,
        A: list[torch.Tensor],
        B: list[torch.Tensor],
        scales: list[float],
        side: str,
        grams: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ):
        """``grams``: ``(A A^T, B^T B)`` of exactly these factors stacked, where the caller has them."""
        if self._use_fast(A):
            a_gram, b_gram = (None, None) if grams is None else grams()
            gram, other = (a_gram, b_gram) if side == "in" else (b_gram, a_gram)
            return FastDecomposer(rank=self.rank, n_null=self.n_null, random_state=self.random_state).fit(
                A, B, scales, side, gram=gram, other_gram=other
            )
        stack = reduce_module(A, B, scales, side=side)  # type: ignore[arg-type]
        dec = ModuleDecomposer(
            method=self.method, rank=self.rank, n_null=self.n_null, random_state=self.random_state
        ).fit(stack)
        return dec

    @staticmethod
    def _held_out_shares(w: _ModuleWork, used, off: torch.Tensor) -> torch.Tensor:
        """Shares with every reference scored against the subspace of the *other* references.

        A candidate never shapes the subspace it is scored against, but a reference does:
        its in-sample share is smaller than a new honest adapter's would be, so thresholds
        measured on in-sample shares flag honest candidates. Each reference's held-out share
        (leading directions of the others' unit-norm updates, at the same rank) is scored the
        way a candidate is. Candidates keep their shares. Needs three references or more.
        """
        A, B, scales, fit_on = w.A, w.B, w.mod.scales, w.fit_on
        out = off.clone()
        if len(fit_on) < 3:
            return out
        for j in fit_on:
            others = [i for i in fit_on if i != j]
            shares = []
            for d, side in used:
                if not d.shared_structure_:
                    continue
                basis = shared_basis(
                    [A[i] for i in others],
                    [B[i] for i in others],
                    [scales[i] for i in others],
                    int(d.subspace_.shape[1]),
                    side,
                )
                shares.append(off_subspace_shares([A[j]], [B[j]], [scales[j]], basis, side)[0])
            if shares:
                out[w.pos[j]] = torch.stack(shares).max()
        return out

    def _prepare(
        self, given: ModuleInput, reference: list[int] | None, without: frozenset[int] = frozenset()
    ) -> _ModuleWork:
        """The module in canonical order on the device, its Grams and its representatives."""
        mod, back, keys = _in_content_order(given)
        dtype = working_dtype(mod.A, self.dtype, self.solver)
        A = [a.to(self.device, dtype) for a in mod.A]
        B = [b.to(self.device, dtype) for b in mod.B]
        grams = factor_grams(A, B)
        G = gram(A, B, mod.scales, *grams).double().cpu()
        _check_finite(mod, G, grams, dtype)
        rep = _representatives(G)
        keep = [j for j in range(len(A)) if rep[j] == j]
        pos = {j: p for p, j in enumerate(keep)}
        norms = G.diagonal().clamp_min(0).sqrt()
        fit_on = _fit_on(mod, keep, reference, norms, without)
        return _ModuleWork(mod, back, keys, A, B, grams, G, norms, rep, keep, pos, fit_on)

    def _shares(self, w: _ModuleWork, used, reference: list[int] | None):
        """Off-subspace shares and residual shares of the representatives, and (gate) the
        references' held-out shares."""
        if reference is None:
            off = torch.stack([self._over_keep(w, d, d.off_subspace_, s) for d, s in used]).max(dim=0).values
            residual = torch.stack([self._over_keep(w, d, d.residual_, s) for d, s in used]).max(dim=0).values
            return off, residual, None
        # Score every adapter against the reference subspace.
        kA, kB, ks = [w.A[j] for j in w.keep], [w.B[j] for j in w.keep], [w.mod.scales[j] for j in w.keep]
        off = torch.stack([off_subspace_shares(kA, kB, ks, d.subspace_, s) for d, s in used]).max(0).values
        return off, off, self._held_out_shares(w, used, off)

    @staticmethod
    def _over_keep(w: _ModuleWork, d, fitted: torch.Tensor, side: str) -> torch.Tensor:
        """A decomposition's per-member values (over ``fit_on``) for every representative: those
        left out of the fit (:meth:`ClairAuditor.refit`) get their share off its subspace."""
        if len(w.fit_on) == len(w.keep):
            return fitted
        out = torch.empty(len(w.keep), dtype=fitted.dtype, device=fitted.device)
        out[[w.pos[j] for j in w.fit_on]] = fitted
        fitted_on = set(w.fit_on)
        left = [j for j in w.keep if j not in fitted_on]
        A, B, scales = [w.A[j] for j in left], [w.B[j] for j in left], [w.mod.scales[j] for j in left]
        out[[w.pos[j] for j in left]] = off_subspace_shares(A, B, scales, d.subspace_, side).to(out)
        return out

    def _in_subspace(self, w: _ModuleWork, main, side: str) -> torch.Tensor | None:
        """Each update's distance inside the shared subspace from the collaborators' centre."""
        if not (self.verdict.in_subspace and main.shared_structure_):
            return None
        # The centre is fitted on the decomposition's collaborators (copies once).
        centre_on = torch.zeros(len(w.A), dtype=torch.bool)
        centre_on[[j for j, c in zip(w.fit_on, main.collaborators_.tolist(), strict=True) if c]] = True
        Gx = in_subspace_gram(w.A, w.B, w.mod.scales, main.subspace_, side, w.grams).double().cpu()
        distances = unit_centre_distances(Gx, w.norms, centre_on)
        return None if distances is None else distances[w.back]

    @staticmethod
    def _direction(w: _ModuleWork, reference: list[int] | None) -> tuple[torch.Tensor, ModuleCentre | None]:
        """Each update's cosine with the module's centre, fitted on the representatives (or
        the references) other than itself and the one it copies: a centre it did not shape;
        outside a gate, also what refits it (:class:`ModuleCentre`)."""
        cosine = cosine_from_gram(w.G)
        if reference is None:
            # Weighed by agreement: a set agreeing far more closely than the module's pool
            # counts as a few adapters, whatever its size.
            centre = ModuleCentre(list(w.mod.members), cosine, list(w.fit_on), list(w.rep), w.back)
            centre.first = centre.cosines()
            return centre.first, centre
        # A gate's references set the centre as they are.
        module_centre = torch.zeros(len(w.A), dtype=torch.bool)
        module_centre[w.fit_on] = True
        return centre_cosines(cosine, module_centre, {j: [j] for j in w.fit_on})[w.back], None

    def audit_module(
        self, given: ModuleInput, reference: list[int] | None = None, without: frozenset[int] = frozenset()
    ) -> ModuleAudit:
        """One module's audit (:class:`ModuleAudit`), which :meth:`fit_audits` folds into the pool's;
        ``without``: adapters (pool indices) left out of the subspace's fit (:meth:`refit`).

        A pure function of ``given`` and the auditor's parameters: its random draws come from
        generators seeded with ``random_state`` for each module, so any process computes it alike.

        Computed in torch's inference mode: the work is hundreds of operations on small
        matrices, where autograd's bookkeeping costs a third of the time (the same kernels,
        so the same numbers); the results are copied out as ordinary tensors.
        """
        with torch.inference_mode():
            done = self._audit_module(given, reference, without)
        return _ordinary(done)

    def _audit_module(self, given: ModuleInput, reference: list[int] | None, without: frozenset[int]) -> ModuleAudit:
        w = self._prepare(given, reference, without)
        sides = ["out", "in"] if self.side == "both" else [self.side]
        decs = [
            self._decompose(
                [w.A[j] for j in w.fit_on],
                [w.B[j] for j in w.fit_on],
                [w.mod.scales[j] for j in w.fit_on],
                s,
                lambda: _sub_grams(w),
            )
            for s in sides
        ]
        # With side="both", a side without shared structure carries no evidence.
        used = [(d, s) for d, s in zip(decs, sides, strict=True) if d.shared_structure_] or [(decs[0], sides[0])]
        main = used[0][0]
        off, residual, held_out = self._shares(w, used, reference)
        expand = torch.tensor([w.pos[w.rep[j]] for j in range(len(w.A))])
        null = main.null_spectrum_
        direction, centre = self._direction(w, reference)
        result = ModuleResult(
            name=w.mod.name,
            members=list(given.members),
            rank=main.rank_,
            spectrum=main.spectrum_.double().cpu(),
            null_bound=None if null is None else null_bound(null).double().cpu(),
            residual=residual.double().cpu()[expand][w.back],
            off_subspace=off.double().cpu()[expand][w.back],
            norms=w.norms[w.back],
            subspace=main.subspace_.cpu(),
            shared_structure=any(d.shared_structure_ for d in decs),
            n_iter=max(d.n_iter_ for d in decs),
            converged=all(d.converged_ for d in decs),
            solver="fast" if isinstance(main, FastDecomposer) else "convex",
            null_draws=0 if null is None else int(null.shape[0]),
            in_subspace=self._in_subspace(w, main, used[0][1]),
            held_out=None if held_out is None else held_out.double().cpu()[expand][w.back],
            direction=direction,
            fitted=sorted(w.mod.members[j] for j, c in zip(w.fit_on, main.collaborators_.tolist(), strict=True) if c),
        )
        return ModuleAudit(result, list(given.members), w.keys, list(w.mod.members), w.G, centre)

    def fit(
        self,
        modules: Iterable[ModuleInput],
        n_adapters: int,
        reference: list[int] | None = None,
        names: list[str] | None = None,
        again: Callable[[list[str]], Iterable[ModuleInput]] | None = None,
    ) -> ClairAuditor:
        """Audit the pool, one module at a time, then :meth:`refit` where :meth:`refit_plan` says.

        Args:
            modules: the modules' factors (consumed once; a list or tuple is also read again
                for the refit).
            n_adapters: K; module members index into ``range(K)``.
            reference: trusted adapters. When given (``clair gate``), each module's
                subspace is estimated on them alone, every other adapter is scored
                against it, and only those others can be flagged.
            names: the adapters' names. In a group of identical adapters the one kept (judged
                on its own signals; the others are flagged as copies) is a reference if
                there is one, else the first by name (by index without names), so the
                order of the sources does not matter.
            again: given the names of some modules, their factors again, in the pool's module
                order (a stream such as a pool read from files; without it, and with ``modules``
                a stream, no refit is made).
        """
        self._check_params()
        if again is None and isinstance(modules, list | tuple):
            again = partial(_named, list(modules))
        self.fit_audits((self.audit_module(given, reference) for given in modules), n_adapters, reference, names)
        while again is not None and (plan := self.refit_plan())[0]:
            wanted, without = plan
            self.refit((self.audit_module(given, reference, without) for given in again(wanted)), without)
        return self

    def _check_params(self) -> None:
        if self.side not in ("out", "in", "both"):
            raise ValueError(f"side must be 'out', 'in' or 'both', got {self.side!r}")
        if self.solver not in ("auto", "convex", "fast"):
            raise ValueError(f"solver must be 'auto', 'convex' or 'fast', got {self.solver!r}")

    def fit_audits(
        self,
        audits: Iterable[ModuleAudit],
        n_adapters: int,
        reference: list[int] | None = None,
        names: list[str] | None = None,
    ) -> ClairAuditor:
        """:meth:`fit` from the modules' audits (:meth:`audit_module`, computed here or
        elsewhere), given in the pool's module order; the arguments are :meth:`fit`'s."""
        self._check_params()
        tally = _Tally.empty(n_adapters)
        results = []
        centres: dict[str, ModuleCentre] = {}
        for done in audits:
            tally.fold(done)
            results.append(done.result)
            if done.centre is not None:
                centres[done.result.name] = done.centre
        if not results:
            raise ValueError("no module to audit")
        tally.seal()
        self.inner_ = tally.inner  # the whole updates' Gram matrix (canonical factors, every module)
        self.cosine_ = cosine_from_gram(tally.inner)
        trusted = set(reference or ())
        order = copy_order(tally.inner.diagonal(), names, trusted)
        self.duplicate_groups_ = [order(g) for g in duplicate_groups(self.cosine_)]
        # Groups that agree far more closely than the pool does count as one adapter (rule 10);
        # in a gate the references alone set every centre and threshold.
        copies = {k for g in self.duplicate_groups_ for k in g[1:]}
        self.coordinated_groups_ = [
            replace(g, members=sorted(g.members, key=lambda k: (names[k] if names else "", k)))
            for g in (coordinated_groups(self.cosine_, copies) if reference is None else [])
        ]
        self.reference_ = None if reference is None else sorted(reference)
        self.refitted_: list[str] = []
        self.refit_without_: list[int] = []
        self._refits = 0
        self._tally, self._centres = tally, centres
        self._conclude(results, trusted)
        return self

    def _conclude(self, results: list[ModuleResult], trusted: set[int]) -> None:
        """The verdict from the modules' results and the pool-wide sums."""
        self.module_results_ = results
        signals = self._pool_signals(results, self._tally, self.reference_, self._centres)
        self._decide(signals, self._tally, trusted)
        self.shared_rank_ = {r.name: r.rank for r in results}
        self.shared_structure_ = any(r.shared_structure for r in results)
        self.n_iter_ = {r.name: r.n_iter for r in results}
        self.converged_ = all(r.converged for r in results)

    def refit_plan(self) -> tuple[list[str], frozenset[int]]:
        """What :meth:`refit` redoes: the modules whose shared subspace two or more adapters the
        verdict flagged helped to fit (among the decomposition's collaborators), in module order, and
        those adapters (pool indices): the flagged for where their update points, alone or as a
        group (``REFIT_WITHOUT``). Adapters flagged only for their size (norm, in-subspace,
        spectral) or as copies stay in: blocks enter the fit at unit norm and copies once, so
        such an adapter shaped the subspace as one honest adapter does. Nothing in a gate (the
        references fit every subspace), when the flagged are not a minority of the pool, or when
        the last refit left out exactly the adapters now flagged; at most ``MAX_REFITS`` refits
        (a second one puts back in the fit an adapter that the first one's verdict no longer
        flags)."""
        flagged = frozenset(
            v.index for v in self.verdicts_ if v.flagged and any(r.rule in REFIT_WITHOUT for r in v.reasons)
        )
        if (
            self.reference_ is not None
            or self._refits >= MAX_REFITS
            or flagged == frozenset(self.refit_without_)
            or 2 * sum(self.flagged_) >= len(self.flagged_)
        ):
            return [], frozenset()
        before = set(self.refitted_)  # fitted without the previous refit's flagged: redone with these
        return [
            r.name
            for r in self.module_results_
            if r.name in before or len(flagged.intersection(r.fitted or ())) >= MIN_CARRIERS_GROUP
        ], flagged

    def refit(self, audits: Iterable[ModuleAudit], without: frozenset[int]) -> ClairAuditor:
        """Decide again with the subspaces of :meth:`refit_plan`'s modules fitted without the
        adapters the verdict flagged.

        An adapter's off-subspace share is measured against a subspace the others fitted. Where
        flagged adapters were among them (a tight group of attackers is; an update far off the
        others' subspace is trimmed out of the fit already), they took part of the subspace's
        rank, and the honest adapter whose own direction was left out looked further off than
        in a pool without them (docs/security.md#refit). ``audits``: :meth:`audit_module` of
        those modules with ``without``, in the pool's module order; every other module keeps
        its result, and the pool-wide sums, which do not depend on the subspaces, stay. The
        left-out adapters are scored against the refitted subspaces as new adapters are (a
        subspace they did not shape).
        """
        redone = {done.result.name: done.result for done in audits}
        before = set(self.refitted_)
        self.refitted_ = [r.name for r in self.module_results_ if r.name in redone or r.name in before]
        self.refit_without_ = sorted(without)
        self._refits += 1
        self._conclude([redone.get(r.name, r) for r in self.module_results_], set())
        return self

    def _pool_signals(
        self,
        results: list[ModuleResult],
        tally: _Tally,
        reference: list[int] | None,
        centres: dict[str, ModuleCentre] | None = None,
    ) -> PoolSignals:
        """What the verdict reads of the whole pool; sets ``direction_``."""
        K = tally.inner.shape[0]
        centre_on = torch.ones(K, dtype=torch.bool)
        if reference is not None:
            centre_on = torch.zeros(K, dtype=torch.bool)
            centre_on[list(reference)] = True
        # In a canonical order of the adapters (their digests), like every module.
        glob = sorted(range(K), key=lambda k: tally.digests[k])
        coordinated = self.coordinated_groups_
        kept_out, masses = kin(self.duplicate_groups_, coordinated), group_masses(K, coordinated)
        small = reference is None and K <= SMALL_POOL_N + 1
        direction_centres = DirectionCentres(tally.unit, centre_on, glob, kept_out, masses, pairs=small)
        self.direction_, pairs = direction_centres()
        # Rule 15's: the whole updates, fitted on the most aligned two thirds (a gate's references all).
        peel = reference is None
        whole_centres = DirectionCentres(tally.inner, centre_on, glob, kept_out, masses, pairs=small, peel=peel)
        # Where the peel leaves out a population of its own, rule 15 is off: no signal, no refits.
        whole, whole_pairs = (None, None) if whole_centres.population else whole_centres()
        return PoolSignals(
            coordinated=coordinated,
            n_adapters=K,
            shares={r.name: r.off_subspace for r in results},
            members={r.name: r.members for r in results},
            structured={r.name: r.shared_structure for r in results},
            sq_norms=tally.inner.diagonal().clamp_min(0),
            duplicates=self.duplicate_groups_,
            threshold=self.verdict.threshold,
            reference=reference,
            in_subspace={r.name: r.in_subspace for r in results},
            held_out={r.name: r.held_out for r in results if r.held_out is not None} or None,
            direction=self.direction_,
            module_direction={r.name: r.direction for r in results if r.direction is not None},
            inner=tally.inner,
            order=glob,
            cosine=cosine_from_gram(tally.unit),
            direction_pairs=pairs,
            recentre=direction_centres if reference is None else None,
            module_recentre=ModuleCentres(centres) if reference is None and centres else None,
            module_norms={r.name: r.norms for r in results},
            whole_direction=whole,
            whole_pairs=whole_pairs,
            whole_recentre=whole_centres if reference is None and whole is not None else None,
            module_groups=module_groups(
                {n: c.for_groups() for n, c in centres.items()},
                coordinated,
                {k for g in self.duplicate_groups_ for k in g[1:]},
            )
            if reference is None and centres
            else [],
        )

    def flag_outright(self, flags: Mapping[int, Reason]) -> None:
        """Flag adapters for what the verdict does not measure, each with its reason (a gate's
        candidates whose files hold what PEFT applies and clair does not analyse); their scores stay."""
        for k, reason in flags.items():
            self.verdicts_[k].flagged = True
            self.verdicts_[k].reasons.append(reason)
        self.flagged_ = [v.flagged for v in self.verdicts_]
        self.collaborative_set_ = [k for k in range(len(self.verdicts_)) if not self.flagged_[k]]

    def _decide(self, signals: PoolSignals, tally: _Tally, trusted: set[int]) -> None:
        """The verdicts, and what follows from them: flags, scores, groups, silent rules."""
        self.verdicts_: list[AdapterVerdict] = decide(signals)
        if self.verdict.copies == "flag-all":
            flag_every_copy(self.verdicts_, self.duplicate_groups_, trusted, signals.sq_norms, tally.inner)
        # Rules that measured no adapter at all in this pool (the report says so).
        self.silent_rules_ = [r for r in WATCHED_RULES if not any(r in v.signals for v in self.verdicts_)]
        copies = {k for g in self.duplicate_groups_ for k in g[1:]}
        self.groups_ = groups(self.verdicts_, cosine_from_gram(tally.unit), self.direction_, copies)
        self.flagged_ = [v.flagged for v in self.verdicts_]
        self.scores_ = [v.score for v in self.verdicts_]
        self.collaborative_set_ = [k for k in range(signals.n_adapters) if not self.flagged_[k]]
