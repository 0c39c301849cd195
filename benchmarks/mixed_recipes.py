"""Honest adapters trained with different recipes: does clair flag more of them, and does it still catch contaminations?

    python -m benchmarks.mixed_recipes [--seeds 3] [--cache DIR] [--trained DIR] [--no-merge] [--out FILE.json]
    python -m benchmarks.mixed_recipes --why    # then: what in the recipe makes clair flag an honest client

Every trained pool of benchmarks/trained_pools.py uses one recipe (r = 4, alpha = 8, 150 AdamW
steps at lr 3e-3, LoRA on c_attn / c_proj / c_fc). Adapters uploaded to a hub, or sent by the
clients of a federation that lets each client pick its settings, do not: this benchmark
retrains the same clients, each with its own recipe (``draw_recipes``, deterministic per task and
seed):

- rank r in {2, 4, 8, 16}; lora_alpha in {r, 2r, 4r}; ``use_rslora`` (alpha / sqrt(r)) for a
  quarter of the clients;
- learning rate log-uniform in [1e-3, 5e-3]; steps in {75, 150, 300} (batch 16, AdamW);
- target modules: all three (half the clients), or c_attn with c_proj, c_attn with c_fc, or
  c_attn alone (so some adapters lack some modules).

Everything else is paired with the uniform-recipe pools of the same (task, seed): the base model
(reused from the trained pools' cache, ``--trained``), each client's data distribution, training
strings and training seed (the trained pools' generators replayed in the same order), and the LoRA
initialisation seed (the pool seed, as trained_pools broadcasts it; clients of one rank and target
set start from the same A). Only the recipe differs. The contaminated clients are trained as
trained_pools trains them (the ``mixed`` scenario's label flip, backdoor, sign flip, free rider and
other-task clients, the ``poisoning`` scenario's first boosted x5 client), each with a recipe of its
own from the same spread. Pools, for each task and seed and for both recipe sets (``uniform``: the
trained pools' own clients, copied; ``mixed``: retrained here)::

    clean       the 12 honest clients
    contam-a    + label_flip, backdoor, sign_flip
    contam-b    + free_rider, unrelated_task, boosted

Each pool is audited as a user would (``python -m clair_cli audit POOL --json - --exit-zero --quiet
--intersect``, defaults otherwise: clair refuses adapters that target different modules unless told to
analyse the modules they all target, and says so; the plain audit's exit is recorded too) and, unless
``--no-merge``, merged (``clair merge --intersect``: ``--method mean`` on the honest clients alone =
oracle, ``--method mean`` on the pool, clair's default merge) and scored on every honest
client's held-out strings (benchmarks/merge_quality.py's ``Scorer``; clean pools also: ``base``, ``local``
= each honest client alone, ``oracle (union of modules)`` = the base plus the mean of the honest
clients' full updates on every module any of them targets, computed here, no --intersect).
Tables: honest flagged / audited with a Wilson 95 % interval, each contamination caught / total,
accuracy, the rules behind every honest flag, and honest flags by recipe property.
Trained clients are cached under ``--cache`` (about 1-4 s each on one thread).

``--why`` reads the results (``--out``) and, for every honest client of a mixed recipe set that some pool
flags, retrains it with one recipe property changed at a time (scale 2 = alpha 2r without rsLoRA; rank 4
at the same scale; lr 1e-3; 75 steps; the uniform recipe), same strings and seeds, puts it back in the
first pool that flagged it and audits again (``OUT_why.json``, ``OUT_why.md``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from transformers import GPT2LMHeadModel

from benchmarks import merge_quality, tasks, trained_pools
from clair_cli.io.writers import AtomicDir
from experiments.text_copy import train

RANKS = (2, 4, 8, 16)
ALPHA_FACTORS = (1, 2, 4)  # lora_alpha = factor x r
LR_RANGE = (1e-3, 5e-3)  # log-uniform
STEPS = (75, 150, 300)
ALL_TARGETS = ("c_attn", "c_fc", "c_proj")
TARGET_SUBSETS = (("c_attn", "c_proj"), ("c_attn", "c_fc"), ("c_attn",))
ALL_TARGETS_SHARE = 0.5  # the rest split evenly over TARGET_SUBSETS
RSLORA_SHARE = 0.25
BATCH = 16
RECIPE_SETS = ("uniform", "mixed", "mixed-full")  # mixed-full: the mixed recipes, all on every module
# Contaminated clients: (trained_pools scenario, position in it, kind); trained from that scenario's generator.
CONTAMINATED: tuple[tuple[str, int, str], ...] = (
    ("mixed", 0, "label_flip"),
    ("mixed", 1, "backdoor"),
    ("mixed", 2, "sign_flip"),
    ("mixed", 3, "free_rider"),
    ("mixed", 4, "unrelated_task"),
    ("poisoning", 2, "boosted"),
)
POOLS: dict[str, tuple[str, ...]] = {
    "clean": (),
    "contam-a": ("label_flip", "backdoor", "sign_flip"),
    "contam-b": ("free_rider", "unrelated_task", "boosted"),
}
MERGES = ("oracle", "mean", "clair")


# -- recipes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    rank: int
    alpha: int
    use_rslora: bool
    lr: float
    steps: int
    targets: tuple[str, ...]

    @property
    def scale(self) -> float:
        """PEFT's multiplier of ``B @ A``: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def label(self) -> str:
        rs = " rs" if self.use_rslora else ""
        return (
            f"r{self.rank} a{self.alpha}{rs} (x{self.scale:g}) lr {self.lr:.1e} {self.steps} st "
            f"{'+'.join(t.removeprefix('c_') for t in self.targets)}"
        )


