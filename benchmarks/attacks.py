"""Attack benchmark: clair's merge against attackers who know it, on trained LoRA pools.

    python -m benchmarks.attacks [--seeds 3] [--tasks revsucc,majority] [--fractions 0.2,0.33]
                                 [--attacks alie,ipm,...] [--quick] [--cache DIR]
                                 [--out benchmarks/results/attacks.json] [--rounds N]

Pools come from benchmarks/trained_pools.py (the 12 benign clients of each (task, seed),
and the trained backdoor clients of its ``heavy`` scenario; generated into --cache on
first use). The honest updates ``Delta_k = s B_k A_k`` (per module, dense, flattened) are
known to the attackers (omniscient, as the papers assume); 20 % and 33 % of the pool are
attackers (3 of 15 and 6 of 18). Each attack vector is written as a LoRA adapter per module
by truncated SVD at rank ``ATTACK_RANK`` (``B = U sqrt(S)``, ``A = sqrt(S) V^T``, scale 1),
and every aggregator sees exactly that truncated update. Factor games use an honest
client's own factors, transformed. Where several attackers take part they are made
non-identical by an independent random perturbation of relative norm ``JITTER`` (before
the truncation), except in the ``copies-*`` rows (identical vectors).

Aggregators (benchmarks/aggregators.py), on the flattened dense updates: ``oracle`` (mean of
the honest), ``mean``, ``clair`` (the library's default audit and merge, in process:
``pool_from_factors`` -> ``audit`` -> ``merge(..., "clair")``; a pool where clair flags every
adapter, or which it refuses, counts as the base model), FedMedian, FedTrimmedAvg
(beta 0.2), Krum and Multi-Krum (f = the number of attackers, m = n - f), Bulyan (f lowered
to (n - 3) // 4 where n < 4 f + 3), centred clipping, geometric median, NNM + mean.

Metric: the benign clients' mean held-out accuracy of the base plus the aggregate (each
client's test strings from its own distribution; benchmarks/merge_quality.py's ``Scorer``);
for the backdoor attacks also the backdoor success rate. Every attack's strength is scanned;
per (task, seed, fraction, attack) each aggregator's *worst point* is its lowest accuracy
over the scan, and for clair the scan records whether it flagged every attacker.
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from benchmarks import aggregators as agg
from benchmarks import tasks, trained_pools
from benchmarks.merge_quality import Scorer

ATTACK_RANK = 8
JITTER = 1e-3  # relative norm of the perturbation that makes attackers non-identical
N_HONEST = trained_pools.N_BENIGN
FRACTIONS = (0.2, 0.33)
TOLERANCE = 0.02  # "within 0.02 of the oracle"
BASELINES = ("median", "trimmed-mean", "krum", "multi-krum", "bulyan", "centered-clip", "geomed", "nnm+mean")
COLUMNS = ("oracle", "mean", "clair", "clair-round", *BASELINES)


def n_attackers(fraction: float, n_honest: int = N_HONEST) -> int:
    """Attackers making up ``fraction`` of the pool: 3 of 15 at 20 %, 6 of 18 at 33 %."""
    return max(1, round(fraction * n_honest / (1 - fraction)))


# -- pools as factors and dense vectors ----------------------------------------------------

Factors = dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # module -> (A r x in, B out x r, scale)


def read_factors(adapter_dir: Path) -> Factors:
    """A PEFT adapter directory's LoRA factors per module (``A``, ``B`` as float64, and ``alpha / r``)."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = float(config["lora_alpha"]) / float(config["r"])
    state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    out: Factors = {}
    for key, a in state.items():
        if ".lora_A." in key:
            module = key.split(".lora_A.")[0]
            b = state[key.replace(".lora_A.", ".lora_B.")]
            out[module] = (a.double(), b.double(), scale)
    return dict(sorted(out.items()))


@dataclass
class Layout:
    """Where each module's ``out x in`` update lies in the flattened vector."""

    modules: list[str]
    shapes: list[tuple[int, int]]

    @property
    def offsets(self) -> list[int]:
        return np.cumsum([0] + [o * i for o, i in self.shapes]).tolist()

    def flatten(self, factors: Factors) -> np.ndarray:
        return np.concatenate([(s * B @ A).numpy().ravel() for A, B, s in (factors[m] for m in self.modules)])

    def split(self, vec: np.ndarray) -> dict[str, np.ndarray]:
        off = self.offsets
        return {m: vec[off[k] : off[k + 1]].reshape(self.shapes[k]) for k, m in enumerate(self.modules)}

    def to_lora(self, vec: np.ndarray, rank: int = ATTACK_RANK) -> Factors:
        """Truncated SVD per module: ``B = U sqrt(S)``, ``A = sqrt(S) V^T``, scale 1."""
        out: Factors = {}
        for m, w in self.split(vec).items():
            u, s, vt = torch.linalg.svd(torch.from_numpy(np.ascontiguousarray(w)), full_matrices=False)
            r = min(rank, len(s))
            root = s[:r].sqrt()
            out[m] = (root[:, None] * vt[:r], u[:, :r] * root, 1.0)
        return out


@dataclass
class Contribution:
    """One attacker: the factors clair receives and the dense update every aggregator sees."""

    factors: Factors
    vector: np.ndarray


def as_lora(layout: Layout, vec: np.ndarray) -> Contribution:
    factors = layout.to_lora(vec)
    return Contribution(factors, layout.flatten(factors))


