"""Clients of unequal data sizes on Flower: ``python -m experiments.federated.unequal [--seeds 0 1 2]``.

What the federated rounds' weight cap (a client's ``num-examples`` counts at most 3x the
collaborators' median) costs where nobody attacks: 10 honest non-IID clients of the text-copy
task (:mod:`experiments.federated.sim`) whose training strings are log-normal around 64 (sd of
the log ``--spread``, 1.0 by default: about one client in seven holds more than 3x the median),
all clients every round. ClairStrategy with its default cap and uncapped (``weight_cap=None``,
FedAvg's weights) against Flower's FedAvg and FedMedian on the same seeded simulation; prints
the benign clients' accuracy after the last round (mean over seeds, min-max), the clients'
sizes, and how many weights the cap lowered.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import warnings

import torch

from . import sim

SETUP = sim.Setup(n_clients=10, attackers=(), size_spread=1.0)
STRATEGIES = ("clair", "clair-uncapped", "FedAvg", "FedMedian")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.federated.unequal", description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=SETUP.rounds)
    parser.add_argument("--spread", type=float, default=SETUP.size_spread)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    setup = sim.Setup(**{**SETUP.__dict__, "rounds": args.rounds, "size_spread": args.spread})
    final: dict[str, list[float]] = {s: [] for s in STRATEGIES}
    capped = 0
    for seed in args.seeds:
        sizes = [sim.client_strings(setup, seed, i) for i in range(setup.n_clients)]
        print(f"seed {seed} sizes: {sizes} (median {statistics.median(sizes):g})", file=sys.stderr, flush=True)
        for name in STRATEGIES:
            run = sim.run(name, setup, seed, scenario="clean")
            final[name].append(float(run.rounds[-1]["benign_accuracy"]))
            if name == "clair":
                capped += sum(row.get("capped", 0) for row in run.rounds)
            print(f"seed {seed} {name}: {final[name][-1]:.3f} ({run.seconds:.0f} s)", file=sys.stderr, flush=True)
    print("| strategy | benign accuracy after the last round (mean, min-max over seeds) |")
    print("|---|---|")
    for name, values in final.items():
        print(f"| {name} | {statistics.fmean(values):.3f} ({min(values):.3f}-{max(values):.3f}) |")
    print(f"\nclair: {capped} client weights lowered by the cap ({len(args.seeds)} seeds x {setup.rounds} rounds)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