UNIFORM = Recipe(
    trained_pools.SETUP.rank,
    trained_pools.SETUP.alpha,
    False,
    trained_pools.SETUP.lr,
    trained_pools.SETUP.steps,
    ALL_TARGETS,
)


def draw_recipe(rng: np.random.Generator) -> Recipe:
    """One client's recipe from the spread of the module docstring."""
    rank = int(rng.choice(RANKS))
    alpha = rank * int(rng.choice(ALPHA_FACTORS))
    use_rslora = bool(rng.random() < RSLORA_SHARE)
    lr = float(math.exp(rng.uniform(math.log(LR_RANGE[0]), math.log(LR_RANGE[1]))))
    steps = int(rng.choice(STEPS))
    if rng.random() < ALL_TARGETS_SHARE:
        targets = ALL_TARGETS
    else:
        targets = TARGET_SUBSETS[int(rng.integers(len(TARGET_SUBSETS)))]
    return Recipe(rank, alpha, use_rslora, round(lr, 6), steps, targets)


def draw_recipes(seed: int, task: str, n: int, stream: int = 0, full: bool = False) -> list[Recipe]:
    """``n`` recipes for (task, seed): the honest clients' (stream 0) or the contaminated ones' (stream 1);
    ``full``: the same recipes, each on every target module."""
    rng = np.random.default_rng([seed, list(tasks.TASKS).index(task), stream, 20_261_207])
    recipes = [draw_recipe(rng) for _ in range(n)]
    return [replace(r, targets=ALL_TARGETS) for r in recipes] if full else recipes


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a proportion k / n (95 % by default)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


# -- training --------------------------------------------------------------------------------


class RecipeTrainer(trained_pools.Trainer):
    """trained_pools' client trainer on a fresh copy of the base, with ``recipe``'s LoRA and optimiser."""

    def __init__(self, base: GPT2LMHeadModel, recipe: Recipe, init_seed: int) -> None:
        self.setup = train.LoraSetup(recipe.rank, recipe.alpha, recipe.steps, BATCH, recipe.lr)
        self.base_name = trained_pools.BASE_NAME
        torch.manual_seed(init_seed)
        config = LoraConfig(
            r=recipe.rank,
            lora_alpha=recipe.alpha,
            use_rslora=recipe.use_rslora,
            target_modules=list(recipe.targets),
            fan_in_fan_out=True,
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        )
        config.base_model_name_or_path = self.base_name
        self.model = get_peft_model(copy.deepcopy(base), config)
        self.initial = {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model).items()}


def client_data(world: tasks.World, task: tasks.Task, kind: str, g: torch.Generator) -> tuple[dict, torch.Tensor]:
    """trained_pools.train_client's draws from ``g``, in its order: the MANIFEST entry and the training strings."""
    spec = trained_pools.CONTAMINATIONS[kind]
    data_task = tasks.other_task(task.name) if spec.other_task else task
    dist = data_task.distribution(trained_pools.CONCENTRATION[data_task.name], g)
    data = data_task.dataset(world, dist, trained_pools.N_TRAIN[data_task.name], g, spec.data)
    info = {"kind": kind, "contaminated": kind != "benign", "data_task": data_task.name, "distribution": dist}
    if kind == "benign":
        info["test_seed"] = int(torch.randint(2**31 - 1, (1,), generator=g))
    return info, data