class Evaluator:
    """Accuracy (and backdoor success) of the base plus a dense update, in process: the update is
    added to GPT-2's Conv1D weights (stored ``in x out``, hence the transpose)."""

    def __init__(self, scorer: Scorer, layout: Layout, n_strings: int = 64) -> None:
        self.scorer = scorer
        self.layout = layout
        self.model = copy.deepcopy(scorer.base)  # the scorer's base stays untouched
        params = dict(self.model.named_parameters())
        self.params = {m: params[m.removeprefix("base_model.model.") + ".weight"] for m in layout.modules}
        self.original = {m: p.detach().clone() for m, p in self.params.items()}
        self.cache: dict[tuple[str, bool], dict] = {}
        self.calls = 0
        names = sorted(scorer.tests)
        # the first n_strings of each client's held-out set (i.i.d. draws), all clients in one batch
        self.tests = torch.cat([scorer.tests[n][:n_strings] for n in names])
        self.owner = torch.cat([torch.full((len(scorer.tests[n][:n_strings]),), k) for k, n in enumerate(names)])
        self.triggered = self.trig_owner = None
        if scorer.has_backdoor:
            self.triggered = torch.cat([scorer.triggered[n][:n_strings] for n in names])
            self.trig_owner = torch.cat(
                [torch.full((len(scorer.triggered[n][:n_strings]),), k) for k, n in enumerate(names)]
            )

    def _per_client(self, correct: torch.Tensor, owner: torch.Tensor) -> float:
        """The mean over clients of each client's mean."""
        sums = torch.zeros(int(owner.max()) + 1).index_add_(0, owner, correct)
        counts = torch.zeros_like(sums).index_add_(0, owner, torch.ones_like(correct))
        return float((sums / counts).mean())

    @torch.inference_mode()
    def score(self, vec: np.ndarray | None, backdoor: bool = False) -> dict:
        """``{"accuracy", "backdoor", "correct"}`` of base + ``vec`` (None: the base); ``correct``: each
        held-out string's score, whose per-client means ``accuracy`` averages (:meth:`paired_interval`)."""
        key = (hashlib.sha1(b"" if vec is None else np.ascontiguousarray(vec).tobytes()).hexdigest(), backdoor)
        if key in self.cache:
            return self.cache[key]
        self.calls += 1
        parts = {} if vec is None else self.layout.split(vec)
        for m, p in self.params.items():
            p.copy_(self.original[m] if vec is None else self.original[m] + torch.from_numpy(parts[m].T).to(p.dtype))
        task = self.scorer.task
        pred = self.model(input_ids=self.tests).logits[:, task.predict_slice].argmax(-1)
        correct = (pred == self.tests[:, task.target_slice]).float().mean(1)
        acc = self._per_client(correct, self.owner)
        bd = None
        if backdoor and self.triggered is not None:
            pred = self.model(input_ids=self.triggered).logits[:, task.predict_slice].argmax(-1)
            bd = self._per_client((pred == task.backdoor_target).all(1).float(), self.trig_owner)
        out = {"accuracy": acc, "backdoor": bd, "correct": correct}
        self.cache[key] = out
        return out

    def paired_interval(self, a: torch.Tensor, b: torch.Tensor, draws: int = 4000) -> tuple[float, float]:
        """A 95 % interval of ``accuracy(a) - accuracy(b)`` over the sampling of the held-out strings:
        ``a`` and ``b`` are two updates' ``correct`` on the same strings, resampled together within each
        client (a paired, stratified bootstrap; fixed generator)."""
        g = torch.Generator().manual_seed(0)
        d = (a - b).double()
        owners = int(self.owner.max()) + 1
        total = torch.zeros(draws, dtype=torch.float64)
        for k in range(owners):
            dk = d[self.owner == k]
            total += dk[torch.randint(len(dk), (draws, len(dk)), generator=g)].mean(1)
        total /= owners
        return float(total.quantile(0.025)), float(total.quantile(0.975))


@dataclass(eq=False)
class PoolData:
    task: str
    seed: int
    layout: Layout
    honest_factors: list[Factors]
    honest: np.ndarray  # (12, d)
    backdoor_factors: list[Factors]
    backdoor: np.ndarray  # (3, d): the heavy scenario's trained backdoor clients
    evaluator: Evaluator

    @property
    def median_norm(self) -> float:
        return float(np.median(np.linalg.norm(self.honest, axis=1)))


def load_pool(heavy: Path, n_strings: int = 64) -> PoolData:
    """The benign clients (shared by every scenario of a (task, seed)) and the backdoor clients of the
    ``heavy`` pool, and a scorer on it (it has the triggered test sets)."""
    scorer = Scorer(heavy)
    adapters = scorer.manifest["adapters"]
    honest_names = sorted(n for n, a in adapters.items() if a["kind"] == "benign")
    bd_names = sorted(n for n, a in adapters.items() if a["kind"] == "backdoor")
    honest_factors = [read_factors(heavy / n) for n in honest_names]
    modules = list(honest_factors[0])
    shapes = [(int(honest_factors[0][m][1].shape[0]), int(honest_factors[0][m][0].shape[1])) for m in modules]
    layout = Layout(modules, shapes)
    bd_factors = [read_factors(heavy / n) for n in bd_names]
    return PoolData(
        scorer.manifest["task"],
        int(scorer.manifest["seed"]),
        layout,
        honest_factors,
        np.stack([layout.flatten(f) for f in honest_factors]),
        bd_factors,
        np.stack([layout.flatten(f) for f in bd_factors]),
        Evaluator(scorer, layout, n_strings),
    )


# -- attacks -------------------------------------------------------------------------------

Builder = Callable[[PoolData, int, float, np.random.Generator], list[Contribution]]


def jittered(layout: Layout, vec: np.ndarray, m: int, rng: np.random.Generator, jitter: float = JITTER) -> list:
    """``m`` attackers sending ``vec`` each with an independent perturbation of relative norm ``jitter``."""
    out = []
    for _ in range(m):
        noise = rng.standard_normal(vec.shape)
        out.append(as_lora(layout, vec + jitter * np.linalg.norm(vec) * noise / np.linalg.norm(noise)))
    return out


def copies(layout: Layout, vec: np.ndarray, m: int) -> list:
    c = as_lora(layout, vec)
    return [c] * m


def _alie(p: PoolData, m: int, z: float, rng: np.random.Generator) -> list:
    return jittered(p.layout, agg.alie(p.honest, z), m, rng)


def _ipm(p: PoolData, m: int, eps: float, rng: np.random.Generator) -> list:
    return jittered(p.layout, agg.ipm(p.honest, eps), m, rng)


def _min_attack(kind: str, ptype: str) -> Builder:
    """Min-Max / Min-Sum: ``mean + gamma p`` at ``strength`` times the papers' ``gamma*``."""

    def build(p: PoolData, m: int, mult: float, rng: np.random.Generator) -> list:
        pert = agg.perturbation(p.honest, ptype)
        gamma = agg.min_max_gamma(p.honest, pert, kind)
        return jittered(p.layout, p.honest.mean(0) + mult * gamma * pert, m, rng)

    return build


@functools.cache
def fang_krum_lambda(p: PoolData, m: int) -> float:
    """Fang et al.'s search: the largest ``lambda`` (halving from an upper bound) for which Krum picks an
    attacker, over the truncated adapters every aggregator sees; the last one tried if none."""
    rng = np.random.default_rng(0)
    direction = agg.fang_krum_direction(p.honest)
    lam = 2 * float(np.linalg.norm(p.honest, axis=1).max()) / np.sqrt(direction.size)
    for _ in range(30):
        attack = jittered(p.layout, lam * direction, m, rng)
        x = np.vstack([p.honest] + [a.vector for a in attack])
        if int(np.argmin(agg.krum_scores(x, m))) >= N_HONEST:
            return lam
        lam /= 2
    return lam


def _fang_krum(p: PoolData, m: int, mult: float, rng: np.random.Generator) -> list:
    lam = fang_krum_lambda(p, m)
    return jittered(p.layout, mult * lam * agg.fang_krum_direction(p.honest), m, rng)


def _fang_trim(p: PoolData, m: int, b: float, rng: np.random.Generator) -> list:
    return [as_lora(p.layout, v) for v in agg.fang_trim(p.honest, m, b, rng)]


def _backdoor(p: PoolData, m: int, c: float, rng: np.random.Generator) -> list:
    """Constrain-and-scale: trained backdoor updates scaled to ``c`` times the honest median norm (with
    more attackers than trained backdoor clients, they are reused, jittered)."""
    out = []
    for k in range(m):
        v = p.backdoor[k % len(p.backdoor)]
        v = c * p.median_norm * v / np.linalg.norm(v)
        out += jittered(p.layout, v, 1, rng, JITTER if k >= len(p.backdoor) else 0.0)
    return out


