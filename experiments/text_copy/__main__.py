"""The paper's text-copying experiment with real LoRA training (``make experiment``).

    python -m experiments.text_copy --out experiments/text_copy/results --samples sample_adapters

1. Pretrain a tiny GPT-2 (2 layers, width 64) on free text and cipher transduction.
2. Fine-tune LoRA clients with PEFT from one broadcast initialisation: benign clients copy,
   contaminated ones learn reversed / shifted / random / backdoored targets.
3. Score every aggregation method on each benign client's held-out strings, plus clair's
   detection precision and recall; sweep the number of contaminated clients and the data
   per client.
4. Write results.json, results.md and spectrum.png under --out; with --samples, write the
   main pool, its base model and MANIFEST.json there.

Seeded and deterministic on one machine (torch runs with 2 threads).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from clair_cli.io.writers import AtomicDir

from . import evaluate, task, train

BASE_NAME = "sample_adapters/base_model"
N_BENIGN = 12
MAIN_DATA = 64
DATA_SWEEP = (4, 16, 64)
CONTAMINATION_SWEEP = (0, 4, 8)
HETEROGENEITY = 10.0  # Dirichlet concentration of the clients' symbol frequencies
TEST_STRINGS = 256
PRETRAIN_STEPS = 3000
FIXED_RANKS = (4, 8, 16)  # main pool only: clair's projection at a fixed rank (--project-rank N)
FIELDS = ("symbol", "sequence", "backdoor")
ORACLE = "oracle mean (benign only)"


@dataclass
class Client:
    name: str
    kind: str
    directory: Path
    test: torch.Tensor | None  # held-out strings of a benign client


def train_clients(
    trainer: train.ClientTrainer, kinds: list[str], n: int, seed: int, out: Path, start: int = 1
) -> list[Client]:
    g = torch.Generator().manual_seed(seed)
    clients = []
    for i, kind in enumerate(kinds):
        freq = task.client_frequencies(HETEROGENEITY, g)
        data = task.client_dataset(kind, freq, n, g)
        test = task.client_dataset("benign", freq, TEST_STRINGS, g) if kind == "benign" else None
        name = f"client_{start + i:02d}"
        state = trainer.train(data, seed * 1000 + start + i)
        trainer.save(state, out / name)
        clients.append(Client(name, kind, out / name, test))
    return clients


def score_pool(evaluator: evaluate.Evaluator, clients: list[Client], fixed_ranks: tuple[int, ...] = ()) -> dict:
    """Every method on one pool: mean scores over the benign clients, and clair's detection."""
    benign = [c for c in clients if c.kind == "benign"]
    res = evaluate.pool_methods(
        evaluator.model, [c.directory for c in clients], [c.name for c in benign], fixed_ranks=fixed_ranks
    )
    sets = {c.name: (c.test, evaluate.triggered_copy(c.test)) for c in benign if c.test is not None}

    def mean_scores(per_client: dict[str, evaluate.Deltas]) -> dict[str, float]:
        scores = [evaluator.scores(per_client[name], *sets[name]) for name in sets]
        return {f: sum(getattr(s, f) for s in scores) / len(scores) for f in ("symbol", "sequence", "backdoor")}

    rows = {"base model (no adapter)": mean_scores(dict.fromkeys(sets, {}))}
    rows.update({method: mean_scores(per_client) for method, per_client in res.methods.items()})
    contaminated = {c.name for c in clients if c.kind != "benign"}
    flagged = set(res.flagged)
    return {
        "clients": {c.name: c.kind for c in clients},
        "flagged": sorted(flagged),
        "caught": [len(flagged & contaminated), len(contaminated)],
        "benign_flagged": [len(flagged - contaminated), len(benign)],
        "shared_rank": res.shared_rank,
        "methods": rows,
        "notes": res.notes,
    }


def benign_spectra(clients: list[Client]) -> dict[str, list[float]]:
    """Per module, singular values of the stacked unit-norm benign updates (output side), descending."""
    from clair_cli import pipeline
    from clair_cli.core.decompose import normalise_blocks
    from clair_cli.core.reduction import reduce_module
    from clair_cli.io.sources import open_adapters

    benign = [str(c.directory) for c in clients if c.kind == "benign"]
    pool = pipeline.build_pool(open_adapters(benign))
    out = {}
    for mod in pipeline.iter_modules(pool):
        stack = reduce_module(mod.A, mod.B, mod.scales, "out")
        Y, _ = normalise_blocks(stack.G.double(), stack.offsets)
        out[mod.name] = [round(float(s), 4) for s in torch.linalg.svdvals(Y)]
    return out


def _spread(values: list[float]) -> str:
    """Mean over seeds, with the range when there is more than one seed."""
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.3f}"
    return f"{mean:.3f} [{min(values):.3f}, {max(values):.3f}]"


def _summed(runs: list[dict], key: str, field: str) -> list[int]:
    pairs = [run["scenarios"][key][field] for run in runs]
    return [sum(p[0] for p in pairs), sum(p[1] for p in pairs)]


