"""Merge quality on trained LoRA pools: does clair's merge match the plain mean and the oracle?

    python -m benchmarks.merge_quality [--seeds 3] [--cache DIR] [--out benchmarks/results/merge_quality.json]

Pools come from benchmarks/trained_pools.py (generated into --cache on first use, then
reused): two tasks (``revsucc`` transduction, ``majority`` classification as LM) x seeds x
scenarios (``clean``, ``mixed``, ``poisoning``, ``heavy``). For every pool, each method row
runs the CLI in a subprocess::

    python -m clair_cli merge POOL --out TMP/x --exit-zero --quiet [--json TMP/x.json] [FLAGS]

(``--json`` for clair's rows only: the baselines run no audit and refuse it)
and the merged adapter is loaded with ``PeftModel.from_pretrained`` on the pool's base
model (its keys checked against adapter_model.safetensors) and scored on every benign
client's held-out strings from its own distribution: accuracy (share of target symbols /
labels right, teacher forcing) averaged over the benign clients, and, in pools with a
backdoor client, the backdoor success rate on the same strings with the trigger put in
front (strings whose true target is the backdoor target left out).

Rows: ``base`` (no adapter), ``local`` (each benign client's own adapter), the baselines
``mean``, ``fedavg``, ``median``, ``trimmed-mean``, ``multi-krum``, clair's default merge (norm bound
1.5x), ``clair --norm-bound off``,
``clair --project``, ``clair --rescale norm`` (recorded as missing when the CLI has no
such flag), and ``oracle`` (``--method mean`` on the benign clients only). clair's
detection comes from the default row's JSON report.

Deterministic given the seeds (torch on 1 thread, deterministic algorithms; the CLI at
its default seed).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel

from benchmarks import tasks, trained_pools
from experiments.text_copy import train

# (row name, extra CLI arguments); None: not a CLI merge of the pool.
METHODS: list[tuple[str, list[str] | None]] = [
    ("base", None),
    ("local", None),
    ("mean", ["--method", "mean"]),
    ("fedavg", ["--method", "fedavg"]),
    ("median", ["--method", "median"]),
    ("trimmed-mean", ["--method", "trimmed-mean"]),
    ("multi-krum", ["--method", "multi-krum"]),
    ("clair", []),
    ("clair --norm-bound off", ["--norm-bound", "off"]),
    ("clair --project", ["--project"]),
    ("clair --rescale norm", ["--rescale", "norm"]),
    ("oracle", ["--method", "mean"]),  # on the benign clients only
]
CLAIR_ROWS = ("clair", "clair --norm-bound off", "clair --project", "clair --rescale norm")
BACKDOOR_KINDS = ("backdoor", "boosted_backdoor")
TOLERANCE = 0.01  # "within 0.01 of the oracle"


# -- scoring -------------------------------------------------------------------------------


class Scorer:
    """One pool's base model, benign test sets and triggered sets."""

    def __init__(self, pool: Path) -> None:
        self.pool = pool
        self.manifest = trained_pools.manifest(pool)
        self.task = tasks.TASKS[self.manifest["task"]]
        self.world = tasks.World.make(self.manifest["seed"])
        self.base: GPT2LMHeadModel = train.load_base(pool / self.manifest["base_model_dir"])
        self.tests = trained_pools.test_sets(pool)
        kinds = {info["kind"] for info in self.manifest["adapters"].values()}
        self.has_backdoor = bool(kinds & set(BACKDOOR_KINDS))
        self.triggered = {}
        if self.has_backdoor:
            for name, test in self.tests.items():
                trig = self.task.triggered(self.world, test)
                keep = (trig[:, self.task.target_slice] != self.task.backdoor_target).any(1)
                self.triggered[name] = trig[keep]

    @torch.no_grad()
    def _scores(self, model: torch.nn.Module, names: list[str]) -> tuple[dict[str, float], dict[str, float]]:
        acc, bd = {}, {}
        for name in names:
            test = self.tests[name]
            pred = model(input_ids=test).logits[:, self.task.predict_slice].argmax(-1)
            acc[name] = (pred == test[:, self.task.target_slice]).float().mean().item()
            if self.has_backdoor:
                trig = self.triggered[name]
                pred = model(input_ids=trig).logits[:, self.task.predict_slice].argmax(-1)
                bd[name] = (pred == self.task.backdoor_target).all(1).float().mean().item()
        return acc, bd

    def load(self, adapter_dir: Path) -> tuple[torch.nn.Module, list[str]]:
        """The base with the adapter loaded by PEFT, and any mismatch between the file and the loaded weights."""
        model = PeftModel.from_pretrained(copy.deepcopy(self.base), str(adapter_dir))
        model.eval()
        problems = []
        on_disk = load_file(str(adapter_dir / "adapter_model.safetensors"))
        loaded = get_peft_model_state_dict(model)
        if set(on_disk) != set(loaded):
            problems.append(
                f"keys differ: missing {sorted(set(on_disk) - set(loaded))[:3]}, "
                f"unexpected {sorted(set(loaded) - set(on_disk))[:3]}"
            )
        else:
            bad = [k for k in on_disk if not torch.equal(on_disk[k].to(loaded[k].dtype), loaded[k])]
            if bad:
                problems.append(f"values differ after loading: {bad[:3]}")
        return model, problems

    def row(self, per_client: dict[str, tuple[dict[str, float], dict[str, float]]]) -> dict:
        acc = {n: a[n] for n, (a, _) in per_client.items()}
        bd = {n: b[n] for n, (_, b) in per_client.items() if n in b}
        return {
            "accuracy": statistics.fmean(acc.values()),
            "backdoor": statistics.fmean(bd.values()) if bd else None,
            "per_client": {n: round(v, 6) for n, v in acc.items()},
        }

    def score_shared(self, model: torch.nn.Module) -> dict:
        names = sorted(self.tests)
        acc, bd = self._scores(model, names)
        return self.row({n: ({n: acc[n]}, {n: bd[n]} if bd else {}) for n in names})

    def score_base(self) -> dict:
        return self.score_shared(self.base)

    def score_local(self) -> tuple[dict, list[str]]:
        per_client, problems = {}, []
        for name in sorted(self.tests):
            model, p = self.load(self.pool / name)
            problems += [f"{name}: {x}" for x in p]
            per_client[name] = self._scores(model, [name])
        return self.row(per_client), problems


