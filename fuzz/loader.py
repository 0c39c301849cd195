"""Fuzz the adapter loader: mutated safetensors files and configs must end in a ClairError.

Each case takes a valid PEFT adapter (two modules, float32, a config) and damages it:
truncation, byte flips in the header or the data, a rewritten header (random dtypes,
shapes, offsets, keys, nesting), a rewritten header length, or a mutated config. It
then opens the adapter and reads every module (:func:`clair_cli.io.adapter.verify`). Any
exception other than :class:`clair_cli.errors.ClairError` is a bug.

    python -m fuzz.loader --cases 100000 --seed 1   # the documented run (README)
    python -m fuzz.loader --cases 500 --seed 3
    python -m fuzz.loader --cases 5000 --kohya    # a kohya LoRA file (no config) instead

``tests/test_fuzz.py`` drives the same mutations from hypothesis on every test run.
"""

from __future__ import annotations

import argparse
import json
import random
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path

from clair_cli.errors import ClairError

DTYPES = ["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "X9", 7, None]


def valid_adapter() -> tuple[bytes, dict]:
    """A small valid adapter: (safetensors bytes, config)."""
    import torch
    from safetensors.torch import save

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for m in ("model.layers.0.q_proj", "model.layers.0.v_proj"):
        tensors[f"base_model.model.{m}.lora_A.weight"] = torch.randn(4, 16, generator=g)
        tensors[f"base_model.model.{m}.lora_B.weight"] = torch.randn(12, 4, generator=g)
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    return save(tensors), config


def valid_kohya() -> bytes:
    """A small valid kohya LoRA file: two linear modules and a conv module with their alphas."""
    import torch
    from safetensors.torch import save

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for m in ("lora_unet_mid_block_attentions_0_proj_in", "lora_te_text_model_encoder_layers_0_self_attn_q_proj"):
        tensors[f"{m}.lora_down.weight"] = torch.randn(4, 16, generator=g)
        tensors[f"{m}.lora_up.weight"] = torch.randn(12, 4, generator=g)
        tensors[f"{m}.alpha"] = torch.tensor(2.0, dtype=torch.float16)
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    tensors[f"{conv}.lora_down.weight"] = torch.randn(4, 3, 3, 3, generator=g)
    tensors[f"{conv}.lora_up.weight"] = torch.randn(5, 4, 1, 1, generator=g)
    tensors[f"{conv}.alpha"] = torch.tensor([4])
    return save(tensors)


def _header(raw: bytes) -> tuple[int, dict]:
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8 : 8 + n])


def _with_header(raw: bytes, header: object, data: bytes | None = None) -> bytes:
    n, _ = _header(raw)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + (raw[8 + n :] if data is None else data)


def _random_value(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(7 if depth < 2 else 4)
    if kind == 0:
        return rng.choice([0, -1, 1, 2**63, 2**64 + 5, 10**30, 3.5, float("nan")])
    if kind == 1:
        return rng.choice(["", "F32", "x" * 50, "\udcff".encode("utf-8", "surrogatepass").decode("utf-8", "replace")])
    if kind == 2:
        return rng.choice([None, True, False])
    if kind == 3:
        return [rng.randrange(-3, 2**20) for _ in range(rng.randrange(4))]
    if kind == 4:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(3))]
    return {str(rng.randrange(5)): _random_value(rng, depth + 1) for _ in range(rng.randrange(3))}