def fit(
    base: GPT2LMHeadModel,
    recipe: Recipe,
    init_seed: int,
    data: torch.Tensor,
    seed: int,
    kind: str,
    prompt_len: int,
    out: Path,
) -> None:
    trainer = RecipeTrainer(base, recipe, init_seed)
    state = trainer.train(data, seed, prompt_len)
    post = trained_pools.CONTAMINATIONS[kind].post
    if post is not None:
        state = post(state)
    trainer.save(state, out)


def train_mixed(trained: Path, cache: Path, task_name: str, seed: int, full: bool = False, log=print) -> Path:
    """The mixed-recipe clients of (task, seed): ``b01``..``b12`` honest, then one per CONTAMINATED kind; reused."""
    target = cache / "clients" / f"{task_name}-s{seed}{'-full' if full else ''}"
    if (target / "CLIENTS.json").is_file():
        return target
    base_dir = trained_pools.pool_dir(trained, task_name, seed, "clean") / trained_pools.BASE_NAME
    if not (base_dir / "config.json").is_file():
        raise SystemExit(f"{base_dir} missing: run python -m benchmarks.trained_pools --cache {trained} first")
    start = time.perf_counter()
    base = train.load_base(base_dir)
    world = tasks.World.make(seed)
    task = tasks.TASKS[task_name]
    t_index = list(tasks.TASKS).index(task_name)
    target.mkdir(parents=True, exist_ok=True)
    clients: dict[str, dict] = {}
    recipes = draw_recipes(seed, task_name, trained_pools.N_BENIGN, full=full)
    g = torch.Generator().manual_seed(1000 * seed + 100 * t_index + 7)  # trained_pools' benign generator
    for i, recipe in enumerate(recipes):
        name = f"b{i + 1:02d}"
        info, data = client_data(world, task, "benign", g)
        fit(base, recipe, seed, data, 10_000 * seed + 100 * t_index + i, "benign", task.prompt_len, target / name)
        clients[name] = info | {"recipe": asdict(recipe)}
    bad_recipes = draw_recipes(seed, task_name, len(CONTAMINATED), stream=1, full=full)
    for scenario in dict.fromkeys(s for s, _, _ in CONTAMINATED):
        s_index = list(trained_pools.SCENARIOS).index(scenario)
        g = torch.Generator().manual_seed(1000 * seed + 100 * t_index + 10 + s_index)
        for j, kind in enumerate(trained_pools.SCENARIOS[scenario]):
            if kind.startswith("copy>"):
                continue
            info, data = client_data(world, task, kind, g)  # replayed even when not wanted: the same strings
            wanted = [k for k, c in enumerate(CONTAMINATED) if c[:2] == (scenario, j)]
            if not wanted:
                continue
            recipe = bad_recipes[wanted[0]]
            train_seed = 10_000 * seed + 100 * t_index + 1000 * (s_index + 1) + j
            data_task = tasks.TASKS[info["data_task"]]
            fit(base, recipe, seed, data, train_seed, kind, data_task.prompt_len, target / kind)
            clients[kind] = info | {"recipe": asdict(recipe)}
    (target / "CLIENTS.json").write_text(json.dumps(clients, indent=1) + "\n")
    log(f"{target.name}: {len(clients)} mixed-recipe clients trained ({time.perf_counter() - start:.0f} s)")
    return target


def uniform_clients(trained: Path, task_name: str, seed: int) -> dict[str, tuple[Path, dict]]:
    """The trained pools' own clients of (task, seed) under the names of :func:`train_mixed`."""
    out: dict[str, tuple[Path, dict]] = {}
    clean = trained_pools.pool_dir(trained, task_name, seed, "clean")
    for i, (name, info) in enumerate(sorted(trained_pools.manifest(clean)["adapters"].items())):
        out[f"b{i + 1:02d}"] = (clean / name, info | {"recipe": asdict(UNIFORM)})
    for scenario, j, kind in CONTAMINATED:
        pool = trained_pools.pool_dir(trained, task_name, seed, scenario)
        adapters = trained_pools.manifest(pool)["adapters"]
        name = f"client_{trained_pools.N_BENIGN + j + 1:02d}"
        if adapters[name]["kind"] != kind:
            raise RuntimeError(f"{pool}/{name} is {adapters[name]['kind']}, expected {kind}")
        out[kind] = (pool / name, adapters[name] | {"recipe": asdict(UNIFORM)})
    return out


