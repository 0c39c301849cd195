"""Rule 15 (direction of the whole update) and its peeled centre: free riders at full norm.

A review from outside built updates that carry nothing along the pool's direction at an honest
norm: zero-sum combinations of the honest updates (as many added as subtracted), so that they
lie in the honest clients' subspace at their size. Rule 1 (every module at unit norm) left them
inside the honest spread, and a third of a trained pool of them took the merge from 0.76 to 0.39.
They also drag any centre fitted on everyone towards zero and against the honest clients they
subtract; the centre of rule 15 is fitted on the two thirds of the pool most aligned with it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import bare_signals

from benchmarks.attacks import read_factors
from clair_cli import pipeline
from clair_cli.core import verdict
from clair_cli.core.insubspace import DirectionCentres, direction_cosines, peeled, second_population
from clair_cli.core.rules import Pass, PoolSignals
from clair_cli.core.rules.direction import (
    DIRECTION_RELATIVE_FLOOR,
    MODULE_DIRECTION_RELATIVE_FLOOR,
    WholeDirection,
    whole_relative_floor,
)
from clair_cli.params import AuditParams
from clair_cli.report.audit import reason_text
from clair_cli.report.modules import ModuleNames

SAMPLES = Path(__file__).parents[1] / "sample_adapters"
HONEST = [f"client_{k:02d}" for k in range(1, 13)]  # the sample pool's twelve honest clients


def _free_rider(honest: np.ndarray, rng: np.random.Generator, targets: tuple[int, ...] = ()) -> np.ndarray:
    """A zero-sum +-1 combination of the honest updates at their median norm; ``targets`` always subtracted."""
    n = len(honest)
    rest = [k for k in range(n) if k not in targets]
    signs = np.full(n, -1.0)
    plus = rng.choice(rest, size=n // 2, replace=False)
    signs[plus] = 1.0
    v = signs @ honest
    return v * float(np.median(np.linalg.norm(honest, axis=1))) / np.linalg.norm(v)


def _honest(rng: np.random.Generator, share: float, dim: int = 4000) -> np.ndarray:
    """Twelve honest updates of unit norm sharing ``share`` of their squared norm with a common
    direction."""
    common = rng.standard_normal(dim)
    common *= math.sqrt(share) / np.linalg.norm(common)
    noise = rng.standard_normal((12, dim))
    noise *= math.sqrt(1 - share) / np.linalg.norm(noise, axis=1, keepdims=True)
    return common + noise


def _gram(seed: int, n_free: int = 6, share: float = 0.2, targets: tuple[int, ...] = ()) -> torch.Tensor:
    """Twelve honest updates sharing ``share`` of their squared norm with a common direction, then
    ``n_free`` free riders made of them; the Gram matrix of all."""
    rng = np.random.default_rng(seed)
    honest = _honest(rng, share)
    free = [_free_rider(honest, rng, targets) for _ in range(n_free)]
    X = torch.from_numpy(np.vstack([honest, *free]) if free else honest)
    return X @ X.T


def _two_populations(seed: int, sizes: tuple[int, int], share: float = 0.25) -> torch.Tensor:
    """Honest updates of two tasks: each task's share of the squared norm along its own direction
    (the two directions orthogonal), the rest independent; the Gram matrix of all."""
    rng = np.random.default_rng(seed)
    dim = 4000
    q, _ = np.linalg.qr(rng.standard_normal((dim, 2)))
    rows = []
    for task, n in enumerate(sizes):
        noise = rng.standard_normal((n, dim))
        noise *= math.sqrt(1 - share) / np.linalg.norm(noise, axis=1, keepdims=True)
        rows.append(math.sqrt(share) * q[:, task] + noise)
    X = torch.from_numpy(np.vstack(rows))
    return X @ X.T


def _centres(G: torch.Tensor, peel: bool = True, order: list[int] | None = None) -> DirectionCentres:
    K = G.shape[0]
    return DirectionCentres(
        G,
        torch.ones(K, dtype=torch.bool),
        order if order is not None else list(range(K)),
        {},
        torch.ones(K, dtype=torch.float64),
        pairs=False,
        peel=peel,
    )


def _rule_15(G: torch.Tensor) -> list[bool]:
    """Rule 15 alone on the pool of Gram matrix ``G``: who it flags."""
    K = G.shape[0]
    centres = _centres(G)
    cosine, pairs = (None, None) if centres.population else centres()  # as the auditor: off there
    ctx = Pass(bare_signals(K, sq_norms=G.diagonal(), whole_direction=cosine, whole_pairs=pairs), set())
    WholeDirection().apply(ctx)
    return [v.flagged for v in ctx.verdicts]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("targets", [(), (3, 8)])
def test_the_peeled_centre_leaves_every_free_rider_out(seed: int, targets: tuple[int, ...]) -> None:
    G = _gram(seed, targets=targets)
    kept = peeled(G, torch.ones(18, dtype=torch.bool))
    assert int(kept.sum()) == 12  # two thirds of 18
    assert not bool(kept[12:].any())


def test_free_riders_drag_a_centre_fitted_on_everyone_against_the_clients_they_subtract() -> None:
    G = _gram(0, targets=(3, 8))
    plain = direction_cosines(G, torch.ones(18, dtype=torch.bool))
    typical = float(plain[:12].median())
    assert float(plain[3]) < 0.6 * typical and float(plain[8]) < 0.6 * typical  # dragged down
    cosine, _ = _centres(G)()
    typical = float(cosine[:12].median())
    assert float(cosine[:12].min()) > 0.7 * typical  # the peeled centre gives them back
    assert float(cosine[12:].max()) < 0.4 * typical  # and leaves the free riders at about 0


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("targets", [(), (3, 8)])
def test_rule_15_flags_the_free_riders_and_no_honest_client(seed: int, targets: tuple[int, ...]) -> None:
    assert _rule_15(_gram(seed, targets=targets)) == [False] * 12 + [True] * 6


def test_rule_15_flags_no_honest_client_of_a_clean_pool() -> None:
    for seed in range(5):
        assert not any(_rule_15(_gram(seed, n_free=0)))


def test_rule_15_is_off_where_the_pool_agrees_on_no_direction() -> None:
    G = _gram(0, share=0.0)
    K = G.shape[0]
    cosine, _ = _centres(G)()
    ctx = Pass(bare_signals(K, sq_norms=G.diagonal(), whole_direction=cosine), set())
    WholeDirection().apply(ctx)
    assert not any(v.flagged for v in ctx.verdicts)
    assert not any("whole_direction" in v.signals for v in ctx.verdicts)


def test_the_peeled_centre_does_not_depend_on_the_order_of_the_adapters() -> None:
    G = _gram(1, targets=(2,))
    key = np.random.default_rng(0).permutation(18)  # a canonical order (clair: the adapters' digests)
    canonical = sorted(range(18), key=lambda k: key[k])
    first, _ = _centres(G, order=canonical)()
    perm = torch.from_numpy(np.random.default_rng(1).permutation(18))
    Gp = G[perm[:, None], perm[None, :]]
    where = {int(k): p for p, k in enumerate(perm)}
    second, _ = _centres(Gp, order=[where[k] for k in canonical])()
    assert torch.equal(second, first[perm])


def test_on_the_sample_pool_rule_15_alone_catches_free_riders_rule_1_also_sees() -> None:
    honest = {n: read_factors(SAMPLES / n) for n in HONEST}
    modules = list(honest[HONEST[0]])
    dense = np.stack(
        [
            np.concatenate([(s * B.double() @ A.double()).numpy().ravel() for A, B, s in factors.values()])
            for factors in honest.values()
        ]
    )
    shapes = [(B.shape[0], A.shape[1]) for A, B, _ in honest[HONEST[0]].values()]
    rng = np.random.default_rng(0)
    pool = dict(honest)
    for j in range(4):
        vec, offset = _free_rider(dense, rng), 0
        factors = {}
        for module, (out_dim, in_dim) in zip(modules, shapes, strict=True):
            W = torch.from_numpy(vec[offset : offset + out_dim * in_dim].reshape(out_dim, in_dim))
            offset += out_dim * in_dim
            u, s, vt = torch.linalg.svd(W, full_matrices=False)
            root = s[:8].sqrt()
            factors[module] = ((root[:, None] * vt[:8]).float(), (u[:, :8] * root).float(), 1.0)
        pool[f"zz_free_{j}"] = factors
    saved = verdict.RULES
    try:  # rule 1 (and 2b, which reads it) taken out: what rule 15 sees on its own
        verdict.RULES = tuple(r for r in saved if r.name not in ("direction", "joint", "isolated"))
        audited = pipeline.pool_from_factors(pool, base_model="gpt2")
        verdicts = dict(zip(audited.names, pipeline.audit(audited, AuditParams()).auditor.verdicts_, strict=True))
    finally:
        verdict.RULES = saved
    for name, v in verdicts.items():
        if name.startswith("zz_free"):
            reason = next(r for r in v.reasons if r.rule == "whole_direction")
            assert reason.cosine < reason.threshold < reason.typical and reason.margin > 1
            text = reason_text(reason, list(verdicts), ModuleNames(modules))
            assert "carries little along the others' direction" in text and f"{reason.cosine:+.2f}" in text
        else:
            assert not v.flagged, name


@pytest.mark.parametrize("sizes", [(11, 3), (10, 4), (9, 5), (8, 6), (7, 7)])
def test_a_second_population_switches_rule_15_off_instead_of_being_flagged(sizes: tuple[int, int]) -> None:
    """Honest adapters of two tasks: the peel leaves (most of) the smaller one out and the centre
    of the rest is the larger one's; an outside review had rule 15 flag the whole smaller task (25
    honest flags in 15 draws of 5 + 9 trained clients, none without it). Where the left-out set
    agrees within itself and its centre points against no kept adapter, the rule is off."""
    for seed in range(3):
        G = _two_populations(seed, sizes)
        if sizes != (7, 7):  # halves: the peel may leave out two of each, which agree on nothing
            assert _centres(G).population  # (most of) the second task, left out by the peel
        assert not any(_rule_15(G))


def test_free_riders_are_no_population_their_centre_points_against_honest_clients() -> None:
    for seed in range(3):
        for targets in ((), (3, 8)):
            G = _gram(seed, targets=targets)
            kept = peeled(G, torch.ones(18, dtype=torch.bool))
            assert second_population(G, ~kept, kept) == []
        # sent in opposite pairs (+s, -s), their centre is near zero: they do not agree with each other
        G = _gram(seed, n_free=3)
        X = torch.linalg.cholesky(G + 1e-9 * torch.eye(15, dtype=G.dtype))  # any factor X with X X^T = G
        X = torch.cat([X, -X[12:]])
        G2 = X @ X.T
        kept = peeled(G2, torch.ones(18, dtype=torch.bool))
        assert second_population(G2, ~kept, kept) == []
        assert _rule_15(G2)[12:] == [True] * 6 and not any(_rule_15(G2)[:12])


def _fake_population(seed: int, share: float = 0.2, decoys: bool = False) -> torch.Tensor:
    """Twelve honest updates (as :func:`_gram`) and six free riders posing as a population of
    their own (what ``benchmarks/adaptive_search.py`` found on the trained pools): each a copy of
    one honest client's deviation from the honest mean x 0.9 (it stays in the honest subspace),
    0.1 of the honest mean, a shared direction orthogonal to it at 0.55 honest norms (they agree
    with each other) and independent noise at 0.7, each scaled by its own jitter; the Gram matrix."""
    rng = np.random.default_rng(seed)
    honest = _honest(rng, share)
    dim = honest.shape[1]
    h = honest.mean(0)
    size = float(np.median(np.linalg.norm(honest, axis=1)))
    shared = rng.standard_normal(dim)
    shared -= (shared @ h) / (h @ h) * h
    shared /= np.linalg.norm(shared)
    riders = []
    for i in rng.permutation(12)[:6]:
        z = rng.standard_normal(dim)
        z /= np.linalg.norm(z)
        scale = np.exp(0.35 * rng.standard_normal())
        copy = 0.0 if decoys and len(riders) % 2 else 0.9  # a decoy: no honest deviation, nothing in the span
        riders.append(scale * (0.1 * h + copy * (honest[i] - h) + 0.55 * size * shared + 0.7 * size * z))
    X = torch.from_numpy(np.vstack([honest, *riders]))
    return X @ X.T


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_free_riders_made_of_honest_deviations_are_no_population(seed: int) -> None:
    """A third of the pool that agrees with itself through a shared direction, points against no
    honest client and keeps to the honest subspace by copying honest clients' deviations switched
    rule 15 off as a second population, and nothing else flagged it (on the trained pools the
    merge fell from 0.761 to 0.491). Half its squared norm lies in the span of the honest updates,
    where another task's adapters have almost none: no population, and rule 15 flags it."""
    G = _fake_population(seed)
    kept = peeled(G, torch.ones(18, dtype=torch.bool))
    assert (~kept).nonzero().flatten().tolist() == list(range(12, 18))
    assert second_population(G, ~kept, kept) == []
    assert _rule_15(G) == [False] * 12 + [True] * 6


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decoys_do_not_carry_the_copies_past_the_span_test(seed: int) -> None:
    """Three of the six free riders without the copy of an honest deviation (share ~0.01 in the
    kept span, the copies ~0.43): torch's lower median of the six shares was a decoy's, the set
    passed as a population and rule 15 was off."""
    G = _fake_population(seed, decoys=True)
    kept = peeled(G, torch.ones(18, dtype=torch.bool))
    assert (~kept).nonzero().flatten().tolist() == list(range(12, 18))
    assert second_population(G, ~kept, kept) == []
    assert not any(_rule_15(G)[:12]) and any(_rule_15(G)[12:])


