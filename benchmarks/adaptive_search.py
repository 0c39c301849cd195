"""An adaptive black-box attacker: search, with clair's own verdict as the oracle, for the most
damaging collusion that passes unflagged.

    python -m benchmarks.adaptive_search [--pools revsucc-s0,majority-s0] [--fractions 0.2,0.33]
                                         [--random 50] [--refine 30] [--check-seed 2]
                                         [--directions neg_mean,other_task,random_lr,dev_pc1]
                                         [--out benchmarks/results/adaptive_search.json]
                                         [--replay POINTS_JSON [--draws 3]] [--copies 1]

Unlike benchmarks/attacks.py's hand-tuned families, one broad family is searched. ``m`` colluding
attackers (20 % or 33 % of the pool, as benchmarks.attacks.n_attackers) each send, before the
benchmark's rank-8 LoRA truncation (``attacks.as_lora``)::

    v_k = s_k * ( a h + b N dir|mask + c (x_{i_k} - h) + sigma N noise_k )

``h``: the honest mean; ``N``: the honest median norm; ``dir``: a unit harmful direction (``neg_mean``:
-h; ``other_task``: the other task's honest mean on the same base, less its part along h;
``random_lr``: a random rank-8 direction, less its part along h; ``dev_pc1``: the honest clients'
main direction of disagreement orthogonal to h; ``loss_ascent``: attacks.loss_ascent_direction, a
documented limit, only when asked for), restricted to a subset of modules ``mask`` and renormalised;
``x_{i_k}``: a randomly chosen honest client (distinct per attacker while there are enough; with
``--copies n``, the same for each n attackers in turn), so
``a = c = 1, b = sigma = 0`` is a near copy of an honest client; ``noise_k``: independent unit rank-8
noise; ``s_k = exp(jitter z_k)``: a per-attacker scale jitter. ``draw`` seeds every random choice.

Objective: the damage ``oracle - clair`` in held-out accuracy (attacks.Evaluator, 64 strings per benign
client), clair being the library's default audit + merge in process (attacks.clair_merge). Two
searches per (pool, m): *strict* (a point where any attacker is flagged is infeasible) and *relaxed*
(flags allowed). Each: ``--random`` uniform points (shared by both), then a (1 + lambda) evolution
strategy from the best (Gaussian steps on the continuous parameters, categorical mutations, step size
adapted by the 1/5 rule) for ``--refine`` evaluations. The best points are then re-scored against the
plain mean, the coordinate median and the geometric median, and re-built on the same task's pool of
``--check-seed`` with three fresh draws.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from benchmarks import aggregators as agg
from benchmarks import attacks, trained_pools

MASKS = ("all", "top1", "top2", "top4", "layer0", "layer1", "attn", "mlp")
DIRECTIONS = ("neg_mean", "other_task", "random_lr", "dev_pc1")
# continuous parameters: name -> (low, high)
BOUNDS = {
    "a": (-0.5, 1.5),
    "b": (0.0, 2.0),
    "c": (0.0, 1.5),
    "sigma": (0.0, 1.0),
    "jitter": (0.0, 0.5),
}


@dataclass(frozen=True)
class Point:
    direction: str
    mask: str
    a: float
    b: float
    c: float
    sigma: float
    jitter: float
    draw: int


def random_point(rng: np.random.Generator, directions: tuple[str, ...]) -> Point:
    vals = {k: float(rng.uniform(lo, hi)) for k, (lo, hi) in BOUNDS.items()}
    return Point(str(rng.choice(directions)), str(rng.choice(MASKS)), **vals, draw=int(rng.integers(2**31)))


def mutate(p: Point, rng: np.random.Generator, step: float, directions: tuple[str, ...]) -> Point:
    vals = {}
    for k, (lo, hi) in BOUNDS.items():
        vals[k] = float(np.clip(getattr(p, k) + step * (hi - lo) * rng.standard_normal(), lo, hi))
    direction = str(rng.choice(directions)) if rng.random() < 0.1 else p.direction
    mask = str(rng.choice(MASKS)) if rng.random() < 0.15 else p.mask
    draw = int(rng.integers(2**31)) if rng.random() < 0.2 else p.draw
    return Point(direction, mask, **vals, draw=draw)


# -- the family ----------------------------------------------------------------------------


class Family:
    """Builds a point's attackers on one pool."""

    def __init__(self, p: attacks.PoolData, other: attacks.PoolData | None, copies: int = 1) -> None:
        self.p = p
        self.copies = copies  # attackers per copied honest client
        self.h = p.honest.mean(0)
        self.hu = self.h / np.linalg.norm(self.h)
        self.N = p.median_norm
        self.other = other
        mean_split = p.layout.split(self.h)
        by_size = sorted(p.layout.modules, key=lambda m: -float(np.linalg.norm(mean_split[m])))
        mods = p.layout.modules
        self.masks = {
            "all": set(mods),
            "top1": set(by_size[:1]),
            "top2": set(by_size[:2]),
            "top4": set(by_size[:4]),
            "layer0": {m for m in mods if ".h.0." in m},
            "layer1": {m for m in mods if ".h.1." in m},
            "attn": {m for m in mods if ".attn." in m},
            "mlp": {m for m in mods if ".mlp." in m},
        }

    def _orth(self, v: np.ndarray) -> np.ndarray:
        v = v - (v @ self.hu) * self.hu
        return v / np.linalg.norm(v)

    @functools.cache  # noqa: B019 - one Family per pool, kept for the run
    def direction(self, name: str) -> np.ndarray:
        p = self.p
        if name == "neg_mean":
            return -self.hu
        if name == "other_task":
            assert self.other is not None
            return self._orth(self.other.honest.mean(0))
        if name == "random_lr":
            return self._orth(attacks.low_rank_noise(p.layout, np.random.default_rng(12345)))
        if name == "dev_pc1":
            dev = p.honest - self.h
            dev -= np.outer(dev @ self.hu, self.hu)
            return np.linalg.svd(dev, full_matrices=False)[2][0]
        if name == "loss_ascent":
            return attacks.loss_ascent_direction(p)
        raise ValueError(name)

    def masked(self, vec: np.ndarray, mask: str) -> np.ndarray:
        keep = self.masks[mask]
        parts = self.p.layout.split(vec)
        out = np.concatenate([(w if m in keep else np.zeros_like(w)).ravel() for m, w in parts.items()])
        n = np.linalg.norm(out)
        return out / n if n > 0 else out

    def build(self, pt: Point, m: int) -> list[attacks.Contribution]:
        p = self.p
        rng = np.random.default_rng(pt.draw)
        harm = self.masked(self.direction(pt.direction), pt.mask)
        n_h = len(p.honest)
        order = rng.permutation(n_h)
        out = []
        for k in range(m):
            i = int(order[(k // self.copies) % n_h])
            noise = attacks.low_rank_noise(p.layout, rng)
            v = pt.a * self.h + pt.b * self.N * harm + pt.c * (p.honest[i] - self.h) + pt.sigma * self.N * noise
            v = float(np.exp(pt.jitter * rng.standard_normal())) * v
            if not np.any(v):
                v = 1e-9 * noise
            out.append(attacks.as_lora(p.layout, v))
        return out


# -- evaluation ----------------------------------------------------------------------------


class Oracle:
    """Runs clair on a point and scores the merge; counts the calls."""

    def __init__(self, fam: Family, m: int) -> None:
        self.fam = fam
        self.m = m
        self.p = fam.p
        self.oracle_acc = self.p.evaluator.score(fam.h)["accuracy"]
        spread = self.p.honest - fam.h
        self.spread = float(np.sqrt((spread**2).sum(1).mean()))  # rms honest deviation
        self.calls = 0
        self.log: list[dict] = []

    def __call__(self, pt: Point, phase: str, baselines: bool = False) -> dict:
        self.calls += 1
        contribs = self.fam.build(pt, self.m)
        vec, info = attacks.clair_merge(self.p, contribs)
        acc = self.p.evaluator.score(vec)["accuracy"]
        row = {
            "phase": phase,
            "point": asdict(pt),
            "clair": round(acc, 6),
            "damage": round(self.oracle_acc - acc, 6),
            "attackers_flagged": info.get("attackers_flagged"),
            "honest_flagged": info.get("honest_flagged"),
            "error": info.get("error"),
            # the cheap proxy: clair's merge's distance from the honest mean, in rms honest deviations
            "proxy": None if vec is None else round(float(np.linalg.norm(vec - self.fam.h)) / self.spread, 4),
            "attack_norm": round(float(np.median([np.linalg.norm(c.vector) for c in contribs])) / self.fam.N, 3),
            "attack_cos": round(
                float(np.median([c.vector @ self.fam.hu / np.linalg.norm(c.vector) for c in contribs])), 3
            ),
        }
        if baselines:
            x = np.vstack([self.p.honest] + [c.vector for c in contribs])
            for name in ("mean", "median", "geomed"):
                row[name] = round(self.p.evaluator.score(agg.AGGREGATORS[name](x, self.m))["accuracy"], 6)
            row["oracle"] = round(self.oracle_acc, 6)
        self.log.append(row)
        return row


def feasible(row: dict, strict: bool) -> bool:
    if row["error"]:
        return not strict and "every adapter flagged" in row["error"]
    return row["attackers_flagged"] == 0 if strict else True


def refine(  # noqa: PLR0913
    oracle: Oracle, start: tuple[Point, dict], budget: int, strict: bool, rng: np.random.Generator, dirs: tuple
) -> tuple[Point, dict]:
    best_pt, best = start
    step, lam, used = 0.15, 5, 0
    while used < budget:
        wins = 0
        for _ in range(min(lam, budget - used)):
            cand = mutate(best_pt, rng, step, dirs)
            row = oracle(cand, "strict" if strict else "relaxed")
            used += 1
            if feasible(row, strict) and row["damage"] > best["damage"]:
                best_pt, best, wins = cand, row, wins + 1
        step = float(np.clip(step * (1.5 if wins / lam > 0.2 else 0.7), 0.02, 0.5))
    return best_pt, best


def search(oracle: Oracle, n_random: int, n_refine: int, seed: int, dirs: tuple) -> dict:
    rng = np.random.default_rng(seed)
    rows = [(pt := random_point(rng, dirs), oracle(pt, "random")) for _ in range(n_random)]
    out = {}
    for strict in (True, False):
        ok = [(pt, r) for pt, r in rows if feasible(r, strict)]
        if not ok:
            out["strict" if strict else "relaxed"] = None
            continue
        start = max(ok, key=lambda t: t[1]["damage"])
        pt, row = refine(oracle, start, n_refine, strict, rng, dirs)
        final = oracle(pt, "final", baselines=True)
        out["strict" if strict else "relaxed"] = final
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.adaptive_search", description=__doc__.split("\n")[0])
    parser.add_argument("--pools", default="revsucc-s0,majority-s0", help="TASK-sSEED, comma-separated")
    parser.add_argument("--fractions", default="0.2,0.33")
    parser.add_argument("--random", type=int, default=50)
    parser.add_argument("--refine", type=int, default=30)
    parser.add_argument("--check-seed", type=int, default=2)
    parser.add_argument("--directions", default=",".join(DIRECTIONS))
    parser.add_argument("--cache", type=Path, default=trained_pools.default_cache())
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/adaptive_search.json"))
    parser.add_argument(
        "--replay",
        help="JSON list of points (Point fields) to re-score on every --pools pool and --fractions instead of "
        "searching, each with --draws fresh draws (draw, draw + 1, ...)",
    )
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument(
        "--copies",
        type=int,
        default=1,
        help="attackers per copied honest client (2: each copied client gets two attackers that resemble "
        "each other, the framing of rule 10 in docs/security.md)",
    )
    args = parser.parse_args(argv)
    trained_pools.configure_torch()
    start = time.perf_counter()
    dirs = tuple(args.directions.split(","))
    loaded: dict[str, attacks.PoolData] = {}

    def pool(name: str) -> attacks.PoolData:
        if name not in loaded:
            loaded[name] = attacks.load_pool(args.cache / f"{name}-heavy")
        return loaded[name]

    def family(name: str) -> Family:
        task, seed = name.split("-s")
        other = "majority" if task == "revsucc" else "revsucc"
        return Family(pool(name), pool(f"{other}-s{seed}"), args.copies)

    if args.replay:
        return replay(args, family, start)
    results = []
    for name, fraction, m, oracle in _oracles(args, family):
        found = search(oracle, args.random, args.refine, zlib.crc32(f"{name}/{m}".encode()), dirs)
        check = {}
        task = name.split("-s")[0]
        check_name = f"{task}-s{args.check_seed}"
        if f"-s{args.check_seed}" not in name:
            cfam = family(check_name)
            coracle = Oracle(cfam, m)
            for kind, row in found.items():
                if row is None:
                    continue
                pt = Point(**row["point"])
                check[kind] = [coracle(replace(pt, draw=pt.draw + k), "check", baselines=True) for k in range(3)]
        results.append(
            {
                "pool": name,
                "fraction": fraction,
                "attackers": m,
                "oracle": oracle.oracle_acc,
                "calls": oracle.calls,
                "found": found,
                "check_pool": check_name,
                "check": check,
                "log": oracle.log,
            }
        )
        trained_pools.log_err(f"{name} m={m}: {oracle.calls} clair calls ({time.perf_counter() - start:.0f} s)")
        log_found(found, check, check_name, m)
    trained_pools.write_results(
        args.out, {"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, start
    )
    return 0


def log_found(found: dict, check: dict, check_name: str, m: int) -> None:
    """One line per point found, and one per check of it on the other seed's pool."""
    for kind, row in found.items():
        if row:
            trained_pools.log_err(
                f"  {kind}: damage {row['damage']:+.3f} clair {row['clair']:.3f} oracle {row['oracle']:.3f} "
                f"mean {row['mean']:.3f} median {row['median']:.3f} geomed {row['geomed']:.3f} "
                f"flagged {row['attackers_flagged']}/{m} honest {row['honest_flagged']} {row['point']}"
            )
        for c in check.get(kind, []):
            trained_pools.log_err(
                f"    check {check_name}: clair {c['clair']:.3f} oracle {c['oracle']:.3f} mean {c['mean']:.3f} "
                f"median {c['median']:.3f} geomed {c['geomed']:.3f} flagged {c['attackers_flagged']}/{m} "
                f"honest {c['honest_flagged']}"
            )


def _oracles(args: argparse.Namespace, family):
    """``(pool name, fraction, attackers, Oracle)`` for every pool of ``--pools`` and fraction of ``--fractions``."""
    for name in args.pools.split(","):
        fam = family(name)
        for fraction in (float(f) for f in args.fractions.split(",")):
            m = attacks.n_attackers(fraction)
            yield name, fraction, m, Oracle(fam, m)


def replay(args: argparse.Namespace, family, start: float) -> int:
    """Re-score given points on every pool (``--pools``), fraction and draw; a summary line each."""
    points = [Point(**d) for d in json.loads(args.replay)]
    rows = []
    for name, _, m, oracle in _oracles(args, family):
        for j, pt in enumerate(points):
            for k in range(args.draws):
                row = oracle(replace(pt, draw=pt.draw + k), f"replay{j}", baselines=True)
                rows.append(row | {"pool": name, "attackers": m, "point_index": j})
                trained_pools.log_err(
                    f"{name} m={m} point {j} draw +{k}: clair {row['clair']:.3f} oracle {row['oracle']:.3f} "
                    f"mean {row['mean']:.3f} median {row['median']:.3f} geomed {row['geomed']:.3f} "
                    f"attackers flagged {row['attackers_flagged']}/{m} honest flagged {row['honest_flagged']}"
                )
    trained_pools.write_results(args.out, {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
