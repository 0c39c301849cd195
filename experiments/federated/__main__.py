"""The federated experiment: ``python -m experiments.federated --out DIR`` (``make fl-experiment``).

Runs every strategy (ClairStrategy and Flower's FedAvg, FedMedian, FedTrimmedAvg, Krum,
MultiKrum, Bulyan) on the same seeded Flower simulation (:mod:`experiments.federated.sim`),
clean and under attack, for several seeds, and writes ``results.json`` (every round of every
run), ``results.md`` (the tables) and ``rounds.png`` (accuracy and backdoor success per round).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from . import sim

SEEDS = (0, 1, 2)
SCENARIOS = ("clean", "attack")
# The clean runs that the question needs (is clair at least FedAvg without attackers?); the
# other strategies' clean runs cost as much again (--clean-strategies to add them).
CLEAN_STRATEGIES = ("clair", "FedAvg")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def _fmt(values: list[float], digits: int = 3) -> str:
    """Mean over seeds, and the range when the seeds differ."""
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    mean = _mean(values)
    if hi - lo < 0.5 * 10**-digits:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def _runs(results: list[dict], strategy: str, scenario: str) -> list[dict]:
    return [r for r in results if r["strategy"] == strategy and r["scenario"] == scenario]


def _detections(run: dict) -> tuple[int, int, int]:
    """(true positives, false positives, attackers) summed over the rounds of a clair run."""
    tp = fp = n = 0
    attackers = set(run["attackers"])
    for row in run["rounds"]:
        if "flagged" not in row:
            continue
        flagged = set(row["flagged"])
        tp += len(flagged & attackers)
        fp += len(flagged - attackers)
        n += len(attackers)
    return tp, fp, n


def summary_table(results: list[dict], strategies: list[str], rounds: int) -> list[str]:
    lines = [
        "| strategy | clean: benign acc. | attack: benign acc. | attack: acc. over rounds 1-10 | "
        "attack: backdoor success | attack: max backdoor (any round) | aggregation s/round |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in strategies:
        clean, attack = _runs(results, name, "clean"), _runs(results, name, "attack")

        def final(runs: list[dict], key: str) -> list[float]:
            return [r["rounds"][rounds][key] for r in runs]

        worst = [max(row["backdoor_success"] for row in r["rounds"]) for r in attack]
        area = [_mean([row["benign_accuracy"] for row in r["rounds"][1:]]) for r in attack]
        secs = [row["aggregate_s"] for r in clean + attack for row in r["rounds"] if "aggregate_s" in row]
        lines.append(
            f"| {name} | {_fmt(final(clean, 'benign_accuracy'), 4)} | {_fmt(final(attack, 'benign_accuracy'), 4)} | "
            f"{_fmt(area)} | {_fmt(final(attack, 'backdoor_success'))} | {_fmt(worst)} | {_mean(secs):.3f} |"
        )
    return lines


def round_table(results: list[dict], strategies: list[str], rounds: int, key: str) -> list[str]:
    lines = ["| round | " + " | ".join(strategies) + " |", "|---:|" + "---:|" * len(strategies)]
    for t in range(0 if key != "aggregate_s" else 1, rounds + 1):
        cells = []
        for name in strategies:
            vals = [r["rounds"][t][key] for r in _runs(results, name, "attack")]
            cells.append(f"{_mean(vals):.3f}")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return lines


def detection_table(results: list[dict], rounds: int) -> list[str]:
    runs = sorted(_runs(results, "clair", "attack"), key=lambda r: r["seed"])
    if not runs:
        return []
    kinds = runs[0]["kinds"]
    who = ", ".join(f"{i + 1} {k}" for i, k in enumerate(kinds) if k != "benign")
    lines = [
        f"Attackers (node: attack): {who}. Flagged nodes per round, by seed:",
        "",
        "| round | " + " | ".join(f"seed {r['seed']}" for r in runs) + " |",
        "|---:|" + "---|" * len(runs),
    ]
    for t in range(1, rounds + 1):
        cells = []
        for r in runs:
            row = r["rounds"][t]
            flagged = ", ".join(str(n) for n in row["flagged"]) or "-"
            cells.append(flagged + (f" ({row['fallback']})" if row.get("fallback") else ""))
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    tp = fp = n = 0
    for r in runs:
        a, b, c = _detections(r)
        tp, fp, n = tp + a, fp + b, n + c
    lines += [
        "",
        f"Over all rounds and seeds: {tp} of {n} attacker-rounds flagged (recall {tp / max(n, 1):.2f}), "
        f"{fp} benign client-rounds flagged (precision {tp / max(tp + fp, 1):.2f}).",
    ]
    clean = _runs(results, "clair", "clean")
    if clean:
        false = sum(len(row.get("flagged", [])) for r in clean for row in r["rounds"])
        total = sum(len(r["kinds"]) for r in clean) * rounds
        lines.append(f"Clean runs: {false} of {total} client-rounds flagged.")
    trunc = [row["truncation_error"] for r in _runs(results, "clair", "attack") for row in r["rounds"][1:]]
    if trunc:
        lines.append(
            f"Relative error of writing clair's global update at rank r (per round, worst module): "
            f"mean {_mean(trunc):.3f}, max {max(trunc):.3f}."
        )
    return lines


def markdown(results: list[dict], setup: sim.Setup, seeds: list[int], strategies: list[str]) -> str:
    r = setup.rounds
    out = [
        "# Federated LoRA on Flower: ClairStrategy against Flower's robust strategies",
        "",
        f"{setup.n_clients} clients, {r} rounds, LoRA r={setup.rank} (alpha {setup.alpha}) on the text-copy task, "
        f"{setup.local_steps} local steps a round, seeds {', '.join(map(str, seeds))}. "
        f"Attack runs: {', '.join(setup.attackers)} (one client each, from round 1). "
        + (f"The backdoor attacker sends g + {setup.boost:g} (local - g). " if setup.boost is not None else "")
        + (
            f"The backdoor attacker trains {setup.attacker_steps}x the local steps. "
            if setup.attacker_steps != sim.Setup.attacker_steps
            else ""
        )
        + (f"Flower samples {setup.fraction_train:g} of the clients a round. " if setup.fraction_train != 1 else "")
        + "Benign accuracy: symbol accuracy of the global model on the held-out strings of the clients that are "
        "benign in the attack runs (the same clients in both scenarios), after the last round. Backdoor success: "
        "share of triggered strings that produce the whole backdoor target. Mean over seeds (min-max).",
        "",
        *summary_table(results, strategies, r),
        "",
        "## Benign accuracy per round (attack, mean over seeds)",
        "",
        *round_table(results, strategies, r, "benign_accuracy"),
        "",
        "## Backdoor success per round (attack, mean over seeds)",
        "",
        *round_table(results, strategies, r, "backdoor_success"),
        "",
        "## Aggregation time per round, seconds (attack, mean over seeds; one thread, varies with load)",
        "",
        *round_table(results, strategies, r, "aggregate_s"),
        "",
        "## clair's detections",
        "",
        *detection_table(results, r),
        "",
    ]
    return "\n".join(out)


def plot(results: list[dict], strategies: list[str], rounds: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [
        ("clean", "benign_accuracy", "clean: benign accuracy"),
        ("attack", "benign_accuracy", "attack: benign accuracy"),
        ("attack", "backdoor_success", "attack: backdoor success"),
    ]
    for ax, (scenario, key, title) in zip(axes, panels, strict=True):
        for name in strategies:
            runs = _runs(results, name, scenario)
            if not runs:
                continue
            ys = [_mean([r["rounds"][t][key] for r in runs]) for t in range(rounds + 1)]
            ax.plot(range(rounds + 1), ys, marker="o", ms=3, lw=2.2 if name == "clair" else 1.2, label=name)
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.federated", description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--strategies", nargs="+", default=list(sim.STRATEGIES), choices=sim.STRATEGIES)
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--clean-strategies", nargs="+", default=list(CLEAN_STRATEGIES), choices=sim.STRATEGIES)
    parser.add_argument("--rounds", type=int, default=sim.Setup.rounds)
    parser.add_argument(
        "--backdoor-boost",
        type=float,
        default=None,
        metavar="X",
        help="the backdoor attacker sends g + X (local - g) every round (default: the number of clients, 12)",
    )
    parser.add_argument(
        "--attacker-steps",
        type=int,
        default=sim.Setup.attacker_steps,
        metavar="K",
        help="the backdoor attacker trains K times the honest clients' local steps (default 5)",
    )
    parser.add_argument(
        "--fraction-train", type=float, default=1.0, help="share of the clients Flower samples each round (default 1)"
    )
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite results.md and rounds.png from DIR/results.json"
    )
    args = parser.parse_args(argv)
    if args.report_only:
        saved = json.loads((args.out / "results.json").read_text())
        meta = saved["meta"]
        setup = sim.Setup(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["setup"].items()})
        return _write(args.out, saved["runs"], setup, meta["seeds"], meta["strategies"])
    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = {
        "rounds": args.rounds,
        "boost": args.backdoor_boost,
        "attacker_steps": args.attacker_steps,
        "fraction_train": args.fraction_train,
    }
    attack = sim.Setup(**sizes)
    clean = sim.Setup(**sizes, attackers=())
    benign = [i for i, k in enumerate(attack.kinds) if k == "benign"]
    results: list[dict[str, Any]] = []
    start = time.perf_counter()
    for seed in args.seeds:
        for scenario in args.scenarios:
            setup = attack if scenario == "attack" else clean
            for name in args.strategies:
                if scenario == "clean" and name not in args.clean_strategies:
                    continue
                audits = (
                    args.out / "audits"
                    if (name == "clair" and scenario == "attack" and seed == args.seeds[0])
                    else None
                )
                res = sim.run(name, setup, seed, scenario, audit_dir=audits, benign_eval=benign)
                row = asdict(res) | {"kinds": setup.kinds}
                results.append(row)
                last = res.rounds[-1]
                total = time.perf_counter() - start
                log(
                    f"seed {seed} {scenario:6s} {name:13s} acc {last['benign_accuracy']:.3f} "
                    f"backdoor {last['backdoor_success']:.3f} ({res.seconds:.0f} s, total {total:.0f} s)"
                )
    meta = {
        "setup": asdict(attack),
        "seeds": args.seeds,
        "strategies": args.strategies,
        "scenarios": args.scenarios,
        "clean_strategies": args.clean_strategies,
        "torch": torch.__version__,
    }
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "runs": results}, indent=1) + "\n")
    return _write(args.out, results, attack, args.seeds, args.strategies)


def _write(out: Path, results: list[dict], setup: sim.Setup, seeds: list[int], strategies: list[str]) -> int:
    text = markdown(results, setup, seeds, strategies)
    (out / "results.md").write_text(text)
    plot(results, strategies, setup.rounds, out / "rounds.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