def test_span_shares_from_the_gram_matrix() -> None:
    from clair_cli.core.insubspace import span_shares

    rng = np.random.default_rng(0)
    B = rng.standard_normal((3, 50))
    inside = rng.standard_normal(3) @ B
    outside = rng.standard_normal(50)
    outside -= np.linalg.lstsq(B.T, outside, rcond=None)[0] @ B
    mixed = inside / np.linalg.norm(inside) + outside / np.linalg.norm(outside)  # half in, half out
    X = torch.from_numpy(np.vstack([B, inside, outside, mixed, 2 * B[0] - B[1]]))  # a dependent basis too
    shares = span_shares(X @ X.T, [3, 4, 5], [0, 1, 2, 6])
    assert torch.allclose(shares, torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64), atol=1e-9)


def test_the_relative_floor_moves_to_rule_12s_where_one_module_carries_the_update() -> None:
    assert whole_relative_floor(math.inf) == pytest.approx(DIRECTION_RELATIVE_FLOOR)
    assert whole_relative_floor(1.0) == pytest.approx(MODULE_DIRECTION_RELATIVE_FLOOR)
    assert whole_relative_floor(2.0) == pytest.approx(0.8)
    assert whole_relative_floor(0.5) == pytest.approx(MODULE_DIRECTION_RELATIVE_FLOOR)  # never past rule 12's


