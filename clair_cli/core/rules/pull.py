"""Rule 11, **a group pulling together** (``pull``): how far a group moves the mean, as one.

Every other rule judges an adapter against the others; a group of attackers who each stay
inside the pool's spread (a norm under rule 5's 4x floor, a direction under rule 1's, a
mutual cosine under rule 10's floor) passes them all, yet moves the mean by what they share.
With ``d_k = Theta_k - c`` each update's deviation from the pool's geometric median ``c``
(coordinated groups of rule 10 counted once, as in rule 1's centre), less its part along
``c`` itself (an update larger or smaller than the typical one along the common direction is
the norm rule's), and ``s^2`` the median of ``||d_k||^2``, a group ``S`` of ``g`` adapters
pulls

    T(S) = sum_{i != j in S} <d_i, d_j> / (g s^2)

the members' mean inner product with the other members' deviations. Honest clients'
deviations are nearly independent, so ``T`` stays near 0 for any group of them; attackers who
share a push agree: ``g`` members of ``c`` typical deviations at mutual cosine ``rho`` give
about ``(g - 1) c^2 rho``. Only pairs count, not a member's own size: one large update does
not make a group with an honest client (the norm rule judges it).

The groups judged are found greedily in the ``K x K`` Gram matrix of the deviations: from
every adapter, add the one with the largest inner product with the group's sum, up to a
minority (fewer than half of the adapters judged); each step is a candidate. A candidate
counts only if each member's inner product with the other members' sum is at least ``JOIN``
times the members' mean. The counted candidate with the largest ``T`` past ``PULL_FLOOR`` is
flagged, then the largest among the others, and so on; each other adapter's margin is the
``T`` of the best counted candidate it is in over ``PULL_FLOOR`` (0 in none). Adapters
flagged in an earlier pass are still judged, against the centre and scale of the others.
The groups past ``SUSPECT`` times the floor (``T > 0.5``), found the same way (the largest
first, its members then set aside), are not flagged for it, but leave rule 1's centres in the
next pass (:func:`clair_cli.core.verdict.decide`): a group that agrees closely drags every
centre it is in, and is then measured against the rest's.
Only the Gram matrix of the whole updates is used (summed over modules, from canonical
factors: invariant to how each update is factored).

Where it is off (the report lists it among the silent rules): in ``clair gate`` (uploads are
judged one by one against the references); with fewer than ``MIN_ADAPTERS`` adapters setting
the centre; where they agree on no direction (rule 9's consensus below 0.1: their mean is near
zero and every update deviates by its whole self) even with the groups found set aside (a
minority of groups that pull along different directions can lower the consensus of a pool
that agrees; :meth:`Pull.without_consensus`); and where their norms spread by a robust
sd (Qn) of more than ``NORM_SPREAD_MAX`` in log (alphas or learning rates that differ: larger
honest updates then pull together as a group does; on synthetic pools of mixed alphas, whose
Qn is 0.5-1.5, 2-10 honest clients were flagged). Honest clients of the trained pools of
``benchmarks/`` spread by 0.08-0.12, and 0.11-0.18 with a third of attackers at 3.5x: Qn
breaks down only at half the pool, so a minority cannot switch the rule off.

The floor is fixed, not calibrated on the pool: the pool of a round may hold a third of
attackers, and a scale fitted to their pull would hide it. On the attack benchmark's pools
the most coherent group of 5-12 honest clients has ``T`` at most 0.32; but a third of the
pool pointing away drags the geometric median, and the honest clients on the far side then
share the drag: such honest groups reach 1.5 (and 2.2 for attackers at cosine 0.7, before
rule 10 counts so tight a group once in the centre). Six attackers at cosine 0.4 reach
0.8-1.6 at the honest norm, 1.5-3.2 at 1.5x and 2.7-5.6 at 2x (docs/security.md).

What an attacker who knows it can do: keep ``T`` under the floor. ``g`` members at mutual
cosine ``rho`` then send at most ``sqrt(2 / ((g - 1) rho))`` typical deviations each, and the
group's shared push is at most about ``sqrt(2 g)`` typical deviations whatever its size and
spread: about what six attackers at the honest norm and ``rho = 0.4`` send
(``opposed-spread-norm`` at 1x in the attack benchmark, where clair still loses to the
oracle). Or it splits into several groups along different directions, each under the floor:
each group that pulls past ``SUSPECT`` of it is still set apart from rule 1's centres, and the
groups together lower the pool's consensus, which is why the consensus gate is judged with
them set aside (``split-groups`` in the attack benchmark: two or three groups of a third of the
pool at twice the honest norm, every attacker caught in every pool).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import torch

from clair_cli.core.calibration import qn_scale
from clair_cli.core.insubspace import centre_weights
from clair_cli.core.rules.base import Reason
from clair_cli.core.rules.context import Pass
from clair_cli.core.rules.coordinated import group_masses
from clair_cli.core.rules.opposed import CONSENSUS, OPPOSED_COSINE, Opposed

PULL_FLOOR = 2.0  # T: the members' mean inner product with the others' deviations, in typical squared deviations
JOIN = 0.5  # each member's inner product with the others' pull: at least half the members' mean
SUSPECT = 0.25  # margin (T > 0.5): the group leaves rule 1's centres in the next pass
MIN_ADAPTERS = 5
NORM_SPREAD_MAX = 0.3  # on where honest log norms spread by a robust sd of at most 0.3 (~1.35x)
MAX_STARTS = 256  # greedy starts: the adapters that deviate most (every adapter in pools up to this size)
REFERENCE_POOL = 24  # the floor is PULL_FLOOR for every group of a pool of up to this many adapters


def _extreme_pull(size: float, pool: float) -> float:
    """``(g - 1) mu(g / K)^2``: how ``T`` grows for the ``g`` honest updates of ``K`` that lie
    farthest along one direction of Gaussian spread, ``mu(q)`` the mean of a standard normal's
    top ``q`` (the members' mean deviation along it)."""
    normal = NormalDist()
    q = min(max(size / pool, 1e-9), 1 - 1e-9)
    return (size - 1) * (normal.pdf(normal.inv_cdf(1 - q)) / q) ** 2


# The largest such growth in pools of up to REFERENCE_POOL adapters (8 of 24): where the floor was
# set and measured (attack benchmark, small rounds, clustered federations: 5-18 adapters).
_REFERENCE_PULL = max(
    _extreme_pull(g, k) for k in range(MIN_ADAPTERS, REFERENCE_POOL + 1) for g in range(2, (k + 1) // 2)
)


def pull_floor(size: np.ndarray | int, pool: int) -> np.ndarray:
    """The floor of ``T`` for a group of ``size`` of the ``pool`` adapters judged: ``PULL_FLOOR``,
    raised where the honest updates farthest along a direction of their spread would pull more
    than any group of a pool of ``REFERENCE_POOL`` (a group of 12 of 150 pulls 4.6 times as much
    as one of 8 of 24: the extremes of 150 lie farther out)."""
    sizes = np.atleast_1d(np.asarray(size, dtype=np.float64))
    growth = np.array([_extreme_pull(float(g), pool) for g in sizes]) / _REFERENCE_PULL
    out = PULL_FLOOR * np.maximum(1.0, growth)
    return out if np.ndim(size) else out[:1]


def group_pulls(
    G: torch.Tensor, mass: torch.Tensor | None = None, fit: torch.Tensor | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The counted candidate groups of ``K`` updates known by their Gram matrix ``G``.

    Args:
        G: the ``K x K`` Gram matrix of the updates judged.
        mass: per update, its weight in the geometric median (default 1 each).
        fit: the updates that set the centre and the scale (default all): those flagged in an
            earlier pass are still judged, against the others'.

    Returns:
        ``(members, pulls)``: a boolean ``P x K`` matrix, one row per counted candidate
        group, and their ``T``; empty where fewer than ``MIN_ADAPTERS`` set the centre or the
        updates do not deviate.
    """
    K = G.shape[0]
    nothing = np.zeros((0, K), dtype=bool), np.zeros(0)
    fit = torch.ones(K, dtype=torch.bool) if fit is None else fit.bool()
    if int(fit.sum()) < MIN_ADAPTERS:
        return nothing
    G = G.double()
    w = centre_weights(G, fit[None, :], mass=mass)[0].numpy()
    g = G.numpy()
    centred = np.eye(K) - w[None, :]  # row k: e_k - w, the deviation's coefficients
    E = centred @ g @ centred.T
    # Deviations along the centre's own direction (updates larger or smaller than the typical
    # one: alphas and learning rates differ) are the norm rule's; only the rest can pull apart.
    along = centred @ (g @ w)
    centre_sq = float(w @ g @ w)
    if centre_sq > 0:
        E = E - np.outer(along, along) / centre_sq
    E = 0.5 * (E + E.T)
    scale = float(np.median(np.diagonal(E)[fit.numpy()]))
    if not scale > 0 or not math.isfinite(scale):
        return nothing
    E = E / scale
    diag = np.diagonal(E).copy()
    starts = np.argsort(-diag, kind="stable")[:MAX_STARTS]
    rows = np.arange(len(starts))
    member = np.zeros((len(starts), K), dtype=bool)
    member[rows, starts] = True
    pull = E[starts].copy()  # row r: E u_r, each adapter's inner product with the group's sum
    agree = np.zeros(len(starts))  # sum of E_ij over ordered pairs of distinct members
    found_members, found_pulls = [], []
    for size in range(2, (K + 1) // 2):  # a minority: size < K / 2
        gain = np.where(member, -np.inf, pull)
        j = gain.argmax(1)
        agree += 2 * gain[rows, j]
        pull += E[j]
        member[rows, j] = True
        others = pull - diag[None, :]  # each member's inner product with the other members' sum
        mean = agree / size  # = the members' mean of ``others``: the group's T
        ok = (np.where(member, others, np.inf).min(1) >= JOIN * mean) & (mean > 0)
        found_members.append(np.packbits(member[ok], axis=1))  # 8 members a byte
        found_pulls.append(mean[ok])
    if not found_members:
        return nothing
    packed = np.ascontiguousarray(np.concatenate(found_members))
    pulls = np.concatenate(found_pulls)
    # One group once: the rows compared as byte strings sort as the boolean rows do (np.unique with
    # axis=0, which compared them column by column: seconds and a gigabyte for a pool of 2,048).
    _, first = np.unique(packed.view(np.dtype((np.void, packed.shape[1]))).ravel(), return_index=True)
    return np.unpackbits(packed[first], axis=1, count=K).astype(bool), pulls[first]


class Pull:
    name = "pull"
    pointing = False

    def apply(self, ctx: Pass) -> None:
        inner = ctx.signals.inner
        if inner is None or ctx.gated:
            return
        K = len(ctx.verdicts)
        setters = ctx.basis(torch.zeros(K, dtype=torch.float64), echoes=True)
        mass = group_masses(K, ctx.signals.coordinated)
        order = ctx.signals.order or list(range(K))  # canonical order: reproducible ties
        judged = [k for k in order if k not in ctx.copies and not ctx.verdicts[k].flagged]
        fit = [k for k in judged if bool(setters[k])]
        C = ctx.signals.cosine
        if C is None or len(fit) < MIN_ADAPTERS or self.norm_spread(ctx.signals.sq_norms[fit]) > NORM_SPREAD_MAX:
            return

        def pulls_of(among: list[int]) -> tuple[np.ndarray, np.ndarray]:
            return group_pulls(inner.double()[among][:, among], mass[among], setters[among])

        members, pulls = pulls_of(judged)
        margins = pulls / pull_floor(members.sum(1), len(judged))
        # The groups past SUSPECT of their floor, the largest margin first, each set aside before
        # the next is sought.
        found: list[tuple[list[int], float, float]] = []
        while len(margins) and float(margins.max()) > SUSPECT:
            best = int(np.argmax(margins))
            found.append(([judged[p] for p in np.flatnonzero(members[best])], float(pulls[best]), float(margins[best])))
            judged = [k for k in judged if k not in found[-1][0]]
            members, pulls = pulls_of(judged)
            margins = pulls / pull_floor(members.sum(1), len(judged))
        if not self.agreed(C, fit):
            kept = self.without_consensus(C, fit, found)
            if kept is None:
                return
            found = kept  # the groups left out get no margin from this rule: the other rules judge them
        # Past the floor a group is flagged; past SUSPECT of it, it is set apart (rule 1's
        # centres leave it out in the next pass).
        for group, pull, margin in found:
            for k in group:
                if ctx.margin(k, margin, self.name):
                    ctx.flag(k, self.reason(pull, [j for j in group if j != k], margin, pull / margin))
                elif margin <= 1:
                    ctx.pulling.add(k)
        for p, k in enumerate(judged):  # in no counted group: nothing pulls with it (T = 0)
            ctx.margin(k, float(max(margins[members[:, p]], default=0.0)) if len(margins) else 0.0, self.name)

    @staticmethod
    def agreed(C: torch.Tensor, fit: list[int]) -> bool:
        """Whether the adapters that set the centre agree on a direction (rule 9's consensus,
        at least ``CONSENSUS``): where they share only a subspace, their mean is near zero and
        every update deviates by its whole self, so updates that are merely larger (alphas
        differ) pull together."""
        if len(fit) < MIN_ADAPTERS:
            return False
        sub = C.double()[fit][:, fit]
        return Opposed().consensus(sub, torch.ones(len(fit), dtype=torch.float64)) >= CONSENSUS

    @staticmethod
    def without_consensus(
        C: torch.Tensor, fit: list[int], found: list[tuple[list[int], float, float]]
    ) -> list[tuple[list[int], float, float]] | None:
        """The groups judged where the adapters that set the centre agree on no direction (None:
        the rule is off).

        A minority can make a pool that agrees look as if it agreed on nothing: groups that
        pull along different directions of disagreement lower every member's cosine with the
        mean of the others (on a trained pool whose honest clients agree at a consensus of
        0.16, six attackers in two groups took it to 0.04). So the groups found are set aside,
        the largest pull first, while together they stay a minority of the adapters that set
        the centre, and the rule judges them if the rest then agree (consensus at least
        ``CONSENSUS``). A group whose mean stands against all the others' (cosine below
        ``-OPPOSED_COSINE``) is left out: that is one side of the split a pool without a
        common direction makes (measured at -0.36 to -0.71 on synthetic pools of updates spread
        around zero in a subspace, against -0.04 to -0.17 for the attackers' groups), and
        rule 9 judges such splits where the rest agree.
        """
        kept: list[tuple[list[int], float, float]] = []
        out: set[int] = set()
        for group, pull, margin in found:
            if 2 * (len(out) + len(group)) >= len(fit):
                break
            if _group_cosine(C, group, [k for k in fit if k not in group]) < -OPPOSED_COSINE:
                continue
            kept.append((group, pull, margin))
            out.update(group)
        if not kept or not Pull.agreed(C, [k for k in fit if k not in out]):
            return None
        return kept

    @staticmethod
    def norm_spread(sq_norms: torch.Tensor) -> float:
        """The robust spread (Qn) of the log norms of non-zero updates (inf where fewer than
        ``MIN_ADAPTERS``). A minority cannot widen it: Qn breaks down at half the pool."""
        sq_norms = sq_norms.double()
        sq_norms = sq_norms[sq_norms > 0]
        if len(sq_norms) < MIN_ADAPTERS:
            return math.inf
        return float(qn_scale(0.5 * torch.log(sq_norms)))

    def reason(self, pull: float, others: list[int], margin: float, floor: float) -> Reason:
        """``value``: the group's ``T``; ``threshold``: its floor (:func:`pull_floor`); ``of``: the other members."""
        return Reason(
            kind="pull",
            of=tuple(others),
            rule=self.name,
            value=pull,
            threshold=floor,
            compare=">",
            margin=margin,
        )


def _group_cosine(C: torch.Tensor, group: list[int], rest: list[int]) -> float:
    """The cosine between the mean unit update of ``group`` and that of ``rest`` (-1 where either
    mean is zero)."""
    idx = group + rest
    sub = C.double()[idx][:, idx]
    s = torch.zeros(len(idx), dtype=torch.float64)
    s[: len(group)] = 1.0
    t = 1.0 - s
    ss, tt = float(s @ sub @ s), float(t @ sub @ t)
    if ss <= 0 or tt <= 0:
        return -1.0
    return float(s @ sub @ t) / math.sqrt(ss * tt)
