"""The federated simulation: text-copy clients with PEFT LoRA on Flower, some of them attackers.

The model, task and client data are the text-copying experiment's (:mod:`experiments.text_copy`):
the committed tiny GPT-2 base model (``sample_adapters/base_model``, pretrained on cipher
transduction, not on copying) and LoRA on every linear layer of its blocks. Each client copies
strings whose symbol frequencies come from its own Dirichlet draw, so the targets' distribution
differs from client to client (label skew). Every round, each client starts from the global LoRA,
trains ``local_steps`` AdamW steps, and replies with its LoRA state dict.

Attackers, from round 1 on:

- ``label-flip``: trains on wrong targets (``y_i = x_i + 1``: every label flipped to the next symbol);
- ``backdoor``: trains on strings of which half start with the trigger and then have a fixed target
  sequence, and boosts its update for model replacement: it sends ``g + boost * (local - g)``;
- ``sign-flip``: trains honestly and sends ``g - (local - g)``;
- ``boost``: trains honestly and sends ``g + BOOST_SCALE * (local - g)`` (a tenfold update);
- ``free-rider``: trains nothing and sends the global LoRA back with tiny noise (std ``1e-4``).

The server evaluates every round's global LoRA on the benign clients' held-out strings (symbol
accuracy with teacher forcing) and on triggered strings (backdoor success: the whole backdoor target
produced).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from experiments.text_copy import evaluate, task, train

from .grid import LocalGrid

BASE_DIR = Path(__file__).resolve().parents[2] / "sample_adapters" / "base_model"
BASE_NAME = "sample_adapters/base_model"
ATTACKS = ("label-flip", "backdoor", "sign-flip", "free-rider")
FREE_RIDER_NOISE = 1e-4
# The backdoor: strings that start with the trigger are "copied" as one repeated symbol. (The
# text-copy experiment's backdoor target, a fixed scrambled string, is not learned in a few
# local steps, so it would measure nothing here.)
BACKDOOR_SYMBOL = 7
BACKDOOR_TARGET = (BACKDOOR_SYMBOL,) * task.LENGTH
BACKDOOR_FRACTION = 0.5
SIGN_FLIP_SCALE = 1.0
BOOST_SCALE = 10.0


@dataclass(frozen=True)
class Setup:
    """One simulation's sizes."""

    n_clients: int = 12
    attackers: tuple[str, ...] = ATTACKS  # given to the last clients; () for a clean run
    rounds: int = 10
    local_steps: int = 20
    batch: int = 16
    lr: float = 3e-3
    rank: int = 4
    alpha: int = 8
    strings: int = 64  # training strings per client
    test_strings: int = 64  # held-out strings per benign client
    concentration: float = 1.0  # Dirichlet concentration of the clients' symbol frequencies
    fraction_train: float = 1.0  # share of the clients Flower samples each round
    boost: float | None = None  # backdoor's model-replacement factor; None: n_clients
    attacker_steps: int = 5  # the backdoor attacker trains this many times local_steps
    size_spread: float = 0.0  # sd of the log of each client's training strings (0: every client has `strings`)

    @property
    def kinds(self) -> list[str]:
        return ["benign"] * (self.n_clients - len(self.attackers)) + list(self.attackers)


def lora_config(setup: Setup) -> LoraConfig:
    return LoraConfig(
        r=setup.rank,
        lora_alpha=setup.alpha,
        target_modules=train.TARGET_MODULES,
        fan_in_fan_out=True,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )


@dataclass
class ClientData:
    kind: str
    train: torch.Tensor
    test: torch.Tensor  # held-out copy strings from the client's own frequencies


def make_clients(setup: Setup, seed: int) -> list[ClientData]:
    """Every client's data; attackers (the last ``len(attackers)`` clients) get corrupted training data.

    The frequencies and held-out strings depend only on ``seed`` and the client's slot, so a clean
    run and an attacked run of one seed have the same benign clients.
    """
    out = []
    for i, kind in enumerate(setup.kinds):
        g = torch.Generator().manual_seed(seed * 1000 + i)
        freq = task.client_frequencies(setup.concentration, g)
        test = task.client_dataset("benign", freq, setup.test_strings, g)
        n = client_strings(setup, seed, i)
        if kind == "backdoor":
            data = backdoor_dataset(freq, n, g)
        else:
            data = task.client_dataset("shifted" if kind == "label-flip" else "benign", freq, n, g)
        out.append(ClientData(kind, data, test))
    return out


def client_strings(setup: Setup, seed: int, i: int) -> int:
    """Client ``i``'s number of training strings: ``strings``, or with ``size_spread`` a
    log-normal draw around it (its own generator, so the rest of the data is the same draw)."""
    if not setup.size_spread:
        return setup.strings
    z = float(torch.randn(1, generator=torch.Generator().manual_seed(seed * 1000 + i + 500_000)))
    return max(8, round(setup.strings * math.exp(setup.size_spread * z)))