def _signals(cosines: list[float], module_norms: dict[str, torch.Tensor] | None, **fields: object) -> PoolSignals:
    whole = torch.tensor(cosines, dtype=torch.float64)
    return bare_signals(len(cosines), module_norms=module_norms, whole_direction=whole, **fields)


def test_effective_modules_is_the_participation_ratio_of_the_typical_module_norms() -> None:
    K = 12
    even = {f"m{i}": torch.ones(K) for i in range(8)}
    assert _signals([0.4] * K, even).effective_modules == pytest.approx(8.0)
    dominant = {**even, "m0": torch.full((K,), 10.0)}  # every client's first module x 10 (alpha_pattern)
    assert _signals([0.4] * K, dominant).effective_modules == pytest.approx(107**2 / (100**2 + 7), rel=1e-9)
    # a minority cannot move it: the medians of each module's norms
    boosted = {m: torch.cat([v[:9], torch.full((3,), 1e3)]) for m, v in even.items()} | {"m0": torch.ones(K)}
    assert _signals([0.4] * K, boosted).effective_modules == pytest.approx(8.0)
    # a module of one adapter counts nothing (its median over the pool is 0), however large
    solo = _signals([0.4] * K, {**even, "solo": torch.tensor([30.0])}, members={"solo": [11]})
    assert solo.effective_modules == pytest.approx(8.0)
    # in gate, the references alone: candidates that all boost one module do not move it
    gate = {m: torch.cat([torch.ones(12), torch.full((14,), 30.0 if m == "m0" else 1.0)]) for m in even}
    assert _signals([0.4] * 26, gate, reference=list(range(12))).effective_modules == pytest.approx(8.0)
    assert _signals([0.4] * 26, gate).effective_modules < 2.0
    with_nan = {**even, "m1": torch.tensor([math.nan] + [1.0] * (K - 1))}
    assert _signals([0.4] * K, with_nan).effective_modules == pytest.approx(8.0)
    assert _signals([0.4] * K, None).effective_modules == math.inf


@pytest.mark.parametrize(("x", "flagged_even", "flagged_dominant"), [(0.12, True, False), (-0.05, True, True)])
def test_where_one_module_dominates_rule_15_asks_what_rule_12_asks_of_one_module(
    x: float, flagged_even: bool, flagged_dominant: bool
) -> None:
    """Eleven clients at a whole cosine of about 0.4 and one at ``x``: over eight equal modules
    (rule 1's floor, 0.6 + 0.4 / 8 of the typical cosine) a drop to 0.12 is flagged; where one
    module carries nearly all of every update the whole cosine is that module's, and, as rule 12
    on one module, only a cosine below 0 is."""
    K = 12
    cosines = [0.4 + 0.01 * (i % 3 - 1) for i in range(K - 1)] + [x]
    even = {f"m{i}": torch.ones(K) for i in range(8)}
    dominant = {**even, "m0": torch.full((K,), 30.0)}
    for norms, expected in ((even, flagged_even), (dominant, flagged_dominant)):
        ctx = Pass(_signals(cosines, norms), set())
        WholeDirection().apply(ctx)
        assert [v.flagged for v in ctx.verdicts] == [False] * (K - 1) + [expected]
