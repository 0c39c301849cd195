"""`clair gate` on trained pools: honest candidates flagged and contaminated ones caught, by
the number of trusted references.

    python -m benchmarks.gate_trained [--seeds 8] [--refs 5,6,8,10] [--splits 4]

For every ``mixed`` and ``heavy`` pool of benchmarks/trained_pools.py (12 benign clients
plus 5 or 6 contaminated ones) and every reference count ``n``, ``--splits`` random subsets
of ``n`` benign clients are the references (seeded from the pool's name), and the other
benign clients plus every contaminated one are the candidates, as in::

    clair gate CANDIDATES... --reference REF1 --reference REF2 ...

(run in-process through the same pipeline). Counts are summed over pools and splits; the
honest false-flag rate comes with its 95 % Clopper-Pearson interval.
"""

from __future__ import annotations

import argparse
import random
import zlib
from collections import Counter
from pathlib import Path

import torch
from scipy.stats import beta

from benchmarks.trained_pools import default_cache, manifest
from clair_cli import pipeline
from clair_cli.io.sources import open_adapters
from clair_cli.params import AuditParams


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    a = (1 - level) / 2
    lo = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return lo, hi


def gate_once(pool: Path, refs: list[str], candidates: list[str]) -> set[str]:
    adapters = open_adapters([str(pool / c) for c in candidates + refs])
    built = pipeline.build_pool(adapters)
    reference = [i for i, a in enumerate(built.adapters) if a.name in set(refs)]
    outcome = pipeline.audit(built, AuditParams(), reference=reference)
    return {built.adapters[k].name for k, f in enumerate(outcome.auditor.flagged_) if f}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--refs", default="5,6,8,10")
    parser.add_argument("--splits", type=int, default=4)
    parser.add_argument("--cache", type=Path, default=default_cache())
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pools = [
        args.cache / f"{task}-s{seed}-{scenario}"
        for task in ("revsucc", "majority")
        for seed in range(args.seeds)
        for scenario in ("mixed", "heavy")
    ]
    missing = [p for p in pools if not (p / "MANIFEST.json").is_file()]
    if missing:
        parser.error(f"{len(missing)} pools missing (first: {missing[0]}); run python -m benchmarks.trained_pools")
    print("| references | honest candidates flagged | 95 % interval | contaminated caught | by kind |")
    print("|---:|---:|---|---:|---|")
    for n in [int(x) for x in args.refs.split(",")]:
        honest = [0, 0]
        caught: Counter[str] = Counter()
        total: Counter[str] = Counter()
        for pool in pools:
            info = manifest(pool)["adapters"]
            benign = sorted(a for a, v in info.items() if v["kind"] == "benign")
            bad = sorted(a for a, v in info.items() if v["kind"] != "benign")
            rng = random.Random(zlib.crc32(f"{pool.name}/{n}".encode()))
            for _ in range(args.splits):
                refs = sorted(rng.sample(benign, n))
                cands = [a for a in benign if a not in refs]
                flagged = gate_once(pool, refs, cands + bad)
                honest[0] += len(flagged & set(cands))
                honest[1] += len(cands)
                for a in bad:
                    total[info[a]["kind"]] += 1
                    caught[info[a]["kind"]] += a in flagged
        lo, hi = clopper_pearson(*honest)
        kinds = ", ".join(f"{k} {caught[k]}/{total[k]}" for k in sorted(total))
        print(
            f"| {n} | {honest[0]}/{honest[1]} | {lo:.1%}-{hi:.1%} | "
            f"{sum(caught.values())}/{sum(total.values())} | {kinds} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
