"""A canonical order of adapters, so that no result depends on the order they were given in.

Every per-module computation that could depend on position (which block a random null
draw lands on, the order of floating-point sums, cross-validation folds, which copy in a
group of duplicates represents it) runs with the adapters sorted by a digest of their
own factors. Permuting the sources then permutes every per-adapter result exactly, bit for
bit, and leaves every pool-level result unchanged.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import torch


def _digest(a: torch.Tensor, b: torch.Tensor, scale: float) -> bytes:
    h = hashlib.sha256()
    for t in (a, b):
        t = t.detach().to("cpu").contiguous()
        h.update(struct.pack("<2q", *t.shape))
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(struct.pack("<d", float(scale)))
    return h.digest()


def content_keys(A: Sequence[torch.Tensor], B: Sequence[torch.Tensor], scales: Sequence[float]) -> list[bytes]:
    """A SHA-256 digest of each adapter's factors and scale."""
    return [_digest(a, b, s) for a, b, s in zip(A, B, scales, strict=True)]


def content_order(
    A: Sequence[torch.Tensor], B: Sequence[torch.Tensor], scales: Sequence[float], keys: Sequence[bytes] | None = None
) -> list[int]:
    """Indices of the adapters sorted by a SHA-256 digest of their factors and scale
    (``keys``, when computed already).

    Adapters with identical factors tie; they are interchangeable, so their relative order
    cannot change a result.
    """
    keys = list(keys) if keys is not None else content_keys(A, B, scales)
    return sorted(range(len(keys)), key=keys.__getitem__)


def inverse(order: Sequence[int]) -> torch.Tensor:
    """``inv`` with ``inv[order[p]] = p``: indexes a canonical-order tensor back into input order."""
    inv = torch.empty(len(order), dtype=torch.long)
    inv[torch.tensor(list(order), dtype=torch.long)] = torch.arange(len(order))
    return inv
