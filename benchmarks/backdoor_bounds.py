"""Can a norm bound close the gap that constrain-and-scale backdoors leave? (docs/security.md)

    python -m benchmarks.backdoor_bounds [--pools majority-2,revsucc-1,revsucc-2] [--cache DIR]

On the trained pools of benchmarks/attacks.py (12 honest clients, 3 backdoor clients: 20 %),
the attackers send their trained backdoor updates scaled to 1-2x the honest median norm
(``backdoor-scale``, finer than the attack benchmark's scan), and clair's default audit is
followed by its merge with no norm bound and with a bound of 1.5, 1.25 and 1.1x the
collaborators' median norm (``MergeOptions(norm_bound=...)``, widened where their norms
spread, as ``clair merge --norm-bound``). Prints the benign clients' held-out accuracy of each
merge and of the plain mean, per strength.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from benchmarks import attacks, trained_pools
from clair_cli import pipeline
from clair_cli.params import AuditParams, MergeOptions

STRENGTHS = (1.0, 1.1, 1.25, 1.5, 2.0)
BOUNDS = (None, 1.5, 1.25, 1.1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pools", default="majority-2,revsucc-1,revsucc-2", help="TASK-SEED, comma-separated")
    parser.add_argument("--cache", type=Path, default=trained_pools.default_cache())
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    attack = attacks.ATTACKS["backdoor-scale"]
    m = attacks.n_attackers(0.2)
    print("| pool | strength | mean | " + " | ".join(f"clair, bound {b or 'none'}" for b in BOUNDS) + " |")
    print("|---|---:|---:|" + "---:|" * len(BOUNDS))
    for key in args.pools.split(","):
        task, seed = key.split("-")
        trained_pools.generate(args.cache, [int(seed)], [task], ["heavy"], trained_pools.log_err)
        p = attacks.load_pool(args.cache / f"{task}-s{seed}-heavy")
        oracle = p.evaluator.score(p.honest.mean(0))["accuracy"]
        for strength in STRENGTHS:
            rng = np.random.default_rng([0, m, int(1e6 * strength) % 2**31, 0])
            contributions = attack.build(p, m, strength, rng)
            named = {f"h{k:02d}": f for k, f in enumerate(p.honest_factors)}
            named |= {f"x{k:02d}": c.factors for k, c in enumerate(contributions)}
            pool = pipeline.pool_from_factors(named, base_model=trained_pools.BASE_NAME)
            outcome = pipeline.audit(pool, AuditParams())
            x = np.vstack([p.honest] + [c.vector for c in contributions])
            row = [p.evaluator.score(x.mean(0))["accuracy"]]
            for bound in BOUNDS:
                merged = pipeline.merge(
                    pool, "clair", AuditParams(), options=MergeOptions(norm_bound=bound), outcome=outcome
                )
                vec = np.concatenate(
                    [
                        (merged.modules[n].B.double() @ merged.modules[n].A.double()).numpy().ravel()
                        for n in p.layout.modules
                    ]
                )
                row.append(p.evaluator.score(vec)["accuracy"])
            print(
                f"| {key} (oracle {oracle:.3f}) | {strength}x | " + " | ".join(f"{v:.3f}" for v in row) + " |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
