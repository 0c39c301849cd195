"""Convert an MLX-LM LoRA adapter (``mlx_lm.lora``) into a PEFT adapter directory clair reads.

    python examples/mlx_to_peft.py MLX_ADAPTER_DIR PEFT_OUT_DIR

MLX-LM stores ``<module>.lora_a`` (in x r) and ``<module>.lora_b`` (r x out) in
``adapters.safetensors`` and adds ``scale * (x @ lora_a) @ lora_b`` to a layer's output, with one
``rank`` and ``scale`` for every module (``lora_parameters`` in ``adapter_config.json``). The same
update in PEFT's terms: ``lora_A.weight = lora_a^T``, ``lora_B.weight = lora_b^T`` and
``lora_alpha / r = scale``. MLX-LM's module names are the Hugging Face model's, so the PEFT adapter
targets exactly the modules the file holds. DoRA (``fine_tune_type: dora``), full fine-tunes and
MoE expert stacks (3-D factors) are refused: they are not a plain LoRA update. The scale is the one
clair reads (``clair_cli.io.mlx.mlx_config``: ``scale * alpha / rank`` for the configs of mlx_lm
0.13.0 and older that give an ``alpha``). An embedding's LoRA (MLX-LM's ``LoRAEmbedding``: the
table gains ``scale * lora_a @ lora_b``) is written under PEFT's embedding names
(``lora_embedding_A = lora_a^T``, ``lora_embedding_B = lora_b^T``: PEFT adds ``(B @ A)^T``), which
PEFT loads into an ``nn.Embedding`` (it ignores ``lora_A.weight`` there); the file does not say which
modules are embeddings, so they are told by name (``EMBEDDING_NAMES``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# The last part of an embedding module's name in the Hugging Face models MLX-LM fine-tunes.
EMBEDDING_NAMES = {"embed_tokens", "wte", "embed_in", "tok_embeddings", "word_embeddings"}


def convert(src: Path, dst: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    config = json.loads((src / "adapter_config.json").read_text(encoding="utf-8"))
    kind = config.get("fine_tune_type", "lora")
    if kind != "lora":
        raise SystemExit(f"{src}: fine_tune_type {kind!r} is not a plain LoRA")
    params = config["lora_parameters"]
    rank = int(params["rank"])
    try:
        from clair_cli.errors import ClairError
        from clair_cli.io.mlx import mlx_config

        scale = mlx_config(src / "adapter_config.json")[1]
    except ImportError:  # clair not installed: the config's scale as it stands
        scale = float(params["scale"])
    except ClairError as exc:
        raise SystemExit(str(exc)) from None
    tensors: dict[str, torch.Tensor] = {}
    modules: set[str] = set()
    for key, t in load_file(str(src / "adapters.safetensors")).items():
        module, _, part = key.rpartition(".")
        if part not in ("lora_a", "lora_b") or t.ndim != 2:
            raise SystemExit(f"{src}: {key} {tuple(t.shape)} is not a LoRA factor of a linear layer")
        peft_part = "lora_A" if part == "lora_a" else "lora_B"
        if module.rsplit(".", 1)[-1] in EMBEDDING_NAMES:
            name = f"base_model.model.{module}.{peft_part.replace('lora_', 'lora_embedding_')}"
        else:
            name = f"base_model.model.{module}.{peft_part}.weight"
        tensors[name] = t.T.contiguous()
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
