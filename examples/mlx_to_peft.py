"""Convert an MLX-LM LoRA adapter (``mlx_lm.lora``) into a PEFT adapter directory clair reads.

    python examples/mlx_to_peft.py MLX_ADAPTER_DIR PEFT_OUT_DIR

MLX-LM stores ``<module>.lora_a`` (in x r) and ``<module>.lora_b`` (r x out) in
``adapters.safetensors`` and adds ``scale * (x @ lora_a) @ lora_b`` to a layer's output, with one
``rank`` and ``scale`` for every module (``lora_parameters`` in ``adapter_config.json``). The same
update in PEFT's terms: ``lora_A.weight = lora_a^T``, ``lora_B.weight = lora_b^T`` and
``lora_alpha / r = scale``. MLX-LM's module names are the Hugging Face model's, so the PEFT adapter
targets exactly the modules the file holds. DoRA (``fine_tune_type: dora``), full fine-tunes and
MoE expert stacks (3-D factors) are refused: they are not a plain LoRA update.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def convert(src: Path, dst: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    config = json.loads((src / "adapter_config.json").read_text(encoding="utf-8"))
    kind = config.get("fine_tune_type", "lora")
    if kind != "lora":
        raise SystemExit(f"{src}: fine_tune_type {kind!r} is not a plain LoRA")
    params = config["lora_parameters"]
    rank, scale = int(params["rank"]), float(params["scale"])
    tensors: dict[str, torch.Tensor] = {}
    modules: set[str] = set()
    for key, t in load_file(str(src / "adapters.safetensors")).items():
        module, _, part = key.rpartition(".")
        if part not in ("lora_a", "lora_b") or t.ndim != 2:
            raise SystemExit(f"{src}: {key} {tuple(t.shape)} is not a LoRA factor of a linear layer")
        peft_part = "lora_A" if part == "lora_a" else "lora_B"
        tensors[f"base_model.model.{module}.{peft_part}.weight"] = t.T.contiguous()
        modules.add(module)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": config.get("model"),
        "r": rank,
        "lora_alpha": scale * rank,
        "target_modules": sorted(modules),
        "lora_dropout": float(params.get("dropout", 0.0)),
        "bias": "none",
    }
    (dst / "adapter_config.json").write_text(json.dumps(peft_config, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    convert(Path(sys.argv[1]), Path(sys.argv[2]))
