"""Rule 9 (``opposed``): a group that points against the rest of the pool."""

from __future__ import annotations

import pytest
import torch

from benchmarks.synthetic import flagged, make_pool
from clair_cli.core.audit import ClairAuditor


def _flip(mods, members):
    for m in mods:
        for k in members:
            m.B[k] = -m.B[k]
    return mods


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_third_of_the_pool_flipped_is_caught_as_a_group(seed: int) -> None:
    """Six of eighteen honest-looking clients sign-flipped: a third of the pool drags the
    centre rule 1 measures against; as a group they point against the rest."""
    K, bad = 18, tuple(range(12, 18))
    mods = _flip(make_pool(M=3, K=K, spread=1.0, seed=seed), bad)
    aud = ClairAuditor().fit(mods, K)
    assert flagged(aud) == set(bad)
    opposed = [r for k in bad for r in aud.verdicts_[k].reasons if r.rule == "opposed"]
    assert len(opposed) == len(bad)
    for r in opposed:
        assert r.value < -0.2 and len(r.of or ()) == len(bad) - 1


def test_loose_pools_flag_no_honest_client_with_the_group() -> None:
    """Where honest clients agree only loosely (spread 2), some of them sit near or below zero
    against the rest's mean; the group takes only members past the calibrated cut."""
    for seed in range(3):
        mods = _flip(make_pool(M=3, K=18, spread=2.0, seed=seed), tuple(range(12, 18)))
        aud = ClairAuditor().fit(mods, 18)
        assert flagged(aud) <= set(range(12, 18)), seed


@pytest.mark.parametrize("kw", [dict(spread=0.5), dict(spread=2.0), dict(kind="independent"), dict()])
def test_honest_pools_have_no_opposed_group(kw: dict) -> None:
    """Pools with a common direction never split against themselves; pools without one (no
    consensus: independent updates, or coefficients drawn independently inside one
    subspace) may split by chance, and there the rule is off."""
    for seed in range(6):
        aud = ClairAuditor().fit(make_pool(M=3, K=12, seed=seed, **kw), 12)
        assert not any(v.signals.get("opposed", 0.0) > 1 for v in aud.verdicts_), (kw, seed)


def test_a_lone_flipped_client_in_a_small_pool() -> None:
    mods = _flip(make_pool(M=2, K=6, spread=1.0, seed=7), (5,))
    aud = ClairAuditor().fit(mods, 6)
    assert flagged(aud) == {5}
    assert torch.isfinite(torch.tensor(aud.verdicts_[5].score))
