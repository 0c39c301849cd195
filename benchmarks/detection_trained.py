"""Detection on trained LoRA pools: clair's audit against the detectors a user would pick instead.

    python -m benchmarks.detection_trained [--seeds 3] [--cache DIR] [--out benchmarks/results/detection_trained.json]

Pools come from benchmarks/trained_pools.py (generated into --cache on first use, then
reused): two tasks x seeds x scenarios (``clean``: 12 benign; ``mixed``, ``poisoning``: +5
contaminated; ``heavy``: +6). Every adapter's full update (``scale * B @ A`` per module,
flattened and concatenated; read with clair's loader) goes to the baselines of
benchmarks/detectors.py, at their papers' defaults:

- ``multi-krum``: f = floor((K - 3) / 2) assumed Byzantine, the K - f lowest Krum scores
  kept, f flagged; ``multi-krum (true f)``: f = the pool's true contaminated count;
- ``flame``: HDBSCAN on cosine distances, min_cluster_size = K // 2 + 1, noise flagged;
- ``dnc``: Divide-and-Conquer, b = 10,000, niters = 5, c = 1, m = floor(0.3 K) assumed;
  ``dnc (true m)``: m = the true count (fresh subsamples from the same seed);
- ``foolsgold``: FoolsGold weights from pardoned cosine similarities, weight 0 flagged;
- ``norm > 3x median``: updates whose norm exceeds 3x the pool's median norm;

and clair runs as a user would, in a subprocess at default settings::

    python -m clair_cli audit POOL --json - --exit-zero --quiet

Counts: contaminated adapters caught / contaminated (per kind; copies by what they copy),
benign adapters flagged / benign, summed over the seeds and both tasks, and per task.

Matched false flags. A detector that must flag a fixed count (Multi-Krum, DnC) cannot be
compared on counts alone, so for every detector with a continuous score (Krum score, DnC
score, norm ratio, FoolsGold's pardoned max similarity, clair's per-adapter ``score``, its
largest margin over the verdict's threshold rules) the benchmark also reads off, per pool, the contaminated adapters
it catches at the threshold that flags exactly as many benign adapters as clair's verdict
did in that pool (``n_b``): the threshold is the (n_b + 1)-th largest benign score, and
a contaminated adapter counts as caught only if its score is *strictly* above it (a tie with a
benign adapter is not caught; so a copy of a benign client is caught only when the original
is among the n_b flagged). Same, at zero benign flags (strictly above every benign score).
clair's verdict flags a score above 1 (and copies, whatever their score); at matched false
flags "clair score" is a ranking within each pool, next to the verdict itself.

Deterministic: DnC's subsamples are seeded from the pool's name (crc32); HDBSCAN,
Multi-Krum, FoolsGold and the norm rule are deterministic; clair runs at its default seed
(torch on 1 thread).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np

from benchmarks import detectors, trained_pools

REPO = Path(__file__).resolve().parents[1]

# (row, has continuous score)
DETECTORS: list[tuple[str, bool]] = [
    ("clair", True),
    ("multi-krum", True),
    ("multi-krum (true f)", False),
    ("flame", False),
    ("dnc", True),
    ("dnc (true m)", False),
    ("foolsgold", True),
    ("norm > 3x median", True),
]
# Statistics without a rule of their own: in the score tables only.
SCORE_ONLY = ["dnc exact"]
SCORED = [name for name, scored in DETECTORS if scored] + SCORE_ONLY
SCORE_LABEL = {
    "clair": "clair score (largest rule margin)",
    "multi-krum": "Krum score",
    "dnc": "DnC score",
    "foolsgold": "FoolsGold max pardoned similarity",
    "norm > 3x median": "norm / median",
    "dnc exact": "DnC statistic, exact and leave-one-out",
}
# One threshold for every pool: each score divided by its pool's median; thresholds at zero
# and at this share of all honest adapters flagged.
GLOBAL_SHARE = 0.01
VERDICT = "clair verdict (reference)"


# -- one pool --------------------------------------------------------------------------------


def run_clair(pool: Path) -> tuple[dict, float]:
    cmd = [sys.executable, "-m", "clair_cli", "audit", str(pool), "--json", "-", "--exit-zero", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", NO_COLOR="1", PYTHONPATH=str(REPO))
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"clair audit {pool} failed (exit {proc.returncode}): {proc.stderr[-500:]}")
    return json.loads(proc.stdout), seconds


def label(info: dict) -> str:
    """A contaminated adapter's kind; copies by what they copy (``copy>benign``)."""
    if info["kind"] == "copy":
        return f"copy>{info.get('copy_of_kind', '?')}"
    return info["kind"]


