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

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS  # noqa: E402
from helpers import train_replies  # noqa: E402

from clair_cli.errors import AdapterFormatError, UsageError  # noqa: E402
from clair_cli.federated.flower import SECAGG_MARKERS, ClairStrategy, split_state_dict, weighted_metrics  # noqa: E402
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


class _SecAggServer(ClairStrategy):
    """A server whose train instructions carry Flower's SecAgg+ record."""

    def _construct_messages(self, record: RecordDict, node_ids: list[int], message_type: str) -> list[Message]:
        record["secaggplus_configs"] = ConfigRecord({"stage": "setup"})
        return super()._construct_messages(record, node_ids, message_type)


def test_secure_aggregation_is_refused_from_the_servers_instructions_only() -> None:
    """The run is refused when the server's own train instructions carry secure-aggregation
    records; replies that carry them, every reply of a round included, are only malformed replies
    (a review: two clients whose replies named a record ``secagg_junk``, the others' replies
    errors, stopped the run with UsageError)."""
    assert any(marker in RECORD_KEY_CONFIGS for marker in SECAGG_MARKERS)  # Flower's SecAgg/SecAgg+ record
    strategy = _SecAggServer({"r": 4, "lora_alpha": 8}, fraction_evaluate=0.0, min_available_nodes=6)
    with pytest.raises(UsageError, match="train instructions carry secure-aggregation records"):
        strategy.start(
            grid=LocalGrid(ClientApp(), 6),
            initial_arrays=ArrayRecord(_state()),
            num_rounds=1,
            train_config=ConfigRecord({}),
        )
    strategy = _one_round(_state(), RecordDict({"secaggplus_configs": ConfigRecord({"stage": "setup"})}))
    (entry,) = strategy.history
    assert len(entry["flagged"]) == 6 and entry["fallback"] == "skip"
    assert all("secure-aggregation" in entry["reasons"][n][0] for n in entry["flagged"])
    strategy, (arrays, metrics) = _direct({n: _error() for n in range(1, 5)} | {5: _junk(5), 6: _junk(6)})
    (entry,) = strategy.history
    assert entry["flagged"] == ["node-5", "node-6"] and entry["fallback"] == "skip"
    assert sorted(entry["errors"]) == ["node-1", "node-2", "node-3", "node-4"]
    assert arrays is not None and metrics is not None and metrics["clair-skipped"] == 1


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


# Found by a review of 2026-12-06: copies in median rounds (tests/test_federated.py), SecAgg decided from
# the replies' record names (above), metrics wrong under huge weights, skipped and median rounds alike in
# the metrics, nothing logged of who was left out, no history of a round of errors, arrays decoded before
# their keys were checked.

_START = _state()


