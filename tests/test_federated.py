"""The in-memory pool and one federated round (clair_cli.federated), without Flower."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.synthetic import make_module
from clair_cli import pipeline
from clair_cli.errors import AdapterFormatError
from clair_cli.federated import aggregate_round, client_update
from clair_cli.io.sources import open_adapters
from clair_cli.params import AuditParams
from clair_cli.report.audit import audit_report
from tests.helpers import lora_config, write_adapter

NAMES = ("layers.0.q_proj", "layers.1.q_proj")


def _pool(K: int = 8, bad: tuple[int, ...] = (2,)) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Per client, per module (A, B): benign clients share a subspace, ``bad`` ones do not."""
    mods = {n: make_module(K=K, bad=bad, r=2, spread=0.3, seed=m, dtype=torch.float32) for m, n in enumerate(NAMES)}
    return {f"node-{k}": {n: (mods[n][0][k], mods[n][1][k]) for n in NAMES} for k in range(K)}


def _dense(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float) -> dict[str, torch.Tensor]:
    return {n: scale * B.double() @ A.double() for n, (A, B) in factors.items()}


def test_memory_pool_audits_like_files(tmp_path: Path) -> None:
    """The same factors give the same scores and flags from memory as from adapter files."""
    clients = _pool()
    cfg = lora_config(r=4, lora_alpha=8, target_modules=["q_proj"])
    for name, mods in clients.items():
        tensors = {}
        for n, (A, B) in mods.items():
            tensors[f"base_model.model.{n}.lora_A.weight"] = A.contiguous()
            tensors[f"base_model.model.{n}.lora_B.weight"] = B.contiguous()
        write_adapter(tmp_path / name, tensors, cfg)
    files = pipeline.build_pool(open_adapters([str(tmp_path)]))
    memory = pipeline.pool_from_factors(
        {name: {n: (A, B, 2.0) for n, (A, B) in mods.items()} for name, mods in clients.items()},
        base_model=cfg["base_model_name_or_path"],
    )
    settings = AuditParams()
    from_files = audit_report(pipeline.audit(files, settings))
    from_memory = audit_report(pipeline.audit(memory, settings))
    assert from_memory["flagged"] == from_files["flagged"] == ["node-2"]
    assert [a["score"] for a in from_memory["adapters"]] == [a["score"] for a in from_files["adapters"]]
    assert from_memory["adapters"][0]["source"] == "memory:node-0"


def test_memory_pool_refuses_non_factors() -> None:
    A = torch.randn(4, 12)
    with pytest.raises(AdapterFormatError, match="rank mismatch"):
        pipeline.pool_from_factors({f"c{k}": {"m": (A, torch.randn(16, 3), 1.0)} for k in range(5)})
    with pytest.raises(AdapterFormatError, match="floating point"):
        pipeline.pool_from_factors({f"c{k}": {"m": (A.long(), torch.randn(16, 4).long(), 1.0)} for k in range(5)})


def test_round_merges_the_collaborators_exactly() -> None:
    """New global = rank-r truncation of s B_g A_g + mean of the collaborators' updates."""
    r, s = 4, 2.0
    g = torch.Generator().manual_seed(5)
    glob = {n: (0.1 * torch.randn(r, 40, generator=g), 0.1 * torch.randn(48, r, generator=g)) for n in NAMES}
    clients = _pool()
    # Clients trained from the global: their factors are the global plus their own change.
    clients = {
        c: {n: (glob[n][0] + A / 4, glob[n][1] + B / 4) for n, (A, B) in mods.items()} for c, mods in clients.items()
    }
    res = aggregate_round(glob, clients, dict.fromkeys(NAMES, s), dict.fromkeys(NAMES, r))
    assert res.flagged == [k == 2 for k in range(8)]
    assert res.report is not None and res.report["flagged"] == ["node-2"]
    for n in NAMES:
        target = _dense({n: glob[n]}, s)[n] + torch.stack(
            [_dense({n: clients[c][n]}, s)[n] - _dense({n: glob[n]}, s)[n] for c in res.collaborators]
        ).mean(0)
        u, sv, vh = torch.linalg.svd(target)
        best = (u[:, :r] * sv[:r]) @ vh[:r]
        A, B = res.global_factors[n]
        assert A.shape == glob[n][0].shape and B.shape == glob[n][1].shape
        got = s * B.double() @ A.double()
        assert torch.allclose(got, best, atol=1e-4 * float(best.norm()))
        err = float((target - best).norm() / target.norm())
        assert res.truncation_error[n] == pytest.approx(err, rel=1e-3, abs=1e-6)


