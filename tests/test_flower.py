"""ClairStrategy on Flower (needs the extra: ``pip install 'clair-lora[flower]'``; ``make test-flower``).

A short simulation of the federated experiment (Flower's ServerApp, ClientApp and strategies on
an in-process Grid) checks that a planted attacker is left out of every round, and the
refusals: replies that are not LoRA factors, other ranks, secure aggregation.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("transformers")

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
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
    bad_reply: Callable[[dict[str, torch.Tensor]], RecordDict] | None = None,
) -> ClairStrategy:
    """Run ClairStrategy for one round: every client replies ``reply_state`` plus its own
    change, except the last node, which replies ``bad`` when given, or ``bad_reply(its state)``."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        g = torch.Generator().manual_seed(int(context.node_id) % 2**31)
        state = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in reply_state.items()}
        if bad is not None and int(context.node_id) == nodes:
            state = bad
        content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": 10, "loss": 1.0})})
        for key, record in (config or {}).items():
            content[key] = record
        if bad_reply is not None and int(context.node_id) == nodes:
            content = bad_reply(state)
        return Message(content, reply_to=msg)

    strategy = ClairStrategy({"r": 4, "lora_alpha": 8}, fraction_evaluate=0.0, min_available_nodes=nodes)
    grid = LocalGrid(app, nodes)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(_state()), num_rounds=1, train_config=ConfigRecord({}))
    return strategy


def test_refuses_what_is_not_lora() -> None:
    with pytest.raises(AdapterFormatError, match="use_dora"):
        ClairStrategy({"r": 4, "lora_alpha": 8, "use_dora": True})
    with pytest.raises(UsageError, match="every reply carries secure-aggregation records"):
        _one_round(_state(), RecordDict({"secaggplus_configs": ConfigRecord({"stage": "setup"})}))


def _with_array(key: str, array: Array) -> Callable[[dict[str, torch.Tensor]], RecordDict]:
    def reply(state: dict[str, torch.Tensor]) -> RecordDict:
        record = ArrayRecord({k: Array(v.numpy()) for k, v in state.items()})
        record[key] = array
        return RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": 10})})

    return reply