def evaluate_pool(pool: Path) -> dict:
    manifest = trained_pools.manifest(pool)
    start = time.perf_counter()
    names, modules, X = detectors.load_updates(pool)
    load_s = time.perf_counter() - start
    if set(names) != set(manifest["adapters"]):
        raise RuntimeError(f"{pool}: loader found {sorted(names)}, MANIFEST lists {sorted(manifest['adapters'])}")
    K = len(names)
    infos = [manifest["adapters"][n] for n in names]
    contaminated = [bool(i["contaminated"]) for i in infos]
    kinds = ["benign" if not c else label(i) for c, i in zip(contaminated, infos, strict=True)]
    n_bad = sum(contaminated)
    seed = zlib.crc32(pool.name.encode())

    results: dict[str, dict] = {}

    def record(row: str, det: detectors.Detection, seconds: float) -> None:
        results[row] = {
            "flagged": sorted(names[k] for k in det.flagged),
            "score": None if det.score is None else [round(float(s), 8) for s in det.score],
            "info": det.info,
            "seconds": round(seconds, 3),
        }

    report, clair_s = run_clair(pool)
    by_name = {a["name"]: a for a in report["adapters"]}
    results["clair"] = {
        "flagged": sorted(report["flagged"]),
        "score": [by_name[n]["score"] for n in names],
        "info": {
            "reasons": {n: [r["kind"] for r in by_name[n]["reasons"]] for n in names if by_name[n]["reasons"]},
            "norm_ratio": [by_name[n]["norm"] for n in names],
            "shared_rank": report.get("shared_rank"),
            "shared_structure": report.get("shared_structure"),
            "duplicate_groups": report.get("duplicate_groups"),
            "params": report.get("params"),
        },
        "seconds": round(clair_s, 3),
    }
    runs = [
        ("multi-krum", lambda: detectors.multi_krum(X)),
        ("multi-krum (true f)", lambda: detectors.multi_krum(X, f=n_bad)),
        ("flame", lambda: detectors.flame(X)),
        ("dnc", lambda: detectors.dnc(X, seed=seed)),
        ("dnc (true m)", lambda: detectors.dnc(X, m=n_bad, seed=seed)),
        ("foolsgold", lambda: detectors.foolsgold(X)),
        ("norm > 3x median", lambda: detectors.norm_outlier(X)),
        ("dnc exact", lambda: detectors.dnc_exact(X)),
    ]
    for row, fn in runs:
        t0 = time.perf_counter()
        try:
            det = fn()
        except ImportError as exc:  # FLAME without scikit-learn
            results[row] = {"missing": f"{type(exc).__name__}: {exc} (needs scikit-learn >= 1.3)"}
            continue
        record(row, det, time.perf_counter() - t0)
    # The literal reading of FLAME's "min_samples = 1" in scikit-learn's convention, for the record.
    if "missing" not in results["flame"]:
        literal = detectors.flame(X, min_samples=1)
        results["flame"]["info"]["flagged_with_sklearn_min_samples_1"] = sorted(names[k] for k in literal.flagged)

    benign_idx = [k for k in range(K) if not contaminated[k]]
    clair_benign = sum(1 for n in results["clair"]["flagged"] if not contaminated[names.index(n)])
    matched = {}
    for row in SCORED:
        if "score" not in results.get(row, {}) or results[row]["score"] is None:
            continue
        s = np.asarray(results[row]["score"], dtype=float)
        matched[row] = {
            "at_clair_benign_flags": caught_at(s, contaminated, benign_idx, clair_benign),
            "at_zero_benign_flags": caught_at(s, contaminated, benign_idx, 0),
        }
    return {
        "pool": str(pool),
        "task": manifest["task"],
        "seed": manifest["seed"],
        "scenario": manifest["scenario"],
        "names": names,
        "kinds": kinds,
        "n_modules": len(modules),
        "dim": int(X.shape[1]),
        "load_seconds": round(load_s, 3),
        "clair_benign_flags": clair_benign,
        "detectors": results,
        "matched": matched,
    }


