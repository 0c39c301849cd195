"""Rule 7: the leave-one-out spectral statistic (clair_cli.core.spectral) and its calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from benchmarks.synthetic import coordinated_push, make_pool
from clair_cli.core import spectral
from clair_cli.core.audit import ClairAuditor
from clair_cli.core.calibration import LOG_CHI2, critical_value, qn_scale
from clair_cli.core.spectral import leading_direction_scores


def _dense(
    X: np.ndarray, shapes: np.ndarray, leave_out: list[list[int]], loo: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """The statistic from explicit vectors: a PCA of the others' rows, then the projection."""
    K = X.shape[0]
    out, share = np.full(K, np.nan), np.full(K, np.nan)
    for k in range(K):
        keep = [j for j in range(K) if shapes[j] and (not loo or j not in leave_out[k])]
        Y = X[keep]
        mu = Y.mean(0)
        _, s, vt = np.linalg.svd(Y - mu, full_matrices=False)
        lead = s[0] ** 2
        out[k] = ((X[k] - mu) @ vt[0]) ** 2 / (lead / len(keep))
        share[k] = ((X[k] - mu) @ vt[0]) ** 2 / np.sum((X[k] - mu) ** 2)
    return out, share


def _vectors(K: int = 12, d: int = 30, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(K, d)) * rng.uniform(0.5, 2.0, size=(K, 1)) + rng.normal(size=d)


def test_scores_match_a_dense_pca_leaving_each_adapter_and_its_copies_out() -> None:
    X = _vectors()
    X[7] = X[3]  # a copy: left out of each other's fits
    shapes = np.ones(12, dtype=bool)
    shapes[[5, 7]] = False  # flagged in an earlier pass, and the copy: never shape a fit
    leave_out = [[k] for k in range(12)]
    leave_out[3] = leave_out[7] = [3, 7]
    got = leading_direction_scores(torch.tensor(X @ X.T), torch.tensor(shapes), leave_out)
    want = _dense(X, shapes, leave_out)
    np.testing.assert_allclose(got[0].numpy(), want[0], rtol=1e-8)
    np.testing.assert_allclose(got[1].numpy(), want[1], rtol=1e-8)


def test_large_pools_fit_one_direction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spectral, "LOO_MAX", 5)
    X = _vectors(K=9)
    shapes = np.ones(9, dtype=bool)
    got = leading_direction_scores(torch.tensor(X @ X.T), torch.tensor(shapes), [[k] for k in range(9)])
    want = _dense(X, shapes, [[k] for k in range(9)], loo=False)
    np.testing.assert_allclose(got[0].numpy(), want[0], rtol=1e-8)
    np.testing.assert_allclose(got[1].numpy(), want[1], rtol=1e-8)


def test_degenerate_fits_give_nan() -> None:
    X = np.ones((5, 4))  # the others do not vary
    got, _ = leading_direction_scores(torch.tensor(X @ X.T), torch.ones(5, dtype=torch.bool), [[k] for k in range(5)])
    assert torch.isnan(got).all()
    X = _vectors(K=4)  # 3 others shape each fit: defined; 2 do not
    shapes = torch.tensor([True, True, True, False])
    got, share = leading_direction_scores(torch.tensor(X @ X.T), shapes, [[k] for k in range(4)])
    assert torch.isnan(got[:3]).all() and torch.isfinite(got[3]) and 0 <= float(share[3]) <= 1


@pytest.mark.parametrize(("n", "alpha"), [(11, 0.01), (20, 0.005)])
def test_log_chi2_critical_value_gives_the_stated_false_flag_rate(n: int, alpha: float) -> None:
    # Direct simulation of squared Gaussian projections with a random scale per pool.
    c = critical_value(n, alpha, LOG_CHI2)
    g = torch.Generator().manual_seed(777)
    draws, hits = 200_000, 0
    for _ in range(draws // 10_000):
        scale = torch.rand(10_000, 1, generator=g, dtype=torch.float64) * 5 + 0.1
        x = torch.log((scale * torch.randn(10_000, n + 1, generator=g, dtype=torch.float64)) ** 2)
        basis = x[:, :n]
        hits += int((x[:, n] > basis.quantile(0.5, dim=1) + c * qn_scale(basis)).sum())
    rate = hits / draws
    assert abs(rate - alpha) < 5 * math.sqrt(alpha * (1 - alpha) / draws) + 0.05 * alpha
    # The log of a chi-square has a short right tail: the Gaussian law would cut much farther out.
    assert c < critical_value(n, alpha)
    assert critical_value(5_000, alpha, LOG_CHI2) == critical_value(100, alpha, LOG_CHI2)  # conservative


def _coordinated_pool(seed: int, strength: float, bad: tuple[int, ...] = (17, 18, 19)):
    """Honest clients that agree loosely (spread 1.0); ``bad`` share one extra push."""
    mods = make_pool(M=4, K=20, r=4, spread=1.0, seed=seed)
    coordinated_push(mods, bad, strength, seed)
    return mods


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_coordinated_group_is_flagged_by_the_spectral_rule(seed: int) -> None:
    aud = ClairAuditor().fit(_coordinated_pool(seed, 2.0), 20)
    flagged = [k for k, v in enumerate(aud.verdicts_) if v.flagged]
    assert flagged == [17, 18, 19]
    for k in flagged:
        assert any(r.kind == "spectral" for r in aud.verdicts_[k].reasons)
        assert aud.verdicts_[k].signals["spectral"] > 1


def test_an_honest_adapter_with_a_larger_alpha_is_not_flagged_for_its_projection() -> None:
    # Its deviation is large in every direction, so its projection on the others' leading
    # direction is large too, but not its share of its own deviation.
    rng = np.random.default_rng(3)
    X = rng.normal(size=(16, 200)) + rng.normal(size=200)
    X[4] *= 6.0
    G = torch.tensor(X @ X.T)
    scores, shares = leading_direction_scores(G, torch.ones(16, dtype=torch.bool), [[k] for k in range(16)])
    assert float(scores[4]) > 5 * float(scores.median())
    assert float(shares[4]) < 2 * float(shares.median())


def test_without_the_group_no_honest_adapter_is_flagged() -> None:
    for seed in range(3):
        aud = ClairAuditor().fit(_coordinated_pool(seed, 2.0, bad=()), 20)
        assert not any(v.flagged for v in aud.verdicts_)


def test_the_spectral_reason_reads_and_is_in_the_json_signals() -> None:
    from clair_cli.report.audit import reason_text
    from clair_cli.report.modules import ModuleNames

    aud = ClairAuditor().fit(_coordinated_pool(1, 2.0), 20)
    reason = next(r for r in aud.verdicts_[18].reasons if r.kind == "spectral")
    assert reason.rule == "spectral" and reason.compare == ">"
    assert reason.value == reason.ratio > reason.threshold > 1
    assert 0 < reason.share <= 1
    assert aud.verdicts_[18].score >= reason.margin > 1
    text = reason_text(reason, [], ModuleNames(["layers.0.q_proj"]))
    assert text.startswith("along the direction in which the other adapters differ most, it lies ")
    assert f"{reason.ratio:.1f}x" in text