def test_update_is_exact() -> None:
    g = torch.Generator().manual_seed(1)
    glob = {"m": (torch.randn(3, 10, generator=g), torch.randn(8, 3, generator=g))}
    client = {"m": (torch.randn(3, 10, generator=g), torch.randn(8, 3, generator=g))}
    A, B, s = client_update(client, glob, {"m": 0.5})["m"]
    assert A.shape == (6, 10) and B.shape == (8, 6)
    want = 0.5 * (client["m"][1] @ client["m"][0] - glob["m"][1] @ glob["m"][0])
    assert torch.allclose(s * B @ A, want, atol=1e-5)


def test_free_rider_and_too_few() -> None:
    r = 4
    glob = {n: (torch.randn(r, 40), torch.zeros(48, r)) for n in NAMES}
    clients = _pool(K=6, bad=())
    clients["node-5"] = {n: (A.clone(), B.clone()) for n, (A, B) in glob.items()}
    res = aggregate_round(glob, clients, dict.fromkeys(NAMES, 1.0), dict.fromkeys(NAMES, r))
    assert res.flagged[5] and "unchanged" in res.reasons[5][0]
    assert res.fallback is None and not any(res.flagged[:5])
    # Four clients: below clair's minimum of five.
    few = {c: clients[c] for c in list(clients)[:4]}
    skip = aggregate_round(glob, few, dict.fromkeys(NAMES, 1.0), dict.fromkeys(NAMES, r))
    assert skip.fallback == "skip" and skip.report is None and "fewer than clair's minimum of 5" in skip.notes[0]
    assert all(torch.equal(skip.global_factors[n][1], glob[n][1]) for n in NAMES)
    median = aggregate_round(glob, few, dict.fromkeys(NAMES, 1.0), dict.fromkeys(NAMES, r), on_too_few="median")
    assert median.fallback == "median" and "geometric median" in median.notes[0]
    assert bool(median.global_factors[NAMES[0]][1].any())
    two = {c: clients[c] for c in list(clients)[:2]}
    skipped = aggregate_round(glob, two, dict.fromkeys(NAMES, 1.0), dict.fromkeys(NAMES, r), on_too_few="median")
    assert skipped.fallback == "skip" and "kept unchanged" in skipped.notes[0]


def test_small_round_median_resists_a_boosted_client() -> None:
    """Four clients, one sending a hundredfold update: the geometric median stays with the
    three others (the plain mean would move 25x as far as one honest update)."""
    r = 4
    glob = {n: (torch.randn(r, 40), torch.zeros(48, r)) for n in NAMES}
    clients = _pool(K=4, bad=())
    honest = {n: torch.stack([_dense({n: clients[c][n]}, 1.0)[n] for c in list(clients)[:3]]) for n in NAMES}
    clients["node-3"] = {n: (A, 100 * B) for n, (A, B) in clients["node-3"].items()}
    res = aggregate_round(glob, clients, dict.fromkeys(NAMES, 1.0), dict.fromkeys(NAMES, r), on_too_few="median")
    assert res.fallback == "median"
    for n in NAMES:
        got = _dense({n: res.global_factors[n]}, 1.0)[n]
        spread = (honest[n] - honest[n].mean(0)).norm(dim=(1, 2)).max()
        assert float((got - honest[n].mean(0)).norm()) < 2 * float(spread)


def _clients_with(bad: str) -> tuple[dict, dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]]:
    glob = {n: (torch.randn(4, 40), torch.zeros(48, 4)) for n in NAMES}
    clients = {c: {n: (A.clone(), B.clone()) for n, (A, B) in mods.items()} for c, mods in _pool(K=8, bad=()).items()}
    if bad == "rank":
        clients["node-3"] = {n: (torch.randn(8, 40), torch.randn(48, 8)) for n in NAMES}
    elif bad == "modules":
        clients["node-3"] = {NAMES[0]: clients["node-0"][NAMES[0]]}
    elif bad in ("nan", "inf"):
        clients["node-3"][NAMES[1]][1][0, 0] = math.nan if bad == "nan" else math.inf
    elif bad == "huge":  # finite, but its update overflows the analysis (float32 Grams)
        clients["node-3"] = {n: (A, B * 1e20) for n, (A, B) in clients["node-3"].items()}
    return glob, clients


@pytest.mark.parametrize(
    "bad, why",
    [
        ("rank", "rank 4 in the LoraConfig"),
        ("modules", "sent LoRA modules other than"),
        ("nan", "NaN or infinite"),
        ("inf", "NaN or infinite"),
        ("huge", "make its update overflow"),
    ],
)
def test_a_malformed_reply_is_left_out_and_the_round_goes_on(bad: str, why: str) -> None:
    glob, clients = _clients_with(bad)
    res = aggregate_round(glob, clients, dict.fromkeys(NAMES, 1.0), dict.fromkeys(NAMES, 4))
    assert res.flagged[3] and res.reasons[3][0].startswith("malformed reply") and why in res.reasons[3][0]
    assert res.fallback is None and res.report is not None and "node-3" not in res.collaborators
    assert any("node-3" in note for note in res.notes)
    for A, B in res.global_factors.values():
        assert bool(A.isfinite().all()) and bool(B.isfinite().all()) and bool(B.any())


