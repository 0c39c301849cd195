"""Rules 12 and 13 (direction and norm per module) and copies scaled by another factor.

An update honest in every module but one, sign-flipped there, moved rule 1's average over
modules by one module's worth and no whole-update statistic at all: on the project's trained
pools one such client of twelve took the merge from 0.72 to 0.42 unflagged. And a copy of an
honest client's update scaled by 3, under a name that sorts first, had the honest client
flagged as the copy and its own boosted update merged.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks.attacks import read_factors
from clair_cli import pipeline
from clair_cli.core import verdict
from clair_cli.core.rules import Pass, PoolSignals
from clair_cli.core.rules.direction import ModuleDirection
from clair_cli.core.rules.norm import ModuleNorm
from clair_cli.params import AuditParams
from clair_cli.report.audit import reason_text
from clair_cli.report.modules import ModuleNames

SAMPLES = Path(__file__).parents[1] / "sample_adapters"
HONEST = [f"client_{k:02d}" for k in range(1, 13)]  # the sample pool's twelve honest clients


@pytest.fixture(scope="module")
def honest() -> dict[str, dict]:
    return {n: read_factors(SAMPLES / n) for n in HONEST}


def _audit(pool_factors: dict[str, dict], rules=None):
    pool = pipeline.pool_from_factors(pool_factors, base_model="gpt2")
    saved = verdict.RULES
    try:
        if rules is not None:
            verdict.RULES = rules
        out = pipeline.audit(pool, AuditParams())
    finally:
        verdict.RULES = saved
    return {n: v for n, v in zip(pool.names, out.auditor.verdicts_, strict=True)}


def _one_module(factors: dict, module: str, c: float) -> dict:
    out = dict(factors)
    A, B, s = out[module]
    out[module] = (A, c * B, s)
    return out


def test_a_sign_flip_in_one_module_of_eight_is_flagged_and_nothing_else(honest) -> None:
    module = next(iter(honest["client_04"]))  # layer 0 c_attn
    pool = {n: f for n, f in honest.items() if n != "client_04"}
    pool["zz_attacker"] = _one_module(honest["client_04"], module, -1.0)
    before = tuple(r for r in verdict.RULES if r.name not in ("module_direction", "module_norm", "module_projection"))
    assert not _audit(pool, before)["zz_attacker"].flagged  # what rules 1-11 alone let through
    verdicts = _audit(pool)
    v = verdicts["zz_attacker"]
    assert v.flagged and [r.rule for r in v.reasons] == ["module_direction"]
    reason = v.reasons[0]
    assert reason.module == module and reason.compare == "<" and reason.cosine < 0 < reason.typical
    assert reason.value < reason.threshold and reason.margin > 1
    assert not any(verdicts[n].flagged for n in pool if n != "zz_attacker")
    text = reason_text(reason, list(verdicts), ModuleNames([module]))
    assert "points away from the others' there" in text and f"{reason.cosine:+.2f}" in text


def test_the_honest_sample_clients_trip_neither_rule(honest) -> None:
    verdicts = _audit(honest)
    assert not any(v.flagged for v in verdicts.values())
    assert all({"module_direction", "module_norm"} <= set(v.signals) for v in verdicts.values())
    assert max(max(v.signals["module_direction"], v.signals["module_norm"]) for v in verdicts.values()) < 1


def _signals(norms: list[list[float]], cosines: list[list[float]]) -> PoolSignals:
    """A pool of K adapters over len(norms) modules with the given per-module values."""
    K = len(norms[0])
    names = [f"m{i}" for i in range(len(norms))]
    return PoolSignals(
        n_adapters=K,
        shares={n: torch.full((K,), 0.1) for n in names},
        members={n: list(range(K)) for n in names},
        structured=dict.fromkeys(names, True),
        sq_norms=torch.ones(K, dtype=torch.float64),
        duplicates=[],
        module_direction={n: torch.tensor(c, dtype=torch.float64) for n, c in zip(names, cosines, strict=True)},
        module_norms={n: torch.tensor(x, dtype=torch.float64) for n, x in zip(names, norms, strict=True)},
    )


def test_module_norm_flags_past_its_floor_upward_only() -> None:
    g = torch.Generator().manual_seed(0)
    K, M = 16, 4
    norms = (1 + 0.05 * torch.randn(M, K, generator=g, dtype=torch.float64)).tolist()
    cos = (0.5 + 0.02 * torch.randn(M, K, generator=g, dtype=torch.float64)).tolist()
    norms[2][3] = 4.4  # past the floor of 4x on one module
    norms[1][5] = 3.6  # under it: a tight pool's spread alone would flag it, the floor does not
    norms[0][7] = 0.01  # far below: a module left small is not this rule's
    ctx = Pass(_signals(norms, cos), set())
    ModuleNorm().apply(ctx)
    assert [k for k, v in enumerate(ctx.verdicts) if v.flagged] == [3]
    reason = ctx.verdicts[3].reasons[0]
    assert reason.module == "m2" and reason.ratio == pytest.approx(4.4, rel=0.05) and reason.threshold == 4.0


def test_module_direction_is_off_where_the_others_agree_on_no_direction() -> None:
    g = torch.Generator().manual_seed(1)
    K, M = 16, 3
    cos = (0.05 + 0.02 * torch.randn(M, K, generator=g, dtype=torch.float64)).tolist()  # typical 0.05
    cos[0][2] = -0.9
    ctx = Pass(_signals([[1.0] * K] * M, cos), set())
    ModuleDirection().apply(ctx)
    assert not any(v.flagged for v in ctx.verdicts)
    assert "module_direction" not in ctx.verdicts[2].signals  # not measured at all
    cos = [[c + 0.4 for c in row] for row in cos]  # typical 0.45: now it is
    cos[0][2] = -0.5
    ctx = Pass(_signals([[1.0] * K] * M, cos), set())
    ModuleDirection().apply(ctx)
    assert [k for k, v in enumerate(ctx.verdicts) if v.flagged] == [2]


@pytest.mark.parametrize("c", [3.0, 0.2])
def test_a_scaled_copy_does_not_get_the_client_it_copies_flagged(honest, c: float) -> None:
    copy = {m: (A, c * B, s) for m, (A, B, s) in honest["client_05"].items()}
    verdicts = _audit({"aaa_copy": copy, **honest})
    assert not any(r.kind == "duplicate" for r in verdicts["client_05"].reasons)
    # Never the original flagged and the copy merged (the pair can be flagged together: a x3
    # copy and its original pull the mean one way, rule 11).
    assert verdicts["aaa_copy"].flagged or not verdicts["client_05"].flagged


def test_an_exact_copy_is_still_one_update_sent_twice(honest) -> None:
    verdicts = _audit({"aaa_copy": dict(honest["client_05"]), **honest})
    flagged_as_copy = [n for n in ("aaa_copy", "client_05") if any(r.kind == "duplicate" for r in verdicts[n].reasons)]
    assert len(flagged_as_copy) == 1


def test_the_copy_kept_is_the_one_whose_norm_is_nearest_the_median() -> None:
    sq = torch.tensor([1.0, 1.1, 0.9, 9.0, 0.04, 1.0], dtype=torch.float64)  # 3: a x3 copy, 4: a x0.2 copy
    order = verdict.copy_order(sq, ["b", "c", "d", "aaa", "aab", "a"])
    assert order([0, 3]) == [0, 3] and order([4, 0]) == [0, 4]
    assert order([0, 5]) == [5, 0]  # identical copies: the first by name
    assert verdict.copy_order(sq, None, trusted=[3])([3, 0]) == [3, 0]  # a reference first


def test_a_copy_refactored_is_tied_with_its_original_whatever_the_rounding() -> None:
    """One update re-factored (B c, A / c) differs in norm by rounding only: the name decides, in
    either direction of the rounding (the attack benchmark's ``rebalance`` had honest clients named
    as copies of their own re-factored updates)."""
    for eps in (1e-9, -1e-9, 1e-5, -1e-5):
        sq = torch.tensor([1.0, 1.2, 0.8, 1.0 + eps, 1.1], dtype=torch.float64)
        assert verdict.copy_order(sq, ["h00", "h01", "h02", "x00", "h03"])([3, 0]) == [0, 3]
    sq = torch.tensor([1.0, 1.2, 0.8, 1.01, 1.1], dtype=torch.float64)  # 0.5 % in norm: not rounding
    assert verdict.copy_order(sq, ["h00", "h01", "h02", "x00", "h03"])([0, 3]) == [3, 0]


def test_module_projection_flags_a_flipped_and_scaled_module_only_against_the_others() -> None:
    from clair_cli.core.rules.direction import ModuleProjection

    g = torch.Generator().manual_seed(3)
    K, M = 16, 4
    norms = (1 + 0.1 * torch.randn(M, K, generator=g, dtype=torch.float64)).tolist()
    cos = (0.4 + 0.15 * torch.randn(M, K, generator=g, dtype=torch.float64)).tolist()  # loose agreement
    cos[1][4], norms[1][4] = -0.45, 3.5  # against the others, scaled under the norm floor
    cos[2][6], norms[2][6] = 0.0, 3.5  # orthogonal, as large: not against anyone
    ctx = Pass(_signals(norms, cos), set())
    ModuleProjection().apply(ctx)
    assert [k for k, v in enumerate(ctx.verdicts) if v.flagged] == [4]
    reason = ctx.verdicts[4].reasons[0]
    assert reason.module == "m1" and reason.value == pytest.approx(
        -0.45 * 3.5 / float(torch.tensor(norms[1]).median()), rel=1e-6
    )
    assert reason.value < reason.threshold < 0 < reason.typical


def test_a_flipped_copy_of_one_module_does_not_get_the_original_flagged(honest) -> None:
    """A copy of an honest client's update flipped in one module agrees with the original far
    more closely than the pool does (a coordinated pair): the per-module rules that flag the
    copy do not flag the pair."""
    module = next(iter(honest["client_04"]))
    verdicts = _audit({"zz_copy": _one_module(honest["client_04"], module, -1.0), **honest})
    assert verdicts["zz_copy"].flagged and not verdicts["client_04"].flagged


def test_the_norm_bound_bounds_each_module_too(honest) -> None:
    from clair_cli.core.influence import module_bounded_weights
    from clair_cli.params import MergeOptions

    module = next(iter(honest["client_04"]))
    pool_factors = {n: f for n, f in honest.items() if n != "client_04"}
    pool_factors["zz"] = _one_module(honest["client_04"], module, 3.5)  # under every norm floor
    pool = pipeline.pool_from_factors(pool_factors, base_model="gpt2")
    out = pipeline.audit(pool, AuditParams())
    assert not out.auditor.flagged_[pool.names.index("zz")]
    merged = pipeline.merge(pool, "clair", AuditParams(), options=MergeOptions(norm_bound=1.5), outcome=out)
    bounded = merged.modules[module].info["module_norm_bounded"]
    assert list(bounded) == [pool.names.index("zz")] and 0 < bounded[pool.names.index("zz")] < 0.5
    assert all("module_norm_bounded" not in r.info for m, r in merged.modules.items() if m != module)
    summary = merged.summary()
    assert summary["module_norm_bounded"] == {
        module: {str(pool.names.index("zz")): pytest.approx(bounded[pool.names.index("zz")], abs=1e-6)}
    }
    assert any("module's norm bound" in n for n in merged.notes)
    # The function alone: weights as given where nothing is above the bound.
    A = [torch.eye(2, dtype=torch.float64)] * 4
    B = [torch.eye(2, dtype=torch.float64)] * 4
    assert module_bounded_weights(A, B, [1.0] * 4, None) == (None, {})
    w, at = module_bounded_weights(A, B, [1.0, 1.0, 1.0, 5.0], [0.25] * 4, 1.5)
    assert list(at) == [3] and at[3] == pytest.approx(1.5 / 5) and sum(w) == pytest.approx(1.0)


def test_a_negative_alpha_pattern_is_noted_and_its_flip_flagged(tmp_path: Path) -> None:
    """The one-module flip through the config alone: honest tensors byte for byte, and an
    ``alpha_pattern`` entry that PEFT applies as a negative scale on one module."""
    import json
    import shutil

    from tests.helpers import run_cli

    pool = tmp_path / "pool"
    for name in HONEST:
        if name != "client_04":
            shutil.copytree(SAMPLES / name, pool / name)
    shutil.copytree(SAMPLES / "client_04", pool / "zz_attacker")
    config_path = pool / "zz_attacker" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["alpha_pattern"] = {r"^transformer\.h\.0\.attn\.c_attn": -config["lora_alpha"]}
    config_path.write_text(json.dumps(config))
    proc = run_cli("audit", str(pool), "--json", "-", "-q", "--exit-zero")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    verdicts = {a["name"]: a for a in report["adapters"]}
    assert verdicts["zz_attacker"]["flagged"]
    assert not any(a["flagged"] for n, a in verdicts.items() if n != "zz_attacker")
    assert {r["rule"] for r in verdicts["zz_attacker"]["reasons"]} & {"module_direction", "module_projection"}
    assert any("negative LoRA scale" in note and "sign-flipped" in note for note in verdicts["zz_attacker"]["notes"])
