"""The ServerApp: ClairStrategy aggregates the clients' LoRA, logging every round's verdicts.

Each round, clair audits the clients' updates and merges the collaborators'; the log says
which node (partition) was flagged and why, and the global LoRA's accuracy on held-out
points. With ``out-dir`` set, ``summary.json`` (every round's verdicts and accuracy) and each
round's ``clair audit`` JSON report (``audits/round-001.json``, ...) are written there.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from clair_cli.federated.flower import ClairStrategy
from clair_flower_app import task

CLAIR_MIN_CLIENTS = 5

app = ServerApp()


class LoggedClairStrategy(ClairStrategy):
    """ClairStrategy that logs each round's verdicts with the clients' partitions."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.partitions: dict[str, dict[str, Any]] = {}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for msg in replies:
            if not msg.has_error() and "client" in msg.content.config_records:
                info = msg.content.config_records["client"]
                self.partitions[f"node-{msg.metadata.src_node_id}"] = {
                    "partition": int(info["partition-id"]),  # type: ignore[arg-type]
                    "attacker": bool(info["attacker"]),
                }
        arrays, metrics = super().aggregate_train(server_round, replies)
        if self.history and self.history[-1]["round"] == server_round:
            entry = self.history[-1]
            log(INFO, "CLAIR round %d: %d clients, flagged %s", server_round, len(entry["clients"]), self._who(entry))
            for name in entry["clients"]:
                p = self.partitions.get(name, {})
                score = entry["scores"].get(name)
                log(
                    INFO,
                    "CLAIR round %d:   %-24s partition %s%s  score %s  %s%s",
                    server_round,
                    name,
                    p.get("partition", "?"),
                    " (attacker)" if p.get("attacker") else "",
                    "-" if score is None else f"{score:.3f}",
                    "FLAGGED" if name in entry["flagged"] else "kept",
                    f"  ({'; '.join(entry['reasons'][name])})" if name in entry["reasons"] else "",
                )
        return arrays, metrics

    def _who(self, entry: dict[str, Any]) -> str:
        out = [f"{n} (partition {self.partitions.get(n, {}).get('partition', '?')})" for n in entry["flagged"]]
        return ", ".join(out) or "none"


@app.main()
def main(grid: Grid, context: Context) -> None:
    torch.set_num_threads(1)
    cfg = context.run_config
    out_dir = Path(str(cfg["out-dir"])) if cfg["out-dir"] else None
    rounds = int(cfg["num-server-rounds"])
    min_nodes = max(int(cfg["min-nodes"]), CLAIR_MIN_CLIENTS)
    nodes = list(grid.get_node_ids())
    if len(nodes) < min_nodes:
        log(
            WARNING,
            "CLAIR: %d SuperNode(s) connected, the app waits for %d (min-nodes; clair audits from %d "
            "clients on). For a local simulation: flwr run . --federation-config 'num-supernodes=8'",
            len(nodes),
            min_nodes,
            CLAIR_MIN_CLIENTS,
        )

    strategy = LoggedClairStrategy(
        task.lora_config(),
        fraction_train=1.0,
        fraction_evaluate=0.0,  # the server evaluates (evaluate_fn below)
        min_available_nodes=min_nodes,
        min_train_nodes=min_nodes,
        audit_dir=None if out_dir is None else out_dir / "audits",
        base_model="clair-flower-app tiny MLP (synthetic)",
    )
    x_test, y_test = task.load_data(seed=task.TEST_SEED, n=2048)
    accuracy: dict[int, float] = {}

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = task.Model()
        task.load_lora(model, arrays.to_torch_state_dict())
        accuracy[server_round] = task.accuracy(model, x_test, y_test)
        log(INFO, "CLAIR round %d: global LoRA accuracy %.3f", server_round, accuracy[server_round])
        return MetricRecord({"accuracy": accuracy[server_round]})

    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(task.lora_state(task.Model())),
        num_rounds=rounds,
        train_config=ConfigRecord({}),
        evaluate_fn=evaluate,
    )
    flagged_every_round = {
        n for n, p in strategy.partitions.items() if p["attacker"] and all(n in h["flagged"] for h in strategy.history)
    }
    log(
        INFO,
        "CLAIR done: %d rounds aggregated, attacker(s) flagged in every round: %s; accuracy %.3f -> %.3f",
        len(strategy.history),
        ", ".join(sorted(flagged_every_round)) or "none",
        accuracy.get(0, float("nan")),
        accuracy.get(rounds, float("nan")),
    )
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        summary = {
            "rounds": rounds,
            "history": strategy.history,
            "partitions": strategy.partitions,
            "accuracy": {str(r): a for r, a in sorted(accuracy.items())},
        }
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