@pytest.mark.parametrize("how", ["rebalanced", "balanced near the bound"])
def test_a_reply_whose_update_the_reader_would_refuse_is_left_out_from_the_second_round_on(how: str) -> None:
    """Once the global LoRA is non-zero the update is [A; A_g], [B, -B_g] at rank 2r: the screen
    checks those factors, as the reader will (found by review: a rebalanced reply, A 1e15 and
    B / 1e15, or one just under the bound at rank r, passed the screen and stopped the round)."""
    g = torch.Generator().manual_seed(5)
    glob = {n: (0.1 * torch.randn(4, 40, generator=g), 0.1 * torch.randn(48, 4, generator=g)) for n in NAMES}
    clients = {
        c: {n: (glob[n][0] + A / 4, glob[n][1] + B / 4) for n, (A, B) in mods.items()} for c, mods in _pool().items()
    }
    if how == "rebalanced":
        clients["node-3"] = {n: (A * 1e15, B / 1e15) for n, (A, B) in clients["node-3"].items()}
    else:  # each factor at 0.7 of what the bound allows a rank-4 update: the rank-8 one passes it
        for n, (A, B) in clients["node-3"].items():
            c = (0.7 * 1e12 / (2.0 * 4)) ** 0.5
            clients["node-3"][n] = (A / A.abs().max() * c, B / B.abs().max() * c)
    res = aggregate_round(glob, clients, dict.fromkeys(NAMES, 2.0), dict.fromkeys(NAMES, 4))
    assert res.flagged[3] and "make its update overflow" in res.reasons[3][0]
    assert res.report is not None and "node-3" not in res.collaborators


def test_a_reply_that_could_not_be_read_is_listed_and_left_out() -> None:
    glob, clients = _clients_with("none")
    res = aggregate_round(
        glob, clients, dict.fromkeys(NAMES, 1.0), dict.fromkeys(NAMES, 4), refused={"node-9": "malformed reply: x"}
    )
    assert res.names[-1] == "node-9" and res.flagged[-1] and res.scores[-1] is None
    assert res.reasons[-1] == ["malformed reply: x"] and not any(res.flagged[:-1])


@pytest.mark.parametrize("noise", [0.0, 1e-5])
def test_copies_in_a_round_are_all_left_out(noise: float) -> None:
    """Two clients sending the same (or a nearly identical) update: both are left out, the
    first as well as the copy, since honest clients never send identical updates."""
    glob, clients = _clients_with("none")
    clients["node-7"] = {
        n: (A.clone(), B + noise * B.norm() * torch.randn_like(B)) for n, (A, B) in clients["node-6"].items()
    }
    res = aggregate_round(glob, clients, dict.fromkeys(NAMES, 1.0), dict.fromkeys(NAMES, 4))
    assert res.flagged[6] and res.flagged[7] and not any(res.flagged[:6])
    assert any("cop" in why or "identical" in why for why in res.reasons[6])


@pytest.mark.parametrize("K, kind", [(5, "boost"), (6, "boost"), (6, "flip"), (8, "boost")])
def test_small_rounds_catch_a_boosted_or_flipped_client(K: int, kind: str) -> None:
    glob = {n: (torch.randn(4, 40), torch.zeros(48, 4)) for n in NAMES}
    clients = _pool(K=K, bad=())
    last = f"node-{K - 1}"
    factor = 10.0 if kind == "boost" else -1.0
    clients[last] = {n: (A, factor * B) for n, (A, B) in clients[last].items()}
    res = aggregate_round(glob, clients, dict.fromkeys(NAMES, 1.0), dict.fromkeys(NAMES, 4))
    assert res.flagged == [k == K - 1 for k in range(K)], res.reasons


def test_flower_module_says_how_to_install_it() -> None:
    """Without flwr, importing clair_cli.federated.flower names the extra; the base package never imports flwr."""
    code = (
        "import sys; sys.modules['flwr'] = None\n"
        "import clair_cli, clair_cli.pipeline, clair_cli.federated, clair_cli.cli\n"
        "try:\n    import clair_cli.federated.flower\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "pip install 'clair-lora[flower]'" in out.stdout, out.stderr
    code = "import sys, clair_cli.federated, clair_cli.__main__; print('flwr' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