# -- the CLI -------------------------------------------------------------------------------


REPO = Path(__file__).resolve().parents[1]


def run_merge(source: Path, out: Path, extra: list[str], report: bool, clair_src: Path) -> tuple[int, str, float]:
    """``clair merge`` in a subprocess, importing ``clair_cli`` from ``clair_src``; ``report``: with
    ``--json OUT.json`` (only clair's own method writes one)."""
    cmd = [sys.executable, "-m", "clair_cli", "merge", str(source), "--out", str(out), "--exit-zero", "--quiet"]
    cmd += (["--json", str(out) + ".json"] if report else []) + extra
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", NO_COLOR="1", PYTHONPATH=str(clair_src))
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=clair_src)
    return proc.returncode, (proc.stderr + proc.stdout).strip(), time.perf_counter() - start


def benign_only(pool: Path, names: list[str], work: Path) -> Path:
    """A pool directory of copies of the benign clients (clair refuses symlinks that lead outside)."""
    target = work / "benign_only"
    target.mkdir()
    for name in names:
        shutil.copytree(pool / name, target / name)
    return target


def clair_source(clair_src: Path) -> dict:
    """Which clair_cli the CLI rows ran: the path, a digest of its .py files and, for a git checkout, the
    commit and the uncommitted changes."""
    digest = hashlib.sha256()
    for f in sorted((clair_src / "clair_cli").rglob("*.py")):
        digest.update(str(f.relative_to(clair_src)).encode() + b"\0" + f.read_bytes())
    info: dict = {"path": str(clair_src), "sha256_of_py_files": digest.hexdigest()}
    git = ["git", "-C", str(clair_src)]
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        info["commit"] = head.stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "clair_cli"], capture_output=True, text=True)
        info["uncommitted_clair_cli_changes"] = [line[3:] for line in dirty.stdout.splitlines()]
    return info


