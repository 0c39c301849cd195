"""Refinement and merge against dense computation."""

from __future__ import annotations

import pytest
import torch

from benchmarks.synthetic import make_module
from clair_cli.core.merge import check_weights, merge, refine


@pytest.fixture()
def pool():
    A, B, s, U = make_module(K=6, ranks=[2, 4, 3, 4, 5, 1], noise=0.3, seed=4)
    return A, B, s, U


@pytest.mark.parametrize("side", ["out", "in"])
def test_refine_is_projection(pool, side) -> None:
    A, B, s, U = pool
    basis = U if side == "out" else torch.linalg.qr(torch.randn(A[0].shape[1], 3, dtype=torch.float64))[0]
    for a, b in zip(A, B, strict=True):
        a2, b2 = refine(a, b, basis, side)
        assert a2.shape == a.shape and b2.shape == b.shape
        P = basis @ basis.T
        expected = P @ (b @ a) if side == "out" else (b @ a) @ P
        torch.testing.assert_close(b2 @ a2, expected)


@pytest.mark.parametrize("side", ["out", "in"])
@pytest.mark.parametrize("balance", [True, False])
@pytest.mark.parametrize("weights", [None, [1, 2, 3, 0, 1, 1]])
def test_merge_equals_weighted_sum_of_refined(pool, side, balance, weights) -> None:
    A, B, s, U = pool
    basis = U if side == "out" else torch.linalg.qr(torch.randn(A[0].shape[1], 2, dtype=torch.float64))[0]
    a_bar, b_bar = merge(A, B, s, basis, weights, side=side, balance=balance)
    assert a_bar.shape == (2, A[0].shape[1]) and b_bar.shape == (B[0].shape[0], 2)
    w = check_weights(weights, len(A))
    P = basis @ basis.T
    dense = sum(
        wk * sk * ((P @ b @ a) if side == "out" else (b @ a @ P)) for wk, sk, a, b in zip(w, s, A, B, strict=True)
    )
    torch.testing.assert_close(b_bar @ a_bar, dense)
    if balance:  # both factors carry the same singular values
        torch.testing.assert_close(torch.linalg.svdvals(a_bar), torch.linalg.svdvals(b_bar))


@pytest.mark.parametrize(
    "weights, message", [([1, 2], "expected 3"), ([1, -1, 1], "non-negative"), ([0, 0, 0], "not all be zero")]
)
def test_bad_weights(weights, message) -> None:
    with pytest.raises(ValueError, match=message):
        check_weights(weights, 3)
