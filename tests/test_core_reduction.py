"""The factored reduction is exact: compared with dense stacks on small random cases."""

from __future__ import annotations

import pytest
import torch

from clair_cli.core.reduction import reduce_module


def _pool(ranks: list[int], d_out: int = 20, d_in: int = 15, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    A = [torch.randn(r, d_in, generator=g, dtype=torch.float64) for r in ranks]
    B = [torch.randn(d_out, r, generator=g, dtype=torch.float64) for r in ranks]
    scales = [0.5 + k for k in range(len(ranks))]
    return A, B, scales


def _dense(A, B, scales, side):
    thetas = [s * b @ a for a, b, s in zip(A, B, scales, strict=True)]
    return torch.cat(thetas if side == "out" else [t.T for t in thetas], dim=1), thetas


CASES = [([2, 4, 3, 1], 20, 15), ([4] * 6, 8, 30), ([8, 8, 2], 5, 40), ([1], 10, 10), ([3, 5, 7, 2, 6], 64, 12)]


@pytest.mark.parametrize("side", ["out", "in"])
@pytest.mark.parametrize("ranks, d_out, d_in", CASES)
def test_reduction_reproduces_dense_stack(ranks, d_out, d_in, side) -> None:
    A, B, s = _pool(ranks, d_out, d_in)
    red = reduce_module(A, B, s, side=side)
    Y, thetas = _dense(A, B, s, side)
    torch.testing.assert_close(red.Q.T @ red.Q, torch.eye(red.Q.shape[1], dtype=torch.float64))
    for k, theta in enumerate(thetas):
        torch.testing.assert_close(red.dense_block(k), theta if side == "out" else theta.T)
        w = red.P[k].shape[1]
        torch.testing.assert_close(red.P[k].T @ red.P[k], torch.eye(w, dtype=torch.float64))
    sv_dense = torch.linalg.svdvals(Y)
    sv_core = torch.linalg.svdvals(red.G)
    n = sv_core.numel()
    torch.testing.assert_close(sv_core, sv_dense[:n])
    assert sv_dense[n:].abs().max().item() < 1e-9 if sv_dense.numel() > n else True
    torch.testing.assert_close(red.block_norms(), torch.stack([t.norm() for t in thetas]))


def test_rank_deficient_stack_is_compressed_exactly() -> None:
    g = torch.Generator().manual_seed(1)
    U = torch.linalg.qr(torch.randn(50, 2, generator=g, dtype=torch.float64))[0]
    B = [U @ torch.randn(2, 4, generator=g, dtype=torch.float64) for _ in range(10)]
    A = [torch.randn(4, 30, generator=g, dtype=torch.float64) for _ in range(10)]
    red = reduce_module(A, B, [1.0] * 10)
    assert red.Q.shape == (50, 2)
    for k in range(10):
        torch.testing.assert_close(red.dense_block(k), B[k] @ A[k])


def test_left_singular_vectors_map_back() -> None:
    A, B, s = _pool([3, 2, 4], 25, 10)
    red = reduce_module(A, B, s)
    Y, _ = _dense(A, B, s, "out")
    u_core = red.Q @ torch.linalg.svd(red.G, full_matrices=False)[0][:, :3]
    u_dense = torch.linalg.svd(Y, full_matrices=False)[0][:, :3]
    torch.testing.assert_close((u_core.T @ u_dense).abs(), torch.eye(3, dtype=torch.float64), atol=1e-8, rtol=0)


def test_bad_shapes_raise_value_error() -> None:
    A, B, s = _pool([2, 3])
    with pytest.raises(ValueError):
        reduce_module(A, B[:1], s)
    with pytest.raises(ValueError):
        reduce_module([A[0], torch.randn(3, 7, dtype=torch.float64)], B, s)
    with pytest.raises(ValueError):
        reduce_module(A, B, s, side="both")  # type: ignore[arg-type]
