"""Rule 1's later passes judge every adapter against the centre of the adapters the previous
pass let through (:class:`clair_cli.core.insubspace.DirectionCentres`)."""

from __future__ import annotations

import pytest
import torch
from helpers import bare_signals

from benchmarks.synthetic import flagged, tight_pool
from clair_cli.core.audit import ClairAuditor, ModuleInput
from clair_cli.core.insubspace import DirectionCentres, direction_cosines, direction_pairs
from clair_cli.core.rules import Pass, PoolSignals


def _unit_gram(seed: int, K: int = 9, d: int = 30) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(K, d, generator=g, dtype=torch.float64) + 0.7 * torch.randn(d, generator=g, dtype=torch.float64)
    X = X / X.norm(dim=1, keepdim=True)
    return X @ X.T


@pytest.mark.parametrize("seed", [0, 1])
def test_centres_without_a_set_are_the_centres_fitted_on_the_rest(seed: int) -> None:
    C, K = _unit_gram(seed), 9
    groups, mass = {3: [3, 4], 4: [3, 4]}, torch.tensor([1.0, 1, 1, 0.5, 0.5, 1, 1, 1, 1], dtype=torch.float64)
    fit_on = torch.ones(K, dtype=torch.bool)
    centres = DirectionCentres(C, fit_on, list(range(K)), groups, mass, pairs=True)
    cos, pairs = centres(frozenset({1, 6}))
    rest = fit_on.clone()
    rest[[1, 6]] = False
    torch.testing.assert_close(cos, direction_cosines(C, rest, groups, mass), rtol=1e-12, atol=1e-12)
    assert pairs is not None
    torch.testing.assert_close(pairs, direction_pairs(C, rest, groups, mass), rtol=1e-12, atol=1e-12, equal_nan=True)
    assert centres(frozenset({1, 6}))[0] is cos  # cached per set
    # The canonical order only fixes the arithmetic's order: the same values, to rounding.
    order = list(reversed(range(K)))
    other = DirectionCentres(C, fit_on, order, groups, mass, pairs=False)(frozenset({1, 6}))
    torch.testing.assert_close(other[0], cos, rtol=1e-9, atol=1e-12)
    assert other[1] is None


def _with_flipped_copies(mods: list[ModuleInput], victims: tuple[int, ...]) -> list[ModuleInput]:
    """The pool plus, for each victim, its update with the sign flipped (a new adapter)."""
    out = []
    for m in mods:
        K = len(m.members)
        extra = list(range(K, K + len(victims)))
        out.append(
            ModuleInput(
                m.name,
                m.members + extra,
                m.A + [m.A[v] for v in victims],
                m.B + [-m.B[v] for v in victims],
                m.scales + [m.scales[v] for v in victims],
            )
        )
    return out


@pytest.mark.parametrize("K", [12, 15])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_sign_flipped_copies_do_not_get_their_victims_flagged(K: int, seed: int) -> None:
    """Three attackers each send an honest client's update with its sign flipped. Against
    centres that include them, each victim's cosine falls by the share its own negative holds
    in the centre, and where the honest pool agrees loosely (pairwise cosine about 0.1) the
    victims were flagged with the attackers (every seed here). Judged against the centre of
    the adapters that pass, only the attackers are."""
    victims = (0, 1, 2)
    mods = _with_flipped_copies(tight_pool(K, seed=seed, own=3.0), victims)
    aud = ClairAuditor().fit(mods, K + len(victims))
    assert flagged(aud) == {K, K + 1, K + 2}


def _signals(K: int, recentre) -> PoolSignals:
    return bare_signals(K, direction=torch.zeros(K, dtype=torch.float64), recentre=recentre)


