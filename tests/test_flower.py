"""ClairStrategy on Flower (needs the extra: ``pip install 'clair-lora[flower]'``; ``make test-flower``).

A short simulation of the federated experiment (Flower's ServerApp, ClientApp and strategies on
an in-process Grid) checks that a planted attacker is left out of every round, and the
refusals: replies that are not LoRA factors, other ranks, secure aggregation.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("transformers")

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from clair_cli.errors import AdapterFormatError, UsageError  # noqa: E402
from clair_cli.federated.flower import ClairStrategy, split_state_dict  # noqa: E402
from experiments.federated import sim  # noqa: E402
from experiments.federated.grid import LocalGrid  # noqa: E402

pytestmark = pytest.mark.slow
TINY = sim.Setup(n_clients=5, attackers=("backdoor",), rounds=3, local_steps=8, strings=32, test_strings=16)


@pytest.fixture(autouse=True)
def _quiet_flower() -> None:
    logging.getLogger("flwr").setLevel(logging.WARNING)
    torch.set_num_threads(1)


def test_planted_attacker_is_excluded(tmp_path: Path) -> None:
    """Five clients, one boosted backdoor attacker: clair leaves it out of every round."""
    result = sim.run("clair", TINY, seed=0, audit_dir=tmp_path)
    rounds = [r for r in result.rounds if r["round"] >= 1]
    assert result.attackers == [5]
    assert len(rounds) == TINY.rounds
    for r in rounds:
        assert 5 in r["flagged"], r
        assert r["fallback"] is None
        assert 0 <= r["truncation_error"] < 1
    reports = sorted(tmp_path.glob("round-*.json"))
    assert [p.name for p in reports] == ["round-001.json", "round-002.json", "round-003.json"]
    report = json.loads(reports[-1].read_text())
    assert report["schema"] == 1 and report["tool"] == "clair" and report["round"] == 3
    assert "node-5" in report["flagged"] and len(report["adapters"]) == 5
    # FedAvg on the same simulation is backdoored (in some round); clair is not.
    fedavg = sim.run("FedAvg", TINY, seed=0)
    assert max(r["backdoor_success"] for r in rounds) < 0.1
    assert max(r["backdoor_success"] for r in fedavg.rounds) > 0.5


def _state(r: int = 4, extra: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(r)
    state = {
        "base_model.model.h.0.attn.q.lora_A.weight": torch.randn(r, 12, generator=g),
        "base_model.model.h.0.attn.q.lora_B.weight": torch.randn(16, r, generator=g),
    }
    return state | (extra or {})


def _one_round(
    reply_state: dict[str, torch.Tensor],
    config: RecordDict | None = None,
    bad: dict[str, torch.Tensor] | None = None,
    nodes: int = 6,
) -> ClairStrategy:
    """Run ClairStrategy for one round: every client replies ``reply_state`` plus its own
    change, except the last node, which replies ``bad`` when given."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        g = torch.Generator().manual_seed(int(context.node_id) % 2**31)
        state = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in reply_state.items()}
        if bad is not None and int(context.node_id) == nodes:
            state = bad
        content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": 10})})
        for key, record in (config or {}).items():
            content[key] = record
        return Message(content, reply_to=msg)

    strategy = ClairStrategy({"r": 4, "lora_alpha": 8}, fraction_evaluate=0.0, min_available_nodes=nodes)
    grid = LocalGrid(app, nodes)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(_state()), num_rounds=1, train_config=ConfigRecord({}))
    return strategy


def test_refuses_what_is_not_lora() -> None:
    with pytest.raises(AdapterFormatError, match="use_dora"):
        ClairStrategy({"r": 4, "lora_alpha": 8, "use_dora": True})
    with pytest.raises(UsageError, match="secure aggregation"):
        _one_round(_state(), RecordDict({"secaggplus_configs": ConfigRecord({"stage": "setup"})}))


NAN = _state()
NAN["base_model.model.h.0.attn.q.lora_B.weight"] = torch.full((16, 4), float("nan"))


@pytest.mark.parametrize(
    "bad, why",
    [
        (NAN, "NaN or infinite"),
        (_state(extra={"base_model.model.score.weight": torch.randn(3, 16)}), "is not a LoRA factor"),
        (_state(r=8), "rank 4 in the LoraConfig"),
        ({k: v.long() for k, v in _state().items()}, "floating-point"),
    ],
)
def test_a_malformed_reply_is_left_out_and_the_round_goes_on(bad: dict[str, torch.Tensor], why: str) -> None:
    """One client's unreadable or non-finite reply is flagged with its reason; the round
    aggregates the others (Flower's own strategies carry on too)."""
    strategy = _one_round(_state(), bad=bad)
    (entry,) = strategy.history
    (left_out,) = entry["flagged"]
    assert why in entry["reasons"][left_out][0] and entry["reasons"][left_out][0].startswith("malformed reply")
    assert left_out == entry["clients"][-1] and len(entry["clients"]) == 6
    assert entry["fallback"] is None and strategy.reports[1]["flagged"] == []


def test_split_state_dict_pairs_factors() -> None:
    factors, keys = split_state_dict("x", _state())
    assert list(factors) == ["h.0.attn.q"]
    assert keys["h.0.attn.q"] == (
        "base_model.model.h.0.attn.q.lora_A.weight",
        "base_model.model.h.0.attn.q.lora_B.weight",
    )
    with pytest.raises(AdapterFormatError, match="not its pair"):
        split_state_dict("x", {"base_model.model.h.0.attn.q.lora_A.weight": torch.randn(4, 12)})
    with pytest.raises(AdapterFormatError, match="floating-point"):
        split_state_dict("x", {k: v.long() for k, v in _state().items()})
