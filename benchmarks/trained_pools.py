"""Pools of really trained LoRA adapters with known contamination, on two tasks (benchmarks/tasks.py).

    python -m benchmarks.trained_pools [--seeds 3] [--cache DIR]

For each seed, one tiny GPT-2 (experiments/text_copy's architecture: 2 layers, width 64)
is pretrained on both task families (``tasks.World.pretraining_batch``), then PEFT LoRA
clients (r = 4, alpha = 8, on c_attn / c_proj / c_fc, one broadcast initialisation,
150 AdamW steps on 32 (revsucc) or 64 (majority) strings each; experiments/text_copy's ``ClientTrainer``) are
fine-tuned per task: 12 benign non-IID clients shared by every scenario, and the
contaminated clients of each scenario. Each (task, seed, scenario) becomes one pool
directory under the cache::

    CACHE/<task>-s<seed>-<scenario>/
        base_model/          the pretrained base (save_pretrained, safetensors)
        client_01/ ...       PEFT adapter directories (benign first, then contaminated)
        MANIFEST.json        {"task", "seed", "scenario", "adapters": {name: {"kind", "contaminated", ...}}, ...}

MANIFEST.json also records each client's data distribution and, for benign clients,
the seed of its held-out test set: ``test_sets(pool)`` rebuilds them. Existing pools
(with MANIFEST.json) are reused; a seed's pools are written all together (atomically).

Contamination kinds (``CONTAMINATIONS``): ``label_flip`` (every target rotated),
``backdoor`` (half the inputs start with a trigger and map to a fixed target),
``boosted_backdoor`` (a backdoor client's B x 8: model replacement), ``sign_flip``
(an honest client's B x -1), ``free_rider`` (an honest client's B x 1e-3),
``unrelated_task`` (trained on the other task), ``boosted`` (an honest client's B x 5),
``copy`` (an exact copy of another client's files).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from transformers import GPT2Config, GPT2LMHeadModel

from benchmarks import tasks
from clair_cli.io.writers import AtomicDir
from experiments.text_copy import train

BASE_NAME = "base_model"  # every adapter's base_model_name_or_path: the pool's base_model/ folder
N_BENIGN = 12
N_TRAIN = {"revsucc": 32, "majority": 64}  # strings per client
N_TEST = 256  # held-out strings per benign client
CONCENTRATION = {"revsucc": 0.5, "majority": 1.0}  # Dirichlet: symbol skew / label skew
PRETRAIN_STEPS = 1500
SETUP = train.LoraSetup()  # r = 4, alpha = 8, 150 steps, batch 16, lr 3e-3
BOOST = 5.0
REPLACEMENT_BOOST = 8.0
FREE_RIDER_SCALE = 1e-3
DEFAULT_SEEDS = (0, 1, 2)

# Scenarios: contaminated clients appended to the 12 benign ones. "copy>KIND" copies the
# first client of that kind in the pool ("copy>benign": client_01).
SCENARIOS: dict[str, tuple[str, ...]] = {
    "clean": (),
    "mixed": ("label_flip", "backdoor", "sign_flip", "free_rider", "unrelated_task"),
    "poisoning": ("boosted_backdoor", "copy>boosted_backdoor", "boosted", "boosted", "copy>benign"),
    "heavy": ("label_flip",) * 3 + ("backdoor",) * 3,
}


# -- model and training ------------------------------------------------------------------


def base_config() -> GPT2Config:
    """experiments/text_copy's GPT-2 (2 layers, width 64) on this benchmark's vocabulary."""
    config = train.base_config()
    config.vocab_size = tasks.VOCAB
    config.bos_token_id = tasks.BOS
    config.eos_token_id = config.pad_token_id = tasks.EOS
    return config


def lm_loss(model: torch.nn.Module, batch: torch.Tensor, prompt_len: torch.Tensor | int) -> torch.Tensor:
    """Next-token cross-entropy on the targets and EOS only (each row's first ``prompt_len`` tokens are context)."""
    logits = model(input_ids=batch).logits[:, :-1]
    labels = batch[:, 1:].clone()
    position = torch.arange(1, batch.shape[1]).unsqueeze(0)
    labels[(position < torch.as_tensor(prompt_len).reshape(-1, 1)).expand_as(labels)] = -100
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def pretrain(world: tasks.World, steps: int, seed: int, batch: int = 64, lr: float = 3e-3) -> GPT2LMHeadModel:
    """A fresh model trained on both task families, but never on the clients' tasks themselves."""
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(base_config())
    g = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * max(0.1, 1.0 - s / max(1, steps))
    )
    half = batch // 2  # pretraining_batch: transduction rows first, then majority rows
    prompt = torch.tensor(
        [tasks.TASKS["revsucc"].prompt_len] * half + [tasks.TASKS["majority"].prompt_len] * (batch - half)
    )
    model.train()
    for _ in range(steps):
        loss = lm_loss(model, world.pretraining_batch(batch, g), prompt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return model


class Trainer(train.ClientTrainer):
    """experiments/text_copy's client trainer (one broadcast LoRA init), with this benchmark's loss mask."""

    def train(self, data: torch.Tensor, seed: int, prompt_len: int = 0) -> dict[str, torch.Tensor]:  # type: ignore[override]
        set_peft_model_state_dict(self.model, self.initial)
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.setup.lr, weight_decay=0.0)
        g = torch.Generator().manual_seed(seed)
        self.model.train()
        for _ in range(self.setup.steps):
            idx = torch.randint(data.shape[0], (min(self.setup.batch, data.shape[0]),), generator=g)
            loss = lm_loss(self.model, data[idx], prompt_len)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        self.model.eval()
        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model).items()}

    def save(self, state: dict[str, torch.Tensor], directory: Path) -> None:
        super().save(state, directory)
        (directory / "README.md").write_text(
            f"---\nbase_model: {self.base_name}\nlibrary_name: peft\ntags:\n- lora\n- clair-benchmark\n---\n\n"
            "A LoRA client of clair's trained-pool benchmark (`python -m benchmarks.trained_pools`).\n"
            "MANIFEST.json in the parent directory says whether it is benign or contaminated.\n"
        )