def _honest(node: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(node)
    return {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in _START.items()}


def _content(node: int, metrics: dict | None = None, state: dict[str, torch.Tensor] | None = None) -> RecordDict:
    return RecordDict(
        {
            "arrays": ArrayRecord(_honest(node) if state is None else state),
            "metrics": MetricRecord(metrics or {"num-examples": 10, "loss": 1.0}),
        }
    )


def _junk(node: int) -> RecordDict:
    content = _content(node)
    content["secagg_junk"] = ConfigRecord({"x": 1})
    return content


def _error() -> Error:
    return Error(code=0, reason="timeout")


def _direct(contents: dict[int, RecordDict | Error], **kwargs) -> tuple[ClairStrategy, tuple]:
    """``aggregate_train`` of round 1 called with node ``n``'s reply ``contents[n]`` (a Flower
    error where an ``Error``)."""
    LocalGrid(ClientApp(), 1)  # the ServerApp's identity, which messages read
    strategy = ClairStrategy({"r": 4, "lora_alpha": 8}, fraction_evaluate=0.0, **kwargs)
    strategy._round_arrays = {1: ArrayRecord(_START)}
    return strategy, strategy.aggregate_train(1, train_replies(contents))


def test_metrics_under_weights_whose_sum_overflows() -> None:
    """Claims of 1e308 summed to infinity and made the round's loss 0.0; the weights are now
    divided by the largest first: three clients at 1e308 and loss 2 against three at 10 and loss 1
    give 2."""
    contents = {
        n: _content(n, {"num-examples": 10 if n <= 3 else 1e308, "loss": 1.0 if n <= 3 else 2.0}) for n in range(1, 7)
    }
    _, (_, metrics) = _direct(contents, weight_cap=None)
    assert metrics["loss"] == pytest.approx(2.0)
    _, (_, metrics) = _direct(contents)  # capped at 3x the median (5e307): not lowered
    assert metrics["loss"] == pytest.approx(2.0)


def test_a_value_that_is_not_finite_is_left_out_of_its_metric_only() -> None:
    """A NaN loss left the reply's whole record out (its accuracy too); now only that value, with a
    note, and so for one element of a list."""
    contents = {
        n: _content(n, {"num-examples": 10, "loss": 1.0, "accuracy": 0.5, "per": [0.5, 0.5]}) for n in range(1, 7)
    }
    contents[7] = _content(7, {"num-examples": 10, "loss": float("nan"), "accuracy": 1.0, "per": [float("inf"), 1.0]})
    strategy, (_, metrics) = _direct(contents)
    assert metrics["loss"] == pytest.approx(1.0)
    assert metrics["accuracy"] == pytest.approx((6 * 0.5 + 1.0) / 7)
    assert metrics["per"] == pytest.approx([0.5, (6 * 0.5 + 1.0) / 7])
    notes = strategy.history[0]["notes"]
    assert any("'loss': 1 of 7 replies' values are not finite" in n for n in notes), notes
    assert any("'per': 1 of 7" in n for n in notes), notes


def test_weighted_metrics_are_the_weighted_mean() -> None:
    records = [MetricRecord({"n": w, "loss": v}) for w, v in [(1, 1e308), (6, 1.0), (0, float("nan"))]]
    out, notes = weighted_metrics(records, "n")
    assert out["loss"] == pytest.approx(1e308 / 7) and list(out) == ["loss"] and len(notes) == 1
    out, notes = weighted_metrics([MetricRecord({"n": 0, "loss": 2.0}), MetricRecord({"n": 0, "loss": 4.0})], "n")
    assert out["loss"] == 3.0 and "equal weights" in notes[0]
    out, _ = weighted_metrics([MetricRecord({"n": 1, "loss": 1.7e308}), MetricRecord({"n": 1, "loss": 1.7e308})], "n")
    assert out["loss"] == pytest.approx(1.7e308)


@pytest.mark.parametrize(
    "nodes, on_too_few, skipped, fallback",
    [(6, "skip", 0, 0), (4, "skip", 1, 1), (4, "median", 0, 1), (2, "median", 1, 1)],
)
def test_the_metrics_say_whether_a_round_was_skipped(nodes: int, on_too_few: str, skipped: int, fallback: int) -> None:
    """``clair-fallback`` was 1 for a skipped round and for a median round alike."""
    _, (_, metrics) = _direct({n: _content(n) for n in range(1, nodes + 1)}, on_too_few=on_too_few)
    assert metrics["clair-skipped"] == skipped and metrics["clair-fallback"] == fallback


def test_each_round_logs_who_was_left_out_and_why(caplog: pytest.LogCaptureFixture) -> None:
    nan = _honest(7)
    nan[KEY_A] = torch.full_like(nan[KEY_A], float("nan"))
    contents: dict[int, RecordDict | Error] = {n: _content(n) for n in range(1, 7)}
    contents[7] = _content(7, state=nan)
    contents[8] = _error()
    with caplog.at_level(logging.INFO, logger="flwr"):
        _direct(contents)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("CLAIR round 1")]
    assert line.startswith("CLAIR round 1: 8 replies, 2 left out (node-7: malformed reply: module")
    assert "NaN or infinite" in line and "node-8: error reply (code 0): 'timeout'" in line and line.endswith("6 merged")