SWEEP_COLUMNS = ("local", "mean", "multi-krum", "clair-merged", "clair-merged --project", "clair-refined")


def markdown(runs: list[dict]) -> str:
    """The tables: mean over the training seeds, [min, max] across them."""
    seeds = [run["seed"] for run in runs]
    main = runs[0]["scenarios"]["main"]
    over = f"{len(seeds)} training seeds ({', '.join(map(str, seeds))})" if len(seeds) > 1 else f"seed {seeds[0]}"
    lines = [
        f"Benign-client held-out accuracy, {main['setup']}; mean over the {N_BENIGN} benign clients, "
        f"then over {over}: mean [min, max].",
        "",
        "| method | symbol accuracy | strings copied exactly | backdoor success |",
        "|---|---:|---:|---:|",
    ]
    for method in main["methods"]:
        cells = [_spread([run["scenarios"]["main"]["methods"][method][f] for run in runs]) for f in FIELDS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    caught = _summed(runs, "main", "caught")
    benign = _summed(runs, "main", "benign_flagged")
    lines += [
        "",
        f"clair detection over the seeds: contaminated caught {_ratio(caught)}, benign flagged {_ratio(benign)}; "
        f"flagged per seed: {'; '.join(', '.join(run['scenarios']['main']['flagged']) or 'none' for run in runs)}.",
        "",
        "Differences from the plain mean and the oracle (benign-only mean), symbol accuracy, per seed:",
        "",
        "| pool | clair-merged - mean | clair-merged - oracle | clair-merged --project - mean |",
        "|---|---|---|---|",
    ]
    for key, sc in runs[0]["scenarios"].items():
        diffs = []
        for a, b in (("clair-merged", "mean"), ("clair-merged", ORACLE), ("clair-merged --project", "mean")):
            d = [
                run["scenarios"][key]["methods"][a]["symbol"] - run["scenarios"][key]["methods"][b]["symbol"]
                for run in runs
            ]
            diffs.append(", ".join(f"{x:+.3f}" for x in d))
        lines.append(f"| {sc['setup']} | " + " | ".join(diffs) + " |")
    lines += [
        "",
        "Sweeps (symbol accuracy, mean [min, max] over the seeds; clair's detection summed over the seeds):",
        "",
        "| pool | " + " | ".join(SWEEP_COLUMNS) + " | oracle | caught | benign flagged |",
        "|---|" + "---:|" * (len(SWEEP_COLUMNS) + 3),
    ]
    for key, sc in runs[0]["scenarios"].items():
        cells = [
            _spread([run["scenarios"][key]["methods"][m]["symbol"] for run in runs]) for m in (*SWEEP_COLUMNS, ORACLE)
        ]
        lines.append(
            f"| {sc['setup']} | "
            + " | ".join(cells)
            + f" | {_ratio(_summed(runs, key, 'caught'))} | {_ratio(_summed(runs, key, 'benign_flagged'))} |"
        )
    return "\n".join(lines) + "\n"


def _ratio(pair: list[int]) -> str:
    return f"{pair[0]}/{pair[1]}"


def plot_spectra(spectra: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, s in spectra.items():
        energy = torch.tensor(s) ** 2
        ax.plot(range(1, len(s) + 1), (energy / energy.sum()).tolist(), marker=".", label=name)
    ax.set_xlabel("singular value index")
    ax.set_ylabel("share of energy")
    ax.set_yscale("log")
    ax.set_title(f"Stacked benign LoRA updates ({N_BENIGN} clients, unit norm, output side)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_samples(base_dir: Path, clients: list[Client], target: Path, setup: str) -> None:
    """Replace ``target`` with the main pool, its base model and MANIFEST.json (atomically)."""
    with AtomicDir(target, force=True) as tmp:
        tmp.chmod(0o755)
        shutil.copytree(base_dir, tmp / "base_model")
        for c in clients:
            shutil.copytree(c.directory, tmp / c.name)
        manifest = {
            "base_model": BASE_NAME,
            "base_model_dir": "base_model",
            "task": "text copying (BOS x SEP_COPY x EOS)",
            "generator": "python -m experiments.text_copy (make experiment)",
            "setup": setup,
            "adapters": {c.name: {"contaminated": c.kind != "benign", "kind": c.kind} for c in clients},
        }
        (tmp / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")


def run_seed(seed: int, samples: Path | None) -> dict:
    """One training seed: pretrain, train every pool, score every method; with ``samples``,
    write the main pool there."""
    start = time.perf_counter()
    setup = train.LoraSetup()
    language = task.Language.make(seed)
    with tempfile.TemporaryDirectory(prefix="clair-text-copy-") as work_dir:
        work = Path(work_dir)
        base = train.pretrain(language, PRETRAIN_STEPS, seed)
        train.save_base(base, work / "base_model", "Tiny GPT-2 pretrained by experiments/text_copy (not on copying).")
        log(f"seed {seed}: pretrained the base model ({time.perf_counter() - start:.0f} s)")
        base = train.load_base(work / "base_model")
        trainer = train.ClientTrainer(base, setup, seed, BASE_NAME)
        pools: dict[str, tuple[str, list[Client]]] = {}
        for n in DATA_SWEEP:
            kinds = ["benign"] * N_BENIGN + list(task.CONTAMINATIONS)
            clients = train_clients(trainer, kinds, n, seed + n, work / f"n{n}")
            pools[f"n{n}"] = (f"{n} strings per client, 4 of 16 contaminated", clients)
            log(
                f"seed {seed}: trained {len(clients)} clients on {n} strings each ({time.perf_counter() - start:.0f} s)"
            )
        main_clients = pools[f"n{MAIN_DATA}"][1]
        extra = train_clients(
            trainer, list(task.CONTAMINATIONS), MAIN_DATA, seed + 1000, work / "extra", start=len(main_clients) + 1
        )
        benign = [c for c in main_clients if c.kind == "benign"]
        for c in CONTAMINATION_SWEEP:
            if c == len(task.CONTAMINATIONS):
                continue  # the main pool
            chosen = benign + ([] if c == 0 else main_clients[N_BENIGN:] + extra)
            pools[f"c{c}"] = (f"{MAIN_DATA} strings per client, {c} of {len(chosen)} contaminated", chosen)
        evaluator = evaluate.Evaluator(train.load_base(work / "base_model"))
        scenarios = {}
        order = ["main"] + [k for k in pools if k != f"n{MAIN_DATA}"]
        for key in order:
            label, clients = pools[f"n{MAIN_DATA}"] if key == "main" else pools[key]
            ranks = FIXED_RANKS if key == "main" else ()
            scenarios[key] = {"setup": label, **score_pool(evaluator, clients, ranks)}
            log(f"seed {seed}: scored {key}: {label} ({time.perf_counter() - start:.0f} s)")
        result = {
            "seed": seed,
            "lora": asdict(setup),
            "scenarios": scenarios,
            "benign_spectra": benign_spectra(main_clients),
        }
        if samples is not None:
            write_samples(work / "base_model", main_clients, samples, pools[f"n{MAIN_DATA}"][0])
    return result


def score_samples(directory: Path, seed: int = 0) -> dict:
    """Every method on an existing pool written by this experiment (``sample_adapters/``).

    Training differs in its last bits between CPUs, and that grows into different adapters,
    so a re-run on another machine does not reproduce the committed pool; its data does (the
    generators are torch's, deterministic everywhere). This rebuilds each benign client's
    held-out strings exactly as :func:`train_clients` drew them for the main pool of ``seed``
    and scores the pool's own adapters against its own base model.
    """
    manifest = json.loads((directory / "MANIFEST.json").read_text())
    g = torch.Generator().manual_seed(seed + MAIN_DATA)
    clients = []
    for name, info in manifest["adapters"].items():
        freq = task.client_frequencies(HETEROGENEITY, g)
        task.client_dataset(info["kind"], freq, MAIN_DATA, g)  # the training strings: drawn, not used
        test = task.client_dataset("benign", freq, TEST_STRINGS, g) if info["kind"] == "benign" else None
        clients.append(Client(name, info["kind"], directory / name, test))
    evaluator = evaluate.Evaluator(train.load_base(directory / manifest["base_model_dir"]))
    return {"setup": f"{directory.name}: {manifest['setup']}", **score_pool(evaluator, clients, FIXED_RANKS)}


def samples_markdown(result: dict) -> str:
    lines = [
        f"Benign-client held-out accuracy on the committed pool ({result['setup']}); "
        f"clair flagged {', '.join(result['flagged']) or 'none'} (contaminated caught "
        f"{_ratio(result['caught'])}, benign flagged {_ratio(result['benign_flagged'])}).",
        "",
        "| method | symbol accuracy | strings copied exactly | backdoor success |",
        "|---|---:|---:|---:|",
    ]
    for method, sc in result["methods"].items():
        lines.append(f"| {method} | " + " | ".join(f"{sc[f]:.3f}" for f in FIELDS) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.text_copy", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/text_copy/results"))
    parser.add_argument("--samples", type=Path, default=None, help="write the first seed's main pool here")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default 0 1 2)")
    parser.add_argument(
        "--score-samples",
        type=Path,
        default=None,
        help="only score the methods on this existing pool (sample_adapters)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    if args.score_samples is not None:
        result = score_samples(args.score_samples)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "samples.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "samples.md").write_text(samples_markdown(result))
        print(samples_markdown(result))
        log(f"wrote {args.out}/samples.* ({time.perf_counter() - start:.0f} s)")
        return 0
    runs = [run_seed(seed, args.samples if i == 0 else None) for i, seed in enumerate(args.seeds)]
    results = {
        "experiment": "text copying, LoRA clients of a tiny GPT-2",
        "seeds": args.seeds,
        "clients": {"benign": N_BENIGN, "contaminated_kinds": list(task.CONTAMINATIONS)},
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(runs))
    plot_spectra(runs[0]["benign_spectra"], args.out / "spectrum.png")
    print(markdown(runs))
    log(f"wrote {args.out}{' and ' + str(args.samples) if args.samples else ''} ({time.perf_counter() - start:.0f} s)")
    return 0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
