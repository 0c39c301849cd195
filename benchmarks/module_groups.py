"""Rule 16 (``module_opposed``): how close honest clients come to it, and what it adds against
groups that turn one module.

    python -m benchmarks.module_groups [--seeds 3] [--subsets 6] [--synthetic-seeds 10] [--cache DIR]

Two tables:

1. **Honest margins on trained pools.** The 12 benign clients of each (task, seed) of
   benchmarks/trained_pools.py, whole and in ``--subsets`` random subsets of each size 5, 6, 7,
   8 and 10, audited with clair's defaults: the largest rule-16 margin of an honest client (1
   flags), and the honest clients flagged by any rule.
2. **Module-flip on synthetic pools.** ``benchmarks.synthetic.make_pool`` pools of 12 honest
   clients (spread 0.5, 1 and 2; 3 or 6 modules) plus 0, 3 or 6 clients whose update is an
   honest-looking one with module 0 sign-flipped, ``--synthetic-seeds`` seeds each, audited with
   and without rule 16 (its groups emptied): attackers caught and honest clients flagged. The
   flip is sent two ways: each attacker flips its own module (``own``), or every attacker sends
   the first one's flipped module at its own norm (``copies``: one update, cosine 1).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from unittest import mock

import numpy as np

from benchmarks import trained_pools
from benchmarks.attacks import load_pool
from benchmarks.synthetic import flagged, make_pool
from clair_cli import pipeline
from clair_cli.core import audit as audit_module
from clair_cli.core.audit import ClairAuditor
from clair_cli.params import AuditParams

SUBSET_SIZES = (5, 6, 7, 8, 10)
SPREADS = (0.5, 1.0, 2.0)
MODULES = (3, 6)
ATTACKERS = (0, 3, 6)
SENT = ("own", "copies")
N_HONEST = 12


def honest_margins(cache: Path, seeds: int, subsets: int) -> list[dict]:
    """Per (task, seed): audits, the largest honest rule-16 margin, honest flags by any rule."""
    rows = []
    for task in ("revsucc", "majority"):
        for seed in range(seeds):
            p = load_pool(cache / f"{task}-s{seed}-heavy", 8)
            rng = np.random.default_rng(seed)
            sets = [list(range(N_HONEST))]
            sets += [
                sorted(rng.choice(N_HONEST, k, replace=False).tolist()) for k in SUBSET_SIZES for _ in range(subsets)
            ]
            worst, flags, audited = 0.0, 0, 0
            for sel in sets:
                pool = pipeline.pool_from_factors(
                    {f"h{k:02d}": p.honest_factors[k] for k in sel}, base_model=trained_pools.BASE_NAME
                )
                aud = pipeline.audit(pool, AuditParams()).auditor
                worst = max([worst] + [v.signals.get("module_opposed", 0.0) for v in aud.verdicts_])
                flags += sum(aud.flagged_)
                audited += len(sel)
            rows.append(dict(task=task, seed=seed, audits=len(sets), worst=worst, flagged=flags, audited=audited))
            trained_pools.log_err(f"{task} s{seed}: largest honest rule-16 margin {worst:.2f}")
    return rows


def flip_module(mods: list, attackers: range, sent: str) -> None:
    """Module 0 of each attacker sign-flipped: its own (``own``), or the first attacker's flipped
    module at the attacker's own norm (``copies``)."""
    m = mods[0]
    for k in attackers:
        m.B[k] = -m.B[k]
        if sent == "copies" and k != attackers[0]:
            first = attackers[0]
            own = float((m.B[k] @ m.A[k]).norm()) * m.scales[k]
            size = float((m.B[first] @ m.A[first]).norm()) * m.scales[first]
            m.A[k], m.B[k] = m.A[first].clone(), m.B[first] * (m.scales[first] * own / size / m.scales[k])


def module_flip(seeds: int) -> list[dict]:
    """Per (how the flip is sent, spread, with/without rule 16): attackers caught, honest flagged."""
    rows = []
    for sent in SENT:
        for spread in SPREADS:
            for rule in (True, False):
                caught = attackers = honest = audited = 0
                for n_mod in MODULES:
                    for m in ATTACKERS:
                        for seed in range(seeds):
                            K = N_HONEST + m
                            mods = make_pool(M=n_mod, K=K, spread=spread, seed=seed)
                            flip_module(mods, range(N_HONEST, K), sent)
                            if rule:
                                found = flagged(ClairAuditor().fit(mods, K))
                            else:
                                with mock.patch.object(audit_module, "module_groups", lambda *args: []):
                                    found = flagged(ClairAuditor().fit(mods, K))
                            caught += sum(k >= N_HONEST for k in found)
                            honest += sum(k < N_HONEST for k in found)
                            attackers += m
                            audited += N_HONEST
                rows.append(
                    dict(
                        sent=sent,
                        spread=spread,
                        rule=rule,
                        caught=caught,
                        attackers=attackers,
                        honest=honest,
                        audited=audited,
                    )
                )
    return rows


def render(honest: list[dict], flips: list[dict]) -> str:
    lines = [
        "| task | seed | audits | largest honest rule-16 margin | honest flagged (any rule) |",
        "|---|---|---|---|---|",
    ]
    for r in honest:
        lines.append(
            f"| {r['task']} | {r['seed']} | {r['audits']} | {r['worst']:.2f} | {r['flagged']} / {r['audited']} |"
        )
    lines += ["", "| flip sent as | spread | rule 16 | attackers caught | honest flagged |", "|---|---|---|---|---|"]
    for r in flips:
        on = "on" if r["rule"] else "off"
        caught, honest = f"{r['caught']} / {r['attackers']}", f"{r['honest']} / {r['audited']}"
        lines.append(f"| {r['sent']} | {r['spread']:g} | {on} | {caught} | {honest} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.module_groups", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--seeds", type=int, default=len(trained_pools.DEFAULT_SEEDS), help="trained pools' seeds 0..N-1"
    )
    parser.add_argument("--subsets", type=int, default=6, help="random honest subsets per size and pool")
    parser.add_argument("--synthetic-seeds", type=int, default=10)
    parser.add_argument("--cache", type=Path, default=trained_pools.default_cache())
    args = parser.parse_args(argv)
    start = time.perf_counter()
    trained_pools.configure_torch()
    trained_pools.generate(
        args.cache, list(range(args.seeds)), ["revsucc", "majority"], ["heavy"], trained_pools.log_err
    )
    print(render(honest_margins(args.cache, args.seeds, args.subsets), module_flip(args.synthetic_seeds)))
    trained_pools.log_err(f"{time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