def _scaled_honest(p: PoolData, m: int, c: float) -> list:
    """Attacker ``k`` sends honest client ``k``'s update times ``c`` (its factors, ``B * c``)."""
    out = []
    for k in range(m):
        f = {mod: (A, c * B, s) for mod, (A, B, s) in p.honest_factors[k].items()}
        out.append(Contribution(f, p.layout.flatten(f)))
    return out


def _boost(p: PoolData, m: int, c: float, rng: np.random.Generator) -> list:
    return _scaled_honest(p, m, c)


def _sign_flip(p: PoolData, m: int, c: float, rng: np.random.Generator) -> list:
    return _scaled_honest(p, m, -c)


def _module_flip(p: PoolData, m: int, c: float, rng: np.random.Generator) -> list:
    """Attacker ``k`` sends honest client ``k``'s update, honest in every module but the one the
    honest mean relies on most (its largest module), where it is sent times ``-c``: the attack
    whole-update statistics dilute (rules 12-14 judge each module)."""
    target = _flip_target(p)
    out = []
    for k in range(m):
        f = dict(p.honest_factors[k])
        A, B, s = f[target]
        f[target] = (A, -c * B, s)
        out.append(Contribution(f, p.layout.flatten(f)))
    return out


def _flip_target(p: PoolData) -> str:
    """The module the honest mean relies on most (its largest)."""
    mean = p.layout.split(p.honest.mean(0))
    return max(p.layout.modules, key=lambda mod: (float(np.linalg.norm(mean[mod])), mod))


def _module_flip_copies(p: PoolData, m: int, c: float, rng: np.random.Generator) -> list:
    """``module-flip`` sent as copies: every attacker's target module is honest client 0's times
    ``-c``, the same update (cosine 1), each at its own honest norm times ``c``; copies of one
    module update enter a module's statistics once, so the group must be counted by its copies."""
    flipped = _module_flip(p, m, c, rng)
    target = _flip_target(p)
    A0, B0, s0 = flipped[0].factors[target]
    size0 = float((s0 * B0 @ A0).norm())
    out = [flipped[0]]
    for k in range(1, m):
        f = dict(flipped[k].factors)
        A, B, s = f[target]
        own = float((s * B @ A).norm())
        f[target] = (A0, B0 * (s0 * own / size0 / s), s)
        out.append(Contribution(f, p.layout.flatten(f)))
    return out


def _free_ride_span(p: PoolData, m: int, cosine: float, rng: np.random.Generator) -> list:
    """Free riders at full norm: each attacker sends a zero-sum combination of the honest updates
    (random signs, as many + as -), less its part along the honest mean, plus ``cosine`` of the honest
    mean's direction, at the honest median norm. At 0 it carries nothing along the honest direction while
    its norm and subspace are the honest clients' (it is made of their differences), and it dilutes the
    merge by its share of the pool; it also subtracts some honest clients' updates, dragging the cosines
    of those clients with any centre it shapes. Tuned against rule 15 by raising ``cosine``: each step buys
    back part of the share it dilutes."""
    h = p.honest.mean(0)
    h = h / np.linalg.norm(h)
    out = []
    for _ in range(m):
        v = _zero_sum(p, rng, (h,))
        vec = cosine * h + np.sqrt(1 - cosine**2) * v / np.linalg.norm(v)
        out.append(as_lora(p.layout, p.median_norm * vec))
    return out


DILUTE_SPREAD = 0.5  # dilute-spread's deviations, in honest median norms (the red team's most damaging)


def _dilute_spread(p: PoolData, m: int, b: float, rng: np.random.Generator) -> list:
    """Honest-looking dilution (a red team's most damaging layout against rule 10, 2026-12-07): each
    attacker sends the honest mean less ``b`` honest median norms along its direction, plus a random
    combination of the honest clients' deviations from their mean (Gaussian weights) at
    ``DILUTE_SPREAD`` of the median norm. Inside the honest subspace, at half an honest norm, with a
    cosine with the honest mean inside the honest clients' range while ``b`` stays under the mean's own
    length (about half the median norm on these pools), each carries a fraction of an honest client's
    part along the honest direction: it dilutes the merge as an honest client that learned less would,
    and no rule that judges one adapter, or a group by its agreement, can tell the two apart."""
    h = p.honest.mean(0)
    unit = h / np.linalg.norm(h)
    out = []
    for _ in range(m):
        u = rng.standard_normal(len(p.honest)) @ (p.honest - h)
        vec = h - b * p.median_norm * unit + DILUTE_SPREAD * p.median_norm * u / np.linalg.norm(u)
        out.append(as_lora(p.layout, vec))
    return out


def _zero_sum(p: PoolData, rng: np.random.Generator, away: tuple[np.ndarray, ...]) -> np.ndarray:
    """A combination of the honest updates with random signs, as many + as - (their differences),
    less its parts along the orthonormal vectors ``away``."""
    n = len(p.honest)
    signs = np.array([1.0] * (n // 2) + [-1.0] * (n - n // 2))
    rng.shuffle(signs)
    v = (signs - signs.mean()) @ p.honest
    return v - sum((v @ u) * u for u in away)


ASCENT_STRINGS = 192  # fresh strings of each benign client's distribution the loss-ascent attackers use


@functools.cache
def loss_ascent_direction(p: PoolData) -> np.ndarray:
    """Unit: where the benign clients' loss rises fastest at the base plus the honest mean, at rank
    ``ATTACK_RANK`` per module and orthogonal to the honest mean. The gradient of the cross-entropy on
    ``ASCENT_STRINGS`` fresh strings of every benign client's distribution (drawn with seeds of their own,
    so none is a held-out string the evaluator scores): what an attacker who knows the task and the
    others' updates computes, as the papers' omniscient attackers do."""
    ev, sc = p.evaluator, p.evaluator.scorer
    names = sorted(sc.tests)
    strings = torch.cat(
        [
            sc.task.dataset(
                sc.world,
                sc.manifest["adapters"][n]["distribution"],
                ASCENT_STRINGS,
                torch.Generator().manual_seed(10_000 + k),
            )
            for k, n in enumerate(names)
        ]
    )
    parts = p.layout.split(p.honest.mean(0))
    try:
        for m, prm in ev.params.items():
            with torch.no_grad():
                prm.copy_(ev.original[m] + torch.from_numpy(parts[m].T).to(prm.dtype))
            prm.requires_grad_(True)
            prm.grad = None
        with torch.enable_grad():
            logits = ev.model(input_ids=strings).logits[:, sc.task.predict_slice]
            target = strings[:, sc.task.target_slice]
            torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1)).backward()
        grad = {m: ev.params[m].grad.detach().double().numpy().T for m in p.layout.modules}
    finally:
        for m, prm in ev.params.items():
            prm.requires_grad_(False)
            prm.grad = None
            with torch.no_grad():
                prm.copy_(ev.original[m])
    d = p.layout.flatten(p.layout.to_lora(np.concatenate([grad[m].ravel() for m in p.layout.modules])))
    h = p.honest.mean(0) / np.linalg.norm(p.honest.mean(0))
    d -= (d @ h) * h
    return d / np.linalg.norm(d)