# -- contaminations ----------------------------------------------------------------------


def scale_b(factor: float) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    def post(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v * factor if "lora_B" in k else v for k, v in state.items()}

    return post


@dataclass(frozen=True)
class Contamination:
    data: str  # tasks.Task.dataset kind: benign, label_flip or backdoor
    other_task: bool = False  # trained on the other task's data
    post: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None


CONTAMINATIONS: dict[str, Contamination] = {
    "benign": Contamination("benign"),
    "label_flip": Contamination("label_flip"),
    "backdoor": Contamination("backdoor"),
    "boosted_backdoor": Contamination("backdoor", post=scale_b(REPLACEMENT_BOOST)),
    "sign_flip": Contamination("benign", post=scale_b(-1.0)),
    "free_rider": Contamination("benign", post=scale_b(FREE_RIDER_SCALE)),
    "unrelated_task": Contamination("benign", other_task=True),
    "boosted": Contamination("benign", post=scale_b(BOOST)),
    # "copy" has no training: see SCENARIOS.
}


@dataclass
class Client:
    name: str
    kind: str
    directory: Path
    info: dict  # MANIFEST entry


def train_client(
    trainer: Trainer,
    world: tasks.World,
    task: tasks.Task,
    kind: str,
    g: torch.Generator,
    train_seed: int,
    directory: Path,
) -> dict:
    """Train one client of ``kind`` (its own data distribution from ``g``) and save it; return its MANIFEST entry."""
    spec = CONTAMINATIONS[kind]
    data_task = tasks.other_task(task.name) if spec.other_task else task
    dist = data_task.distribution(CONCENTRATION[data_task.name], g)
    data = data_task.dataset(world, dist, N_TRAIN[data_task.name], g, spec.data)
    state = trainer.train(data, train_seed, data_task.prompt_len)
    if spec.post is not None:
        state = spec.post(state)
    trainer.save(state, directory)
    info = {"kind": kind, "contaminated": kind != "benign", "data_task": data_task.name, "distribution": dist}
    if kind == "benign":
        info["test_seed"] = int(torch.randint(2**31 - 1, (1,), generator=g))
    return info


