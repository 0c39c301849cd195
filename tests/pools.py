"""Small synthetic pools on disk for the report, SARIF and CI tests: benign adapters share a
rank-2 column space per module, the ``bad`` ones do not (the audit flags them)."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import lora_config, write_adapter

HIDDEN = 16
MODULES = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]


def write_pool(root: Path, k: int = 8, bad: tuple[int, ...] = (2, 6), seed: int = 0) -> Path:
    """``root/client_00`` ... ``client_{k-1}``; returns ``root``."""
    g = torch.Generator().manual_seed(seed)
    shared = {m: torch.linalg.qr(torch.randn(HIDDEN, 2, generator=g))[0] for m in MODULES}
    for i in range(k):
        tensors = {}
        for m in MODULES:
            b = torch.randn(HIDDEN, 4, generator=g) if i in bad else shared[m] @ torch.randn(2, 4, generator=g)
            tensors[f"base_model.model.{m}.lora_A.weight"] = torch.randn(4, HIDDEN, generator=g) / 4
            tensors[f"base_model.model.{m}.lora_B.weight"] = b + 0.02 * torch.randn(HIDDEN, 4, generator=g)
        write_adapter(root / f"client_{i:02d}", tensors, lora_config(lora_alpha=4 + 4 * (i % 3)))
    return root