def caught_at(score: np.ndarray, contaminated: list[bool], benign_idx: list[int], n_benign_flags: int) -> list[int]:
    """Indices of contaminated adapters whose score is strictly above the (n+1)-th largest benign
    score (every contaminated one when n covers all benign adapters)."""
    benign = np.sort(score[benign_idx])[::-1]
    threshold = benign[n_benign_flags] if n_benign_flags < len(benign) else -np.inf
    return [k for k, c in enumerate(contaminated) if c and score[k] > threshold]


# -- report --------------------------------------------------------------------------------


def _frac(a: int, b: int) -> str:
    return f"{a}/{b}" if b else "-"


def _kinds(results: list[dict]) -> list[str]:
    order: list[str] = []
    for r in results:
        for k in r["kinds"]:
            if k != "benign" and k not in order:
                order.append(k)
    return order


def tally(results: list[dict], row: str) -> dict | None:
    """Caught per kind, caught and benign flagged per task and overall, for one detector row."""
    out: dict = {"kind": {}, "task_caught": {}, "task_benign": {}}
    for r in results:
        det = r["detectors"].get(row)
        if det is None or "missing" in det:
            return None
        flagged = set(det["flagged"])
        task = r["task"]
        tc = out["task_caught"].setdefault(task, [0, 0])
        tb = out["task_benign"].setdefault(task, [0, 0])
        for name, kind in zip(r["names"], r["kinds"], strict=True):
            hit = name in flagged
            if kind == "benign":
                tb[0] += hit
                tb[1] += 1
            else:
                kc = out["kind"].setdefault(kind, [0, 0])
                kc[0] += hit
                kc[1] += 1
                tc[0] += hit
                tc[1] += 1
    return out


def tally_matched(results: list[dict], row: str, key: str) -> dict | None:
    out: dict = {"kind": {}, "task_caught": {}}
    for r in results:
        if row not in r["matched"]:
            return None
        caught = {r["names"][k] for k in r["matched"][row][key]}
        tc = out["task_caught"].setdefault(r["task"], [0, 0])
        for name, kind in zip(r["names"], r["kinds"], strict=True):
            if kind == "benign":
                continue
            kc = out["kind"].setdefault(kind, [0, 0])
            kc[0] += name in caught
            kc[1] += 1
            tc[0] += name in caught
            tc[1] += 1
    return out


def _sum(pairs: dict) -> list[int]:
    return [sum(v[0] for v in pairs.values()), sum(v[1] for v in pairs.values())]