def test_a_pass_recentres_only_without_a_minority() -> None:
    """The centres leave out what the previous pass flagged only while that is a minority
    of the pool (else the flagged set says more about the pool than about the adapters)."""
    asked: list[frozenset[int]] = []

    def recentre(without: frozenset[int]) -> tuple[torch.Tensor, None]:
        asked.append(without)
        return torch.ones(6, dtype=torch.float64), None

    signals = _signals(6, recentre)
    assert float(Pass(signals, set()).direction_cosine.sum()) == 0  # the first pass: the whole pool's
    assert float(Pass(signals, {0, 1}).direction_cosine.sum()) == 6
    assert float(Pass(signals, {0, 1, 2}).direction_cosine.sum()) == 0  # half: not a minority
    assert asked == [frozenset({0, 1})]


def test_near_misses_leave_a_majority_to_set_the_thresholds() -> None:
    """The flagged and the near misses left out of the bases stay a minority of the pool,
    the largest misses first: in a pool of five, at most two."""
    from clair_cli.core.rules import AdapterVerdict
    from clair_cli.core.verdict import _suspects

    margins = [0.35, -0.8, 0.48, 0.9, 2.35]
    verdicts = [AdapterVerdict(k, m, m > 1, signals={"direction": m}) for k, m in enumerate(margins)]
    assert _suspects(verdicts, frozenset({4}), 0.3, set()) == {4, 3}
    assert _suspects(verdicts, frozenset(), 0.3, set()) == {4, 3}
    assert _suspects(verdicts, frozenset({4}), 0.3, {3}) == {4, 2}  # references are never left out
    verdicts += [AdapterVerdict(k, 0.0, False, signals={"direction": 0.0}) for k in range(5, 11)]
    assert _suspects(verdicts, frozenset({4}), 0.3, set()) == {4, 3, 2, 0}  # eleven: room for five
    assert _suspects(verdicts, frozenset({1, 5, 6, 7}), 0.3, set()) == {4}  # four flagged elsewhere


@pytest.mark.parametrize("norm", [1.0, 1.25, 1.5])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_spread_group_at_the_honest_norm_is_caught_against_the_rest(norm: float, seed: int) -> None:
    """Six of eighteen at 1-1.5x the honest norm, at cosine 0.4 with each other, among honest
    clients who agree loosely (pairwise cosine about 0.1): the group drags every centre it
    is in, so against the whole pool's its members point about as honest clients do, and its
    pull stays under rule 11's floor. A group pulling past a quarter of it leaves rule 1's
    centres, whole-update and per-module, in the next pass: against the centre of the rest
    the members point away, and exactly they are flagged. (Refitting only the whole-update
    centre without the flagged caught 0-6 of the six.)"""
    K, bad = 18, tuple(range(12, 18))
    aud = ClairAuditor().fit(tight_pool(K, bad, rho=0.4, norm=norm, own=3.0, seed=seed), K)
    assert flagged(aud) == set(bad)


def test_batched_module_centres_equal_the_module_by_module_ones() -> None:
    """The verdict refits every module's centres as one batch: the same cosines as
    :func:`centre_cosines` module by module (copies, a zero update, members outside the
    centre), to rounding, and NaN in the same places."""
    import numpy as np

    from clair_cli.core.insubspace import agreement_masses, batched_centre_cosines, centre_cosines

    rng = np.random.default_rng(0)
    B, K = 40, 7
    Cs, fits, reps, masses, expected = [], [], [], [], []
    for b in range(B):
        X = rng.standard_normal((K, 12)) + 0.5 * rng.standard_normal(12)
        rep = np.arange(K)
        if b % 5 == 0:
            X[3], rep[3] = X[1], 1  # a copy: its centre leaves out the member it copies
        if b % 7 == 0:
            X[5] = 0  # a zero update: NaN
        X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-300)
        fit = rep == np.arange(K)
        if b % 3 == 0:
            fit[0] = False
        C = torch.from_numpy(X @ X.T)
        mass = agreement_masses(C, torch.from_numpy(fit))
        leave_out = {j: [int(rep[j])] for j in range(K)}
        expected.append(centre_cosines(C, torch.from_numpy(fit), leave_out, mass).numpy())
        Cs.append(C.numpy())
        fits.append(fit)
        reps.append(rep)
        masses.append(mass.numpy())
    got = batched_centre_cosines(np.stack(Cs), np.stack(fits), np.stack(reps), np.stack(masses))
    want = np.stack(expected)
    assert np.array_equal(np.isnan(got), np.isnan(want)) and np.isnan(want).any()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-13, equal_nan=True)


