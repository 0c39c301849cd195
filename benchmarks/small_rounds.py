"""Small rounds: can clair tell one boosted or sign-flipped client among 5-8 from honest ones?

    python -m benchmarks.small_rounds [--seeds 3] [--draws 10] [--sizes 5,6,8] [--cache DIR] [--passes]

Pools come from benchmarks/trained_pools.py (the 12 benign clients of each task and seed,
``clean`` scenario). For each pool size K, ``--draws`` random sets of K clients are drawn per
(task, seed); in the ``honest`` rows all K are honest, in the others the last drawn client
is replaced by its own update boosted (``B x 5``, ``B x 10``) or sign-flipped (``B x -1``).
Each set is audited with clair's defaults (``pipeline.pool_from_factors`` then
``pipeline.audit``); the table counts the attackers caught and the honest clients flagged.
``--passes`` also says how the verdicts' passes ended (:mod:`benchmarks.verdict_passes`).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

from benchmarks import trained_pools, verdict_passes
from benchmarks.attacks import read_factors
from clair_cli import pipeline
from clair_cli.params import AuditParams

KINDS = {"honest": None, "x5": 5.0, "x10": 10.0, "flip": -1.0}
Passes = list[tuple[verdict_passes.Ending, list[str]]]  # each verdict's passes, and its audit's adapter names


def run(
    cache: Path,
    seeds: int,
    draws: int,
    sizes: list[int],
    passes: Passes | None = None,
) -> dict[tuple[str, int, str], list[int]]:
    """Per (task, K, kind): [attackers caught, attacker sets, honest flagged, honest audited].
    ``passes``: where given, every verdict's :class:`~benchmarks.verdict_passes.Ending` and the
    audit's adapter names are appended to it."""
    out: dict[tuple[str, int, str], list[int]] = {}
    for pool_dir in sorted(cache.glob("*-clean")):
        task, seed = pool_dir.name.split("-")[0], int(pool_dir.name.split("-")[1][1:])
        if seed >= seeds:
            continue
        clients = {p.name: read_factors(p) for p in sorted(pool_dir.glob("client_*"))}
        names = sorted(clients)
        for K in sizes:
            rng = random.Random(1000 * seed + K)
            for kind, factor in KINDS.items():
                row = out.setdefault((task, K, kind), [0, 0, 0, 0])
                for _ in range(draws):
                    drawn = rng.sample(names, K)
                    pool = {n: clients[n] for n in drawn[:-1]}
                    last = clients[drawn[-1]]
                    pool["attacker" if factor else drawn[-1]] = (
                        {m: (A, factor * B, s) for m, (A, B, s) in last.items()} if factor else last
                    )
                    audited = pipeline.pool_from_factors(pool, base_model=trained_pools.BASE_NAME)
                    with verdict_passes.traced() as trace:
                        flagged = pipeline.audit(audited, AuditParams()).auditor.flagged_
                    if passes is not None:
                        passes.extend((ending, list(audited.names)) for ending in trace.endings)
                    flags = dict(zip(audited.names, flagged, strict=True))
                    if factor:
                        row[0] += flags.pop("attacker")
                        row[1] += 1
                    row[2] += sum(flags.values())
                    row[3] += len(flags)
    return out


def table(out: dict[tuple[str, int, str], list[int]]) -> str:
    lines = [
        "| task | K | honest flags (clean sets) | x5 caught | x10 caught | flip caught "
        "| honest flags (attacked sets) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for task, K in sorted({(t, k) for t, k, _ in out}):
        h = out[(task, K, "honest")]
        attacked = [out[(task, K, kind)] for kind in ("x5", "x10", "flip")]
        honest_attacked = (sum(r[2] for r in attacked), sum(r[3] for r in attacked))
        lines.append(
            f"| {task} | {K} | {h[2]}/{h[3]} | "
            + " | ".join(f"{r[0]}/{r[1]}" for r in attacked)
            + f" | {honest_attacked[0]}/{honest_attacked[1]} |"
        )
    return "\n".join(lines)


def passes_table(passes: Passes) -> str:
    """How the verdicts' passes ended; where a cycle's passes flag different adapters, what
    counting every pass's flags (union) or only those of every pass (intersection) would add
    to or take from the verdict returned, honest clients and attackers apart."""
    kinds = {k: sum(e.kind == k for e, _ in passes) for k in ("clean", "fixed", "cycle", "open")}
    split = [(e, names) for e, names in passes if e.union != e.intersection]

    def count(which: str, attacker: bool) -> int:
        total = 0
        for e, names in split:
            moved = e.union - e.returned if which == "union" else e.returned - e.intersection
            total += sum((names[i] == "attacker") == attacker for i in moved)
        return total

    return "\n".join(
        [
            "| verdicts | nothing to redo | fixed point | cycle | no repeat in 20 passes | cycles whose flags differ "
            "| union adds honest / attackers | intersection drops honest / attackers |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {len(passes)} | {kinds['clean']} | {kinds['fixed']} | {kinds['cycle']} | {kinds['open']} "
            f"| {len(split)} "
            f"| {count('union', False)} / {count('union', True)} "
            f"| {count('intersection', False)} / {count('intersection', True)} |",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--draws", type=int, default=10, help="random client sets per (task, seed, K, kind)")
    parser.add_argument("--sizes", default="5,6,8", help="pool sizes K")
    parser.add_argument("--cache", type=Path, default=trained_pools.default_cache())
    parser.add_argument("--passes", action="store_true", help="also: how the verdicts' passes ended")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    trained_pools.generate(
        args.cache, list(range(args.seeds)), ["revsucc", "majority"], ["clean"], log=trained_pools.log_err
    )
    start = time.perf_counter()
    passes: Passes | None = [] if args.passes else None
    out = run(args.cache, args.seeds, args.draws, [int(k) for k in args.sizes.split(",")], passes)
    print(table(out))
    if passes is not None:
        print()
        print(passes_table(passes))
    print(f"({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