def evaluate_pool(pool: Path, clair_src: Path = REPO) -> dict:
    """Every method row on one pool, and clair's detection."""
    scorer = Scorer(pool)
    adapters = scorer.manifest["adapters"]
    benign = sorted(n for n, a in adapters.items() if not a["contaminated"])
    contaminated = sorted(n for n, a in adapters.items() if a["contaminated"])
    rows: dict[str, dict] = {}
    notes: list[str] = []
    detection = None
    with tempfile.TemporaryDirectory(prefix="clair-mq-") as tmp:
        work = Path(tmp)
        for method, extra in METHODS:
            start = time.perf_counter()
            if method == "base":
                rows[method] = scorer.score_base()
                continue
            if method == "local":
                rows[method], problems = scorer.score_local()
                notes += [f"local: PEFT load: {p}" for p in problems]
                rows[method]["seconds"] = round(time.perf_counter() - start, 2)
                continue
            assert extra is not None
            source = benign_only(pool, benign, work) if method == "oracle" else pool
            out = work / method.replace(" ", "_").replace("-", "_")
            rc, text, seconds = run_merge(source, out, extra, method in CLAIR_ROWS, clair_src)
            if rc != 0:
                reason = "no such option" if rc == 2 and "No such option" in text else f"exit {rc}: {text[-300:]}"
                rows[method] = {"missing": reason}
                if reason != "no such option":
                    notes.append(f"{method}: CLI failed ({reason})")
                continue
            report_path = Path(str(out) + ".json")
            report = json.loads(report_path.read_text()) if report_path.exists() else None
            try:
                model, problems = scorer.load(out)
            except Exception as exc:  # a merged adapter PEFT cannot load is a finding, not a crash
                rows[method] = {"missing": f"PEFT failed to load: {type(exc).__name__}: {exc}"[:300]}
                notes.append(f"{method}: {rows[method]['missing']}")
                continue
            rows[method] = scorer.score_shared(model)
            rows[method]["cli_seconds"] = round(seconds, 2)
            if problems:
                rows[method]["peft_load_problems"] = problems
                notes += [f"{method}: PEFT load: {p}" for p in problems]
            if report is not None and method in CLAIR_ROWS:
                flagged = sorted(report.get("flagged", []))
                rows[method]["flagged"] = flagged
                rows[method]["shared_rank"] = report.get("shared_rank")
                if method == "clair":
                    detection = {
                        "flagged": flagged,
                        "caught": [len(set(flagged) & set(contaminated)), len(contaminated)],
                        "benign_flagged": [len(set(flagged) & set(benign)), len(benign)],
                        "flagged_kinds": {n: adapters[n]["kind"] for n in flagged},
                    }
    m = scorer.manifest
    return {
        "task": m["task"],
        "seed": m["seed"],
        "scenario": m["scenario"],
        "pool": str(pool),
        "kinds": {n: a["kind"] for n, a in adapters.items()},
        "has_backdoor": scorer.has_backdoor,
        "rows": rows,
        "detection": detection,
        "notes": notes,
    }


# -- report --------------------------------------------------------------------------------


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _spread(values: list[float]) -> str:
    return f"[{min(values):.3f}, {max(values):.3f}]"


def tables(results: list[dict]) -> str:
    lines: list[str] = []
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["task"], r["scenario"]), []).append(r)
    for (task, scenario), runs in groups.items():
        runs.sort(key=lambda r: r["seed"])
        seeds = [r["seed"] for r in runs]
        kinds = sorted({k for r in runs for k in r["kinds"].values() if k != "benign"})
        has_bd = any(r["has_backdoor"] for r in runs)
        lines += [
            f"### {task} / {scenario} (seeds {', '.join(map(str, seeds))}; "
            f"{sum(1 for k in runs[0]['kinds'].values() if k != 'benign')} of {len(runs[0]['kinds'])} contaminated"
            f"{': ' + ', '.join(kinds) if kinds else ''})",
            "",
            "| method | accuracy (mean) | [min, max] over seeds |"
            + (" backdoor (mean) | [min, max] |" if has_bd else ""),
            "|---|---:|---:|" + ("---:|---:|" if has_bd else ""),
        ]
        for method, _ in METHODS:
            got = [r["rows"][method] for r in runs if "accuracy" in r["rows"].get(method, {})]
            if len(got) < len(runs):
                reasons = {r["rows"].get(method, {}).get("missing", "not run") for r in runs} - {None}
                lines.append(f"| {method} | missing ({'; '.join(sorted(reasons))}) | |" + (" | |" if has_bd else ""))
                continue
            acc = [g["accuracy"] for g in got]
            cells = f"| {method} | {statistics.fmean(acc):.3f} | {_spread(acc)} |"
            if has_bd:
                bd = [g["backdoor"] for g in got if g["backdoor"] is not None]
                cells += f" {_fmt(statistics.fmean(bd)) if bd else '-'} | {_spread(bd) if bd else ''} |"
            lines.append(cells)
        dets = [r["detection"] for r in runs if r["detection"]]
        if dets:
            caught = [sum(d["caught"][0] for d in dets), sum(d["caught"][1] for d in dets)]
            benign = [sum(d["benign_flagged"][0] for d in dets), sum(d["benign_flagged"][1] for d in dets)]
            flagged_kinds: dict[str, int] = {}
            for d in dets:
                for k in d["flagged_kinds"].values():
                    flagged_kinds[k] = flagged_kinds.get(k, 0) + 1
            kinds_text = ", ".join(f"{k} {v}" for k, v in sorted(flagged_kinds.items())) or "none"
            lines += [
                "",
                f"clair detection (summed over {len(dets)} seeds): contaminated caught {caught[0]}/{caught[1]}, "
                f"benign flagged {benign[0]}/{benign[1]}; flagged by kind: {kinds_text}.",
            ]
        lines += ["", *differences(runs), ""]
    return "\n".join(lines)