def _loss_ascent(p: PoolData, m: int, beta: float, rng: np.random.Generator) -> list:
    """An honest-looking update with a small part along the loss's ascent (an outside review,
    2026-12-06): each attacker sends the honest median norm along ``sqrt(1 - beta^2) b + beta d``, where
    ``b`` is ``free-ride-span``'s update at the honest clients' median cosine with their mean (a zero-sum
    combination of their updates, orthogonal to ``d``: honest norm, honest cosine, honest subspace) and
    ``d`` is :func:`loss_ascent_direction`. ``beta`` is the share of the update's norm that does harm; the
    model's loss is far steeper along ``d`` than along the directions in which honest clients differ, so a
    part smaller than the honest spread costs much accuracy."""
    d = loss_ascent_direction(p)
    h = p.honest.mean(0) / np.linalg.norm(p.honest.mean(0))
    typical = float(np.median(p.honest @ h / np.linalg.norm(p.honest, axis=1)))
    out = []
    for _ in range(m):
        v = _zero_sum(p, rng, (h, d))
        b = typical * h + np.sqrt(1 - typical**2) * v / np.linalg.norm(v)
        out.append(as_lora(p.layout, p.median_norm * (np.sqrt(1 - beta**2) * b + beta * d)))
    return out


def _rebalance(p: PoolData, m: int, c: float, rng: np.random.Generator) -> list:
    """Factor game: honest client ``k``'s ``(A / c, B c)`` in float64 (the same update)."""
    out = []
    for k in range(m):
        f = {mod: (A / c, B * c, s) for mod, (A, B, s) in p.honest_factors[k].items()}
        out.append(Contribution(f, p.honest[k].copy()))
    return out


def _rank_inflation(p: PoolData, m: int, amp: float, rng: np.random.Generator) -> list:
    """Factor game: honest client ``k``'s factors with rank doubled by extra directions of relative size
    ``amp`` (zero rows and columns for ``amp = 0``)."""
    out = []
    for k in range(m):
        f = {}
        for mod, (A, B, s) in p.honest_factors[k].items():
            r = A.shape[0]
            g = torch.Generator().manual_seed(int(rng.integers(2**31)))
            extra_a = torch.randn(r, A.shape[1], generator=g, dtype=A.dtype) * A.norm() / np.sqrt(r * A.shape[1])
            extra_b = torch.randn(B.shape[0], r, generator=g, dtype=B.dtype) * B.norm() / np.sqrt(r * B.shape[0])
            f[mod] = (torch.cat([A, amp * extra_a]), torch.cat([B, amp * extra_b], 1), s)
        out.append(Contribution(f, p.layout.flatten(f)))
    return out


SPREAD = 0.3  # alie-norm: independent perturbations of 0.3 x the vector's norm (not copies)


def _alie_norm(p: PoolData, m: int, c: float, rng: np.random.Generator) -> list:
    """ALIE tuned against clair's norm rule: the ALIE vector (z = 1) rescaled to ``c`` times the
    honest median norm, just under the rule's 4x floor at ``c = 3.9``, each attacker perturbed
    independently by ``SPREAD`` of its norm so that no two are copies (cosine about 0.9)."""
    v = agg.alie(p.honest, 1.0)
    return jittered(p.layout, c * p.median_norm * v / np.linalg.norm(v), m, rng, SPREAD)


EDGE_COSINE = 0.19  # opposed-edge: the group's cosine with the honest mean, just above rule 9's -0.2


def _opposed_edge(p: PoolData, m: int, c: float, rng: np.random.Generator) -> list:
    """Tuned against rule 9 (``opposed``): every attacker sends ``c`` times the honest median norm along
    ``-0.19 h + 0.98 d`` (``h`` the honest mean's direction, ``d`` the honest clients' main direction of
    disagreement, orthogonal to ``h``, so the update stays inside the honest subspace), each perturbed
    independently by ``SPREAD``: the group's mean has cosine about -0.19 with the rest's, just above the
    rule's -0.2, and no member is a copy. What it buys: a pull of 0.19 c median norms per attacker against
    the honest direction, plus a push along ``d``."""
    return jittered(p.layout, c * p.median_norm * edge_direction(p), m, rng, SPREAD)


def edge_direction(p: PoolData, which: int = 0, cosine: float = EDGE_COSINE) -> np.ndarray:
    """``-0.19 h + 0.98 d``: unit, at cosine -0.19 (``-cosine``) with the honest mean ``h``, along the honest
    clients' main direction of disagreement ``d`` (``which``: the next ones, orthogonal to it and to ``h``)."""
    h = p.honest.mean(0)
    h /= np.linalg.norm(h)
    dev = p.honest - p.honest.mean(0)
    dev -= np.outer(dev @ h, h)
    d = np.linalg.svd(dev, full_matrices=False)[2][which]
    return -cosine * h + np.sqrt(1 - cosine**2) * d


SPREAD_NORM = 3.5  # opposed-spread: each attacker's norm, in honest median norms (under the 4x floor)


def low_rank_noise(layout: Layout, rng: np.random.Generator, rank: int = ATTACK_RANK) -> np.ndarray:
    """A random update of unit norm, rank ``rank`` per module (it survives the attack's truncation)."""
    parts = [rng.standard_normal((o, rank)) @ rng.standard_normal((rank, i)) for o, i in layout.shapes]
    vec = np.concatenate([x.ravel() for x in parts])
    return vec / np.linalg.norm(vec)


def _opposed_spread(p: PoolData, m: int, rho: float, rng: np.random.Generator) -> list:
    """``opposed-edge`` tuned against rule 10 (``coordinated``) too: each attacker adds independent
    low-rank noise, so that two attackers' cosine is about ``rho`` (the noise's norm ``sqrt(1 / rho - 1)``
    times the shared part's) and their nearest-neighbour cosines approach the honest clients'; every
    attacker's norm is ``SPREAD_NORM`` honest median norms. Lower ``rho``: harder to group, and less of
    each update is the shared pull (``sqrt(rho)`` of its norm)."""
    return spread_edge(p, m, rho, SPREAD_NORM, rng)


SPREAD_RHO = 0.4  # opposed-spread-norm: the attackers' cosine, clair's worst point of opposed-spread


def _opposed_spread_norm(p: PoolData, m: int, c: float, rng: np.random.Generator) -> list:
    """``opposed-spread`` at ``SPREAD_RHO`` with the norm scanned instead (``c`` honest median norms):
    what the attacker gives up by staying at the honest clients' size, where no norm statistic (the
    distance-based aggregators' tell, clair's norm bound) sees it."""
    return spread_edge(p, m, SPREAD_RHO, c, rng)


