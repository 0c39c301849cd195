"""The backdoor attacker that stays under the rules: ``python -m experiments.federated.boost_scan``.

The experiment's backdoor attacker (:mod:`experiments.federated.sim`) sends ``g + 12 (local - g)``
every round and is left out of every round. One that knows clair's rules sends a smaller boost
every round instead, hoping to stay under the flags and the merge's norm bound and to build the
backdoor up over the rounds. This scans the boost: for each ``X`` of ``--boosts`` it runs
``python -m experiments.federated --scenarios attack --backdoor-boost X`` (every other
attacker and setting as in the experiment) into ``OUT/boost-X/``, then prints, per strategy and
boost, the final benign accuracy and its mean over the rounds, the final backdoor success and its
highest value in any round (mean over seeds, min-max), for clair the rounds in which it left the
backdoor attacker out, and each strategy's worst point of the scan (highest final backdoor
success, then highest backdoor in any round, then lowest final benign accuracy; one per
setting of attacker steps and sampling).

``--from DIR [DIR ...]`` only renders the table from directories that ``python -m
experiments.federated --backdoor-boost X`` wrote (runs of one strategy, boost and seed found in
several directories are counted once).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from . import __main__ as experiment

STRATEGIES = ("clair", "FedAvg", "FedMedian", "MultiKrum", "Bulyan")


def _fmt(values: list[float], digits: int = 3) -> str:
    lo, hi = min(values), max(values)
    mean = statistics.fmean(values)
    if hi - lo < 0.5 * 10**-digits:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def load(dirs: list[Path]) -> dict[tuple[str, float, int, float], dict[int, dict]]:
    """Runs keyed by (strategy, boost, attacker steps, fraction sampled), then by seed."""
    runs: dict[tuple[str, float, int, float], dict[int, dict]] = {}
    for d in dirs:
        saved = json.loads((d / "results.json").read_text())
        setup = saved["meta"]["setup"]
        boost = float(setup["boost"] if setup["boost"] is not None else setup["n_clients"])
        key_rest = (boost, int(setup["attacker_steps"]), float(setup["fraction_train"]))
        for run in saved["runs"]:
            if run["scenario"] == "attack":
                runs.setdefault((run["strategy"], *key_rest), {}).setdefault(run["seed"], run)
    return runs


def _backdoor_flags(run: dict) -> tuple[int, int]:
    """(rounds the backdoor attacker was flagged, rounds it replied) in a clair run."""
    node = run["kinds"].index("backdoor") + 1  # node ids are 1-based
    flagged = replied = 0
    for row in run["rounds"][1:]:
        if "flagged" in row and node in row.get("clients", [node]):
            replied += 1
            flagged += node in row["flagged"]
    return flagged, replied


def table(runs: dict[tuple[str, float, int, float], dict[int, dict]]) -> list[str]:
    lines = [
        "| strategy | boost | seeds | benign acc. (final) | benign acc. (mean over rounds) | backdoor (final) | "
        "backdoor (max, any round) | backdoor attacker flagged |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    worst: dict[tuple[str, int, float], tuple[tuple[float, ...], str]] = {}  # by strategy and setting
    names = [s for s in STRATEGIES if any(k[0] == s for k in runs)] + sorted({k[0] for k in runs} - set(STRATEGIES))
    for name in names:
        for key in sorted(k for k in runs if k[0] == name):
            by_seed = runs[key]
            seeds = sorted(by_seed)
            acc = [by_seed[s]["rounds"][-1]["benign_accuracy"] for s in seeds]
            area = [statistics.fmean(row["benign_accuracy"] for row in by_seed[s]["rounds"][1:]) for s in seeds]
            final = [by_seed[s]["rounds"][-1]["backdoor_success"] for s in seeds]
            peak = [max(row["backdoor_success"] for row in by_seed[s]["rounds"]) for s in seeds]
            flags = "-"
            if name.startswith("clair"):
                pairs = [_backdoor_flags(by_seed[s]) for s in seeds]
                flags = f"{sum(p[0] for p in pairs)} of {sum(p[1] for p in pairs)} rounds"
            label = (
                f"{key[1]:g}"
                + (f", {key[2]}x steps" if key[2] != 5 else "")
                + (f", {key[3]:g} sampled" if key[3] != 1 else "")
            )
            cells = [name, label, ",".join(map(str, seeds)), _fmt(acc, 4), _fmt(area), _fmt(final), _fmt(peak), flags]
            row = "| " + " | ".join(cells) + " |"
            lines.append(row)
            # Worst point, among the points run on the most seeds: highest mean final backdoor, then
            # highest peak, then lowest final accuracy.
            rank = (len(seeds), statistics.fmean(final), statistics.fmean(peak), -statistics.fmean(acc))
            setting = (name, key[2], key[3])
            if setting not in worst or rank > worst[setting][0]:
                worst[setting] = (rank, row)
    lines += ["", "Each strategy's worst point of the scan:", "", *lines[:2]]
    lines += [worst[k][1] for k in sorted(worst, key=lambda k: (k[1], -k[2], names.index(k[0])))]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.federated.boost_scan", description=__doc__)
    parser.add_argument("--out", type=Path, help="directory of the scan's runs (OUT/boost-X/)")
    parser.add_argument("--boosts", type=float, nargs="+", default=[1, 1.5, 2, 3, 4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--attacker-steps", type=int, default=5)
    parser.add_argument("--fraction-train", type=float, default=1.0)
    parser.add_argument("--from", dest="dirs", type=Path, nargs="+", help="only render the table from these dirs")
    args = parser.parse_args(argv)
    dirs: list[Path] = args.dirs or []
    if not dirs:
        if args.out is None:
            parser.error("--out or --from is needed")
        for boost in args.boosts:
            out = args.out / f"boost-{boost:g}"
            common: list[Any] = ["--out", out, "--scenarios", "attack", "--backdoor-boost", boost]
            common += ["--attacker-steps", args.attacker_steps, "--fraction-train", args.fraction_train]
            experiment.main([str(a) for a in [*common, "--seeds", *args.seeds, "--strategies", *args.strategies]])
            dirs.append(out)
    print("\n".join(table(load(dirs))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
