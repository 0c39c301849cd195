"""Findings of an adversarial review of ClairStrategy and the round logic (clair_cli.federated).

The round-level tests need no Flower; those that drive ``ClairStrategy`` skip without it."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import train_replies

from clair_cli.federated import aggregate_round

NAMES = ("layers.0.q_proj", "layers.1.q_proj")
R = 4


def _global(zero_b: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return {n: (torch.randn(R, 20, generator=g), (0 if zero_b else 1) * torch.randn(24, R, generator=g)) for n in NAMES}


def _honest(glob: dict, k: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + k)
    return {
        n: (A + 0.3 * torch.randn(A.shape, generator=g), B + 0.3 * torch.randn(B.shape, generator=g))
        for n, (A, B) in glob.items()
    }


def _refactored(A: torch.Tensor, B: torch.Tensor, how: str) -> tuple[torch.Tensor, torch.Tensor]:
    return (A / 2, B * 2) if how == "B*2, A/2" else (A.flip(0), B.flip(1))


@pytest.mark.parametrize("zero_b", [False, True])
@pytest.mark.parametrize("how", ["B*2, A/2", "rank permuted"])
def test_the_global_sent_back_refactored_is_a_free_rider_as_the_unchanged_one_is(zero_b: bool, how: str) -> None:
    """The global LoRA sent back re-factored is the same zero update as the global sent back as it
    was, and is flagged before the audit as that one is (review: only the unchanged copy was; two
    replies of the global with its rank permuted among four were counted as two points at zero,
    and the round's "geometric median" was the global, 1e-6 of an honest update away, where the
    same replies unchanged were flagged and the round skipped)."""
    glob = _global(zero_b)
    scales, ranks = dict.fromkeys(NAMES, 2.0), dict.fromkeys(NAMES, R)
    for n_honest in (2, 3):
        clients = {f"node-{k}": _honest(glob, k) for k in range(n_honest)}
        plain = dict(clients, **{"node-8": {n: (A.clone(), B.clone()) for n, (A, B) in glob.items()}})
        moved = dict(clients, **{"node-8": {n: _refactored(A, B, how) for n, (A, B) in glob.items()}})
        a = aggregate_round(glob, plain, scales, ranks, on_too_few="median")
        b = aggregate_round(glob, moved, scales, ranks, on_too_few="median")
        assert a.flagged == b.flagged == [False] * n_honest + [True], b.reasons
        assert a.fallback == b.fallback == ("skip" if n_honest == 2 else "median")
        assert "zero update" in b.reasons[-1][0] and b.scores[-1] is None
    two = {f"node-{k}": _honest(glob, k) for k in range(2)}
    two["node-8"] = {n: _refactored(A, B, how) for n, (A, B) in glob.items()}
    two["node-9"] = {
        n: _refactored(A, B, "rank permuted" if how != "rank permuted" else "B*2, A/2") for n, (A, B) in glob.items()
    }
    res = aggregate_round(glob, two, scales, ranks, on_too_few="median")
    assert res.flagged == [False, False, True, True] and res.fallback == "skip"


def test_a_zero_update_from_a_zero_first_factor_is_a_free_rider() -> None:
    """First round (global B zero): a reply whose A is zero and B random is a zero update as a
    reply whose B is zero is (review: the first was counted in a median round, the second flagged)."""
    glob = _global(zero_b=True)
    clients = {f"node-{k}": _honest(glob, k) for k in range(3)}
    clients["node-8"] = {n: (torch.zeros_like(A), torch.randn(B.shape)) for n, (A, B) in glob.items()}
    res = aggregate_round(glob, clients, dict.fromkeys(NAMES, 2.0), dict.fromkeys(NAMES, R), on_too_few="median")
    assert res.flagged == [False, False, False, True] and res.fallback == "median"


def test_strategy_flags_the_global_sent_back_refactored() -> None:
    """The same through ClairStrategy.aggregate_train: two replies of the global with its rank
    permuted among four are both left out, and the round is skipped, not a median at the global."""
    pytest.importorskip("flwr")
    from flwr.app import ArrayRecord, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from clair_cli.federated.flower import ClairStrategy
    from experiments.federated.grid import LocalGrid

    logging.getLogger("flwr").setLevel(logging.WARNING)
    prefix = "base_model.model."
    glob = _global(zero_b=False)
    state = {f"{prefix}{n}.lora_{p}.weight": t for n, (A, B) in glob.items() for p, t in (("A", A), ("B", B))}

    def reply(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> RecordDict:
        arrays = {
            f"{prefix}{n}.lora_{p}.weight": t.contiguous()
            for n, (A, B) in factors.items()
            for p, t in (("A", A), ("B", B))
        }
        return RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord({"num-examples": 10})})

    contents = {1: reply(_honest(glob, 1)), 2: reply(_honest(glob, 2))}
    for node in (3, 4):
        contents[node] = reply({n: _refactored(A, B, "rank permuted") for n, (A, B) in glob.items()})
    LocalGrid(ClientApp(), 1)
    strategy = ClairStrategy({"r": R, "lora_alpha": 8}, fraction_evaluate=0.0, on_too_few="median")
    strategy._round_arrays = {1: ArrayRecord(state)}
    arrays, metrics = strategy.aggregate_train(1, train_replies(contents))
    assert strategy.history[-1]["flagged"] == ["node-3", "node-4"]
    assert strategy.history[-1]["fallback"] == "skip" and metrics["clair-skipped"] == 1
    assert all(torch.equal(arrays.to_torch_state_dict()[k], v) for k, v in state.items())