def pool_dir(cache: Path, task: str, seed: int, scenario: str) -> Path:
    return cache / f"{task}-s{seed}-{scenario}"


def generate_seed(cache: Path, seed: int, task_names: list[str], scenarios: list[str], log=print) -> list[Path]:
    """Pretrain the seed's base, train every client, write the pools (reused when all present)."""
    wanted = [pool_dir(cache, t, seed, s) for t in task_names for s in scenarios]
    if all((p / "MANIFEST.json").exists() for p in wanted):
        return wanted
    start = time.perf_counter()
    world = tasks.World.make(seed)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".seed{seed}-", dir=cache) as work_dir:
        work = Path(work_dir)
        base = pretrain(world, PRETRAIN_STEPS, seed)
        train.save_base(
            base, work / "base_model", f"Tiny GPT-2 pretrained by benchmarks/trained_pools.py, seed {seed}."
        )
        log(f"seed {seed}: pretrained the base ({time.perf_counter() - start:.0f} s)")
        trainer = Trainer(train.load_base(work / "base_model"), SETUP, seed, BASE_NAME)
        for task_name in task_names:
            task = tasks.TASKS[task_name]
            # Every client's data and training seed depend only on (seed, task, scenario, position),
            # not on which tasks and scenarios were asked for.
            t_index = list(tasks.TASKS).index(task_name)
            g = torch.Generator().manual_seed(1000 * seed + 100 * t_index + 7)
            here = work / task_name
            clients: list[Client] = []
            for i in range(N_BENIGN):
                name = f"b{i + 1:02d}"
                info = train_client(trainer, world, task, "benign", g, 10_000 * seed + 100 * t_index + i, here / name)
                clients.append(Client(name, "benign", here / name, info))
            for scenario in scenarios:
                s_index = list(SCENARIOS).index(scenario)
                g = torch.Generator().manual_seed(1000 * seed + 100 * t_index + 10 + s_index)
                pool_clients = list(clients)
                for j, kind in enumerate(SCENARIOS[scenario]):
                    name = f"{scenario}_{j + 1:02d}"
                    if kind.startswith("copy>"):
                        target = kind.removeprefix("copy>")
                        source = next(c for c in pool_clients if c.kind == target)
                        info = {"kind": "copy", "contaminated": True, "copy_of_kind": target}
                        shutil.copytree(source.directory, here / name)
                        pool_clients.append(Client(name, "copy", here / name, info | {"_source": source}))
                        continue
                    train_seed = 10_000 * seed + 100 * t_index + 1000 * (s_index + 1) + j
                    info = train_client(trainer, world, task, kind, g, train_seed, here / name)
                    pool_clients.append(Client(name, kind, here / name, info))
                write_pool(
                    work / "base_model",
                    pool_clients,
                    pool_dir(cache, task_name, seed, scenario),
                    task_name,
                    seed,
                    scenario,
                )
            log(f"seed {seed}: trained and wrote the {task_name} pools ({time.perf_counter() - start:.0f} s)")
    return wanted


