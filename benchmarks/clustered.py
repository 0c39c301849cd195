"""Honest federations whose clients come in clusters: how many honest clients clair flags.

    python -m benchmarks.clustered [--seeds 3] [--draws 5] [--cohorts] [--out FILE.json] [--cache DIR] [--pools DIR]

Real federations are rarely a set of independent non-IID clients: several hospitals of one
network, shops of one chain or devices of one region share a data distribution, so their
updates agree with each other more than with the rest of the round. clair's group rules look
for exactly that (a set agreeing more closely than the pool, a set pointing against the rest on
one module), so a cluster of honest clients is the honest case closest to a coordinated attack.
This benchmark measures what they do to the verdict, with no attacker at all.

For each (task, seed) of benchmarks/trained_pools.py (its pretrained base, its LoRA recipe), a
bank of honest clients is trained: ``CLUSTERS`` cluster distributions with ``PER_CLUSTER``
clients each (each client its own strings of the cluster's distribution, its own training
seed), and ``INDEPENDENT`` clients with a distribution each, as the trained pools' clients
are. Both at the trained pools' Dirichlet concentration (``standard``) and at ``STRONG``
(``strong``: most of each client's data from one or two labels or symbols). Pools are drawn
from a bank (``--draws`` per layout), clients in a random order:

- ``independent``: the bank's 12 clients with a distribution each (the trained pools' setting;
  one pool per bank);
- ``pairs``, ``triples``, ``quads``, ``halves``: 12 clients in clusters of 2, 3, 4 and 6;
- ``one-3``, ``one-4``: one cluster of 3 or 4 and the rest independent;
- ``small-2x3``, ``small-3x2``, ``small-one-3``: rounds of 6 (two clusters of 3, three of 2, one
  of 3 and three independent).

Every pool is audited with clair's defaults (``pipeline.audit``, ``AuditParams()``); the table
gives honest clients flagged over clients audited, per layout and skew, the pools with any flag,
how many of the flagged are in a cluster, and the rules that flagged them. ``--cohorts`` adds
what a user who knows the cohorts can do instead (:func:`cohort_rows`): audit each cohort alone,
or gate the clients against references drawn from every cohort. Banks are cached under
``--pools`` (trained once, about 1 s a client: 45 s a bank).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from benchmarks import tasks, trained_pools
from benchmarks.attacks import read_factors
from clair_cli import pipeline
from clair_cli.params import AuditParams
from experiments.text_copy import train

CLUSTERS = 6
PER_CLUSTER = 6
INDEPENDENT = 12
STRONG = 0.2  # Dirichlet concentration of the strongly skewed banks
MIN_COHORT = 5  # --cohorts: the smallest cohort audited alone (clair audits pools of five or more)
SKEWS = ("standard", "strong")
LAYOUTS: dict[str, tuple[tuple[int, ...], int]] = {  # cluster sizes, independent clients
    "independent": ((), 12),
    "pairs": ((2,) * 6, 0),
    "triples": ((3,) * 4, 0),
    "quads": ((4,) * 3, 0),
    "halves": ((6, 6), 0),
    "one-3": ((3,), 9),
    "one-4": ((4,), 8),
    "small-2x3": ((3, 3), 0),
    "small-3x2": ((2, 2, 2), 0),
    "small-one-3": ((3,), 3),
}


def concentration(task: str, skew: str) -> float:
    return trained_pools.CONCENTRATION[task] if skew == "standard" else STRONG


def bank_dir(pools: Path, task: str, seed: int, skew: str) -> Path:
    return pools / f"{task}-s{seed}-{skew}"


def train_bank(cache: Path, pools: Path, task_name: str, seed: int, skew: str, log=print) -> Path:
    """Train (or reuse) one bank: ``c<i>_<j>`` cluster clients and ``i<j>`` independent ones."""
    target = bank_dir(pools, task_name, seed, skew)
    if (target / "BANK.json").is_file():
        return target
    base = cache / f"{task_name}-s{seed}-clean" / trained_pools.BASE_NAME
    if not (base / "config.json").is_file():
        raise SystemExit(f"{base} missing; run python -m benchmarks.trained_pools first")
    start = time.perf_counter()
    trainer = trained_pools.Trainer(train.load_base(base), trained_pools.SETUP, seed, trained_pools.BASE_NAME)
    world = tasks.World.make(seed)
    task = tasks.TASKS[task_name]
    t_index = list(tasks.TASKS).index(task_name)
    g = torch.Generator().manual_seed(7_000 + 1000 * seed + 100 * t_index + SKEWS.index(skew))
    conc = concentration(task_name, skew)
    target.mkdir(parents=True, exist_ok=True)
    clients: dict[str, dict] = {}
    jobs = [(f"c{i}_{j}", i) for i in range(CLUSTERS) for j in range(PER_CLUSTER)]
    jobs += [(f"i{j:02d}", None) for j in range(INDEPENDENT)]
    dists = [task.distribution(conc, g) for _ in range(CLUSTERS)]
    for n, (name, cluster) in enumerate(jobs):
        dist = dists[cluster] if cluster is not None else task.distribution(conc, g)
        data = task.dataset(world, dist, trained_pools.N_TRAIN[task_name], g)
        state = trainer.train(data, 50_000 + 1000 * seed + n, task.prompt_len)
        trainer.save(state, target / name)
        clients[name] = {"cluster": cluster, "distribution": dist}
    (target / "BANK.json").write_text(json.dumps({"task": task_name, "seed": seed, "skew": skew, "clients": clients}))
    log(f"{target.name}: {len(jobs)} clients trained ({time.perf_counter() - start:.0f} s)")
    return target


def draw_pool(rng: np.random.Generator, layout: str) -> tuple[list[str], dict[str, int]]:
    """Client names of one pool of ``layout`` and, per client, its cluster's label in the pool (-1: none)."""
    sizes, independent = LAYOUTS[layout]
    clusters = rng.choice(CLUSTERS, len(sizes), replace=False)
    names, label = [], {}
    for c, (cluster, size) in enumerate(zip(clusters, sizes, strict=True)):
        for j in rng.choice(PER_CLUSTER, size, replace=False):
            names.append(f"c{cluster}_{j}")
            label[names[-1]] = c
    for j in rng.choice(INDEPENDENT, independent, replace=False):
        names.append(f"i{j:02d}")
        label[names[-1]] = -1
    order = rng.permutation(len(names))
    return [names[k] for k in order], label