def spread_edge(  # noqa: PLR0913 - each keyword is one property of the attack
    p: PoolData, m: int, rho: float, c: float, rng: np.random.Generator, groups: int = 1, cosine: float = EDGE_COSINE
) -> list:
    """``m`` updates of ``c`` honest median norms along the ``opposed-edge`` direction plus independent
    low-rank noise, two of them at cosine about ``rho``. With ``groups`` > 1 the attackers split into that
    many groups (sizes as equal as they can be), group ``j`` along ``edge_direction(p, j)``: every group
    pulls against the honest mean alike, each along its own direction of honest disagreement, so two
    groups' directions have cosine 0.19^2 = 0.04 (``cosine``: instead of 0.19)."""
    directions = [edge_direction(p, j, cosine) for j in range(groups)]
    spread = np.sqrt(1 / rho - 1)
    out = []
    for k in range(m):
        vec = directions[k % groups] + spread * low_rank_noise(p.layout, rng)
        out.append(as_lora(p.layout, c * p.median_norm * vec / np.linalg.norm(vec)))
    return out


FAINT_RHO = 0.15  # opposed-spread-faint: the attackers' cosine, under rule 11's reach in a pool of honest ones


def _opposed_spread_faint(p: PoolData, m: int, c: float, rng: np.random.Generator) -> list:
    """``opposed-spread-norm`` with the attackers at cosine about ``FAINT_RHO`` with each other, as loosely
    as trained honest clients agree: each update is mostly its own noise (the shared pull is ``sqrt(0.15)``
    = 0.39 of its norm), so what gives the group away is only the sum of its small pulls."""
    return spread_edge(p, m, FAINT_RHO, c, rng)


SPLIT_NORM = 2.0  # split-groups: each attacker's norm in honest median norms


def _split_groups(p: PoolData, m: int, groups: float, rng: np.random.Generator) -> list:
    """Tuned against rule 11 (a group's pull is judged group by group): the attackers split into
    ``groups`` groups (at most one per attacker), each an ``opposed-spread`` group at cosine
    ``SPREAD_RHO`` and ``SPLIT_NORM`` honest median norms along its own direction of honest
    disagreement, so that each group pulls a fraction of the whole while together they pull the
    merge against the honest mean as one group would."""
    return spread_edge(p, m, SPREAD_RHO, SPLIT_NORM, rng, groups=min(int(groups), m))


def _split_against(p: PoolData, m: int, cosine: float, rng: np.random.Generator) -> list:
    """``split-groups`` in two groups, tuned against rule 11's set-aside check: each group's cosine with
    the honest mean scanned from -0.19 down, so that past -0.2 a group stands against the others, where a
    side of a directionless pool does and rule 11 leaves it to rule 9."""
    return spread_edge(p, m, SPREAD_RHO, SPLIT_NORM, rng, groups=min(2, m), cosine=cosine)


def _copies_alie(p: PoolData, m: int, z: float, rng: np.random.Generator) -> list:
    return copies(p.layout, agg.alie(p.honest, z), m)


def _copies_backdoor(p: PoolData, m: int, c: float, rng: np.random.Generator) -> list:
    v = p.backdoor[0]
    return copies(p.layout, c * p.median_norm * v / np.linalg.norm(v), m)


@dataclass(frozen=True)
class Attack:
    name: str
    build: Builder
    strengths: tuple[float, ...]
    quick: tuple[float, ...]
    unit: str  # what the strength is
    backdoor: bool = False


ATTACKS: dict[str, Attack] = {
    a.name: a
    for a in (
        Attack("alie", _alie, (0.25, 0.5, 1.0, 2.0, 4.0), (0.5, 1.5, 4.0), "z (std units)"),
        Attack("ipm", _ipm, (0.1, 0.5, 2.0, 10.0), (0.5, 2.0, 10.0), "epsilon"),
        Attack("min-max-unit", _min_attack("max", "unit"), (0.5, 1.0, 4.0), (1.0, 4.0), "gamma / gamma*"),
        Attack("min-max-std", _min_attack("max", "std"), (0.5, 1.0, 4.0), (1.0, 4.0), "gamma / gamma*"),
        Attack("min-sum-unit", _min_attack("sum", "unit"), (0.5, 1.0, 4.0), (1.0, 4.0), "gamma / gamma*"),
        Attack("min-sum-std", _min_attack("sum", "std"), (0.5, 1.0, 4.0), (1.0, 4.0), "gamma / gamma*"),
        Attack("fang-krum", _fang_krum, (0.25, 1.0, 8.0), (1.0, 8.0), "lambda / lambda*"),
        Attack("fang-trim", _fang_trim, (1.25, 1.5, 2.0, 3.0, 10.0), (2.0, 10.0), "b"),
        Attack("backdoor-scale", _backdoor, (0.5, 1.0, 1.5, 2.0, 5.0), (1.0, 5.0), "norm / honest median", True),
        Attack("boost", _boost, (2.0, 5.0, 50.0), (2.0, 10.0), "x c"),
        Attack("sign-flip", _sign_flip, (1.0, 2.0, 10.0), (1.0, 5.0), "x -c"),
        Attack("module-flip", _module_flip, (1.0, 2.0, 3.0, 3.9, 8.0), (2.0, 3.9), "x -c in one module"),
        Attack("module-flip-copies", _module_flip_copies, (1.0, 2.0, 3.0, 3.9, 8.0), (2.0, 3.9), "x -c in one module"),
        Attack("free-ride-span", _free_ride_span, (0.0, 0.1, 0.2, 0.3), (0.0, 0.2), "cosine with the honest mean"),
        Attack("dilute-spread", _dilute_spread, (0.25, 0.35, 0.45, 0.55), (0.35, 0.45), "median norms off the mean"),
        Attack("loss-ascent", _loss_ascent, (0.05, 0.1, 0.2, 0.35, 0.5, 0.8), (0.1, 0.5), "share of the norm along d"),
        Attack("rebalance", _rebalance, (1e-6, 1e6, 1e18), (1e-6, 1e18), "c in (A / c, B c)"),
        Attack("rank-inflation", _rank_inflation, (0.0, 1e-3), (0.0, 1e-3), "extra directions' size"),
        Attack("alie-norm", _alie_norm, (1.0, 2.0, 3.0, 3.5, 3.9), (2.0, 3.9), "norm / honest median"),
        Attack("opposed-edge", _opposed_edge, (1.0, 2.0, 3.0, 3.9), (2.0, 3.9), "norm / honest median"),
        Attack("opposed-spread", _opposed_spread, (0.9, 0.6, 0.4, 0.25), (0.6, 0.25), "attackers' cosine"),
        Attack(
            "opposed-spread-norm",
            _opposed_spread_norm,
            (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.5),
            (1.0, 3.5),
            "norm / honest median",
        ),
        Attack("opposed-spread-faint", _opposed_spread_faint, (1.0, 1.5, 2.0, 3.5), (1.0, 2.0), "norm / honest median"),
        Attack("split-groups", _split_groups, (2.0, 3.0, 6.0), (2.0, 3.0), "groups"),
        Attack("split-against", _split_against, (0.19, 0.3, 0.45, 0.6), (0.3, 0.45), "-cos(group, honest mean)"),
        Attack("copies-alie", _copies_alie, (0.5, 1.0, 4.0), (1.0, 4.0), "z"),
        Attack(
            "copies-backdoor", _copies_backdoor, (0.5, 1.0, 1.5, 2.0, 5.0), (1.0, 5.0), "norm / honest median", True
        ),
    )
}