def test_batched_module_centres_in_chunks_are_the_one_batch_bit_for_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Thousands of modules are refitted a chunk at a time (a few ``K x K`` temporaries per
    module in one batch took 1.1 GiB for 1,000 modules of 128 adapters): the same cosines, bit
    for bit, and the loop's memory bounded by the chunk, not by the number of modules."""
    import tracemalloc

    import numpy as np

    from clair_cli.core import insubspace

    rng = np.random.default_rng(1)
    B, K = 600, 16
    X = rng.standard_normal((B, K, 20)) + 0.4 * rng.standard_normal((B, 1, 20))
    X[::7, 5] = 0  # zero updates: NaN
    X = X / np.maximum(np.linalg.norm(X, axis=2, keepdims=True), 1e-300)
    C = X @ X.transpose(0, 2, 1)
    fit = np.ones((B, K), dtype=bool)
    fit[::3, 0] = False
    rep = np.tile(np.arange(K), (B, 1))
    rep[::4, 3] = 1  # member 3 copies member 1
    mass = rng.uniform(0.5, 1.5, (B, K))

    def run() -> tuple[np.ndarray, int]:
        tracemalloc.start()
        try:
            out = insubspace.batched_centre_cosines(C, fit, rep, mass)
            return out, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    whole, whole_peak = run()
    monkeypatch.setattr(insubspace, "CHUNK_ENTRIES", 10 * K * K)  # chunks of 10 modules
    chunked, chunked_peak = run()
    assert np.array_equal(chunked, whole, equal_nan=True) and np.isnan(whole).any()
    per_module = C[0].nbytes
    # One batch: about ten (B, K, K) temporaries (5,700 modules' worth measured); in chunks, a
    # chunk's and a few (B, K) arrays (150 measured).
    assert whole_peak > 1000 * per_module
    assert chunked_peak < 400 * per_module


def test_rule_11_sets_apart_the_group_not_every_client_in_a_candidate_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Groups are set apart as rule 11 flags them, the largest pull first and its members then
    out of the search: the honest clients that some greedy candidate joins to the group (a
    candidate grown from an honest client takes the group in) are not set apart with it, so
    the centres without the group remain most of the pool. Without rule 15 the first pass
    flags nothing and sets apart exactly the six; the later passes flag exactly them. (Rule 15,
    whose centre is fitted on the most aligned two thirds of the pool, flags no honest client
    here: the six agree with each other and are a population of their own to it, and it is
    off.)"""
    from clair_cli.core import verdict

    first: list[tuple[set[int], frozenset[int]]] = []
    decide_pass = verdict._decide

    def recorded(*args, **kwargs):
        verdicts, pulling = decide_pass(*args, **kwargs)
        first.append(({v.index for v in verdicts if v.flagged}, pulling))
        return verdicts, pulling

    monkeypatch.setattr(verdict, "_decide", recorded)
    K, bad = 18, tuple(range(12, 18))
    pool = tight_pool(K, bad, rho=0.4, norm=1.25, own=3.0, seed=3)
    aud = ClairAuditor().fit(pool, K)
    assert first[0][0] <= set(bad) and flagged(aud) == set(bad)
    first.clear()
    monkeypatch.setattr(verdict, "RULES", tuple(r for r in verdict.RULES if r.name != "whole_direction"))
    aud = ClairAuditor().fit(pool, K)
    assert first[0] == (set(), frozenset(bad))
    assert flagged(aud) == set(bad)