def audit_pool(
    names: list[str], factors: dict[str, dict], references: list[str] | None = None
) -> list[tuple[str, list[str]]]:
    """The flagged clients of one pool and the rules that flagged each; with ``references``, as
    ``clair gate`` judges the other clients against them."""
    pool = pipeline.pool_from_factors({n: factors[n] for n in names}, base_model=trained_pools.BASE_NAME)
    reference = None if references is None else [names.index(n) for n in references]
    auditor = pipeline.audit(pool, AuditParams(), reference=reference).auditor
    return [(names[v.index], sorted({r.rule for r in v.reasons})) for v in auditor.verdicts_ if v.flagged]


ATTACKS = {"x10": 10.0, "flip": -1.0}  # --cohorts: one candidate's update times this (its B scaled)


def cohort_rows(names: list[str], label: dict[str, int], factors: dict[str, dict]) -> dict:
    """What a user who knows the cohorts can do instead (``--cohorts``): audit each cohort (each
    cluster, and the clients of no cluster together) as a pool of its own, where it has at least
    ``MIN_COHORT`` clients; or gate the clients against references drawn from every cohort (the
    first half of each cohort, rounded up, in the pool's order). Then, for each of ``ATTACKS``,
    the first candidate (in the pool's order) sends its own update scaled (x10, or sign-flipped,
    as in the small-rounds benchmark) instead: whether the gate flags it, whether its cohort,
    audited alone where large enough, does, and whether the whole pool's audit does."""
    cohorts: dict[int, list[str]] = {}
    for n in names:
        cohorts.setdefault(label[n], []).append(n)
    flagged, audited = [], 0
    for members in cohorts.values():
        if len(members) >= MIN_COHORT:
            audited += len(members)
            flagged += [n for n, _ in audit_pool(members, factors)]
    references = [n for members in cohorts.values() for n in members[: (len(members) + 1) // 2]]
    candidates = [n for n in names if n not in references]
    gated = [n for n, _ in audit_pool(names, factors, references)]
    row: dict = {
        "cohort_flagged": flagged,
        "cohort_audited": audited,
        "gate_flagged": [n for n in gated if n in candidates],
        "gate_candidates": len(candidates),
    }
    victim = candidates[0]
    cohort = cohorts[label[victim]]
    for attack, factor in ATTACKS.items():
        bad = f"{victim}-{attack}"
        sent = {**factors, bad: {m: (a, b * factor, s) for m, (a, b, s) in factors[victim].items()}}
        swap = [bad if n == victim else n for n in names]
        row[f"gate_{attack}"] = bad in {n for n, _ in audit_pool(swap, sent, references)}
        row[f"audit_{attack}"] = bad in {n for n, _ in audit_pool(swap, sent)}
        if len(cohort) >= MIN_COHORT:
            own = [bad if n == victim else n for n in cohort]
            row[f"cohort_{attack}"] = bad in {n for n, _ in audit_pool(own, sent)}
    return row


def run(cache: Path, pools: Path, seeds: int, draws: int, cohorts: bool = False, log=print) -> list[dict]:
    rows = []
    for skew in SKEWS:
        for task in ("revsucc", "majority"):
            for seed in range(seeds):
                bank = train_bank(cache, pools, task, seed, skew, log)
                info = json.loads((bank / "BANK.json").read_text())["clients"]
                factors = {n: read_factors(bank / n) for n in info}
                rng = np.random.default_rng([seed, SKEWS.index(skew), list(tasks.TASKS).index(task)])
                for layout in LAYOUTS:
                    for draw in range(1 if layout == "independent" else draws):  # one set: one pool
                        names, label = draw_pool(rng, layout)
                        row = dict(skew=skew, task=task, seed=seed, layout=layout, draw=draw, clients=len(names))
                        flagged = audit_pool(names, factors)
                        row["flagged"] = [n for n, _ in flagged]
                        row["rules"] = [r for _, rs in flagged for r in rs]
                        row["in_cluster"] = sum(label[n] >= 0 for n, _ in flagged)
                        if cohorts and layout != "independent":
                            row |= cohort_rows(names, label, factors)
                        rows.append(row)
                log(f"{bank.name}: audited")
    return rows


def render(rows: list[dict]) -> str:
    lines = [
        "| layout | skew | pools | honest flagged | pools with a flag | in a cluster | rules |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for layout in LAYOUTS:
        for skew in SKEWS:
            sel = [r for r in rows if r["layout"] == layout and r["skew"] == skew]
            if not sel:
                continue
            audited = sum(r["clients"] for r in sel)
            rules = Counter(x for r in sel for x in r["rules"])
            text = ", ".join(f"{k} {v}" for k, v in sorted(rules.items())) or "-"
            lines.append(
                f"| {layout} | {skew} | {len(sel)} | {sum(len(r['flagged']) for r in sel)} / {audited} | "
                f"{sum(bool(r['flagged']) for r in sel)} | {sum(r['in_cluster'] for r in sel)} | {text} |"
            )
    for skew in SKEWS:
        sel = [r for r in rows if r["skew"] == skew]
        audited = sum(r["clients"] for r in sel)
        lines.append(
            f"| all | {skew} | {len(sel)} | {sum(len(r['flagged']) for r in sel)} / {audited} | "
            f"{sum(bool(r['flagged']) for r in sel)} | {sum(r['in_cluster'] for r in sel)} | |"
        )
    if any("gate_flagged" in r for r in rows):
        lines += [
            "",
            "| layout | skew | whole pool audited: x10, flip caught | each cohort audited alone: honest flagged | "
            "x10, flip caught | gate against half of every cohort: honest candidates flagged | x10, flip caught |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for layout in LAYOUTS:
            for skew in SKEWS:
                sel = [r for r in rows if r["layout"] == layout and r["skew"] == skew and "gate_flagged" in r]
                if sel:
                    lines.append(
                        f"| {layout} | {skew} | {_caught(sel, 'audit')} | "
                        f"{sum(len(r['cohort_flagged']) for r in sel)} / {sum(r['cohort_audited'] for r in sel)} | "
                        f"{_caught(sel, 'cohort')} | "
                        f"{sum(len(r['gate_flagged']) for r in sel)} / {sum(r['gate_candidates'] for r in sel)} | "
                        f"{_caught(sel, 'gate')} |"
                    )
    return "\n".join(lines)


def _caught(rows: list[dict], how: str) -> str:
    """``x10 caught / tried, flip caught / tried`` over ``rows`` (``how``: ``audit``, ``cohort`` or ``gate``)."""
    parts = []
    for attack in ATTACKS:
        tried = [r[f"{how}_{attack}"] for r in rows if f"{how}_{attack}" in r]
        parts.append(f"{sum(tried)}/{len(tried)}" if tried else "-")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--cache", type=Path, default=trained_pools.default_cache())
    parser.add_argument("--pools", type=Path, default=Path(trained_pools.default_cache()).parent / "clair-clustered")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    parser.add_argument(
        "--cohorts", action="store_true", help="also audit each cohort alone, and gate against references of each"
    )
    args = parser.parse_args(argv)
    trained_pools.configure_torch()
    start = time.perf_counter()
    rows = run(args.cache, args.pools, args.seeds, args.draws, args.cohorts)
    print(render(rows))
    print(f"\n{time.perf_counter() - start:.0f} s")
    if args.out is not None:
        args.out.write_text(json.dumps({"rows": rows, "seconds": time.perf_counter() - start}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
