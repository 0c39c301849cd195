"""Per-module cost of the audit on MoE-shaped pools: thousands of small expert modules.

    python -m benchmarks.moe                        # K = 8 adapters, 1,000 and 10,000 expert modules
    python -m benchmarks.moe --modules 1000 --k 8 --runs 3
    python -m benchmarks.moe --modules 10000 --k 1 --named --inspect   # a merged adapter read back

``--named``: each config names its modules as ``clair merge`` writes them, one alternation of exact
names in ``target_modules`` (``exact_targets``), instead of ``["down_proj"]``; ``--inspect`` times
``clair inspect`` of the first adapter instead of the pool's audit.

Each adapter holds ``--modules`` LoRA modules named like a MoE model's experts
(``model.layers.L.mlp.experts.E.down_proj``, 64 experts a layer), 64 x 64, rank 4, bfloat16:
the shape of today's open MoE adapters, where the per-module overhead, not the arithmetic,
sets the time. Two adapters carry a shared direction pushed ten times harder (contaminated),
so the audit has something to find. ``clair audit`` runs as a separate process (the command
line's one thread); the table gives its wall time, the time per module, per module and
adapter, and its peak resident memory (medians of ``--runs``; each run a fresh process).
The start-up (Python, torch, the CLI) is measured apart and taken off the per-module figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.perf import CLAIR, timed

EXPERTS_PER_LAYER = 64
WIDTH = 64
RANK = 4


def generate(out: Path, k: int, modules: int, seed: int = 0, named: bool = False) -> Path:
    """Write ``k`` PEFT adapters of ``modules`` expert modules each into ``out`` (``named``: their
    config's ``target_modules`` the alternation of their names that ``clair merge`` writes)."""
    import torch
    from safetensors.torch import save_file

    from clair_cli.io.lora_config import exact_targets

    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(WIDTH, 1, generator=g)
    for a in range(k):
        tensors = {}
        names = []
        for i in range(modules):
            name = f"model.layers.{i // EXPERTS_PER_LAYER}.mlp.experts.{i % EXPERTS_PER_LAYER}.down_proj"
            names.append(name)
            A = torch.randn(RANK, WIDTH, generator=g)
            B = torch.randn(WIDTH, RANK, generator=g)
            B[:, :1] += (10.0 if a >= k - 2 else 1.0) * shared
            tensors[f"base_model.model.{name}.lora_A.weight"] = A.to(torch.bfloat16)
            tensors[f"base_model.model.{name}.lora_B.weight"] = B.to(torch.bfloat16)
        directory = out / f"adapter_{a:03d}"
        directory.mkdir(parents=True, exist_ok=True)
        save_file(tensors, directory / "adapter_model.safetensors")
        config = {
            "peft_type": "LORA",
            "base_model_name_or_path": "moe-bench",
            "r": RANK,
            "lora_alpha": 2 * RANK,
            "target_modules": exact_targets(names) if named else ["down_proj"],
        }
        (directory / "adapter_config.json").write_text(json.dumps(config))
    return out


def measure(pool: Path, k: int, modules: int, runs: int, inspect: bool = False) -> dict:
    start = timed([sys.executable, "-c", "import torch, clair_cli.cli"], runs)["wall_s"]
    limit = ["--max-modules", str(modules)]
    if inspect:  # one adapter read back, its modules checked against its config
        k = 1
        command = [*CLAIR, "inspect", str(pool / "adapter_000"), "--json", "-", *limit]
    else:
        command = [*CLAIR, "audit", str(pool), "-q", "--exit-zero", *limit]
    audit = timed(command, runs)
    work = max(audit["wall_s"] - start, 0.0)
    return {
        "k": k,
        "modules": modules,
        "wall_s": audit["wall_s"],
        "startup_s": start,
        "ms_per_module": 1e3 * work / modules,
        "ms_per_module_adapter": 1e3 * work / (modules * k),
        "max_rss": audit["max_rss"],
        "runs": audit["runs"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=8, help="adapters (default 8)")
    parser.add_argument("--modules", type=int, nargs="+", default=[1000, 10000], help="expert modules per adapter")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--named", action="store_true", help="target_modules as clair merge writes it")
    parser.add_argument("--inspect", action="store_true", help="time clair inspect of one adapter")
    args = parser.parse_args(argv)
    rows = []
    work = Path(tempfile.mkdtemp(prefix="clair-moe-"))
    try:
        for n in args.modules:
            pool = generate(work / f"pool{n}", args.k, n, named=args.named)
            rows.append(measure(pool, args.k, n, args.runs, args.inspect))
            shutil.rmtree(pool)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("| adapters | modules | wall (s) | start-up (s) | ms / module | ms / module / adapter | peak RSS |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        spread = f" ({min(r['runs']):.1f}-{max(r['runs']):.1f})" if len(r["runs"]) > 1 else ""
        print(
            f"| {r['k']} | {r['modules']} | {statistics.median(r['runs']):.1f}{spread} | {r['startup_s']:.1f} | "
            f"{r['ms_per_module']:.1f} | {r['ms_per_module_adapter']:.2f} | {r['max_rss'] / 2**20:.0f} MiB |"
        )


if __name__ == "__main__":
    main()
