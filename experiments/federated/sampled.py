"""Small sampled rounds on Flower: ``python -m experiments.federated.sampled [--seeds 0 1 2]``.

The case issue #22 measured from outside: a federation of 10 non-IID clients of the
text-copy task (:mod:`experiments.federated.sim`), two of them attackers from round 1 on (one
sends a tenfold update, ``boost``; one a sign-flipped one), and Flower samples 6 of the 10
each round (``fraction_train=0.6``), so a round has 6 replies with 0, 1 or 2 attackers.
ClairStrategy (its defaults) against Flower's FedMedian and FedAvg on the same seeded
simulation; prints, per strategy, the benign clients' accuracy after the last round (mean
over seeds, min-max) and, for clair, the attacker replies caught and honest replies flagged.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import warnings

import torch

from . import sim

SETUP = sim.Setup(n_clients=10, attackers=("boost", "sign-flip"), fraction_train=0.6)
STRATEGIES = ("clair", "FedMedian", "FedAvg")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.federated.sampled", description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=SETUP.rounds)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    setup = sim.Setup(**{**SETUP.__dict__, "rounds": args.rounds})
    final: dict[str, list[float]] = {s: [] for s in STRATEGIES}
    caught = sampled = honest_flags = honest_sampled = 0
    for seed in args.seeds:
        for name in STRATEGIES:
            run = sim.run(name, setup, seed)
            final[name].append(float(run.rounds[-1]["benign_accuracy"]))
            print(f"seed {seed} {name}: {final[name][-1]:.3f} ({run.seconds:.0f} s)", file=sys.stderr, flush=True)
            if name != "clair":
                continue
            for row in run.rounds[1:]:
                replied, flagged = set(row.get("clients", [])), set(row.get("flagged", []))
                sampled += len(replied & set(run.attackers))
                honest_sampled += len(replied - set(run.attackers))
                caught += len(flagged & set(run.attackers))
                honest_flags += len(flagged - set(run.attackers))
    print("| strategy | benign accuracy after the last round (mean, min-max over seeds) |")
    print("|---|---|")
    for name, values in final.items():
        print(f"| {name} | {statistics.fmean(values):.3f} ({min(values):.3f}-{max(values):.3f}) |")
    print(
        f"\nclair: {caught} of {sampled} attacker replies flagged, {honest_flags} of {honest_sampled} honest replies "
        f"flagged ({len(args.seeds)} seeds x {setup.rounds} rounds)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
