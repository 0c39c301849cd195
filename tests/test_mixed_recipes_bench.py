"""The mixed-recipe benchmark's pure helpers (benchmarks/mixed_recipes.py): recipe draws and the Wilson interval."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

from benchmarks import mixed_recipes as mr  # noqa: E402


def test_recipes_are_deterministic_per_task_and_seed() -> None:
    a = mr.draw_recipes(0, "revsucc", 12)
    assert a == mr.draw_recipes(0, "revsucc", 12)
    assert a != mr.draw_recipes(1, "revsucc", 12)
    assert a != mr.draw_recipes(0, "majority", 12)
    assert a != mr.draw_recipes(0, "revsucc", 12, stream=1)  # the contaminated clients' stream
    assert mr.draw_recipes(0, "revsucc", 5) == a[:5]  # a prefix: one client's recipe does not depend on n


def test_recipes_stay_in_the_spread() -> None:
    recipes = [r for seed in range(20) for r in mr.draw_recipes(seed, "majority", 12)]
    for r in recipes:
        assert r.rank in mr.RANKS and r.alpha // r.rank in mr.ALPHA_FACTORS and r.alpha % r.rank == 0
        assert mr.LR_RANGE[0] <= r.lr <= mr.LR_RANGE[1] and r.steps in mr.STEPS
        assert r.targets == mr.ALL_TARGETS or r.targets in mr.TARGET_SUBSETS
        assert "c_attn" in r.targets
        assert r.scale == pytest.approx(r.alpha / (math.sqrt(r.rank) if r.use_rslora else r.rank))
    # every value of every property turns up in 240 draws
    assert {r.rank for r in recipes} == set(mr.RANKS)
    assert {r.steps for r in recipes} == set(mr.STEPS)
    assert {r.targets for r in recipes} == {mr.ALL_TARGETS, *mr.TARGET_SUBSETS}
    assert {r.use_rslora for r in recipes} == {False, True}


def test_full_recipes_differ_only_in_targets() -> None:
    mixed = mr.draw_recipes(2, "revsucc", 12)
    full = mr.draw_recipes(2, "revsucc", 12, full=True)
    assert all(f.targets == mr.ALL_TARGETS for f in full)
    assert [(m.rank, m.alpha, m.use_rslora, m.lr, m.steps) for m in mixed] == [
        (f.rank, f.alpha, f.use_rslora, f.lr, f.steps) for f in full
    ]


def test_wilson_interval() -> None:
    lo, hi = mr.wilson(0, 12)
    assert lo == 0.0 and hi == pytest.approx(0.2425, abs=1e-3)
    lo, hi = mr.wilson(5, 10)  # symmetric about one half
    assert lo == pytest.approx(1 - hi) and lo == pytest.approx(0.2366, abs=1e-3)
    assert mr.wilson(0, 0) == (0.0, 1.0)
    lo, hi = mr.wilson(3, 216)
    assert lo < 3 / 216 < hi