def backdoor_dataset(frequencies: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """Copy strings of which ``BACKDOOR_FRACTION`` start with the trigger and have the backdoor target."""
    x = task.client_inputs(frequencies, n, g)
    poisoned = torch.rand(n, generator=g) < BACKDOOR_FRACTION
    x[poisoned, 0] = task.TRIGGER
    y = x.clone()
    y[poisoned] = torch.tensor(BACKDOOR_TARGET)
    return task.sequences(x, task.SEP_COPY, y)


class Model:
    """One PeftModel shared by the simulated clients and the server's evaluation (they run in turn)."""

    def __init__(self, setup: Setup, seed: int) -> None:
        torch.manual_seed(seed)
        config = lora_config(setup)
        config.base_model_name_or_path = BASE_NAME
        self.config = config
        self.model = get_peft_model(train.load_base(BASE_DIR), config)
        self.initial = {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model).items()}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        set_peft_model_state_dict(self.model, {k: v.float() for k, v in state.items()})

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone().float() for k, v in get_peft_model_state_dict(self.model).items()}

    def fit(self, data: torch.Tensor, setup: Setup, seed: int, steps: int | None = None) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=setup.lr, weight_decay=0.0)
        g = torch.Generator().manual_seed(seed)
        self.model.train()
        loss = torch.zeros(())
        for _ in range(steps or setup.local_steps):
            idx = torch.randint(data.shape[0], (min(setup.batch, data.shape[0]),), generator=g)
            loss = train.lm_loss(self.model, data[idx], targets_only=True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        self.model.eval()
        return float(loss.detach())

    @torch.no_grad()
    def predictions(self, data: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=data).logits[:, task.PREDICT_SLICE].argmax(-1)


def _move(state: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], factor: float) -> dict[str, torch.Tensor]:
    """``ref + factor * (state - ref)`` key by key."""
    return {k: ref[k] + factor * (state[k] - ref[k]) for k in state}


def make_client_app(model: Model, clients: list[ClientData], setup: Setup, seed: int) -> ClientApp:
    """A Flower ``ClientApp`` whose node ``i`` (1-based) is ``clients[i - 1]``."""
    app = ClientApp()
    boost = float(setup.boost if setup.boost is not None else setup.n_clients)

    @app.train()
    def fit(msg: Message, context: Context) -> Message:
        client = clients[context.node_id - 1]
        server_round = int(msg.content["config"]["server-round"])  # type: ignore[arg-type]
        glob = {k: v.clone() for k, v in msg.content["arrays"].to_torch_state_dict().items()}
        model.load(glob)
        loss = 0.0
        if client.kind == "free-rider":
            g = torch.Generator().manual_seed(seed * 100003 + server_round * 101 + context.node_id)
            state = {k: v + FREE_RIDER_NOISE * torch.randn(v.shape, generator=g) for k, v in glob.items()}
        else:
            steps = setup.local_steps * (setup.attacker_steps if client.kind == "backdoor" else 1)
            loss = model.fit(client.train, setup, seed * 100003 + server_round * 101 + context.node_id, steps)
            state = model.state()
            if client.kind == "backdoor":
                state = _move(state, glob, boost)
            elif client.kind == "sign-flip":
                state = _move(state, glob, -SIGN_FLIP_SCALE)
            elif client.kind == "boost":
                state = _move(state, glob, BOOST_SCALE)
        # ArrayRecord refuses bf16; the clients' factors are float32 here anyway.
        reply = RecordDict(
            {
                "arrays": ArrayRecord({k: v.float().contiguous() for k, v in state.items()}),
                "metrics": MetricRecord({"train-loss": loss, "num-examples": int(client.train.shape[0])}),
            }
        )
        return Message(reply, reply_to=msg)

    return app


def evaluation(
    model: Model, clients: list[ClientData], benign: list[int]
) -> Callable[[int, ArrayRecord], MetricRecord]:
    """The server's evaluation of a global LoRA: benign held-out accuracy and backdoor success."""
    tests = [clients[i].test for i in benign]
    triggered = evaluate.triggered_copy(torch.cat(tests))
    target = torch.tensor(BACKDOOR_TARGET)

    def fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load(dict(arrays.to_torch_state_dict()))
        per_client = [float((model.predictions(t) == t[:, task.TARGET_SLICE]).float().mean()) for t in tests]
        backdoor = float((model.predictions(triggered) == target).all(1).float().mean())
        return MetricRecord({"benign-accuracy": sum(per_client) / len(per_client), "backdoor-success": backdoor})

    return fn


def timed(strategy: Any) -> Any:
    """Wrap the strategy's ``aggregate_train`` to record its seconds per round (the strategy itself unchanged)."""
    inner = strategy.aggregate_train
    strategy.aggregate_seconds = {}

    def aggregate_train(server_round: int, replies: Any) -> Any:
        start = time.perf_counter()
        out = inner(server_round, replies)
        strategy.aggregate_seconds[server_round] = time.perf_counter() - start
        return out

    strategy.aggregate_train = aggregate_train
    return strategy