def test_a_round_of_errors_leaves_a_history_entry() -> None:
    strategy, (arrays, metrics) = _direct({n: _error() for n in range(1, 4)})
    (entry,) = strategy.history
    assert entry["clients"] == [] and entry["fallback"] == "skip" and len(entry["errors"]) == 3
    assert "every reply (3) is an error" in entry["notes"][-1]
    assert arrays is not None and metrics["clair-skipped"] == 1 and metrics["clair-clients"] == 0


def test_a_replys_keys_are_checked_before_its_arrays_are_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reply of many tiny arrays for modules the global adapter does not have was decoded
    whole before it was refused (20,000 arrays: 3.2 s)."""
    decoded = []
    numpy = Array.numpy
    monkeypatch.setattr(Array, "numpy", lambda self: decoded.append(1) or numpy(self))
    bad = _honest(7)
    for i in range(50):
        bad[f"base_model.model.fake.{i}.lora_A.weight"] = torch.zeros(1, 1)
        bad[f"base_model.model.fake.{i}.lora_B.weight"] = torch.zeros(1, 1)
    contents = {n: _content(n) for n in range(1, 7)} | {7: _content(7, state=bad)}
    strategy, _ = _direct(contents)
    assert "sent LoRA modules other than the global adapter's (50 differ" in strategy.history[0]["reasons"]["node-7"][0]
    assert len(decoded) == 7 * 2  # the global adapter's and the six other replies' factors


def test_the_boost_scan_reports_each_strategys_worst_point(tmp_path: Path) -> None:
    """``experiments.federated.boost_scan`` (no simulation run: results.json files written here)."""
    from experiments.federated import boost_scan

    kinds = ["benign", "benign", "backdoor"]

    def run(strategy: str, seed: int, backdoor: float, flagged: list[int]) -> dict:
        rows = [{"round": 0, "benign_accuracy": 0.1, "backdoor_success": 0.0}]
        rows += [{"round": 1, "benign_accuracy": 0.9, "backdoor_success": backdoor, "clients": [1, 2, 3]}]
        if strategy == "clair":
            rows[1]["flagged"] = flagged
        return {"strategy": strategy, "scenario": "attack", "seed": seed, "rounds": rows, "kinds": kinds}

    dirs = []
    for boost, fedavg in ((1.0, 0.0), (4.0, 0.5)):
        d = tmp_path / f"boost-{boost:g}"
        d.mkdir()
        setup = {"boost": boost, "n_clients": 3, "attacker_steps": 5, "fraction_train": 1.0}
        runs = [run("clair", s, 0.0, [3] if boost > 1 else []) for s in (0, 1)]
        runs += [run("FedAvg", s, fedavg * (1 + s), []) for s in (0, 1)]
        (d / "results.json").write_text(json.dumps({"meta": {"setup": setup}, "runs": runs}))
        dirs.append(d)
    lines = boost_scan.table(boost_scan.load(dirs))
    assert "| clair | 1 | 0,1 | 0.9000 | 0.900 | 0.000 | 0.000 | 0 of 2 rounds |" in lines
    assert "| clair | 4 | 0,1 | 0.9000 | 0.900 | 0.000 | 0.000 | 2 of 2 rounds |" in lines
    worst = lines[lines.index("Each strategy's worst point of the scan:") :]
    assert "| FedAvg | 4 | 0,1 | 0.9000 | 0.900 | 0.750 (0.500-1.000) | 0.750 (0.500-1.000) | - |" in worst


def test_one_claim_above_zero_does_not_take_a_round_of_zero_claims_over() -> None:
    """Six clients claim zero examples (counted equally), a seventh 1e-300 with an update twice
    its own and a loss of 100: it was merged alone (the next global was its update, whole, the
    norm bound its own norm) and set the round's train metrics alone (found by review,
    2026-12-07). The cap's median now counts the zero claims: every weight is zero, the seven are
    merged and their train metrics averaged with equal weights, as where it claims zero too.
    Federated evaluation keeps FedAvg's reading of a zero claim (no test data: its metrics count
    for nothing), so there the clients with test data set the metrics, however few."""
    boosted = {k: _START[k] + 2 * (v - _START[k]) for k, v in _honest(7).items()}

    def contents(claim: float) -> dict[int, RecordDict | Error]:
        out: dict[int, RecordDict | Error] = {n: _content(n, {"num-examples": 0, "loss": 1.0}) for n in range(1, 7)}
        out[7] = _content(7, {"num-examples": claim, "loss": 100.0}, state=boosted)
        return out

    strategy, (arrays, metrics) = _direct(contents(1e-300))
    _, (equal, _) = _direct(contents(0))
    assert strategy.history[0]["flagged"] == []
    assert metrics["loss"] == pytest.approx((6 * 1.0 + 100.0) / 7)
    for key, value in arrays.to_torch_state_dict().items():
        assert torch.allclose(value, equal.to_torch_state_dict()[key], atol=1e-6)
    assert any("weights are all zero" in note for note in strategy.history[0]["notes"])
    claims = {n: (0, 0.0) for n in range(1, 7)} | {n: (10, 0.9) for n in range(7, 11)}
    replies = train_replies(
        {n: RecordDict({"m": MetricRecord({"num-examples": w, "acc": a})}) for n, (w, a) in claims.items()}
    )
    evaluated = strategy.aggregate_evaluate(1, replies)
    assert evaluated is not None and evaluated["acc"] == pytest.approx(0.9)


def test_an_integer_metric_past_floats_range_is_left_out_not_raised() -> None:
    """A reply built in the ServerApp's process (a simulation's, a custom grid's) may carry a
    Python integer of any size in its MetricRecord; a loss of 10**400 raised OverflowError out of
    ``aggregate_train`` and a weight of 10**400 out of ``aggregate_evaluate`` (found by review,
    2026-12-07). Such a value is now one that is not finite: left out of its metric, or the
    reply left out of the metrics, the round going on."""
    contents: dict[int, RecordDict | Error] = {n: _content(n) for n in range(1, 7)}
    contents[7] = _content(7, {"num-examples": 10, "loss": 10**400})
    strategy, (_, metrics) = _direct(contents)
    assert strategy.history[0]["flagged"] == [] and metrics["loss"] == pytest.approx(1.0)
    assert any("'loss': 1 of 7 replies' values are not finite" in n for n in strategy.history[0]["notes"])
    contents[7] = _content(7, {"num-examples": 10**400, "loss": 1.0})
    strategy, _ = _direct(contents)
    assert strategy.history[0]["flagged"] == ["node-7"]
    for bad in ({"num-examples": 10**400, "acc": 1.0}, {"num-examples": 10, "acc": 10**400}):
        replies = train_replies(
            {
                n: RecordDict({"m": MetricRecord(bad if n == 3 else {"num-examples": 10, "acc": 0.5})})
                for n in range(1, 4)
            }
        )
        evaluated = strategy.aggregate_evaluate(1, replies)
        assert evaluated is not None and evaluated["acc"] == pytest.approx(0.5)
    custom = ClairStrategy({"r": 4, "lora_alpha": 8}, evaluate_metrics_aggr_fn=lambda records, key: records[0]["m"])
    replies = train_replies(
        {n: RecordDict({"m": MetricRecord({"num-examples": 10, "acc": 10**400 if n == 1 else 0.5})}) for n in (1, 2)}
    )
    assert custom.aggregate_evaluate(1, replies) == MetricRecord({"num-examples": 10, "acc": 0.5})