# -- clair ---------------------------------------------------------------------------------


def clair_merge(
    p: PoolData, attackers: list[Contribution], round_defaults: bool = False
) -> tuple[np.ndarray | None, dict]:
    """clair's default audit and merge through the library API; the merged dense update (None: no merge,
    the base model) and what it flagged. ``round_defaults``: ClairStrategy's defaults instead of
    ``clair merge``'s (every copy of an update flagged, bounded influence by centred clipping)."""
    from clair_cli import pipeline
    from clair_cli.federated.rounds import _round_merge_options
    from clair_cli.params import AuditParams

    named = {f"h{k:02d}": f for k, f in enumerate(p.honest_factors)}
    named |= {f"x{k:02d}": a.factors for k, a in enumerate(attackers)}
    info: dict = {}
    try:
        pool = pipeline.pool_from_factors(named, base_model=trained_pools.BASE_NAME)
        settings = AuditParams()
        outcome = pipeline.audit(pool, settings, copies="flag-all" if round_defaults else "keep-one")
        flagged = dict(zip(pool.names, outcome.auditor.flagged_, strict=True))
        info["honest_flagged"] = sum(v for n, v in flagged.items() if n.startswith("h"))
        info["attackers_flagged"] = sum(v for n, v in flagged.items() if n.startswith("x"))
        if not outcome.auditor.collaborative_set_:
            info["error"] = "every adapter flagged"
            return None, info
        options = _round_merge_options() if round_defaults else None
        merged = pipeline.merge(pool, "clair", settings, options=options, outcome=outcome)
    except Exception as exc:  # a refusal or crash is a result: the user gets no merge
        info["error"] = f"{type(exc).__name__}: {exc}"[:300]
        return None, info
    vec = np.concatenate(
        [(merged.modules[m].B.double() @ merged.modules[m].A.double()).numpy().ravel() for m in p.layout.modules]
    )
    return vec, info


# -- the benchmark -------------------------------------------------------------------------


@dataclass
class Cell:
    """One (task, seed, fraction, attack): per strength, every aggregator's score."""

    task: str
    seed: int
    fraction: float
    attackers: int
    attack: str
    points: list[dict] = field(default_factory=list)
    # clair's worst point against the best other aggregator's: the difference and its 95 % interval
    # over the held-out strings (:meth:`Evaluator.paired_interval`)
    noise: dict | None = None


def aggregate_all(p: PoolData, x: np.ndarray, f: int) -> dict[str, np.ndarray]:
    return {name: agg.AGGREGATORS[name](x, f) for name in ("mean", *BASELINES)}


def run_cell(p: PoolData, attack: Attack, fraction: float, strengths: tuple[float, ...], seed: int) -> Cell:
    m = n_attackers(fraction)
    cell = Cell(p.task, p.seed, fraction, m, attack.name)
    oracle = p.evaluator.score(p.honest.mean(0), attack.backdoor)
    correct: list[dict[str, torch.Tensor]] = []
    for strength in strengths:
        rng = np.random.default_rng([seed, m, int(1e6 * strength) % 2**31, len(cell.points)])
        contributions = attack.build(p, m, strength, rng)
        x = np.vstack([p.honest] + [c.vector for c in contributions])
        scores = {"oracle": oracle}
        for name, vec in aggregate_all(p, x, m).items():
            scores[name] = p.evaluator.score(vec, attack.backdoor)
        vec, info = clair_merge(p, contributions)
        scores["clair"] = p.evaluator.score(vec, attack.backdoor)
        vec_round, info_round = clair_merge(p, contributions, round_defaults=True)
        scores["clair-round"] = p.evaluator.score(vec_round, attack.backdoor)
        cell.points.append(
            {
                "strength": strength,
                "clair": info,
                "clair_round": info_round,
                "clair_flagged_all": info.get("attackers_flagged") == m,
                "accuracy": {k: round(v["accuracy"], 6) for k, v in scores.items()},
                "backdoor": {k: v["backdoor"] for k, v in scores.items()} if attack.backdoor else None,
                "attack_norm": float(np.median(np.linalg.norm(x[N_HONEST:], axis=1)) / p.median_norm),
            }
        )
        correct.append({k: v["correct"] for k, v in scores.items()})
    cell.noise = against_best_other(p.evaluator, cell, correct)
    return cell


def against_best_other(evaluator: Evaluator, cell: Cell, correct: list[dict[str, torch.Tensor]]) -> dict:
    """clair's worst point against the best other aggregator's worst point (:func:`worst`'s points):
    the difference in accuracy and its 95 % interval over the held-out strings."""

    def at_worst(col: str) -> int:
        return min(range(len(cell.points)), key=lambda i: cell.points[i]["accuracy"][col])

    best = max(("mean", *BASELINES), key=lambda col: cell.points[at_worst(col)]["accuracy"][col])
    a, b = correct[at_worst("clair")]["clair"], correct[at_worst(best)][best]
    lo, hi = evaluator.paired_interval(a, b)
    return {"best_other": best, "difference": round(evaluator._per_client(a - b, evaluator.owner), 6), "ci95": [lo, hi]}


def clean_cell(p: PoolData) -> Cell:
    cell = Cell(p.task, p.seed, 0.0, 0, "clean")
    x = p.honest
    scores = {"oracle": p.evaluator.score(x.mean(0))}
    for name, vec in aggregate_all(p, x, 0).items():
        scores[name] = p.evaluator.score(vec)
    vec, info = clair_merge(p, [])
    scores["clair"] = p.evaluator.score(vec)
    clair_vs_mean = None if vec is None else float(np.linalg.norm(vec - x.mean(0)) / np.linalg.norm(x.mean(0)))
    info["relative_distance_to_mean"] = clair_vs_mean
    vec_round, info_round = clair_merge(p, [], round_defaults=True)
    scores["clair-round"] = p.evaluator.score(vec_round)
    if vec_round is not None:
        info_round["relative_distance_to_mean"] = float(
            np.linalg.norm(vec_round - x.mean(0)) / np.linalg.norm(x.mean(0))
        )
    cell.points.append(
        {
            "strength": 0.0,
            "clair": info,
            "clair_round": info_round,
            "clair_flagged_all": True,
            "accuracy": {k: round(v["accuracy"], 6) for k, v in scores.items()},
            "backdoor": None,
        }
    )
    return cell


def worst(cell: Cell) -> dict[str, dict]:
    """Per aggregator, its worst point over the scan: the lowest accuracy and its strength."""
    out = {}
    for col in COLUMNS:
        point = min(cell.points, key=lambda q: q["accuracy"][col])
        out[col] = {"accuracy": point["accuracy"][col], "strength": point["strength"]}
        if cell.points[0]["backdoor"] is not None:
            out[col]["max_backdoor"] = max(q["backdoor"][col] for q in cell.points)
    return out


# -- report --------------------------------------------------------------------------------


