"""The ClientApp: trains the global LoRA on its partition and replies with its LoRA factors.

The last ``attackers`` partitions (run config) are attackers: they train honestly, then
boost their update, sending ``g + boost * (local - g)`` (model replacement's scaling).
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clair_flower_app import task

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    cfg = context.run_config
    partition = int(context.node_config["partition-id"])
    partitions = int(context.node_config["num-partitions"])
    attacker = partition >= partitions - int(cfg["attackers"])
    server_round = int(msg.content["config"]["server-round"])

    model = task.Model()
    global_state = msg.content["arrays"].to_torch_state_dict()
    task.load_lora(model, global_state)
    x, y = task.load_data(seed=partition, n=int(cfg["examples-per-client"]))
    seed = 1000 * server_round + partition
    loss = task.train(model, x, y, int(cfg["local-steps"]), float(cfg["learning-rate"]), seed)
    state = task.lora_state(model)
    if attacker:
        boost = float(cfg["boost"])
        state = {k: g + boost * (state[k] - g) for k, g in global_state.items()}

    content = RecordDict(
        {
            "arrays": ArrayRecord(state),
            "metrics": MetricRecord({"num-examples": len(x), "train-loss": loss}),
            # Only for the ServerApp's log (which node is which partition); clair does not read it.
            "client": ConfigRecord({"partition-id": partition, "attacker": attacker}),
        }
    )
    return Message(content, reply_to=msg)