def tables(results: list[dict], task_names: list[str]) -> str:
    lines: list[str] = []
    scenarios: dict[str, list[dict]] = {}
    for r in results:
        scenarios.setdefault(r["scenario"], []).append(r)
    for scenario, runs in scenarios.items():
        kinds = _kinds(runs)
        seeds = sorted({r["seed"] for r in runs})
        K = sorted({len(r["names"]) for r in runs})
        lines += [
            f"### {scenario} (K = {', '.join(map(str, K))}; {len(runs)} pools: tasks "
            f"{', '.join(task_names)} x seeds {', '.join(map(str, seeds))})",
            "",
        ]
        head = "| detector |" + "".join(f" {k} |" for k in kinds)
        if kinds:
            head += " caught (all) |" + "".join(f" caught {t} |" for t in task_names)
        head += " benign flagged (all) |" + "".join(f" benign flagged {t} |" for t in task_names)
        lines += [head, "|---|" + "---:|" * (head.count("|") - 2)]
        for row, _ in DETECTORS:  # the score-only statistics flag nothing
            t = tally(runs, row)
            if t is None:
                reason = next((r["detectors"][row]["missing"] for r in runs if "missing" in r["detectors"][row]), "")
                lines.append(f"| {row} | missing: {reason} |")
                continue
            cells = [_frac(*t["kind"][k]) for k in kinds]
            if kinds:
                cells += [_frac(*_sum(t["task_caught"]))] + [_frac(*t["task_caught"][x]) for x in task_names]
            cells += [_frac(*_sum(t["task_benign"]))] + [_frac(*t["task_benign"][x]) for x in task_names]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        lines.append("")
        if not kinds:
            continue
        clair_benign = sum(r["clair_benign_flags"] for r in runs)
        n_benign = sum(1 for r in runs for k in r["kinds"] if k == "benign")
        for key, title in (
            ("at_clair_benign_flags", f"at clair's benign flags per pool ({clair_benign}/{n_benign} in all)"),
            ("at_zero_benign_flags", "at zero benign flags"),
        ):
            lines += [
                f"Continuous scores, contaminated caught {title}:",
                "",
                "| score |"
                + "".join(f" {k} |" for k in kinds)
                + " caught (all) |"
                + "".join(f" caught {t} |" for t in task_names),
                "|---|" + "---:|" * (len(kinds) + 1 + len(task_names)),
            ]
            if key == "at_clair_benign_flags":
                t = tally(runs, "clair")
                assert t is not None
                cells = [_frac(*t["kind"][k]) for k in kinds]
                cells += [_frac(*_sum(t["task_caught"]))] + [_frac(*t["task_caught"][x]) for x in task_names]
                lines.append(f"| {VERDICT} | " + " | ".join(cells) + " |")
            for row in SCORED:
                t = tally_matched(runs, row, key)
                if t is None:
                    continue
                cells = [_frac(*t["kind"][k]) for k in kinds]
                cells += [_frac(*_sum(t["task_caught"]))] + [_frac(*t["task_caught"][x]) for x in task_names]
                lines.append(f"| {SCORE_LABEL[row]} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def global_thresholds(results: list[dict]) -> str:
    """Each scored detector judged against one threshold for every pool, as a verdict must be:
    scores divided by their pool's median, the threshold at zero, at clair's verdict's count and
    at ``GLOBAL_SHARE`` of all honest adapters (over every pool) flagged, contaminated caught
    strictly above it."""
    kinds = _kinds(results)
    scenarios = list(dict.fromkeys(r["scenario"] for r in results))
    columns = [
        (sc, k) for sc in scenarios for k in kinds if any(sc == r["scenario"] and k in r["kinds"] for r in results)
    ]
    n_benign = sum(1 for r in results for k in r["kinds"] if k == "benign")
    allowed = int(GLOBAL_SHARE * n_benign)
    verdict = sum(r["clair_benign_flags"] for r in results)  # the level clair's verdict runs at
    levels = sorted({0, verdict, allowed})
    lines = [
        f"One threshold for every pool (score / pool median), {n_benign} honest adapters in all:",
        "",
        "| score | honest flagged |" + "".join(f" {sc}: {k} |" for sc, k in columns),
        "|---|---:|" + "---:|" * len(columns),
    ]
    for row in SCORED:
        if any(r["detectors"].get(row, {}).get("score") is None for r in results):
            continue
        ratios = []
        for r in results:
            s = np.asarray(r["detectors"][row]["score"], dtype=float)
            ratios.append(s / np.median(s))
        benign = np.sort(
            np.concatenate([q[[k == "benign" for k in r["kinds"]]] for q, r in zip(ratios, results, strict=True)])
        )[::-1]
        for n_flags in levels:
            threshold = benign[n_flags]
            cells = []
            for sc, kind in columns:
                hit = [
                    q[i] > threshold
                    for q, r in zip(ratios, results, strict=True)
                    if r["scenario"] == sc
                    for i, k in enumerate(r["kinds"])
                    if k == kind
                ]
                cells.append(_frac(sum(hit), len(hit)))
            lines.append(f"| {SCORE_LABEL[row]} | {n_flags}/{n_benign} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.detection_trained", description=__doc__.split("\n")[0])
    trained_pools.pool_arguments(parser, "benchmarks/results/detection_trained.json")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    task_names, scenarios = args.tasks.split(","), args.scenarios.split(",")
    seeds = list(range(args.seeds))
    pools = trained_pools.pools_from_arguments(args)
    results = []
    for pool in pools:
        results.append(evaluate_pool(pool))
        r = results[-1]
        trained_pools.log_err(
            f"{pool.name}: clair flagged {len(r['detectors']['clair']['flagged'])} "
            f"({r['clair_benign_flags']} benign) ({time.perf_counter() - start:.0f} s)"
        )
    order = {s: i for i, s in enumerate(trained_pools.SCENARIOS)}
    results.sort(key=lambda r: (order[r["scenario"]], task_names.index(r["task"]), r["seed"]))
    print(tables(results, task_names))
    print(global_thresholds(results))
    from benchmarks.merge_quality import clair_source

    try:
        import sklearn

        sklearn_version = sklearn.__version__
    except ImportError:
        sklearn_version = None
    payload = {
        "benchmark": "detection on trained LoRA pools (benchmarks/detection_trained.py)",
        "seeds": seeds,
        "tasks": task_names,
        "scenarios": {s: list(trained_pools.SCENARIOS[s]) for s in scenarios},
        "detectors": [d for d, _ in DETECTORS],
        "parameters": {
            "multi-krum": "f = floor((K - 3) / 2); m = K - f; (true f): f = contaminated count",
            "flame": "HDBSCAN(min_cluster_size = K // 2 + 1, min_samples = 2 in scikit-learn = 1 in hdbscan, "
            "allow_single_cluster) on cosine distances; noise flagged",
            "dnc": f"b = {detectors.DNC_B}, niters = {detectors.DNC_NITERS}, c = {detectors.DNC_C}, "
            f"m = floor({detectors.DNC_ASSUMED_SHARE} K); (true m): m = contaminated count; seed crc32(pool name)",
            "foolsgold": f"kappa = {detectors.FOOLSGOLD_KAPPA}, one round, weight 0 flagged",
            "norm > 3x median": f"norm > {detectors.NORM_FACTOR} x median norm",
            "dnc exact": "score only: exact leave-one-out DnC statistic from the K x K Gram",
            "global": "score / pool median; thresholds at 0, at clair's verdict's count and "
            f"floor({GLOBAL_SHARE} x honest) honest flags "
            "over all pools",
            "clair": "python -m clair_cli audit POOL --json - --exit-zero --quiet (defaults)",
            "matched": "per pool, threshold = (n_b + 1)-th largest benign score, n_b = clair's benign flags "
            "(or 0); contaminated caught when strictly above",
        },
        "scikit_learn": sklearn_version,
        "clair_source": clair_source(REPO),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "pools": results,
    }
    trained_pools.write_results(args.out, payload, start)
    return 0


if __name__ == "__main__":
    trained_pools.configure_torch()
    raise SystemExit(main())