def _with_records(extra: dict[str, object], metrics: dict[str, object] | None = None):
    def reply(state: dict[str, torch.Tensor]) -> RecordDict:
        content = RecordDict(
            {"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics or {"num-examples": 10})}  # type: ignore[arg-type]
        )
        for key, record in extra.items():
            content[key] = record  # type: ignore[assignment]
        return content

    return reply


KEY_A = "base_model.model.h.0.attn.q.lora_A.weight"


@pytest.mark.parametrize(
    "make, why",
    [
        (
            _with_array(KEY_A, Array(dtype="float32", shape=(4, 12), stype="numpy.ndarray", data=b"garbage")),
            "cannot be read",
        ),
        (
            _with_array(KEY_A, Array(dtype="float32", shape=(4, 12), stype="torch.raw", data=b"0" * 192)),
            "cannot be read",
        ),
        (_with_array(KEY_A, Array(np.full((4, 12), "x"))), "cannot be read"),
        (_with_array(KEY_A, Array(np.ones((4, 12), dtype=np.longdouble))), "cannot be read"),
        (_with_records({"secagg-junk": ConfigRecord({"x": 1})}), "secure-aggregation"),
        (_with_records({"cfg": ConfigRecord({"use_secagg": 0})}), "secure-aggregation"),
        (_with_records({}, {"num-examples": 10, "loss": [1.0, 2.0]}), None),  # kept: only the metrics are lost
        (_with_records({}, {"num-examples": 0, "loss": 1.0}), None),
    ],
)
def test_a_reply_that_would_have_stopped_the_round_is_left_out(make, why: str | None) -> None:
    """Bytes that are not a NumPy array, another serialisation, dtypes torch has no tensor of,
    one client's secure-aggregation records, metrics of another type: that reply is flagged (or,
    for metrics, the clients' metrics dropped), the round goes on (found by review: each raised
    out of aggregate_train and stopped the federation)."""
    strategy = _one_round(_state(), bad_reply=make)
    (entry,) = strategy.history
    assert entry["fallback"] is None and len(entry["clients"]) == 6
    if why is None:
        assert entry["flagged"] == []
    else:
        (left_out,) = entry["flagged"]
        assert left_out == entry["clients"][-1]
        assert entry["reasons"][left_out][0].startswith("malformed reply") and why in entry["reasons"][left_out][0]


def test_a_big_endian_reply_is_read() -> None:
    strategy = _one_round(
        _state(),
        bad_reply=lambda state: RecordDict(
            {
                "arrays": ArrayRecord({k: Array(v.numpy().astype(">f4")) for k, v in state.items()}),
                "metrics": MetricRecord({"num-examples": 10}),
            }
        ),
    )
    (entry,) = strategy.history
    assert entry["flagged"] == [] and entry["fallback"] is None


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
    twice = _state() | {"h.0.attn.q.lora_A.weight": torch.randn(4, 12).half()}
    with pytest.raises(AdapterFormatError, match="are both module 'h.0.attn.q'"):
        split_state_dict("x", twice)
    mixed = {k: v for k, v in _state().items() if "lora_A" not in k} | {
        "base_model.model.h.0.attn.q.lora_embedding_A": torch.randn(4, 12)
    }
    with pytest.raises(AdapterFormatError, match="pairs an embedding factor with a linear one"):
        split_state_dict("x", mixed)


def test_unequal_client_sizes_change_only_the_sizes() -> None:
    """``size_spread`` draws each client's number of training strings from its own generator:
    0 keeps every client at ``strings`` and the data of a spread run is the same draw, cut."""
    even = sim.Setup(n_clients=4, attackers=(), strings=32)
    spread = sim.Setup(n_clients=4, attackers=(), strings=32, size_spread=1.0)
    assert [sim.client_strings(even, 0, i) for i in range(4)] == [32] * 4
    sizes = [sim.client_strings(spread, 0, i) for i in range(4)]
    assert sizes == [sim.client_strings(spread, 0, i) for i in range(4)] and len(set(sizes)) > 1 and min(sizes) >= 8
    for client, n in zip(sim.make_clients(spread, 0), sizes, strict=True):
        assert client.train.shape[0] == n
    for a, b in zip(sim.make_clients(even, 0), sim.make_clients(spread, 0), strict=True):
        assert torch.equal(a.test, b.test)


# Found by a review of 2026-12-06: the evaluate path kept FedAvg's all-or-nothing check, two replies
# from one node raised, the round's metrics used uncapped claims, and long keys filled the history.


def _run_rounds(train_metrics, evaluate_metrics, nodes: int = 6, rounds: int = 2):
    """A run of ``rounds`` with every client training and evaluating; ``*_metrics(node)`` gives
    each node's MetricRecord contents."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        g = torch.Generator().manual_seed(int(context.node_id))
        state = {
            k: v + 0.3 * torch.randn(v.shape, generator=g)
            for k, v in msg.content["arrays"].to_torch_state_dict().items()
        }
        content = RecordDict(
            {"arrays": ArrayRecord(state), "metrics": MetricRecord(train_metrics(int(context.node_id)))}
        )
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"metrics": MetricRecord(evaluate_metrics(int(context.node_id)))}), reply_to=msg)

    strategy = ClairStrategy({"r": 4, "lora_alpha": 8}, min_available_nodes=nodes)  # fraction_evaluate 1.0
    result = strategy.start(
        grid=LocalGrid(app, nodes),
        initial_arrays=ArrayRecord(_state()),
        num_rounds=rounds,
        train_config=ConfigRecord({}),
    )
    return strategy, result


def test_odd_evaluate_replies_are_left_out_and_the_run_goes_on() -> None:
    """An extra metric key, a missing weight and a NaN from three of eight clients: FedAvg's check
    ended the whole run (InconsistentMessageReplies); now those replies are left out."""

    def evaluate(node: int) -> dict:
        metrics: dict = {"num-examples": 10, "accuracy": 0.5}
        if node == 6:
            metrics["x"] = 1.0
        if node == 7:
            del metrics["num-examples"]
        if node == 8:
            metrics["accuracy"] = float("nan")
        return metrics

    strategy, result = _run_rounds(lambda node: {"num-examples": 10, "loss": 1.0}, evaluate, nodes=8)
    assert len(strategy.history) == 2
    assert {r: dict(m) for r, m in result.evaluate_metrics_clientapp.items()} == {
        1: {"accuracy": 0.5},
        2: {"accuracy": 0.5},
    }


def test_the_rounds_metrics_weigh_claims_as_the_merge_does() -> None:
    """One of eight clients claims 1e15 examples and reports loss 0: the merge counts it at 3x the
    median weight, and so do the round's metrics (they showed 7e-14); a NaN loss is left out."""

    def train(node: int) -> dict:
        if node == 8:
            return {"num-examples": 1e15, "loss": 0.0}
        if node == 7:
            return {"num-examples": 10, "loss": float("nan")}
        return {"num-examples": 10, "loss": 1.0}

    _, result = _run_rounds(train, lambda node: {"num-examples": 10, "accuracy": 0.5}, nodes=8, rounds=1)
    loss = result.train_metrics_clientapp[1]["loss"]
    assert loss == pytest.approx(6 * 10 / (6 * 10 + 30))


def test_two_replies_from_one_node_are_both_left_out() -> None:
    """Which of a node's two replies would count? Neither (a custom grid or a direct call could pass
    both; aggregate_train raised 'expected 7 weights, got 8')."""
    LocalGrid(ClientApp(), 1)  # the ServerApp's identity, which messages read
    strategy = ClairStrategy({"r": 4, "lora_alpha": 8}, fraction_evaluate=0.0)
    start = _state()
    strategy._round_arrays = {1: ArrayRecord(start)}
    replies = []
    for k in range(1, 9):
        node = min(k, 7)
        g = torch.Generator().manual_seed(k)
        state = {key: v + 0.3 * torch.randn(v.shape, generator=g) for key, v in start.items()}
        query = Message(RecordDict(), node, "train", group_id="1")
        query.metadata.__dict__["_message_id"] = f"m{k}"
        content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": 10})})
        reply = Message(content, reply_to=query)
        reply.metadata.__dict__["_message_id"] = f"r{k}"
        replies.append(reply)
    arrays, _ = strategy.aggregate_train(1, replies)
    (entry,) = strategy.history
    assert arrays is not None and "node-7" in entry["flagged"]
    assert "sent 2 replies" in entry["reasons"]["node-7"][0]


def test_a_long_key_is_quoted_cut_in_the_reason() -> None:
    key = "base_model.model." + "x" * 100_000 + ".lora_A.weight"
    with pytest.raises(AdapterFormatError) as caught:
        split_state_dict("node-1", _state() | {key.replace("lora_A", "lora_B"): torch.randn(16, 4)})
    assert len(caught.value.message) < 1000


def test_metrics_of_another_layout_leave_out_that_reply_only() -> None:
    """One client's list of another length (or a list where the others send a number) made the
    aggregation fail and the round lose every client's metrics; now only that reply is left out,
    and a custom aggregator still sees each reply's other records."""

    def evaluate(node: int) -> dict:
        metrics: dict = {"num-examples": 10, "accuracy": 0.5, "per_class": [0.5, 0.5]}
        if node == 6:
            metrics["per_class"] = [0.0, 0.0, 0.0]
        return metrics

    _, result = _run_rounds(lambda node: {"num-examples": 10, "loss": 1.0}, evaluate, nodes=6, rounds=1)
    assert dict(result.evaluate_metrics_clientapp[1]) == {"accuracy": 0.5, "per_class": [0.5, 0.5]}