def write_pool(base_dir: Path, clients: list[Client], target: Path, task: str, seed: int, scenario: str) -> None:
    """One pool directory: base_model/, client_NN/ (benign first), MANIFEST.json; replaced atomically."""
    with AtomicDir(target, force=True) as tmp:
        shutil.copytree(base_dir, tmp / "base_model")
        names = {c.name: f"client_{k + 1:02d}" for k, c in enumerate(clients)}
        adapters = {}
        for c in clients:
            shutil.copytree(c.directory, tmp / names[c.name])
            info = {k: v for k, v in c.info.items() if not k.startswith("_")}
            if "_source" in c.info:
                info["copy_of"] = names[c.info["_source"].name]
            adapters[names[c.name]] = info
        manifest = {
            "task": task,
            "seed": seed,
            "scenario": scenario,
            "base_model": BASE_NAME,
            "base_model_dir": "base_model",
            "generator": "python -m benchmarks.trained_pools",
            "setup": {
                "n_train": N_TRAIN[task],
                "n_test": N_TEST,
                "pretrain_steps": PRETRAIN_STEPS,
                "dirichlet_concentration": CONCENTRATION[task],
                "lora": asdict(SETUP),
                "boost": BOOST,
                "replacement_boost": REPLACEMENT_BOOST,
                "free_rider_scale": FREE_RIDER_SCALE,
            },
            "adapters": adapters,
        }
        (tmp / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")


# -- reading pools back ------------------------------------------------------------------


def manifest(pool: Path) -> dict:
    return json.loads((pool / "MANIFEST.json").read_text())


def test_sets(pool: Path) -> dict[str, torch.Tensor]:
    """Each benign client's held-out test strings (its own distribution), rebuilt from MANIFEST.json."""
    m = manifest(pool)
    task = tasks.TASKS[m["task"]]
    world = tasks.World.make(m["seed"])
    out = {}
    for name, info in m["adapters"].items():
        if info["kind"] == "benign":
            g = torch.Generator().manual_seed(info["test_seed"])
            out[name] = task.dataset(world, info["distribution"], N_TEST, g)
    return out


def generate(cache: Path, seeds: list[int], task_names: list[str], scenarios: list[str], log=print) -> list[Path]:
    configure_torch()
    pools = []
    for seed in seeds:
        pools += generate_seed(cache, seed, task_names, scenarios, log)
    return pools


def configure_torch() -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def default_cache() -> Path:
    return Path(tempfile.gettempdir()) / "clair-trained-pools"


def write_results(out: Path, payload: dict, start: float) -> None:
    """A benchmark's JSON results, and a line saying where they went and how long it took."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    log_err(f"wrote {out} ({time.perf_counter() - start:.0f} s)")


def log_err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def pool_arguments(parser: argparse.ArgumentParser, out: str) -> None:
    """The options every benchmark on these pools takes (seeds, cache, output, tasks, scenarios)."""
    parser.add_argument("--seeds", type=int, default=len(DEFAULT_SEEDS), help="seeds 0..N-1")
    parser.add_argument("--cache", type=Path, default=default_cache())
    parser.add_argument("--out", type=Path, default=Path(out))
    parser.add_argument("--tasks", default=",".join(tasks.TASKS), help="comma-separated task names")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated scenarios")


def pools_from_arguments(args: argparse.Namespace) -> list[Path]:
    """The pools :func:`pool_arguments` name, generated into the cache where missing."""
    start = time.perf_counter()
    seeds = list(range(args.seeds))
    pools = generate(args.cache, seeds, args.tasks.split(","), args.scenarios.split(","), log_err)
    log_err(f"{len(pools)} pools ready ({time.perf_counter() - start:.0f} s)")
    return [p.resolve() for p in pools]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.trained_pools", description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=len(DEFAULT_SEEDS), help="seeds 0..N-1")
    parser.add_argument("--cache", type=Path, default=default_cache())
    parser.add_argument("--tasks", default=",".join(tasks.TASKS), help="comma-separated task names")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated scenario names")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    pools = generate(args.cache, list(range(args.seeds)), args.tasks.split(","), args.scenarios.split(","), log_err)
    for p in pools:
        print(p)
    log_err(f"{len(pools)} pools under {args.cache} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
