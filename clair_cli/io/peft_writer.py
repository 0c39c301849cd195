"""Write PEFT adapter directories atomically.

A merged adapter is a LoRA with scale 1 in every module: ``lora_alpha = r`` and,
where ranks differ by module, matching ``rank_pattern`` / ``alpha_pattern``
entries keyed by the full module name (PEFT matches them as
``(.*\\.)?<key>$``). Tensor names are PEFT's:
``base_model.model.<module>.lora_A.weight`` (``lora_embedding_A`` for
embeddings). A refined adapter keeps its source's config and every tensor of its
file; only the analysed factor on the projected side changes.

:func:`save_adapter` writes into a staging directory of the run's output transaction
(:class:`clair_cli.io.writers.Outputs`), which checks the target and renames it into
place with the run's other outputs, or not at all. Every name written inside it goes
through :func:`clair_cli.io.paths.join_inside`. The umask is honoured.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clair_cli.constants import CONFIG_NAME, MODEL_CARD_NAME, PEFT_KEY_PREFIX, SAFETENSORS_WEIGHTS_NAME
from clair_cli.errors import OutputError
from clair_cli.io.adapter import Adapter, ModuleSpec
from clair_cli.io.paths import apply_umask, join_inside, printable, safe_relpath
from clair_cli.io.writers import os_error_text

if TYPE_CHECKING:
    import torch

HEAD_TASK_TYPES = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")


def save_adapter(
    root: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], card: str, name: str | None = None
) -> Path:
    """Write adapter_config.json, adapter_model.safetensors and README.md into ``root`` (or ``root/name``).

    ``name`` (an adapter name, from the input) is made a safe relative path and checked
    to stay inside ``root``. Non-finite tensors are refused before anything is written.

    Returns:
        The directory written.
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise OutputError(
            f"the output for {printable(name or str(root))} would hold NaN or Inf values "
            f"({len(bad)} tensor(s), e.g. {printable(bad[0])}); nothing was written",
            hint="An input holds extreme values; inspect the adapters (clair inspect).",
        )
    directory = root if name is None else join_inside(root, safe_relpath(name))
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        save_file(
            {k: v.contiguous() for k, v in tensors.items()}, str(directory / SAFETENSORS_WEIGHTS_NAME), {"format": "pt"}
        )
        (directory / MODEL_CARD_NAME).write_text(card, encoding="utf-8")
        apply_umask(directory / SAFETENSORS_WEIGHTS_NAME)  # safetensors creates it 0600
    except OSError as exc:
        raise OutputError(f"{printable(str(directory))}: cannot write ({os_error_text(exc)})") from exc
    except SafetensorError as exc:
        raise OutputError(f"{printable(str(directory))}: cannot write the tensors ({exc})") from exc
    return directory


def _shapes(spec: ModuleSpec, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """PEFT's stored shapes of A and B at a new rank (conv kernels keep their layout)."""
    if spec.kind == "conv" and spec.weight_shape is not None:
        return (rank, *spec.weight_shape[1:]), (spec.d_out, rank, *([1] * (len(spec.weight_shape) - 2)))
    return (rank, spec.d_in), (spec.d_out, rank)


def _keys(spec: ModuleSpec) -> tuple[str, str]:
    if spec.kind == "embedding":
        return f"{PEFT_KEY_PREFIX}{spec.name}.lora_embedding_A", f"{PEFT_KEY_PREFIX}{spec.name}.lora_embedding_B"
    return f"{PEFT_KEY_PREFIX}{spec.name}.lora_A.weight", f"{PEFT_KEY_PREFIX}{spec.name}.lora_B.weight"


def merged_config(
    template: Adapter, ranks: dict[str, int], base_model: str | None, all_modules: bool
) -> dict[str, Any]:
    """PEFT config of a merged adapter: scale 1 everywhere, per-module ranks as patterns.

    Args:
        template: an input adapter (task type, fan_in_fan_out, target_modules).
        ranks: rank per module.
        base_model: the pool's base model.
        all_modules: the merge covers every module the inputs target, so their
            ``target_modules`` can be kept; otherwise the exact module names are listed.
    """
    cfg = template.config
    common = Counter(ranks.values()).most_common(1)[0][0]
    raw = cfg.raw
    # A task type with a head (SEQ_CLS...) makes PEFT expect the head's weights among the
    # adapter's, which a merge of LoRA factors does not carry: written without a task type,
    # the merged adapter loads on the base model with the base model's own head.
    task_type = raw.get("task_type") if raw.get("task_type") not in HEAD_TASK_TYPES else None
    targets: Any = raw.get("target_modules") if all_modules and raw.get("target_modules") else sorted(ranks)
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "r": common,
        "lora_alpha": common,
        "use_rslora": False,
        "rank_pattern": {m: r for m, r in sorted(ranks.items()) if r != common},
        "alpha_pattern": {m: r for m, r in sorted(ranks.items()) if r != common},
        "target_modules": targets,
        "fan_in_fan_out": cfg.fan_in_fan_out,
        "lora_dropout": 0.0,
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def merged_tensors(template: Adapter, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """PEFT tensors of a merged adapter from per-module ``(A, B)`` (scale 1)."""
    out = {}
    for name, (A, B) in factors.items():
        spec = template.modules[name]
        a_shape, b_shape = _shapes(spec, A.shape[0])
        a_key, b_key = _keys(spec)
        out[a_key] = A.reshape(a_shape)
        out[b_key] = B.reshape(b_shape)
    return out


def refined_tensors(
    adapter: Adapter, bases: dict[str, torch.Tensor | None], side: str
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """All tensors of ``adapter``'s file with each analysed module projected onto its basis.

    Returns the tensors (original names and dtypes) and the modules left unchanged
    (no shared structure there).
    """
    import torch

    from clair_cli.core.merge import refine

    unchanged = []
    with adapter.reader() as reader:
        tensors = {key: reader.get(key) for key in reader.tensors}
        for name, basis in bases.items():
            spec = adapter.modules[name]
            if basis is None:
                unchanged.append(name)
                continue
            mod = adapter.read_module(reader, name, torch.float64)  # float64: thread-count independent
            A, B = refine(mod.A, mod.B, basis, side)
            tensors[spec.a_key] = A.reshape(tensors[spec.a_key].shape).to(tensors[spec.a_key].dtype)
            tensors[spec.b_key] = B.reshape(tensors[spec.b_key].shape).to(tensors[spec.b_key].dtype)
    return tensors, unchanged


def source_config(adapter: Adapter) -> dict[str, Any]:
    """The adapter's own config as written to disk, or one built from flags for bare files."""
    if adapter.config.raw:
        return dict(adapter.config.raw)
    cfg = adapter.config
    return {
        "peft_type": "LORA",
        "base_model_name_or_path": cfg.base_model,
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "use_rslora": cfg.use_rslora,
        "rank_pattern": dict(cfg.rank_pattern),
        "alpha_pattern": dict(cfg.alpha_pattern),
        "target_modules": sorted(adapter.modules),
        "fan_in_fan_out": cfg.fan_in_fan_out,
        "bias": "none",
        "inference_mode": True,
    }