def mutate(raw: bytes, config: dict, rng: random.Random) -> tuple[bytes, bytes]:  # noqa: C901 - one branch per kind of damage
    """One damaged (weights, config) pair."""
    cfg = json.dumps(config).encode()
    n, header = _header(raw)
    op = rng.randrange(10)
    if op == 0:  # truncate anywhere
        raw = raw[: rng.randrange(len(raw))]
    elif op == 1:  # flip bytes in the header
        b = bytearray(raw)
        for _ in range(rng.randrange(1, 6)):
            b[rng.randrange(8, 8 + n)] = rng.randrange(256)
        raw = bytes(b)
    elif op == 2:  # flip bytes in the data (finite or not, the loader must cope)
        b = bytearray(raw)
        for _ in range(rng.randrange(1, 40)):
            b[rng.randrange(8 + n, len(b))] = rng.randrange(256)
        raw = bytes(b)
    elif op == 3:  # a random header length
        raw = struct.pack("<Q", rng.choice([0, 1, n - 1, n + 1, len(raw), 2**63, 2**64 - 1])) + raw[8:]
    elif op == 4:  # change one field of one tensor
        key = rng.choice([k for k in header if k != "__metadata__"])
        field = rng.choice(["dtype", "shape", "data_offsets"])
        header[key][field] = rng.choice([*DTYPES, _random_value(rng)]) if field == "dtype" else _random_value(rng)
        raw = _with_header(raw, header)
    elif op == 5:  # rename, drop or duplicate-shape a tensor
        key = rng.choice([k for k in header if k != "__metadata__"])
        entry = header.pop(key)
        if rng.random() < 0.5:
            header[key.replace("lora_A", "lora_B") if "lora_A" in key else key + rng.choice(["x", ".bias", ""])] = entry
        raw = _with_header(raw, header)
    elif op == 6:  # a header that is not what safetensors expects
        raw = _with_header(raw, _random_value(rng))
    elif op == 7:  # non-UTF-8 or non-JSON header bytes of the same length
        raw = raw[:8] + bytes(rng.randrange(256) for _ in range(n)) + raw[8 + n :]
    elif op == 8:  # a damaged config
        c = dict(config)
        c[rng.choice(["r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "peft_type"])] = (
            _random_value(rng)
        )
        cfg = json.dumps(c).encode() if rng.random() < 0.9 else cfg[: rng.randrange(len(cfg))]
    else:  # shapes that agree with the bytes but not with LoRA
        key = rng.choice([k for k in header if k != "__metadata__"])
        header[key]["shape"] = list(reversed(header[key]["shape"]))
        raw = _with_header(raw, header)
    return raw, cfg


def check(weights: bytes, config: bytes, directory: Path) -> None:
    """Open and read the adapter; raise what the loader raises unless it is a ClairError."""
    from clair_cli.io.adapter import verify
    from clair_cli.io.sources import open_adapters

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_model.safetensors").write_bytes(weights)
    (directory / "adapter_config.json").write_bytes(config)
    try:
        for adapter in open_adapters([str(directory)]):
            verify(adapter)
    except ClairError:
        pass


def check_file(weights: bytes, directory: Path) -> None:
    """Open and read a bare weights file (a kohya LoRA needs no config) as :func:`check` does."""
    from clair_cli.io.adapter import verify
    from clair_cli.io.sources import open_adapters

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "lora.safetensors"
    path.write_bytes(weights)
    try:
        for adapter in open_adapters([str(path)]):
            verify(adapter)
    except ClairError:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kohya", action="store_true", help="damage a kohya LoRA file (no config) instead")
    args = parser.parse_args()
    raw, config = (valid_kohya(), {}) if args.kohya else valid_adapter()
    rng = random.Random(args.seed)
    failures = 0
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.cases):
            weights, cfg = mutate(raw, config, rng)
            try:
                if args.kohya:
                    check_file(weights, Path(tmp) / "adapter")
                else:
                    check(weights, cfg, Path(tmp) / "adapter")
            except Exception:  # noqa: BLE001 - counting what escapes is the point
                failures += 1
                if failures <= 5:
                    print(f"case {i}: uncaught exception", file=sys.stderr)
                    traceback.print_exc()
    rate = args.cases / (time.perf_counter() - start)
    print(f"{args.cases} cases (seed {args.seed}), {failures} uncaught exceptions, {rate:.0f} cases/s")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