def _ms(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def meets_bar(w: dict[str, dict]) -> bool:
    """The issue's bar on one pool: clair within TOLERANCE of the oracle (or above it), or, where it is
    not, at least as good as the best other aggregator."""
    best_other = max(w[col]["accuracy"] for col in ("mean", *BASELINES))
    gap = w["clair"]["accuracy"] - w["oracle"]["accuracy"]
    return gap >= -TOLERANCE or w["clair"]["accuracy"] >= best_other - 1e-9


def tables(cells: list[Cell]) -> str:
    groups: dict[tuple[str, float], list[Cell]] = {}
    for c in cells:
        groups.setdefault((c.attack, c.fraction), []).append(c)
    n_pools = len({(c.task, c.seed) for c in cells})
    header = (
        "| attack | attackers | "
        + " | ".join(COLUMNS)
        + " | best other | clair − oracle (worst pool) | meets bar | clair flags all |"
    )
    lines = [
        "Worst-point accuracy: the benign clients' mean held-out accuracy at each aggregator's own worst "
        f"strength of the scan, mean ± sd over {n_pools} (task, seed) pools. *best other*: per pool the best "
        f"of mean and the baselines. *meets bar*: pools where clair is within {TOLERANCE} of the oracle (or "
        "above it) or at least as good as the best other. *clair flags all*: scan points (over pools) where "
        "clair flagged every attacker.",
        "",
        header,
        "|" + "---|" * (len(COLUMNS) + 6),
    ]
    bd_lines = []
    failures = []
    for (attack, fraction), group in groups.items():
        w = [worst(c) for c in group]
        cols = {col: [x[col]["accuracy"] for x in w] for col in COLUMNS}
        gap = [x["clair"]["accuracy"] - x["oracle"]["accuracy"] for x in w]
        others = [max(x[col]["accuracy"] for col in ("mean", *BASELINES)) for x in w]
        ok = [meets_bar(x) for x in w]
        flagged = sum(q["clair_flagged_all"] for c in group for q in c.points)
        total = sum(len(c.points) for c in group)
        who = "none" if fraction == 0 else f"{group[0].attackers}/{N_HONEST + group[0].attackers}"
        lines.append(
            f"| {attack} | {who} | "
            + " | ".join(_ms(cols[col]) for col in COLUMNS)
            + f" | {_ms(others)} | {_ms(gap)} ({min(gap):+.3f}) | {sum(ok)}/{len(w)} | {flagged}/{total} |"
        )
        for c, x, good in zip(group, w, ok, strict=True):
            if not good:
                best = max(("mean", *BASELINES), key=lambda col, x=x: x[col]["accuracy"])
                failures.append(
                    f"- {attack}, {who} attackers, {c.task} seed {c.seed}: clair {x['clair']['accuracy']:.3f} at "
                    f"strength {x['clair']['strength']:g} (oracle {x['oracle']['accuracy']:.3f}, "
                    f"gap {x['clair']['accuracy'] - x['oracle']['accuracy']:+.3f}); best other {best} "
                    f"{x[best]['accuracy']:.3f} at its worst strength {x[best]['strength']:g}" + _noise_text(c)
                )
        if "max_backdoor" in w[0]["clair"]:
            bd = {col: [x[col]["max_backdoor"] for x in w] for col in COLUMNS}
            bd_lines.append(f"| {attack} | {who} | " + " | ".join(_ms(bd[col]) for col in COLUMNS) + " |")
    lines += ["", "Pools where clair misses the bar:", "", *(failures or ["- none"])]
    misses = [c for c in cells if c.attack != "clean" and c.noise is not None and not meets_bar(worst(c))]
    if misses:
        within = sum(c.noise["ci95"][1] >= 0 for c in misses)  # type: ignore[index]
        lines += [
            "",
            f"Of these {len(misses)} misses, {within} are within the evaluation's noise: the 95 % interval of clair "
            "minus the best other (each at its worst point), over the held-out strings resampled within each "
            "client, reaches 0.",
        ]
    if bd_lines:
        lines += [
            "",
            "Backdoor success, the highest over each scan (mean ± sd over the pools):",
            "",
            "| attack | attackers | " + " | ".join(COLUMNS) + " |",
            "|" + "---|" * (len(COLUMNS) + 2),
            *bd_lines,
        ]
    return "\n".join(lines)


def _noise_text(cell: Cell) -> str:
    """A miss's difference from the best other and whether it is within the held-out strings' noise."""
    if cell.noise is None:
        return ""
    lo, hi = cell.noise["ci95"]
    verdict = "within the evaluation's noise" if hi >= 0 else "beyond the evaluation's noise"
    return f"; difference {cell.noise['difference']:+.3f}, 95 % interval {lo:+.3f} to {hi:+.3f} ({verdict})"


def clair_scan_table(cells: list[Cell]) -> str:
    """Per attack, fraction and strength: clair's mean accuracy minus the oracle's, and how often it
    flagged every attacker."""
    rows: dict[tuple[str, float, float], list[dict]] = {}
    for c in cells:
        if c.attack == "clean":
            continue
        for q in c.points:
            rows.setdefault((c.attack, c.fraction, q["strength"]), []).append(q)
    lines = [
        "clair along each scan (mean over pools): accuracy − oracle, mean's accuracy − oracle, "
        "pools where clair flagged every attacker, honest clients flagged (total), errors.",
        "",
        "| attack | fraction | strength | clair − oracle | mean − oracle | flags all | honest flagged | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (attack, fraction, strength), qs in rows.items():
        d = [q["accuracy"]["clair"] - q["accuracy"]["oracle"] for q in qs]
        dm = [q["accuracy"]["mean"] - q["accuracy"]["oracle"] for q in qs]
        lines.append(
            f"| {attack} | {fraction:g} | {strength:g} | {statistics.fmean(d):+.3f} | {statistics.fmean(dm):+.3f} | "
            f"{sum(q['clair_flagged_all'] for q in qs)}/{len(qs)} | "
            f"{sum(q['clair'].get('honest_flagged', 0) for q in qs)} | "
            f"{sum('error' in q['clair'] for q in qs)} |"
        )
    return "\n".join(lines)


# -- multi-round federation (--rounds) -----------------------------------------------------


def federation(p: PoolData, rounds: int, seed: int, per_round: int = 6) -> dict:
    """A small federation through ``clair_cli.federated.aggregate_round`` (ClairStrategy's round): 10
    clients (8 honest, one sending its update x 10, one sign-flipped), ``per_round`` sampled per
    round. No retraining: a sampled client's update is its trained update times ``1 / rounds`` (a
    stand-in for one round of local training), sent as LoRA factors of ``global + update`` at the
    modules' full rank (64: exact), the global LoRA kept at that rank. FedMedian and the oracle (the
    mean of the sampled honest updates) accumulate the same updates. Reports every round's accuracy."""
    from clair_cli.federated import aggregate_round

    rng = np.random.default_rng(seed)
    layout = p.layout
    eta = 1.0 / rounds
    updates = {f"h{k}": eta * p.honest[k] for k in range(8)}
    updates["boost10"] = 10 * eta * p.honest[8]
    updates["signflip"] = -eta * p.honest[9]
    names = list(updates)
    rank = {m: min(shape) for m, shape in zip(layout.modules, layout.shapes, strict=True)}
    scales = dict.fromkeys(layout.modules, 1.0)

    def factors(vec: np.ndarray) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {m: (A.float(), B.float()) for m, (A, B, _) in layout.to_lora(vec, max(rank.values())).items()}

    glob = factors(np.zeros(p.honest.shape[1]))
    g_clair = np.zeros(p.honest.shape[1])
    g_median = np.zeros_like(g_clair)
    g_oracle = np.zeros_like(g_clair)
    log = []
    for r in range(rounds):
        sampled = [names[k] for k in sorted(rng.choice(len(names), per_round, replace=False).tolist())]
        res = aggregate_round(
            glob, {n: factors(g_clair + updates[n]) for n in sampled}, scales, rank, base_model=trained_pools.BASE_NAME
        )
        glob = res.global_factors
        g_clair = np.concatenate(
            [(B.double() @ A.double()).numpy().ravel() for A, B in (glob[m] for m in layout.modules)]
        )
        g_median = g_median + np.median(np.stack([updates[n] for n in sampled]), axis=0)
        honest = [updates[n] for n in sampled if n.startswith("h")]
        g_oracle = g_oracle + (np.mean(honest, axis=0) if honest else 0.0)
        log.append(
            {
                "round": r + 1,
                "sampled": sampled,
                "clair_flagged": [n for n, fl in zip(res.names, res.flagged, strict=True) if fl],
                "fallback": res.fallback,
                "clair": p.evaluator.score(g_clair)["accuracy"],
                "median": p.evaluator.score(g_median)["accuracy"],
                "oracle": p.evaluator.score(g_oracle)["accuracy"],
            }
        )
    return {"task": p.task, "seed": p.seed, "rounds": log}


def federation_table(fed: list[dict]) -> str:
    lines = [
        "Multi-round federation (`--rounds`): 10 clients (8 honest, one x 10, one sign-flipped), 6 sampled "
        "per round; accuracy of the global model after each round (mean over pools).",
        "",
        "| round | oracle | clair | FedMedian | attackers sampled | attackers flagged by clair | honest flagged |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in range(len(fed[0]["rounds"])):
        rows = [f["rounds"][r] for f in fed]
        att = sum(n in ("boost10", "signflip") for q in rows for n in q["sampled"])
        caught = sum(n in ("boost10", "signflip") for q in rows for n in q["clair_flagged"])
        honest = sum(n.startswith("h") for q in rows for n in q["clair_flagged"])
        lines.append(
            f"| {r + 1} | {statistics.fmean(q['oracle'] for q in rows):.3f} | "
            f"{statistics.fmean(q['clair'] for q in rows):.3f} | {statistics.fmean(q['median'] for q in rows):.3f} | "
            f"{att} | {caught} | {honest} |"
        )
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.attacks", description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=len(trained_pools.DEFAULT_SEEDS), help="seeds 0..N-1")
    parser.add_argument("--tasks", default=",".join(tasks.TASKS), help="comma-separated task names")
    parser.add_argument("--fractions", default=",".join(map(str, FRACTIONS)), help="attackers' share of the pool")
    parser.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated attack names")
    parser.add_argument("--quick", action="store_true", help="fewer strengths per attack (a smoke run)")
    parser.add_argument("--cache", type=Path, default=trained_pools.default_cache())
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/attacks.json"))
    parser.add_argument("--eval-strings", type=int, default=64, help="held-out strings per benign client")
    parser.add_argument("--rounds", type=int, default=0, help="also run the multi-round federation (N rounds)")
    parser.add_argument("--from-json", type=Path, help="only re-render the tables of an earlier run's JSON")
    args = parser.parse_args(argv)
    if args.from_json:
        payload = json.loads(args.from_json.read_text())
        cells = [Cell(**{k: v for k, v in c.items() if k != "worst"}) for c in payload["cells"]]
        fed = payload.get("federation") or []
        text = render(cells, fed)
        print(text)
        write_markdown(args.out.with_suffix(".md"), text, payload)
        return 0
    trained_pools.configure_torch()
    start = time.perf_counter()
    seeds = list(range(args.seeds))
    task_names = args.tasks.split(",")
    fractions = [float(x) for x in args.fractions.split(",")]
    attacks = [ATTACKS[a] for a in args.attacks.split(",")]
    pools = trained_pools.generate(args.cache, seeds, task_names, ["clean", "heavy"], trained_pools.log_err)
    cells: list[Cell] = []
    fed = []
    for path in pools:
        if not path.name.endswith("-heavy"):
            continue
        p = load_pool(path, args.eval_strings)
        cells.append(clean_cell(p))
        for attack in attacks:
            strengths = attack.quick if args.quick else attack.strengths
            for fraction in fractions:
                cells.append(run_cell(p, attack, fraction, strengths, p.seed))
            trained_pools.log_err(
                f"{p.task} s{p.seed} {attack.name}: done ({p.evaluator.calls} evaluations, "
                f"{time.perf_counter() - start:.0f} s)"
            )
        if args.rounds:
            fed.append(federation(p, args.rounds, p.seed))
    text = render(cells, fed)
    print(text)
    payload = {
        "benchmark": "attack benchmark on trained LoRA pools (benchmarks/attacks.py)",
        "seeds": seeds,
        "tasks": task_names,
        "fractions": fractions,
        "attackers": {str(f): n_attackers(f) for f in fractions},
        "attack_rank": ATTACK_RANK,
        "jitter": JITTER,
        "eval_strings_per_client": args.eval_strings,
        "attacks": {a.name: {"strengths": a.quick if args.quick else a.strengths, "unit": a.unit} for a in attacks},
        "quick": args.quick,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "cells": [c.__dict__ | {"worst": worst(c)} for c in cells],
        "federation": fed,
    }
    trained_pools.write_results(args.out, payload, start)
    write_markdown(args.out.with_suffix(".md"), text, payload)
    return 0


def render(cells: list[Cell], fed: list[dict]) -> str:
    return "\n\n".join([tables(cells), clair_scan_table(cells)] + ([federation_table(fed)] if fed else []))


def write_markdown(path: Path, text: str, payload: dict) -> None:
    setup = (
        f"Seeds {payload['seeds']}, tasks {', '.join(payload['tasks'])}, attackers "
        f"{', '.join(f'{n} at {f}' for f, n in payload['attackers'].items())} (with {N_HONEST} honest); attack "
        f"adapters at rank {payload['attack_rank']}, jitter {payload['jitter']}; "
        f"{payload.get('eval_strings_per_client', 64)} held-out strings per benign client; "
        f"{'quick scan; ' if payload['quick'] else ''}{payload['wall_seconds']:.0f} s."
    )
    scans = "\n".join(f"- {name}: {a['unit']} in {list(a['strengths'])}" for name, a in payload["attacks"].items())
    path.write_text(
        f"# Attack benchmark (`python -m benchmarks.attacks`)\n\n{setup}\n\nStrengths scanned:\n\n{scans}\n\n{text}\n"
    )


if __name__ == "__main__":
    sys.exit(main())
