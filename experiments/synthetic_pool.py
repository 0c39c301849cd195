"""Write a small synthetic pool of PEFT LoRA adapters with known contamination.

Benign clients share one low-rank output subspace U per module (their updates
are U @ Gamma_k^T plus small noise, with client-specific Gamma_k and A_k), as
CLAIR_SPEC.md section 2 models them. Contaminated clients break that structure
in different ways. The manifest records which is which, so a detector can be
checked against it. Seeded and deterministic.

    python experiments/synthetic_pool.py --out sample_adapters
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

BASE_MODEL = "clair-synthetic/tiny-llama-h64"
HIDDEN = 64
LAYERS = 2
PROJ = ("q_proj", "v_proj")
RANK = 4
ALPHA = 8
SHARED_RANK = 2
NOISE = 0.02

# name -> (kind, contaminated)
CLIENTS = {
    **{f"client_{i:02d}": ("benign", False) for i in range(1, 8)},
    "client_08": ("random_directions", True),
    "client_09": ("one_module_replaced", True),
    "client_10": ("random_directions_rank8", True),
}


def module_names() -> list[str]:
    return [f"model.layers.{layer}.self_attn.{p}" for layer in range(LAYERS) for p in PROJ]


def _orthonormal(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=g))
    return q


def _benign_B(U: torch.Tensor, g: torch.Generator, rank: int) -> torch.Tensor:
    gamma = torch.randn(SHARED_RANK, rank, generator=g)
    return U @ gamma + NOISE * torch.randn(U.shape[0], rank, generator=g)


def build_pool(out: Path, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    shared = {m: _orthonormal(HIDDEN, SHARED_RANK, g) for m in module_names()}
    manifest = {
        "base_model": BASE_MODEL,
        "generator": "experiments/synthetic_pool.py",
        "seed": seed,
        "description": (
            f"Synthetic pool: benign clients share a rank-{SHARED_RANK} output subspace per module "
            f"(noise {NOISE}); contaminated clients do not."
        ),
        "adapters": {},
    }
    for name, (kind, contaminated) in CLIENTS.items():
        rank = 8 if kind.endswith("rank8") else RANK
        tensors = {}
        for j, module in enumerate(module_names()):
            A = torch.randn(rank, HIDDEN, generator=g) / math.sqrt(HIDDEN)
            random_B = torch.randn(HIDDEN, rank, generator=g) / math.sqrt(rank)
            benign_B = _benign_B(shared[module], g, rank)
            if kind == "benign" or (kind == "one_module_replaced" and j != len(module_names()) - 1):
                B = benign_B
            else:
                B = random_B * benign_B.norm() / random_B.norm()
            tensors[f"base_model.model.{module}.lora_A.weight"] = A.contiguous()
            tensors[f"base_model.model.{module}.lora_B.weight"] = B.contiguous()
        d = out / name
        d.mkdir(parents=True)
        save_file(tensors, d / "adapter_model.safetensors", metadata={"format": "pt"})
        config = {
            "peft_type": "LORA",
            "base_model_name_or_path": BASE_MODEL,
            "r": rank,
            "lora_alpha": ALPHA,
            "target_modules": list(PROJ),
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "rank_pattern": {},
            "alpha_pattern": {},
            "task_type": "CAUSAL_LM",
        }
        (d / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        manifest["adapters"][name] = {"contaminated": contaminated, "kind": kind}
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("sample_adapters"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    manifest = build_pool(args.out, args.seed)
    bad = [n for n, a in manifest["adapters"].items() if a["contaminated"]]
    print(f"wrote {len(manifest['adapters'])} adapters to {args.out} ({len(bad)} contaminated: {', '.join(bad)})")


if __name__ == "__main__":
    main()