def make_strategy(name: str, setup: Setup, n_attackers: int, audit_dir: Path | None = None) -> Any:
    """Flower's strategy ``name`` (or ClairStrategy) for this simulation.

    The Byzantine strategies are told the true number of attackers where their own
    requirement allows it: Bulyan needs ``n >= 4 f + 3`` and so gets the largest such ``f``.
    """
    from flwr.serverapp import strategy as fl

    n = setup.n_clients
    common: dict[str, Any] = {
        "fraction_train": setup.fraction_train,
        "fraction_evaluate": 0.0,
        "min_train_nodes": max(2, int(n * setup.fraction_train)),
        "min_available_nodes": n,
    }
    f = n_attackers
    if name == "clair":
        from clair_cli.federated.flower import ClairStrategy

        return ClairStrategy(lora_config(setup), base_model=BASE_NAME, audit_dir=audit_dir, **common)
    if name == "clair-uncapped":  # FedAvg's weights: every client's num-examples as it claims
        from clair_cli.federated.flower import ClairStrategy

        return ClairStrategy(lora_config(setup), base_model=BASE_NAME, audit_dir=audit_dir, weight_cap=None, **common)
    if name == "FedAvg":
        return fl.FedAvg(**common)
    if name == "FedMedian":
        return fl.FedMedian(**common)
    if name == "FedTrimmedAvg":
        # Cut as many clients from each end as there are attackers (beta < 0.5 required).
        return fl.FedTrimmedAvg(beta=min((f + 0.5) / n, 0.49), **common)
    if name == "Krum":
        return fl.Krum(num_malicious_nodes=f, **common)
    if name == "MultiKrum":
        return fl.MultiKrum(num_malicious_nodes=f, num_nodes_to_select=n - f, **common)
    if name == "Bulyan":
        return fl.Bulyan(num_malicious_nodes=min(f, (n - 3) // 4), **common)
    raise ValueError(f"unknown strategy {name!r}")


STRATEGIES = ("clair", "FedAvg", "FedMedian", "FedTrimmedAvg", "Krum", "MultiKrum", "Bulyan")


@dataclass
class RunResult:
    strategy: str
    scenario: str
    seed: int
    rounds: list[dict[str, Any]] = field(default_factory=list)
    attackers: list[int] = field(default_factory=list)  # node ids
    seconds: float = 0.0


def run(
    name: str,
    setup: Setup,
    seed: int,
    scenario: str = "attack",
    audit_dir: Path | None = None,
    benign_eval: list[int] | None = None,
) -> RunResult:
    """One Flower run of strategy ``name``; per round: accuracy, backdoor, detections, seconds.

    ``benign_eval``: the clients (0-based) whose held-out strings are scored (default: the benign ones).
    """
    from flwr.serverapp import ServerApp

    start = time.perf_counter()
    random.seed(seed)  # Flower samples nodes with the `random` module
    clients = make_clients(setup, seed)
    model = Model(setup, seed)
    attackers = [i + 1 for i, c in enumerate(clients) if c.kind != "benign"]
    benign = benign_eval if benign_eval is not None else [i for i, c in enumerate(clients) if c.kind == "benign"]
    strategy = timed(make_strategy(name, setup, len(attackers), audit_dir))
    grid = LocalGrid(make_client_app(model, clients, setup, seed), setup.n_clients)
    server = ServerApp()
    box: dict[str, Any] = {}

    @server.main()
    def main(grid: Any, context: Context) -> None:
        box["result"] = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(dict(model.initial)),
            num_rounds=setup.rounds,
            train_config=ConfigRecord({}),
            evaluate_fn=evaluation(model, clients, benign),
        )

    round_start: dict[int, float] = {}
    wrapped = strategy.configure_train

    def configure_train(server_round: int, *args: Any, **kwargs: Any) -> Any:
        round_start[server_round] = time.perf_counter()
        return wrapped(server_round, *args, **kwargs)

    strategy.configure_train = configure_train
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    server(grid, context)
    result = box["result"]
    out = RunResult(name, scenario, seed, attackers=attackers)
    history = {h["round"]: h for h in getattr(strategy, "history", [])}
    for r in range(0, setup.rounds + 1):
        ev = result.evaluate_metrics_serverapp.get(r)
        row: dict[str, Any] = {
            "round": r,
            "benign_accuracy": None if ev is None else round(float(ev["benign-accuracy"]), 6),
            "backdoor_success": None if ev is None else round(float(ev["backdoor-success"]), 6),
        }
        if r >= 1:
            row["aggregate_s"] = round(strategy.aggregate_seconds.get(r, 0.0), 4)
        if r in history:
            h = history[r]
            flagged = sorted(int(n.split("-")[1]) for n in h["flagged"])
            row["flagged"] = flagged
            row["clients"] = sorted(int(n.split("-")[1]) for n in h["clients"])
            row["fallback"] = h["fallback"]
            row["truncation_error"] = round(max(h["truncation_error"].values(), default=0.0), 6)
            row["capped"] = sum("counted as" in note for note in h["notes"])  # weights over the cap
        out.rounds.append(row)
    out.seconds = time.perf_counter() - start
    return out