def differences(runs: list[dict]) -> list[str]:
    """Per seed, clair's rows minus mean and minus oracle, against the seed-to-seed spread."""
    out = []
    for method in CLAIR_ROWS:
        if not all("accuracy" in r["rows"].get(method, {}) for r in runs):
            continue
        for ref in ("mean", "oracle"):
            if not all("accuracy" in r["rows"].get(ref, {}) for r in runs):
                continue
            diffs = [r["rows"][method]["accuracy"] - r["rows"][ref]["accuracy"] for r in runs]
            own = [r["rows"][method]["accuracy"] for r in runs]
            other = [r["rows"][ref]["accuracy"] for r in runs]
            spread = max(max(own) - min(own), max(other) - min(other))
            mean_diff = statistics.fmean(diffs)
            per_seed = ", ".join(f"s{r['seed']} {d:+.3f}" for r, d in zip(runs, diffs, strict=True))
            verdict = []
            if len(runs) > 1:
                if abs(mean_diff) < spread:
                    verdict.append(f"|mean difference| {abs(mean_diff):.3f} < seed-to-seed spread {spread:.3f}")
                else:
                    verdict.append(f"|mean difference| {abs(mean_diff):.3f} >= seed-to-seed spread {spread:.3f}")
                if all(d > 0 for d in diffs) or all(d < 0 for d in diffs):
                    verdict.append("same sign on every seed")
            if ref == "mean":
                verdict.append("at least mean" if all(d >= 0 for d in diffs) else "below mean on some seed")
            else:
                within = all(abs(d) <= TOLERANCE for d in diffs)
                verdict.append(f"within {TOLERANCE} of oracle on every seed" if within else f"not within {TOLERANCE}")
            out.append(f"- {method} - {ref}: {per_seed}; mean {mean_diff:+.3f} ({'; '.join(verdict)})")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.merge_quality", description=__doc__.split("\n")[0])
    trained_pools.pool_arguments(parser, "benchmarks/results/merge_quality.json")
    parser.add_argument(
        "--clair-src",
        type=Path,
        default=REPO,
        help="directory holding the clair_cli package the CLI rows run (default: this checkout; "
        "e.g. a `git archive HEAD clair_cli` snapshot to benchmark a commit while the tree is being edited)",
    )
    args = parser.parse_args(argv)
    clair_src = args.clair_src.resolve()
    start = time.perf_counter()
    task_names, scenarios = args.tasks.split(","), args.scenarios.split(",")
    seeds = list(range(args.seeds))
    pools = trained_pools.pools_from_arguments(args)
    results = []
    for pool in pools:
        results.append(evaluate_pool(pool, clair_src))
        r = results[-1]
        clair_acc = r["rows"]["clair"].get("accuracy", "missing")
        trained_pools.log_err(f"scored {pool.name}: clair {clair_acc} ({time.perf_counter() - start:.0f} s)")
        for note in r["notes"]:
            trained_pools.log_err(f"  note: {note}")
    text = tables(results)
    print(text)
    payload = {
        "benchmark": "merge quality on trained LoRA pools (benchmarks/merge_quality.py)",
        "seeds": seeds,
        "tasks": task_names,
        "scenarios": {s: list(trained_pools.SCENARIOS[s]) for s in scenarios},
        "methods": [m for m, _ in METHODS],
        "clair_source": clair_source(clair_src),
        "setup": {
            "n_benign": trained_pools.N_BENIGN,
            "n_train": trained_pools.N_TRAIN,
            "n_test": trained_pools.N_TEST,
            "pretrain_steps": trained_pools.PRETRAIN_STEPS,
            "dirichlet_concentration": trained_pools.CONCENTRATION,
        },
        "wall_seconds": round(time.perf_counter() - start, 1),
        "pools": results,
    }
    trained_pools.write_results(args.out, payload, start)
    return 0


if __name__ == "__main__":
    trained_pools.configure_torch()
    raise SystemExit(main())
