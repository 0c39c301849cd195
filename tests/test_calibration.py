"""Calibrated thresholds and the verdict's rules (clair_cli.core.calibration, clair_cli.core.verdict)."""

from __future__ import annotations

import itertools
import math
import tomllib
from pathlib import Path

import pytest
import torch

from benchmarks.synthetic import flagged, make_pool
from clair_cli.core.audit import ClairAuditor
from clair_cli.core.calibration import critical_value, qn_scale, upper_cut


def test_qn_matches_its_definition() -> None:
    g = torch.Generator().manual_seed(0)
    for n in (3, 4, 7, 12):
        x = torch.randn(n, generator=g, dtype=torch.float64)
        pairs = sorted(abs(float(a - b)) for a, b in itertools.combinations(x.tolist(), 2))
        h = n // 2 + 1
        assert float(qn_scale(x)) == pytest.approx(2.2219 * pairs[h * (h - 1) // 2 - 1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_qn_is_the_same_on_every_path_bit_for_bit(dtype: torch.dtype) -> None:
    """NumPy's selection (CPU, float32/64) and torch's kthvalue (other devices, other dtypes,
    tensors that need a gradient) take the same order statistic: the critical values simulated
    with one are those simulated with the other."""
    g = torch.Generator().manual_seed(1)
    for n in (3, 4, 9, 16, 51):
        x = torch.randn(7, 5, n, generator=g, dtype=torch.float64).to(dtype)
        with_grad = x.clone().requires_grad_(True)  # the torch path
        assert torch.equal(qn_scale(x), qn_scale(with_grad).detach())
        assert torch.equal(qn_scale(x.flip(-1)), qn_scale(x))  # a set's order does not matter
        assert torch.equal(qn_scale(x.transpose(0, 1)), qn_scale(x).transpose(0, 1))  # strided input


@pytest.mark.parametrize(("n", "alpha"), [(8, 0.02), (11, 0.01), (30, 0.01)])
def test_critical_value_gives_the_stated_false_flag_rate(n: int, alpha: float) -> None:
    # Direct simulation, independent of the Rao-Blackwellised solution: n values, one new.
    c = critical_value(n, alpha)
    g = torch.Generator().manual_seed(12345)
    draws, hits = 200_000, 0
    for _ in range(draws // 10_000):  # in chunks: Qn holds every pairwise distance
        x = torch.randn(10_000, n + 1, generator=g, dtype=torch.float64)
        basis = x[:, :n]
        hits += int((x[:, n] > basis.quantile(0.5, dim=1) + c * qn_scale(basis)).sum())
    rate = hits / draws
    se = math.sqrt(alpha * (1 - alpha) / draws)
    assert abs(rate - alpha) < 5 * se + 0.05 * alpha


def test_small_pools_need_a_larger_critical_value() -> None:
    assert critical_value(2, 1e-3) == math.inf
    assert critical_value(8, 1e-3) > critical_value(30, 1e-3) > 3.09  # the normal quantile


def test_cut_floors() -> None:
    basis = torch.ones(10, dtype=torch.float64)  # no spread at all: the floor decides
    cut = upper_cut(basis, 1e-3, floor=0.1)
    assert cut is not None and cut.value == pytest.approx(1.1)
    assert upper_cut(basis, 1e-3, floor=0.1, relative=0.5).value == pytest.approx(1.5)  # type: ignore[union-attr]
    assert upper_cut(basis[:2], 1e-3, floor=0.1) is None


def _tamper(mods, ks, factor):
    for m in mods:
        for k in ks:
            m.B[k] = m.B[k] * factor


def test_sign_flips_are_caught_by_direction_where_clients_agree_loosely() -> None:
    # Benign clients agree only loosely (deviations as large as the common update): the
    # in-subspace rule alone caught none of these (README, earlier table).
    for seed in range(3):
        mods = make_pool(M=4, K=20, d_out=64, d_in=48, noise=0.3, spread=1.0, seed=seed)
        _tamper(mods, (5, 6), -1.0)
        aud = ClairAuditor().fit(mods, 20)
        assert {5, 6} <= flagged(aud)
        assert all(any(r.kind == "direction" for r in aud.verdicts_[k].reasons) for k in (5, 6))


def test_another_task_is_caught_by_direction_where_few_modules_agree() -> None:
    # 16 clients that agree on 2 of 12 modules and barely on the rest (deviations 8x the
    # common update), and one adapter of another task. The modules without agreement carry no
    # evidence of direction; weighing them equally hid this adapter in one seed of six.
    from benchmarks.synthetic import make_module
    from clair_cli.core.audit import ModuleInput

    for seed in range(6):
        mods = []
        for m in range(12):
            spread = 0.6 if m < 2 else 8.0
            A, B, s, _ = make_module(K=16, d_out=48, d_in=40, noise=0.3, spread=spread, seed=100 * seed + m)
            A2, B2, s2, _ = make_module(K=1, d_out=48, d_in=40, noise=0.3, spread=0.6, seed=100 * seed + 50 + m)
            mods.append(ModuleInput(f"layers.{m}.q_proj", list(range(17)), A + A2, B + B2, s + s2))
        aud = ClairAuditor().fit(mods, 17)
        assert flagged(aud) == {16}
        assert any(r.kind == "direction" for r in aud.verdicts_[16].reasons)


def test_a_free_rider_is_flagged_for_its_small_norm() -> None:
    mods = make_pool(M=3, K=16, noise=0.3, spread=0.5, seed=1)
    _tamper(mods, (3,), 1e-3)
    aud = ClairAuditor().fit(mods, 16)
    assert flagged(aud) == {3}
    (reason,) = aud.verdicts_[3].reasons
    assert reason.kind == "norm" and reason.ratio < 0.01


def _pool_with_a_copy():
    mods = make_pool(M=3, K=12, noise=0.3, spread=0.5, seed=2)
    for m in mods:  # adapter 11 copies adapter 4
        m.A[11], m.B[11], m.scales[11] = m.A[4].clone(), m.B[4].clone(), m.scales[4]
    return mods


def test_one_copy_of_a_duplicate_group_is_kept_by_name() -> None:
    names = [f"client_{k:02d}" for k in range(12)]
    aud = ClairAuditor().fit(_pool_with_a_copy(), 12, names=names)
    assert flagged(aud) == {11} and aud.verdicts_[11].reasons[0].kind == "duplicate"
    names[11] = "aaa"  # now the copy sorts first: it is kept, and the other is the duplicate
    assert flagged(ClairAuditor().fit(_pool_with_a_copy(), 12, names=names)) == {4}


def test_a_reference_is_kept_over_its_copy() -> None:
    names = [f"client_{k:02d}" for k in range(12)]
    aud = ClairAuditor().fit(_pool_with_a_copy(), 12, reference=list(range(6, 12)), names=names)
    assert flagged(aud) == {4}  # the candidate copying reference 11 is the duplicate


def test_score_above_one_is_a_threshold_rule_flagging() -> None:
    mods = make_pool(M=4, K=20, d_out=64, d_in=48, noise=0.3, bad=(2, 9, 15), seed=0)
    aud = ClairAuditor().fit(mods, 20)
    for v in aud.verdicts_:
        threshold_rules = [r for r in v.reasons if r.kind != "duplicate"]
        assert (v.score > 1) == bool(threshold_rules)
        assert v.score == pytest.approx(max(v.signals.values()))


def test_adapters_of_another_task_are_reported_as_one_group() -> None:
    from benchmarks.synthetic import make_module
    from clair_cli.core.audit import ModuleInput

    mods = []
    for m in range(3):  # 16 adapters of one task, 4 of another (their own consensus)
        A, B, s, _ = make_module(K=16, d_out=48, d_in=40, noise=0.3, spread=0.3, seed=10 + m)
        A2, B2, s2, _ = make_module(K=4, d_out=48, d_in=40, noise=0.3, spread=0.3, seed=50 + m)
        mods.append(ModuleInput(f"layers.{m}.q_proj", list(range(20)), A + A2, B + B2, s + s2))
    aud = ClairAuditor().fit(mods, 20)
    assert flagged(aud) == {16, 17, 18, 19}
    (group,) = aud.groups_
    assert group.members == [16, 17, 18, 19] == group.flagged
    assert group.cosine_within > 0.5 > group.cosine_to_rest


def test_unrelated_outliers_form_no_group() -> None:
    mods = make_pool(M=4, K=20, d_out=64, d_in=48, noise=0.3, bad=(2, 9, 15), seed=0)
    aud = ClairAuditor().fit(mods, 20)
    assert flagged(aud) == {2, 9, 15} and aud.groups_ == []


def test_leave_one_out_cuts_match_one_cut_per_adapter() -> None:
    from clair_cli.core.calibration import leave_one_out_cuts

    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        K = int(torch.randint(3, 25, (1,), generator=g))
        values = torch.randn(K, generator=g, dtype=torch.float64)
        if trial % 4 == 0:
            values[: K // 2] = 1.0  # ties
        if trial % 5 == 0:
            values[0] = math.nan
        basis = torch.rand(K, generator=g) < 0.8
        fast = leave_one_out_cuts(values, basis, 1e-3, 0.1, 0.2)
        for k in range(K):
            if not math.isfinite(float(values[k])):
                continue
            mask = basis & torch.isfinite(values)
            mask[k] = False
            ref = upper_cut(values[mask], 1e-3, 0.1, 0.2)
            got = fast[k]
            assert (ref is None) == (got is None)
            if ref is not None and got is not None:
                assert got.centre == pytest.approx(ref.centre, abs=1e-12)
                assert got.width == pytest.approx(ref.width, rel=1e-9)


def test_distances_without_each_member_match_brute_force_on_large_pools() -> None:
    from clair_cli.core.calibration import _kth_distance_without_each

    g = torch.Generator().manual_seed(1)
    x = torch.randn(1100, generator=g, dtype=torch.float64)  # more members than one chunk
    x[:300] = torch.round(x[:300] * 4) / 4  # ties
    t = 275 * 274 // 2
    got = _kth_distance_without_each(x, t)
    for k in (0, 1, 299, 700, 1023, 1024, 1099):
        others = torch.cat([x[:k], x[k + 1 :]])
        i, j = torch.triu_indices(1099, 1099, 1)
        want = (others[i] - others[j]).abs().kthvalue(t).values
        assert float(got[k]) == float(want)


def test_distances_without_each_member_split_ties_at_the_window_as_the_definition() -> None:
    """Values drawn from three levels: most distances tie, also across the boundary between the
    entries before the window and the window itself (the selection there keeps as many of the
    tied distances as fill it); each member's answer is the t-th distance among the others."""
    from clair_cli.core.calibration import _kth_distance_without_each

    g = torch.Generator().manual_seed(3)
    for n in (4, 5, 9, 16, 33):
        x = torch.randint(0, 3, (3, n), generator=g).double()
        m = n - 1
        t = (m // 2 + 1) * (m // 2) // 2
        got = _kth_distance_without_each(x, t)
        for r in range(3):
            for k in range(n):
                others = torch.cat([x[r, :k], x[r, k + 1 :]])
                i, j = torch.triu_indices(m, m, 1)
                assert float(got[r, k]) == float((others[i] - others[j]).abs().kthvalue(t).values)


def test_the_tabulated_critical_values_are_the_simulated_ones_bit_for_bit() -> None:
    """The shipped table (simulating it took about 0.5 s in every process) holds every level
    the rules use, and each entry is what the simulation gives: on a sample of sizes here,
    every size and level with ``python -m clair_cli.core.calibration`` (which rewrites it)."""
    from clair_cli.core import calibration

    table = calibration._table()
    levels = calibration.tabulated_levels()
    assert {(law, repr(alpha)) for law, alpha in levels} == set(table)
    assert all(len(row) == calibration.LARGE_N - 2 for row in table.values())
    for n in [*range(3, 16), 23, 40, 57, 99, 100]:
        for law, alpha in levels:
            assert critical_value(n, alpha, law) == table[law, repr(alpha)][n - 3]
            assert table[law, repr(alpha)][n - 3] == calibration._solved_critical_value(n, alpha, law), (n, law, alpha)
    package_data = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "core/critical_values.json" in package_data["package-data"]["clair_cli"]  # shipped in the wheel
    # A level the table does not hold is simulated as before.
    assert critical_value(9, 0.0123) == calibration._solved_critical_value(9, 0.0123, calibration.NORMAL)


def test_every_level_the_rules_ask_for_is_tabulated(monkeypatch: pytest.MonkeyPatch) -> None:
    """An audit of a pool (rule 10's levels included) never simulates a critical value."""
    from clair_cli.core import calibration

    asked: list[tuple[int, float, str]] = []
    solved = calibration._solved_critical_value
    monkeypatch.setattr(
        calibration, "_solved_critical_value", lambda n, a, law: asked.append((n, a, law)) or solved(n, a, law)
    )
    calibration.critical_value.cache_clear()
    try:
        for k in (5, 12, 40):
            ClairAuditor().fit(make_pool(M=2, K=k, d_out=32, d_in=24, bad=(0,), seed=k), k)
    finally:
        calibration.critical_value.cache_clear()
    assert asked == []


def test_closed_form_critical_value_continues_the_simulated_one() -> None:
    from clair_cli.core import calibration

    for n in (calibration.LARGE_N - 1, calibration.LARGE_N):  # simulated, both parities
        simulated = calibration.critical_value(n, 1e-3)
        calibration.LARGE_N, saved = n - 1, calibration.LARGE_N
        try:
            closed = calibration.critical_value.__wrapped__(n, 1e-3)
        finally:
            calibration.LARGE_N = saved
        assert closed == pytest.approx(simulated, rel=0.01)
    # Qn's upward bias at finite n (larger for even n) outweighs its noise: near the quantile.
    for n in (101, 500, 2000, 2001):
        assert 3.05 < critical_value(n, 1e-3) < 3.2
    assert critical_value(100_001, 1e-3) == pytest.approx(3.0902, abs=1e-3)  # the normal quantile


def test_an_adapter_with_no_neighbour_is_flagged_as_isolated() -> None:
    # Honest clients agree loosely (spread 1.0): each has neighbours. Another task's adapter,
    # whose update lies elsewhere in every module, has none.
    from clair_cli.report.audit import reason_text
    from clair_cli.report.modules import ModuleNames

    for seed in range(3):
        mods = make_pool(M=4, K=17, r=2, spread=1.0, noise=0.3, seed=seed)
        g = torch.Generator().manual_seed(99 + seed)
        for m in mods:  # adapter 16: another task (random factors of the same ranks)
            m.A[16] = torch.randn(m.A[16].shape, generator=g, dtype=torch.float64)
            m.B[16] = torch.randn(m.B[16].shape, generator=g, dtype=torch.float64)
        aud = ClairAuditor().fit(mods, 17)
        v = aud.verdicts_[16]
        assert v.signals["isolated"] > 1, v.signals
        reason = next(r for r in v.reasons if r.kind == "isolated")
        assert reason.value == reason.cosine < reason.threshold < reason.typical / 3 + 1e-12
        assert "shares almost nothing with any other adapter" in reason_text(reason, [], ModuleNames(["m"]))
        assert all(aud.verdicts_[k].signals.get("isolated", 0.0) < 1 for k in range(16))


def test_attackers_pairing_with_honest_clients_do_not_get_the_others_flagged_as_isolated() -> None:
    # Six attackers among twelve honest clients, each a copy of one honest client's deviation
    # from the mean (x1.2) with half the mean and noise in the honest deviations' span: half the
    # pool has a close neighbour and the others' typical nearest cosine rises. Judged against it,
    # honest clients 7 and 11, whom nobody copied, lay under a third of it (the adaptive search's
    # framing, docs/security.md "Free riders posing as a population"); their third-nearest
    # cosines, which one attacker cannot raise, cap the typical.
    from clair_cli.core.audit import ModuleInput

    g = torch.Generator().manual_seed(7)
    mods = []
    for mod in make_pool(M=4, K=12, r=2, spread=2.0, noise=0.3, seed=0):
        W = torch.stack([s * b @ a for a, b, s in zip(mod.A, mod.B, mod.scales, strict=True)])
        mean, N = W.mean(0), W.norm(dim=(1, 2)).median()
        A, B, S = list(mod.A), list(mod.B), list(mod.scales)
        for j in range(6):
            e = torch.einsum("k,kij->ij", torch.randn(12, generator=g, dtype=torch.float64), W - mean)
            u, sv, vh = torch.linalg.svd(0.5 * mean + 1.2 * (W[j] - mean) + 0.5 * N * e / e.norm())
            A.append(vh[:8].clone())
            B.append((u[:, :8] * sv[:8]).clone())
            S.append(1.0)
        mods.append(ModuleInput(mod.name, list(range(18)), A, B, S))
    aud = ClairAuditor().fit(mods, 18)
    assert not flagged(aud) & set(range(12)), [(k, aud.verdicts_[k].reasons) for k in flagged(aud)]
    assert flagged(aud) == {15}


def test_the_isolated_rule_is_off_where_adapters_share_only_a_subspace() -> None:
    for seed in range(3):  # no consensus: nearest neighbours are chance, so no signal
        aud = ClairAuditor().fit(make_pool(M=3, K=20, noise=0.3, seed=seed), 20)
        assert all("isolated" not in v.signals for v in aud.verdicts_)


def test_a_chance_isolated_honest_adapter_is_not_flagged() -> None:
    # One module, ten honest adapters that share a subspace, not a direction: adding one
    # whose nearest neighbour is far (by chance) must not flag it (hypothesis found seed 6712).
    from benchmarks.synthetic import make_module
    from clair_cli.core.audit import ModuleInput

    A, B, s, _ = make_module(K=13, bad=(0, 1, 2), seed=6712)
    aud = ClairAuditor(dtype=torch.float64).fit([ModuleInput("m", list(range(13)), A, B, s)], 13)
    assert flagged(aud) == {0, 1, 2}


def test_a_reason_serialises_its_rule_fields_between_kind_and_what_was_compared() -> None:
    from clair_cli.core.rules import Reason

    reason = Reason(
        kind="off_subspace",
        share=0.5,
        modules=("b", "a"),
        across_modules=False,
        module="b",
        rule="module",
        value=0.6,
        threshold=0.55,
        compare=">",
        margin=1.2,
    )
    keys = ["kind", "share", "modules", "across_modules", "module", "rule", "value", "threshold", "compare", "margin"]
    assert list(reason.to_dict()) == keys and reason.to_dict()["modules"] == ["b", "a"]
    copy = Reason(kind="duplicate", of=(3,), rule="duplicate", value=None, threshold=0.999, compare=">", margin=None)
    assert copy.to_dict() == {
        "kind": "duplicate",
        "of": [3],
        "rule": "duplicate",
        "value": None,
        "threshold": 0.999,
        "compare": ">",
        "margin": None,
    }


def test_the_rules_are_registered_in_the_order_they_run() -> None:
    from clair_cli.core import rules
    from clair_cli.core.verdict import POINTING

    names = [
        "direction",
        "whole_direction",
        "off_subspace",
        "joint",
        "module",
        "in_subspace",
        "norm",
        "module_direction",
        "module_norm",
        "module_projection",
        "spectral",
        "isolated",
        "opposed",
        "module_opposed",
        "pull",
        "duplicate",
        "coordinated",
    ]
    assert [r.name for r in rules.RULES] == names
    assert POINTING == ("direction", "whole_direction", "off_subspace", "joint")
    assert rules.get("norm") is rules.RULES[6]
    with pytest.raises(ValueError, match="the rules are: direction, whole_direction, off_subspace"):
        rules.get("nope")


def test_cuts_of_many_rows_are_each_rows_cuts_bit_for_bit() -> None:
    """The per-module rules' batched cuts (one row a module, bases that differ between rows,
    rows with too few values, NaNs and ties) equal :func:`leave_one_out_cuts` row by row."""
    from clair_cli.core.calibration import leave_one_out_cuts, leave_one_out_rows

    g = torch.Generator().manual_seed(2)
    for K in (3, 5, 8, 13):
        values = torch.randn(40, K, generator=g, dtype=torch.float64)
        values[::3, : K // 2] = 0.5  # ties
        values[torch.rand(40, K, generator=g) < 0.1] = math.nan
        basis = torch.rand(40, K, generator=g) < 0.85
        basis[::7] = True  # many rows with one basis: batched together
        for capped in (False, True):
            centre, width = leave_one_out_rows(values, basis, 1e-4, 0.05, 0.1, capped=capped)
            for row in range(40):
                for k, cut in enumerate(leave_one_out_cuts(values[row], basis[row], 1e-4, 0.05, 0.1, capped=capped)):
                    if cut is None:
                        assert math.isnan(centre[row, k]) and math.isnan(width[row, k])
                    else:
                        assert (float(centre[row, k]), float(width[row, k])) == (cut.centre, cut.width)


def test_distances_without_each_member_batched_over_rows() -> None:
    from clair_cli.core.calibration import _kth_distance_without_each

    g = torch.Generator().manual_seed(3)
    x = torch.round(torch.randn(30, 9, generator=g, dtype=torch.float64) * 3) / 3  # ties
    t = 5 * 4 // 2
    rows = _kth_distance_without_each(x, t)
    for r in range(30):
        assert torch.equal(rows[r], _kth_distance_without_each(x[r], t))
        for k in range(9):
            others = torch.cat([x[r, :k], x[r, k + 1 :]])
            i, j = torch.triu_indices(8, 8, 1)
            assert float(rows[r, k]) == float((others[i] - others[j]).abs().kthvalue(t).values)


def test_a_centre_stays_within_one_spread_of_near() -> None:
    """``near`` (the norm rules: the whole pool's median) raises a leave-one-out centre to at most
    one spread (the others' Qn scale) below it, and nothing else: the width is the others' as
    before, and rows batched together get each row's own numbers."""
    from clair_cli.core.calibration import leave_one_out_cuts, leave_one_out_rows

    g = torch.Generator().manual_seed(3)
    for trial in range(40):
        K = int(torch.randint(4, 16, (1,), generator=g))
        values = torch.randn(K, generator=g, dtype=torch.float64)
        if trial % 2 == 0:  # nearly half far below the rest: the others' median is the midpoint
            values[: (K - 1) // 2] -= 12.0
        basis = torch.rand(K, generator=g) < 0.9
        near = float(values.median()) if trial % 3 else math.nan
        plain = leave_one_out_cuts(values, basis, 1e-3, 0.1)
        raised = leave_one_out_cuts(values, basis, 1e-3, 0.1, near=near)
        for k in range(K):
            mask = basis.clone()
            mask[k] = False
            if int(mask.sum()) < 3:
                continue
            sigma = float(qn_scale(values[mask]))
            assert plain[k] is not None and raised[k] is not None
            expected = plain[k].centre if math.isnan(near) else max(plain[k].centre, near - sigma)
            assert raised[k].centre == pytest.approx(expected, abs=1e-12)
            assert raised[k].width == plain[k].width
        rows = torch.stack([values, values.flip(0)])
        centre, width = leave_one_out_rows(rows, basis.expand(2, K), 1e-3, 0.1, near=torch.tensor([near, near]))
        assert [(c.centre if c else math.nan) for c in raised] == pytest.approx(centre[0].tolist(), nan_ok=True)


def test_nearly_half_far_below_does_not_set_the_norm_centre() -> None:
    """Four values of nine far below five honest ones (log-norms of near-zero modules): the others'
    median of an honest value is the midpoint of the two groups, six spreads under it; with ``near``
    at the whole pool's median its centre is within a spread of the honest values, and its cut (the
    norm rules' floor, log 4) is not passed by any honest value."""
    from clair_cli.core.calibration import leave_one_out_cuts

    honest = torch.tensor([0.0, 0.1, -0.1, 0.15, -0.05], dtype=torch.float64)
    values = torch.cat([honest, torch.tensor([-14.0, -14.1, -13.9, -14.05], dtype=torch.float64)])
    basis = torch.ones(9, dtype=torch.bool)
    plain = leave_one_out_cuts(values, basis, 1e-3, math.log(4))
    assert any(cut is not None and float(values[k]) > cut.value for k, cut in enumerate(plain[:5]))
    raised = leave_one_out_cuts(values, basis, 1e-3, math.log(4), near=float(values.median()))
    assert all(cut is not None and float(values[k]) <= cut.value for k, cut in enumerate(raised[:5]))


def test_leave_one_out_spreads_in_chunks_of_rows_are_the_whole_bit_for_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Qn and the leave-one-out distances of thousands of modules' rows are computed a chunk of
    rows at a time (their ``n^2 / 2`` distances per row took hundreds of MiB for 1,000 modules of
    128 adapters): the same numbers, bit for bit, ties included, for 2-D and stacked inputs."""
    from clair_cli.core import calibration

    g = torch.Generator().manual_seed(5)
    x = torch.round(torch.randn(37, 11, generator=g, dtype=torch.float64) * 4) / 4  # ties
    t = 6 * 5 // 2
    qn, kth = calibration.qn_scale(x), calibration._kth_distance_without_each(x, t)
    stacked = calibration.qn_scale(x.reshape(37, 1, 11))
    monkeypatch.setattr(calibration, "CHUNK_DISTANCES", 3 * 55)  # chunks of 3 rows
    assert torch.equal(calibration.qn_scale(x), qn)
    assert torch.equal(calibration.qn_scale(x.reshape(37, 1, 11)), stacked) and stacked.shape == (37, 1)
    assert torch.equal(calibration._kth_distance_without_each(x, t), kth)
    assert torch.equal(calibration.qn_scale(x.float()), calibration.qn_scale(x.float()[None])[0])
