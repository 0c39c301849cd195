"""Realistic adapter pools in PEFT format, for timing with known verdicts.

Every adapter is a PEFT LoRA directory (``adapter_config.json`` and
``adapter_model.safetensors``) with Llama-style keys
``base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight``.
Per module, the benign adapters share a rank-``shared`` output subspace ``U``:
``B_k = U Gamma_k + noise`` (noise is ``--noise`` of the signal's norm), ``A_k``
Gaussian at the scale of PEFT's Kaiming initialisation. Contaminated adapters
(the last ``--bad``) have unstructured ``B``. All values are drawn from seeded
generators per (adapter, module), so pools of different ``K`` share their first
adapters and a pool is the same on every machine.

    python -m benchmarks.poolgen --out /tmp/pool                         # Llama-2-7B shapes, K = 64 (2.1 GB)
    python -m benchmarks.poolgen --out /tmp/small --preset small --k 16  # 1024 wide, 4 layers
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
PREFIX = "base_model.model.model.layers"


@dataclass(frozen=True)
class PoolSpec:
    """Shape and structure of a generated pool."""

    k: int = 64
    layers: int = 32
    hidden: int = 4096
    rank: int = 16
    alpha: int = 32
    shared: int = 8
    noise: float = 0.3
    bad: int = 4
    dtype: str = "bfloat16"
    seed: int = 0
    base_model: str = "meta-llama/Llama-2-7b-hf"

    @property
    def modules(self) -> list[str]:
        return [f"{PREFIX}.{i}.self_attn.{p}" for i in range(self.layers) for p in PROJECTIONS]

    @property
    def contaminated(self) -> list[int]:
        return list(range(self.k - self.bad, self.k))

    def name(self, k: int) -> str:
        return f"adapter_{k:03d}"

    def bytes_on_disk(self) -> int:
        size = torch.empty(0, dtype=getattr(torch, self.dtype)).element_size()
        return self.k * len(self.modules) * 2 * self.rank * self.hidden * size


PRESETS = {
    "llama-7b": {},
    "small": {"layers": 4, "hidden": 1024},
    "tiny": {"layers": 2, "hidden": 256, "rank": 8, "shared": 4},
}


def shared_bases(spec: PoolSpec) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(spec.seed)
    return [torch.linalg.qr(torch.randn(spec.hidden, spec.shared, generator=g))[0] for _ in range(len(spec.modules))]


def module_factors(spec: PoolSpec, k: int, m: int, U: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Adapter ``k``'s float32 ``(A, B)`` for module ``m`` with shared basis ``U``."""
    g = torch.Generator().manual_seed(spec.seed * 1_000_003 + 7919 * k + m + 1)
    a = torch.randn(spec.rank, spec.hidden, generator=g) / math.sqrt(spec.hidden)
    if k in spec.contaminated:
        return a, torch.randn(spec.hidden, spec.rank, generator=g) * 0.01
    b = U @ torch.randn(spec.shared, spec.rank, generator=g)
    e = torch.randn(spec.hidden, spec.rank, generator=g)
    return a, (b + spec.noise * b.norm() / e.norm() * e) * 0.01


def adapter_tensors(spec: PoolSpec, k: int, bases: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict of adapter ``k``."""
    dtype = getattr(torch, spec.dtype)
    out = {}
    for m, (name, U) in enumerate(zip(spec.modules, bases, strict=True)):
        a, b = module_factors(spec, k, m, U)
        out[f"{name}.lora_A.weight"] = a.to(dtype).contiguous()
        out[f"{name}.lora_B.weight"] = b.to(dtype).contiguous()
    return out


def adapter_config(spec: PoolSpec) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": spec.base_model,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": 0.0,
        "target_modules": list(PROJECTIONS),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }


def generate(spec: PoolSpec, out: Path) -> Path:
    """Write the pool to ``out`` (replaced) with a ``MANIFEST.json`` of the generator's settings."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    bases = shared_bases(spec)
    config = json.dumps(adapter_config(spec), indent=2)
    for k in range(spec.k):
        d = tmp / spec.name(k)
        d.mkdir()
        (d / "adapter_config.json").write_text(config)
        save_file(adapter_tensors(spec, k, bases), str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    manifest = dict(spec.__dict__, contaminated=[spec.name(k) for k in spec.contaminated])
    (tmp / "MANIFEST.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def ensure(spec: PoolSpec, out: Path) -> Path:
    """``out`` holding ``spec``'s pool: generated unless a pool with the same manifest is there."""
    manifest = out / "MANIFEST.json"
    want = dict(spec.__dict__, contaminated=[spec.name(k) for k in spec.contaminated])
    if manifest.is_file() and json.loads(manifest.read_text()) == want:
        return out
    return generate(spec, out)


def spec_from_args(args: argparse.Namespace) -> PoolSpec:
    fields = dict(PRESETS[args.preset])
    for key in ("k", "layers", "hidden", "rank", "shared", "bad", "seed", "noise", "dtype"):
        value = getattr(args, key)
        if value is not None:
            fields[key] = value
    return PoolSpec(**fields)


def add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama-7b")
    parser.add_argument("--k", type=int, help="adapters (default 64)")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--rank", type=int)
    parser.add_argument("--shared", type=int, help="rank of the benign shared subspace")
    parser.add_argument("--bad", type=int, help="contaminated adapters (the last ones)")
    parser.add_argument("--noise", type=float)
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--seed", type=int)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    add_spec_arguments(parser)
    spec = spec_from_args(parser.parse_args())
    path = generate(spec, parser.parse_args().out)
    print(f"{path}: {spec.k} adapters, {len(spec.modules)} modules, {spec.bytes_on_disk() / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
