"""Sets of adapters that agree far more closely than the pool's pairs do count once in every
threshold (:func:`clair_cli.core.insubspace.agreement_groups`): an honest cluster, clients of one
data source, must not set the typical values the rest of the round is judged by."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import torch
from safetensors import safe_open

from benchmarks.synthetic import flagged
from clair_cli.core.audit import ClairAuditor, ModuleInput
from clair_cli.core.rules import PoolSignals
from clair_cli.core.rules.context import Pass
from tests.helpers import bare_signals
from tests.test_core_insubspace import _loose_pool_with_a_tight_set

DATA = Path(__file__).parent / "data" / "cluster_round.safetensors"


def _cluster_round() -> tuple[list[ModuleInput], list[int]]:
    """A federated round of six trained clients (``python -m benchmarks.clustered``: revsucc, seed
    0, layout ``small-one-3``, draw 0): three from one data distribution, three with their own
    distributions; every one honest. Returns the modules and each client's cluster (-1: none)."""
    with safe_open(str(DATA), framework="pt") as f:
        meta = f.metadata()
        names, clusters, scale = json.loads(meta["names"]), json.loads(meta["clusters"]), json.loads(meta["scale"])
        modules = sorted({k.split("/")[1] for k in f.keys()})  # noqa: SIM118 - safe_open has no iterator
        mods = [
            ModuleInput(
                m,
                list(range(len(names))),
                [f.get_tensor(f"{n}/{m}/A") for n in names],
                [f.get_tensor(f"{n}/{m}/B") for n in names],
                [float(scale)] * len(names),
            )
            for m in modules
        ]
    return mods, clusters


def test_a_cluster_of_half_a_round_no_longer_gets_the_loose_half_flagged() -> None:
    mods, clusters = _cluster_round()
    loose = {k for k, c in enumerate(clusters) if c < 0}
    assert len(loose) == 3
    assert flagged(ClairAuditor().fit(mods, len(clusters))) == set()
    # Without the sets counted once, the cluster sets the typical cosine (0.47-0.49) and the three
    # honest clients with data of their own (0.09-0.16) are flagged for their direction.
    with mock.patch.object(PoolSignals, "agreeing_echoes", set()):
        aud = ClairAuditor().fit(mods, len(clusters))
    assert flagged(aud) == loose
    assert all("direction" in {r.rule for r in aud.verdicts_[k].reasons} for k in loose)


def test_a_pass_counts_each_set_once_and_a_gate_keeps_its_references() -> None:
    X = _loose_pool_with_a_tight_set(9, 3, 0.6)
    C = X @ X.T
    order = list(range(12))
    ctx = Pass(bare_signals(12, cosine=C, order=order), set())
    assert ctx.echoes == {10, 11}
    basis = ctx.basis(torch.zeros(12, dtype=torch.float64))
    assert basis.tolist() == [True] * 10 + [False, False]
    # Copies are counted once already; a set is formed among the rest only.
    ctx = Pass(bare_signals(12, cosine=C, order=order, duplicates=[[9, 10]]), set())
    assert ctx.copies == {10} and ctx.echoes == {11}
    gated = Pass(bare_signals(12, cosine=C, order=order, reference=list(range(12))), set())
    assert gated.echoes == set()
