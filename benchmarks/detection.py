"""Detection and false-flag rates of the default verdict on synthetic pools.

Each scenario builds ``--seeds`` independent pools (4 modules, 64 x 48, rank-4
adapters whose benign column spaces share a rank-2 subspace plus noise) with a
known contaminated set, runs the default auditor and counts (benign update norms
already spread 5x through mixed alphas, scales 0.5 / 1.5 / 2.5):

- detection: contaminated adapters flagged / contaminated adapters;
- false flags: benign adapters flagged / benign adapters.

    python -m benchmarks.detection            # the README table (about 4 minutes on 2 cores)
    python -m benchmarks.detection --seeds 5  # quick look
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

from benchmarks.synthetic import coordinated_push, flagged, make_pool
from clair_cli.core.audit import ClairAuditor, ModuleInput, VerdictOptions


@dataclass
class Scenario:
    name: str
    K: int
    bad: tuple[int, ...]
    pool: dict
    tamper: Callable[[list[ModuleInput]], None] | None = None
    solver: str = "auto"


def _boost(ks: tuple[int, ...], factor: float):
    def tamper(mods: list[ModuleInput]) -> None:
        for m in mods:
            for k in ks:
                m.B[k] = m.B[k] * factor

    return tamper


def _flip(ks: tuple[int, ...]):
    def tamper(mods: list[ModuleInput]) -> None:
        for m in mods:
            for k in ks:
                m.B[k] = -m.B[k]

    return tamper


def _push(ks: tuple[int, ...], strength: float):
    def tamper(mods: list[ModuleInput]) -> None:
        coordinated_push(mods, ks, strength)

    return tamper


def _copies(src: int, dst: tuple[int, ...]):
    def tamper(mods: list[ModuleInput]) -> None:
        for m in mods:
            for k in dst:
                m.A[k], m.B[k], m.scales[k] = m.A[src].clone(), m.B[src].clone(), m.scales[src]

    return tamper


BASE = dict(M=4, d_out=64, d_in=48)
SCENARIOS = [
    Scenario("clean pool, noise 0.3", 20, (), dict(BASE, K=20, noise=0.3)),
    Scenario("independent adapters (no shared structure)", 20, (), dict(BASE, K=20, kind="independent")),
    Scenario("random directions, 3 of 20, noise 0.3", 20, (2, 9, 15), dict(BASE, K=20, bad=(2, 9, 15), noise=0.3)),
    Scenario("random directions, 3 of 20, noise 0.6", 20, (2, 9, 15), dict(BASE, K=20, bad=(2, 9, 15), noise=0.6)),
    Scenario("random directions, 3 of 20, noise 1.0", 20, (2, 9, 15), dict(BASE, K=20, bad=(2, 9, 15), noise=1.0)),
    Scenario(
        "random directions, 8 of 20 (40 %)",
        20,
        tuple(range(0, 20, 5)) + tuple(range(1, 20, 5)),
        dict(BASE, K=20, bad=tuple(range(0, 20, 5)) + tuple(range(1, 20, 5)), noise=0.3),
    ),
    Scenario(
        "contaminated in 1 of 4 modules, 2 of 20",
        20,
        (4, 11),
        dict(BASE, K=20, bad=(4, 11), bad_modules=(2,), noise=0.3),
    ),
    Scenario("norm boosted x10, 2 of 20", 20, (5, 6), dict(BASE, K=20, noise=0.3), _boost((5, 6), 10.0)),
    Scenario("norm boosted x30, 2 of 20", 20, (5, 6), dict(BASE, K=20, noise=0.3), _boost((5, 6), 30.0)),
    Scenario(
        "Sybil: 6 copies of one random adapter",
        20,
        tuple(range(14, 20)),
        dict(BASE, K=20, bad=(19,), noise=0.3),
        _copies(19, tuple(range(14, 19))),
    ),
    Scenario(
        "mixed ranks 2-16, 3 of 20",
        20,
        (3, 8, 17),
        dict(BASE, K=20, bad=(3, 8, 17), noise=0.3, ranks=[2, 4, 8, 16, 4] * 4),
    ),
    Scenario(
        "fast path: random directions, 4 of 40",
        40,
        (1, 12, 25, 38),
        dict(BASE, K=40, bad=(1, 12, 25, 38), noise=0.3),
        solver="fast",
    ),
]
# A coordinated group (rule 7): three otherwise honest clients of a loosely agreeing pool share
# one extra push inside the honest updates' span, 1x and 2x the typical update's norm.
for strength in (1.0, 2.0):
    SCENARIOS.append(
        Scenario(
            f"coordinated push x{strength:g}, 3 of 20, spread 1.0",
            20,
            (17, 18, 19),
            dict(BASE, K=20, noise=0.3, spread=1.0),
            _push((17, 18, 19), strength),
        )
    )
# Attacks inside the shared subspace (rule 4), on pools whose benign clients agree
# (spread 0.3: a common update plus deviations 0.3 its size), agree loosely (spread 1.0),
# or share only the subspace (independent coefficients, as in the rows above).
for label, spread in (("consensus, spread 0.3", 0.3), ("consensus, spread 1.0", 1.0), ("no consensus", None)):
    pool = dict(BASE, K=20, noise=0.3, spread=spread)
    SCENARIOS += [
        Scenario(f"{label}: clean", 20, (), pool),
        Scenario(f"{label}: sign-flipped, 2 of 20", 20, (5, 6), pool, _flip((5, 6))),
        Scenario(f"{label}: scaled x3, 2 of 20", 20, (5, 6), pool, _boost((5, 6), 3.0)),
        Scenario(f"{label}: scaled x10, 2 of 20", 20, (5, 6), pool, _boost((5, 6), 10.0)),
    ]


def run(seeds: int, only: str | None = None) -> list[dict]:
    rows = []
    for sc in SCENARIOS:
        if only and only not in sc.name:
            continue
        hits, false = [0, 0], [0, 0]
        start = time.perf_counter()
        for seed in range(seeds):
            mods = make_pool(seed=seed, **sc.pool)
            if sc.tamper:
                sc.tamper(mods)
            for i, second in enumerate((True, False)):  # with and without rule 4 (in-subspace)
                aud = ClairAuditor(solver=sc.solver, verdict=VerdictOptions(in_subspace=second))  # type: ignore[arg-type]
                got = flagged(aud.fit(mods, sc.K))
                hits[i] += len(got & set(sc.bad))
                false[i] += len(got - set(sc.bad))
        n_bad, n_good = len(sc.bad) * seeds, (sc.K - len(sc.bad)) * seeds
        rows.append(
            {
                "scenario": sc.name,
                "pools": seeds,
                "detected": f"{hits[0]}/{n_bad}" if n_bad else "-",
                "false_flags": f"{false[0]}/{n_good}",
                "detected_without": f"{hits[1]}/{n_bad}" if n_bad else "-",
                "false_flags_without": f"{false[1]}/{n_good}",
                "seconds_per_pool": (time.perf_counter() - start) / seeds / 2,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=25, help="pools per scenario (default 25)")
    parser.add_argument("--only", help="scenarios whose name contains this text")
    args = parser.parse_args()
    rows = run(args.seeds, args.only)
    print(
        "| scenario | pools | contaminated flagged | benign flagged "
        "| without the in-subspace rule: flagged / benign flagged | s / pool |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['scenario']} | {r['pools']} | {r['detected']} | {r['false_flags']} | "
            f"{r['detected_without']} / {r['false_flags_without']} | {r['seconds_per_pool']:.2f} |"
        )


if __name__ == "__main__":
    main()
