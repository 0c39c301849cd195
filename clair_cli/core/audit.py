"""CLAIR over a whole pool: stream modules, decompose each, decide per adapter.

``ClairAuditor(...).fit(modules, n_adapters)`` consumes an iterable of
:class:`ModuleInput` one module at a time (memory is bounded by one module's
factors plus small per-module results) and learns:

- ``module_results_``: per module, rank, spectrum, residual and off-subspace shares,
  subspace basis, solver iterations and convergence;
- ``verdicts_``: per adapter, score, flag and reasons (see :mod:`clair_cli.core.verdict`);
- ``shared_rank_``, ``collaborative_set_``, ``duplicate_groups_``, ``shared_structure_``;
- ``groups_``: flagged adapters that agree with each other but not with the rest
  (:func:`clair_cli.core.verdict.groups`);
- ``silent_rules_``: the rules of ``WATCHED_RULES`` that could measure no adapter of the pool
  (no common direction, no shared structure, too few adapters), so that a report says
  what it could not check.

Within a module, adapters whose updates are identical up to rounding (cosine
above 0.999) enter the decomposition once, so a group of copies cannot pose as
a shared subspace; the copies then receive their representative's scores.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch

from clair_cli.core.calibration import SMALL_POOL_N
from clair_cli.core.canonical import canonical_module
from clair_cli.core.decompose import Method, ModuleDecomposer, null_bound
from clair_cli.core.fastpath import FastDecomposer, off_subspace_shares, shared_basis
from clair_cli.core.insubspace import (
    centre_cosines,
    direction_cosines,
    direction_pairs,
    in_subspace_gram,
    unit_centre_distances,
)
from clair_cli.core.order import content_keys, content_order, inverse
from clair_cli.core.pairwise import cosine_from_gram, factor_grams, gram
from clair_cli.core.reduction import reduce_module
from clair_cli.core.verdict import AdapterVerdict, PoolSignals, decide, duplicate_groups, flag_every_copy, groups

# Rules whose silence over a whole pool is reported: each measures every adapter where it can.
WATCHED_RULES = ("direction", "off_subspace", "norm", "spectral")

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


class ClairAuditor:
    """Audit a pool of adapters with CLAIR.

    Args:
        method: decomposition form, ``"noisy"`` (default) or ``"exact"``.
        side: ``"out"`` (shared output space, default), ``"in"``, or ``"both"``
            (off-subspace share is the larger of the two).
        rank: ``"auto"`` or a fixed shared rank.
        threshold: fixed off-subspace share threshold (default: the automatic rule).
        dtype: working precision of the fast path (float32 or float64); modules on the
            convex path are always computed in float64 (see :func:`working_dtype`).
        device: torch device for the decompositions.
        random_state: seed of the parallel analysis.
        n_null: random rotations for parallel analysis.
        solver: ``"convex"`` (the decomposition of CLAIR_SPEC.md section 3), ``"fast"``
            (:mod:`clair_cli.core.fastpath`), or ``"auto"``: fast when a module's
            adapter ranks sum to more than ``FAST_PATH_MIN_SUM_RANK``.
        in_subspace: also test where each update sits inside the shared subspace
            (rule 4, :mod:`clair_cli.core.insubspace`: sign-flipped updates).
        copies: ``"keep-one"`` (default): in a group of identical updates one member is
            judged on its own signals and the others are flagged as copies (a hub pool may
            hold one adapter twice); ``"flag-all"``: every member of a group of one update
            sent several times (norms within 1 %) is flagged (a federated round, where two
            honest clients never send the same update); a scaled copy still leaves the first
            member to be judged (:func:`clair_cli.core.verdict.flag_every_copy`).
    """

    def __init__(
        self,
        method: Method = "noisy",
        side: SideOption = "out",
        rank: int | Literal["auto"] = "auto",
        threshold: float | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        random_state: int = 0,
        n_null: int = 20,
        solver: Solver = "auto",
        in_subspace: bool = True,
        copies: Literal["keep-one", "flag-all"] = "keep-one",
    ) -> None:
        self.method = method
        self.side = side
        self.rank = rank
        self.threshold = threshold
        self.dtype = dtype
        self.device = device
        self.random_state = random_state
        self.n_null = n_null
        self.solver = solver
        self.in_subspace = in_subspace
        self.copies = copies

    def _use_fast(self, A: list[torch.Tensor]) -> bool:
        return uses_fast_path(A, self.solver)

    def _decompose(self, A: list[torch.Tensor], B: list[torch.Tensor], scales: list[float], side: str):
        if self._use_fast(A):
            return FastDecomposer(rank=self.rank, n_null=self.n_null, random_state=self.random_state).fit(
                A, B, scales, side
            )
        stack = reduce_module(A, B, scales, side=side)  # type: ignore[arg-type]
        dec = ModuleDecomposer(
            method=self.method, rank=self.rank, n_null=self.n_null, random_state=self.random_state
        ).fit(stack)
        return dec

    @staticmethod
    def _held_out_shares(A, B, scales, fit_on: list[int], used, off: torch.Tensor, pos: dict[int, int]) -> torch.Tensor:
        """Shares with every reference scored against the subspace of the *other* references.

        A candidate never shapes the subspace it is scored against, but a reference does:
        its in-sample share is smaller than a new honest adapter's would be, so thresholds
        measured on in-sample shares flag honest candidates. Each reference's held-out share
        (leading directions of the others' unit-norm updates, at the same rank) is scored the
        way a candidate is. Candidates keep their shares. Needs three references or more.
        """
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
                out[pos[j]] = torch.stack(shares).max()
        return out

    def fit(
        self,
        modules: Iterable[ModuleInput],
        n_adapters: int,
        reference: list[int] | None = None,
        names: list[str] | None = None,
    ) -> ClairAuditor:
        """Audit the pool, one module at a time.

        Args:
            modules: the modules' factors (consumed once).
            n_adapters: K; module members index into ``range(K)``.
            reference: trusted adapters. When given (``clair gate``), each module's
                subspace is estimated on them alone, every other adapter is scored
                against it, and only those others can be flagged.
            names: the adapters' names. In a group of identical adapters the one kept (judged
                on its own signals; the others are flagged as copies) is a reference if
                there is one, else the first by name (by index without names), so the
                order of the sources does not matter.
        """
        if self.side not in ("out", "in", "both"):
            raise ValueError(f"side must be 'out', 'in' or 'both', got {self.side!r}")
        if self.solver not in ("auto", "convex", "fast"):
            raise ValueError(f"solver must be 'auto', 'convex' or 'fast', got {self.solver!r}")
        K = n_adapters
        inner = torch.zeros(K, K, dtype=torch.float64)
        unit = torch.zeros(K, K, dtype=torch.float64)  # sum over modules of the cosine matrices
        digests = [hashlib.sha256() for _ in range(K)]  # per adapter, over its modules
        results: list[ModuleResult] = []
        for given in modules:
            # Every statistic is of the update alone: canonical factors first
            # (:mod:`clair_cli.core.canonical`), whatever the factorisation given.
            cA, cB, cs = canonical_module(given.A, given.B, given.scales)
            # Work in a canonical order of the members; per-member results are put back
            # into the given order below, so the sources' order changes nothing.
            keys = content_keys(cA, cB, cs)
            for k, key in zip(given.members, keys, strict=True):
                digests[k].update(key)
            order = content_order(cA, cB, cs, keys)
            back = inverse(order)
            mod = ModuleInput(
                given.name,
                [given.members[j] for j in order],
                [cA[j] for j in order],
                [cB[j] for j in order],
                [cs[j] for j in order],
            )
            dtype = working_dtype(mod.A, self.dtype, self.solver)
            A = [a.to(self.device, dtype) for a in mod.A]
            B = [b.to(self.device, dtype) for b in mod.B]
            grams = factor_grams(A, B)
            G = gram(A, B, mod.scales, *grams).double().cpu()
            idx = torch.tensor(mod.members)
            inner[idx[:, None], idx[None, :]] += G
            unit[idx[:, None], idx[None, :]] += cosine_from_gram(G)
            norms = G.diagonal().clamp_min(0).sqrt()
            # Representatives: later copies of an identical update map to the first.
            rep = list(range(len(A)))
            for group in duplicate_groups(cosine_from_gram(G)):
                for j in group[1:]:
                    rep[j] = group[0]
            keep = [j for j in range(len(A)) if rep[j] == j]
            pos = {j: p for p, j in enumerate(keep)}
            sides = ["out", "in"] if self.side == "both" else [self.side]
            if reference is not None:
                trusted = set(reference)
                fit_on = [j for j in keep if mod.members[j] in trusted]
                if not fit_on:
                    raise ValueError(f"module {mod.name}: no reference adapter targets it")
            else:
                fit_on = keep
            if all(float(norms[j]) == 0 for j in fit_on):
                whose = "reference adapter's" if reference is not None else "adapter's"
                raise EmptyUpdates(
                    f"module {mod.name}: every {whose} update is zero there, so they span no shared subspace"
                )
            decs = [
                self._decompose([A[j] for j in fit_on], [B[j] for j in fit_on], [mod.scales[j] for j in fit_on], s)
                for s in sides
            ]
            # With side="both", a side without shared structure carries no evidence.
            used = [(d, s) for d, s in zip(decs, sides, strict=True) if d.shared_structure_] or [(decs[0], sides[0])]
            main = used[0][0]
            held_out = None
            if reference is not None:
                # Score every adapter against the reference subspace.
                kA, kB, ks = [A[j] for j in keep], [B[j] for j in keep], [mod.scales[j] for j in keep]
                off = torch.stack([off_subspace_shares(kA, kB, ks, d.subspace_, s) for d, s in used]).max(0).values
                residual = off
                held_out = self._held_out_shares(A, B, mod.scales, fit_on, used, off, pos)
            else:
                off = torch.stack([d.off_subspace_ for d, _ in used]).max(dim=0).values
                residual = torch.stack([d.residual_ for d, _ in used]).max(dim=0).values
            expand = torch.tensor([pos[rep[j]] for j in range(len(A))])
            null = main.null_spectrum_
            distances = None
            if self.in_subspace and main.shared_structure_:
                # The centre is fitted on the decomposition's collaborators (copies once).
                centre_on = torch.zeros(len(A), dtype=torch.bool)
                centre_on[[j for j, c in zip(fit_on, main.collaborators_.tolist(), strict=True) if c]] = True
                Gx = in_subspace_gram(A, B, mod.scales, main.subspace_, used[0][1], grams).double().cpu()
                distances = unit_centre_distances(Gx, norms, centre_on)
            # Each update's cosine with the module's centre, fitted on the representatives (or
            # the references) other than itself and the one it copies: a centre it did not shape.
            module_centre = torch.zeros(len(A), dtype=torch.bool)
            module_centre[fit_on] = True
            leave_out = {j: [j] for j in fit_on} if reference is not None else {j: [rep[j]] for j in range(len(A))}
            direction = centre_cosines(cosine_from_gram(G), module_centre, leave_out)
            results.append(
                ModuleResult(
                    name=mod.name,
                    members=list(given.members),
                    rank=main.rank_,
                    spectrum=main.spectrum_.double().cpu(),
                    null_bound=None if null is None else null_bound(null).double().cpu(),
                    residual=residual.double().cpu()[expand][back],
                    off_subspace=off.double().cpu()[expand][back],
                    norms=norms[back],
                    subspace=main.subspace_.cpu(),
                    shared_structure=any(d.shared_structure_ for d in decs),
                    n_iter=max(d.n_iter_ for d in decs),
                    converged=all(d.converged_ for d in decs),
                    solver="fast" if isinstance(main, FastDecomposer) else "convex",
                    null_draws=0 if null is None else int(null.shape[0]),
                    in_subspace=None if distances is None else distances[back],
                    held_out=None if held_out is None else held_out.double().cpu()[expand][back],
                    direction=direction[back],
                )
            )
        if not results:
            raise ValueError("no module to audit")
        self.module_results_ = results
        self.inner_ = inner  # the whole updates' Gram matrix (canonical factors, every module)
        sq = inner.diagonal().clamp_min(0)
        self.cosine_ = cosine_from_gram(inner)
        trusted = set(reference or ())
        self.duplicate_groups_ = [
            sorted(g, key=lambda k: (k not in trusted, names[k] if names else "", k))
            for g in duplicate_groups(self.cosine_)
        ]
        centre_on = torch.ones(K, dtype=torch.bool)
        if reference is not None:
            centre_on = torch.zeros(K, dtype=torch.bool)
            centre_on[list(reference)] = True
        # In a canonical order of the adapters (their digests), like every module above.
        glob = sorted(range(K), key=lambda k: digests[k].digest())
        where = {k: p for p, k in enumerate(glob)}
        perm = torch.tensor(glob)
        self.direction_ = direction_cosines(
            unit[perm[:, None], perm[None, :]],
            centre_on[perm],
            [[where[k] for k in g] for g in self.duplicate_groups_],
        )[inverse(glob)]
        pairs = None
        if reference is None and K <= SMALL_POOL_N + 1:
            pairs = direction_pairs(
                unit[perm[:, None], perm[None, :]],
                centre_on[perm],
                [[where[k] for k in g] for g in self.duplicate_groups_],
            )
            back = inverse(glob)
            pairs = pairs[back[:, None], back[None, :]]
        signals = PoolSignals(
            n_adapters=K,
            shares={r.name: r.off_subspace for r in results},
            members={r.name: r.members for r in results},
            structured={r.name: r.shared_structure for r in results},
            sq_norms=sq,
            duplicates=self.duplicate_groups_,
            threshold=self.threshold,
            reference=reference,
            in_subspace={r.name: r.in_subspace for r in results},
            held_out={r.name: r.held_out for r in results if r.held_out is not None} or None,
            direction=self.direction_,
            module_direction={r.name: r.direction for r in results if r.direction is not None},
            inner=inner,
            order=glob,
            cosine=cosine_from_gram(unit),
            direction_pairs=pairs,
        )
        self.verdicts_: list[AdapterVerdict] = decide(signals)
        if self.copies == "flag-all":
            flag_every_copy(self.verdicts_, self.duplicate_groups_, trusted, sq, inner)
        # Rules that measured no adapter at all in this pool (the report says so).
        self.silent_rules_ = [r for r in WATCHED_RULES if not any(r in v.signals for v in self.verdicts_)]
        copies = {k for g in self.duplicate_groups_ for k in g[1:]}
        self.groups_ = groups(self.verdicts_, cosine_from_gram(unit), self.direction_, copies)
        self.shared_rank_ = {r.name: r.rank for r in results}
        self.shared_structure_ = any(r.shared_structure for r in results)
        self.flagged_ = [v.flagged for v in self.verdicts_]
        self.scores_ = [v.score for v in self.verdicts_]
        self.collaborative_set_ = [k for k in range(K) if not self.flagged_[k]]
        self.reference_ = None if reference is None else sorted(reference)
        self.n_iter_ = {r.name: r.n_iter for r in results}
        self.converged_ = all(r.converged for r in results)
        return self