def write_pool(trained: Path, cache: Path, recipes: str, task_name: str, seed: int, pool: str, clients: dict) -> Path:
    """One pool directory in trained_pools' layout (base_model/, client_NN/, MANIFEST.json); reused."""
    target = cache / "pools" / f"{task_name}-s{seed}-{recipes}-{pool}"
    if (target / "MANIFEST.json").is_file():
        return target
    members = [f"b{i + 1:02d}" for i in range(trained_pools.N_BENIGN)] + list(POOLS[pool])
    base_dir = trained_pools.pool_dir(trained, task_name, seed, "clean") / trained_pools.BASE_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    with AtomicDir(target, force=True) as tmp:
        shutil.copytree(base_dir, tmp / "base_model")
        adapters = {}
        for k, member in enumerate(members):
            source, info = clients[member]
            name = f"client_{k + 1:02d}"
            shutil.copytree(source, tmp / name)
            adapters[name] = info | {"client": member}
        manifest = {
            "task": task_name,
            "seed": seed,
            "scenario": f"{recipes}-{pool}",
            "base_model": trained_pools.BASE_NAME,
            "base_model_dir": "base_model",
            "generator": "python -m benchmarks.mixed_recipes",
            "adapters": adapters,
        }
        (tmp / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return target


# -- audit and merge ------------------------------------------------------------------------


def run_clair(pool: Path, extra: list[str]) -> tuple[int, dict | str, float]:
    """``clair audit POOL --json - --exit-zero --quiet [extra]`` in a subprocess: exit, report (or stderr), seconds."""
    cmd = [sys.executable, "-m", "clair_cli", "audit", str(pool), "--json", "-", "--exit-zero", "--quiet", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", NO_COLOR="1", PYTHONPATH=str(merge_quality.REPO))
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=merge_quality.REPO)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        return proc.returncode, proc.stderr.strip()[-400:], seconds
    return 0, json.loads(proc.stdout), seconds


def audit(pool: Path) -> dict:
    """The audit with ``--intersect`` (a pool whose adapters target different modules is refused without it),
    and whether the plain audit refuses the pool."""
    rc, plain, _ = run_clair(pool, [])
    rc_i, report, seconds = run_clair(pool, ["--intersect"])
    if rc_i != 0 or not isinstance(report, dict):
        raise RuntimeError(f"clair audit --intersect {pool} failed (exit {rc_i}): {report}")
    adapters = trained_pools.manifest(pool)["adapters"]
    rows = {}
    for a in report["adapters"]:
        info = adapters[a["name"]]
        rows[a["name"]] = {
            "client": info["client"],
            "kind": info["kind"],
            "recipe": info["recipe"],
            "flagged": bool(a["flagged"]),
            "score": a["score"],
            "norm": a["norm"],
            "reasons": [
                {k: r.get(k) for k in ("rule", "kind", "value", "threshold", "compare", "margin", "module", "text")}
                for r in a["reasons"]
            ],
        }
    return {
        "adapters": rows,
        "flagged": sorted(report["flagged"]),
        "plain_audit": {"exit": rc, "error": plain if rc else None},
        "plain_same_flags": (sorted(plain["flagged"]) == sorted(report["flagged"])) if rc == 0 else None,
        "modules": len(report.get("modules") or []),
        "dropped_modules": report.get("dropped_modules"),
        "shared_rank": report.get("shared_rank"),
        "notes": report.get("notes"),
        "seconds": round(seconds, 2),
    }


@torch.no_grad()
def union_mean(scorer: merge_quality.Scorer, names: list[str]) -> torch.nn.Module:
    """The base plus the mean of the adapters' full updates on every module any of them targets (an adapter
    that does not target a module adds zero there): the honest oracle no module intersection limits."""
    base = scorer.base.state_dict()
    total = {k: torch.zeros_like(v) for k, v in base.items()}
    for name in names:
        model, _ = scorer.load(scorer.pool / name)
        merged = model.merge_and_unload().state_dict()
        for k in total:
            total[k] += merged[k] - base[k]
    out = copy.deepcopy(scorer.base)
    out.load_state_dict({k: base[k] + total[k] / len(names) for k in base})
    out.eval()
    return out


def merges(pool: Path, local: bool) -> dict:
    """Accuracy on the honest clients' held-out strings: oracle, mean and clair's default merge (and local)."""
    scorer = merge_quality.Scorer(pool)
    adapters = scorer.manifest["adapters"]
    benign = sorted(n for n, a in adapters.items() if not a["contaminated"])
    out: dict[str, dict] = {}
    if local:
        row, problems = scorer.score_local()
        out["local"] = {"accuracy": row["accuracy"], "problems": problems}
        out["base"] = {"accuracy": scorer.score_base()["accuracy"]}
        out["oracle-union"] = {"accuracy": scorer.score_shared(union_mean(scorer, benign))["accuracy"]}
    with tempfile.TemporaryDirectory(prefix="clair-mr-") as tmp:
        work = Path(tmp)
        for method in MERGES:
            source = merge_quality.benign_only(pool, benign, work) if method == "oracle" else pool
            extra = ["--intersect"] + ([] if method == "clair" else ["--method", "mean"])
            dest = work / method
            rc, text, seconds = merge_quality.run_merge(source, dest, extra, False, merge_quality.REPO)
            if rc != 0:
                out[method] = {"missing": f"exit {rc}: {text[-300:]}"}
                continue
            try:
                model, problems = scorer.load(dest)
            except Exception as exc:  # a merged adapter PEFT cannot load is a finding
                out[method] = {"missing": f"PEFT failed to load: {type(exc).__name__}: {exc}"[:300]}
                continue
            row = scorer.score_shared(model)
            out[method] = {"accuracy": row["accuracy"], "backdoor": row["backdoor"], "seconds": round(seconds, 2)}
            if problems:
                out[method]["problems"] = problems
    return out


# -- report --------------------------------------------------------------------------------


def _frac(k: int, n: int) -> str:
    return f"{k}/{n}" if n else "-"


def _wilson_cell(k: int, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"{k}/{n} ({100 * k / n:.1f} %, [{100 * lo:.1f}, {100 * hi:.1f}])" if n else "-"


def honest_rows(results: list[dict], recipes: str, pool: str | None = None) -> list[tuple[dict, dict]]:
    return [
        (r, a)
        for r in results
        if r["recipes"] == recipes and (pool is None or r["pool"] == pool)
        for a in r["audit"]["adapters"].values()
        if a["kind"] == "benign"
    ]


def tables(results: list[dict]) -> str:
    task_names = list(dict.fromkeys(r["task"] for r in results))
    lines = honest_table(results, task_names) + caught_table(results) + modules_table(results)
    if any("merge" in r for r in results):
        lines += merge_table(results, task_names)
    return "\n".join(lines + flags_table(results) + by_property(results))


def honest_table(results: list[dict], task_names: list[str]) -> list[str]:
    lines = [
        "### Honest adapters flagged (count / audited, Wilson 95 % interval)",
        "",
        "| recipes | pool | honest flagged | " + " | ".join(task_names) + " | pools with an honest flag |",
        "|---|---|---:|" + "---:|" * len(task_names) + "---:|",
    ]
    for recipes in RECIPE_SETS:
        for pool in [*POOLS, None]:
            rows = honest_rows(results, recipes, pool)
            sel = [r for r in results if r["recipes"] == recipes and (pool is None or r["pool"] == pool)]
            per_task = []
            for t in task_names:
                rt = [a for r, a in rows if r["task"] == t]
                per_task.append(_frac(sum(a["flagged"] for a in rt), len(rt)))
            with_flag = sum(
                any(a["flagged"] and a["kind"] == "benign" for a in r["audit"]["adapters"].values()) for r in sel
            )
            lines.append(
                f"| {recipes} | {pool or 'all'} | {_wilson_cell(sum(a['flagged'] for _, a in rows), len(rows))} | "
                + " | ".join(per_task)
                + f" | {with_flag}/{len(sel)} |"
            )
    return lines


def modules_table(results: list[dict]) -> list[str]:
    """Pools the plain audit refuses (adapters targeting different modules), and what --intersect analyses."""
    lines = [
        "",
        "### Plain audit (no --intersect) and the modules analysed with --intersect",
        "",
        "| recipes | pools | refused without --intersect | modules analysed (of 8) | plain audit flags the same |",
        "|---|---:|---:|---|---:|",
    ]
    for recipes in RECIPE_SETS:
        sel = [r["audit"] for r in results if r["recipes"] == recipes]
        if not sel:
            continue
        refused = sum(a["plain_audit"]["exit"] != 0 for a in sel)
        modules = Counter(a["modules"] for a in sel)
        same = [a["plain_same_flags"] for a in sel if a["plain_same_flags"] is not None]
        lines.append(
            f"| {recipes} | {len(sel)} | {refused} | "
            + ", ".join(f"{m}: {c} pools" for m, c in sorted(modules.items()))
            + f" | {_frac(sum(same), len(same))} |"
        )
    return lines


def caught_table(results: list[dict]) -> list[str]:
    kinds = [k for _, _, k in CONTAMINATED]
    lines = [
        "",
        "### Contaminated adapters caught (count / total, over tasks and seeds)",
        "",
        "| recipes | " + " | ".join(kinds) + " | all |",
        "|---|" + "---:|" * (len(kinds) + 1),
    ]
    for recipes in RECIPE_SETS:
        bad = [
            a
            for r in results
            if r["recipes"] == recipes
            for a in r["audit"]["adapters"].values()
            if a["kind"] != "benign"
        ]
        cells = [
            _frac(sum(a["flagged"] for a in bad if a["kind"] == k), sum(a["kind"] == k for a in bad)) for k in kinds
        ]
        lines.append(f"| {recipes} | " + " | ".join(cells) + f" | {_frac(sum(a['flagged'] for a in bad), len(bad))} |")
    return lines


def merge_table(results: list[dict], task_names: list[str]) -> list[str]:
    lines = [
        "",
        "### Merge accuracy on the honest clients' held-out strings (mean over seeds [min, max])",
        "",
        "| task | pool | recipes | base | local | oracle (union of modules) | oracle | mean | clair | clair - oracle "
        "| backdoor: mean / clair |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in task_names:
        for pool in POOLS:
            for recipes in RECIPE_SETS:
                sel = [
                    r for r in results if (r["task"], r["pool"], r["recipes"]) == (t, pool, recipes) and "merge" in r
                ]
                if not sel:
                    continue

                def acc(method: str, sel: list[dict] = sel) -> list[float]:
                    return [r["merge"][method]["accuracy"] for r in sel if "accuracy" in r["merge"].get(method, {})]

                def cell(values: list[float], n: int = len(sel)) -> str:
                    if len(values) < n:
                        return "missing"
                    return f"{statistics.fmean(values):.3f} [{min(values):.3f}, {max(values):.3f}]"

                gap = [c - o for c, o in zip(acc("clair"), acc("oracle"), strict=False)]
                bd = ""
                if pool == "contam-a":
                    b_mean = [r["merge"]["mean"].get("backdoor") for r in sel]
                    b_clair = [r["merge"]["clair"].get("backdoor") for r in sel]
                    if None not in b_mean + b_clair:
                        bd = f"{statistics.fmean(b_mean):.3f} / {statistics.fmean(b_clair):.3f}"
                clean = [cell(acc(m)) if pool == "clean" else "" for m in ("base", "local", "oracle-union")]
                lines.append(
                    f"| {t} | {pool} | {recipes} | {' | '.join(clean)} | {cell(acc('oracle'))} | {cell(acc('mean'))} | "
                    f"{cell(acc('clair'))} | {cell(gap)} | {bd} |"
                )
    return lines


def flags_table(results: list[dict]) -> list[str]:
    lines = [
        "",
        "### Every honest flag",
        "",
        "| recipes | pool | task | seed | client | recipe | rules (value vs threshold) |",
        "|---|---|---|---:|---|---|---|",
    ]
    for r in results:
        for a in r["audit"]["adapters"].values():
            if a["kind"] == "benign" and a["flagged"]:
                rules = "; ".join(
                    f"{x['rule']}{'/' + x['kind'] if x['kind'] != x['rule'] else ''} "
                    f"{_num(x['value'])} {x['compare']} {_num(x['threshold'])}"
                    + (f" ({x['module'].removeprefix('transformer.')})" if x.get("module") else "")
                    for x in a["reasons"]
                )
                lines.append(
                    f"| {r['recipes']} | {r['pool']} | {r['task']} | {r['seed']} | {a['client']} | "
                    f"{Recipe(**(a['recipe'] | {'targets': tuple(a['recipe']['targets'])})).label()} | {rules} |"
                )
    return lines + [""]


def _num(x: object) -> str:
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def by_property(results: list[dict]) -> list[str]:
    """Honest adapters flagged by recipe property (every audit of every pool), per mixed recipe set."""
    sets = [x for x in RECIPE_SETS[1:] if honest_rows(results, x)]
    if not sets:
        return []
    props = {
        "rank": lambda rc: rc["rank"],
        "alpha / r": lambda rc: rc["alpha"] // rc["rank"],
        "rsLoRA": lambda rc: rc["use_rslora"],
        "scale": lambda rc: round(rc["alpha"] / (math.sqrt(rc["rank"]) if rc["use_rslora"] else rc["rank"]), 2),
        "steps": lambda rc: rc["steps"],
        "lr": lambda rc: "< 2.2e-3" if rc["lr"] < 2.236e-3 else ">= 2.2e-3",
        "targets": lambda rc: "+".join(t.removeprefix("c_") for t in rc["targets"]),
    }
    lines = [
        "### Mixed-recipe honest adapters flagged, by recipe property (all pools)",
        "",
        "| property | value |" + "".join(f" {x} flagged |" for x in sets),
        "|---|---|" + "---:|" * len(sets),
    ]
    for prop, fn in props.items():
        groups: dict = {}
        for k, x in enumerate(sets):
            for _, a in honest_rows(results, x):
                groups.setdefault(fn(a["recipe"]), [[] for _ in sets])[k].append(a["flagged"])
        for value in sorted(groups, key=str):
            cells = [_frac(sum(g), len(g)) for g in groups[value]]
            lines.append(f"| {prop} | {value} | " + " | ".join(cells) + " |")
    return lines


# -- why: one recipe property changed at a time ------------------------------------------


def variants(recipe: Recipe) -> dict[str, Recipe]:
    """A flagged honest client's recipe with one property changed at a time (and the uniform recipe)."""
    return {
        "as drawn": recipe,
        "scale 2 (alpha 2r, no rsLoRA)": replace(recipe, alpha=2 * recipe.rank, use_rslora=False),
        "rank 4, same scale": replace(recipe, rank=4, alpha=round(recipe.scale * 4), use_rslora=False),
        "lr 1e-3": replace(recipe, lr=1e-3),
        "steps 75": replace(recipe, steps=75),
        "uniform recipe": UNIFORM,
    }


def why(results: list[dict], log=print) -> list[dict]:
    """For every honest client of a mixed recipe set flagged somewhere (the first pool that flags it): retrain it
    with each of :func:`variants` (same strings, training and initialisation seeds), put it in its slot of that
    pool and audit again (--intersect). One training run per variant: a single draw each."""
    rows, seen = [], set()
    for r in results:
        if r["recipes"] == "uniform":
            continue
        for slot, a in r["audit"]["adapters"].items():
            key = (r["recipes"], r["task"], r["seed"], a["client"])
            if a["kind"] != "benign" or not a["flagged"] or key in seen:
                continue
            seen.add(key)
            pool = Path(r["path"])
            task = tasks.TASKS[r["task"]]
            t_index = list(tasks.TASKS).index(r["task"])
            i = int(a["client"][1:]) - 1
            g = torch.Generator().manual_seed(1000 * r["seed"] + 100 * t_index + 7)
            for _ in range(i + 1):  # the client's strings: trained_pools' benign generator replayed
                _, data = client_data(tasks.World.make(r["seed"]), task, "benign", g)
            base = train.load_base(pool / "base_model")
            drawn = Recipe(**(a["recipe"] | {"targets": tuple(a["recipe"]["targets"])}))
            for label, recipe in variants(drawn).items():
                with tempfile.TemporaryDirectory(prefix="mixedrec-why-") as tmp:
                    copy_ = Path(tmp) / pool.name
                    shutil.copytree(pool, copy_)
                    shutil.rmtree(copy_ / slot)
                    fit(
                        base,
                        recipe,
                        r["seed"],
                        data,
                        10_000 * r["seed"] + 100 * t_index + i,
                        "benign",
                        task.prompt_len,
                        copy_ / slot,
                    )
                    rc, report, _ = run_clair(copy_, ["--intersect"])
                if rc != 0 or not isinstance(report, dict):
                    raise RuntimeError(f"clair audit of {pool.name} with {label} failed: {report}")
                v = next(x for x in report["adapters"] if x["name"] == slot)
                rows.append(
                    {
                        "recipes": r["recipes"],
                        "task": r["task"],
                        "seed": r["seed"],
                        "pool": r["pool"],
                        "client": a["client"],
                        "variant": label,
                        "recipe": asdict(recipe),
                        "flagged": bool(v["flagged"]),
                        "score": v["score"],
                        "norm": v["norm"],
                        "rules": sorted({x["rule"] for x in v["reasons"]}),
                        "signals": {k: v["signals"].get(k) for k in ("direction", "off_subspace", "joint", "module")},
                    }
                )
                name = f"{r['task']}-s{r['seed']}-{r['recipes']}-{r['pool']}"
                log(f"why {name} {a['client']} {label}: flagged {rows[-1]['flagged']}")
    return rows


def why_table(rows: list[dict]) -> str:
    lines = [
        "### Flagged honest clients retrained with one recipe property changed (same pool, same data and seeds)",
        "",
        "| recipes | task | seed | pool | client | variant | recipe | flagged | score | norm / median | rules |",
        "|---|---|---:|---|---|---|---|---|---:|---:|---|",
    ]
    for w in rows:
        recipe = Recipe(**(w["recipe"] | {"targets": tuple(w["recipe"]["targets"])})).label()
        lines.append(
            f"| {w['recipes']} | {w['task']} | {w['seed']} | {w['pool']} | {w['client']} | {w['variant']} | {recipe} | "
            f"{'yes' if w['flagged'] else 'no'} | {w['score']:.2f} | {w['norm']:.2f} | {', '.join(w['rules']) or '-'} |"
        )
    lines += ["", "| variant | still flagged |", "|---|---:|"]
    for label in dict.fromkeys(w["variant"] for w in rows):
        sel = [w["flagged"] for w in rows if w["variant"] == label]
        lines.append(f"| {label} | {_frac(sum(sel), len(sel))} |")
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------------


def run(trained: Path, cache: Path, seeds: list[int], task_names: list[str], merge: bool, log=print) -> list[dict]:
    results = []
    start = time.perf_counter()
    for task_name in task_names:
        for seed in seeds:
            sets = {"uniform": uniform_clients(trained, task_name, seed)}
            for recipes in RECIPE_SETS[1:]:
                where = train_mixed(trained, cache, task_name, seed, recipes == "mixed-full", log)
                info = json.loads((where / "CLIENTS.json").read_text())
                sets[recipes] = {n: (where / n, i) for n, i in info.items()}
            for recipes, clients in sets.items():
                for pool in POOLS:
                    path = write_pool(trained, cache, recipes, task_name, seed, pool, clients)
                    row = {"task": task_name, "seed": seed, "recipes": recipes, "pool": pool, "path": str(path)}
                    row["audit"] = audit(path)
                    if merge:
                        row["merge"] = merges(path, local=pool == "clean")
                    results.append(row)
                    honest = [
                        a["client"] for a in row["audit"]["adapters"].values() if a["flagged"] and a["kind"] == "benign"
                    ]
                    log(
                        f"{path.name}: flagged {len(row['audit']['flagged'])}, honest {honest or '-'}"
                        f" ({time.perf_counter() - start:.0f} s)"
                    )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mixed_recipes", description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=len(trained_pools.DEFAULT_SEEDS), help="seeds 0..N-1")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "mixedrec-cache")
    parser.add_argument(
        "--trained", type=Path, default=trained_pools.default_cache(), help="benchmarks/trained_pools.py's cache"
    )
    parser.add_argument("--tasks", default=",".join(tasks.TASKS), help="comma-separated task names")
    parser.add_argument("--no-merge", action="store_true", help="audits only (no merge accuracy)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/mixed_recipes.json"))
    parser.add_argument(
        "--why",
        action="store_true",
        help="instead: read --out's results and retrain each flagged honest client with one recipe property "
        "changed at a time (writes OUT_why.json and .md next to --out)",
    )
    args = parser.parse_args(argv)
    trained_pools.configure_torch()
    if args.why:
        start = time.perf_counter()
        rows = why(json.loads(args.out.read_text())["results"], trained_pools.log_err)
        text = why_table(rows)
        print(text)
        out = args.out.with_name(args.out.stem + "_why.json")
        trained_pools.write_results(out, {"wall_seconds": round(time.perf_counter() - start, 1), "rows": rows}, start)
        out.with_suffix(".md").write_text(
            f"<!-- python -m benchmarks.mixed_recipes --why ({time.perf_counter() - start:.0f} s) -->\n\n{text}\n"
        )
        return 0
    start = time.perf_counter()
    seeds = list(range(args.seeds))
    task_names = args.tasks.split(",")
    # The uniform pools' clients and base models: generated by trained_pools where missing.
    trained_pools.generate(args.trained, seeds, task_names, ["clean", "mixed", "poisoning"], trained_pools.log_err)
    results = run(
        args.trained.resolve(), args.cache.resolve(), seeds, task_names, not args.no_merge, trained_pools.log_err
    )
    text = tables(results)
    print(text)
    payload = {
        "benchmark": "honest adapters trained with different recipes (benchmarks/mixed_recipes.py)",
        "seeds": seeds,
        "tasks": task_names,
        "pools": {p: list(k) for p, k in POOLS.items()},
        "recipe_spread": {
            "rank": RANKS,
            "alpha_factors": ALPHA_FACTORS,
            "rslora_share": RSLORA_SHARE,
            "lr_log_uniform": LR_RANGE,
            "steps": STEPS,
            "targets": {"all": ALL_TARGETS, "share_all": ALL_TARGETS_SHARE, "subsets": TARGET_SUBSETS},
            "batch": BATCH,
        },
        "uniform_recipe": asdict(UNIFORM),
        "clair": "python -m clair_cli audit POOL --json - --exit-zero --quiet (defaults)",
        "clair_source": merge_quality.clair_source(merge_quality.REPO),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "results": results,
    }
    trained_pools.write_results(args.out, payload, start)
    args.out.with_suffix(".md").write_text(
        f"<!-- python -m benchmarks.mixed_recipes --seeds {args.seeds}"
        f"{' --no-merge' if args.no_merge else ''} ({payload['wall_seconds']:.0f} s) -->\n\n{text}\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
