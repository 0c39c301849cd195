"""PEFT adapters of layers clair does not read as one ``B @ A``: refused with the true reason
(found by a review of real PEFT checkpoints, 2026-12-06; both were refused as a rank mismatch)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import lora_config, run_cli, write_adapter
from peft import LoraConfig, get_peft_model
from torch import nn


class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.grouped = nn.Conv2d(4, 6, 3, groups=2)


def test_a_grouped_convolution_lora_is_refused_for_what_it_is(tmp_path: Path) -> None:
    """PEFT stores a grouped conv's lora_B as a grouped 1x1 conv (r / groups input channels)."""
    for k in range(5):
        torch.manual_seed(k)
        with pytest.warns(UserWarning, match="groups > 1"):
            model = get_peft_model(Grouped(), LoraConfig(r=4, lora_alpha=8, target_modules=["grouped"]))
        model.save_pretrained(tmp_path / "pool" / f"c{k}")
    proc = run_cli("inspect", str(tmp_path / "pool"))
    assert proc.returncode == 2, proc.stderr
    assert "a LoRA of a grouped convolution (lora_B (6, 2, 1, 1) takes 2 of lora_A's 4 channels per group" in (
        proc.stderr
    )
    assert "rank mismatch" not in proc.stderr


def test_a_target_parameters_lora_is_refused_for_what_it_is(tmp_path: Path) -> None:
    """LoRAs of nn.Parameters (fused MoE experts) hold one LoRA per expert in one pair of factors of
    rank r x experts: not 'a rank the config does not give' that PEFT would refuse (PEFT loads it)."""
    g = torch.Generator().manual_seed(0)
    name = "base_model.model.model.layers.0.mlp.experts"
    tensors = {f"{name}.lora_A.weight": torch.randn(16, 8, generator=g), f"{name}.lora_B.weight": torch.randn(12, 16)}
    config = lora_config(target_modules=None, target_parameters=["mlp.experts.gate_up_proj"])
    for k in range(5):
        write_adapter(tmp_path / "pool" / f"c{k}", tensors, config)
    for command in ("inspect", "audit"):
        proc = run_cli(command, str(tmp_path / "pool"))
        assert proc.returncode == 2, proc.stderr
        assert "a LoRA of target_parameters (nn.Parameters such as fused MoE experts; 4 LoRAs of rank 4" in proc.stderr
        assert "PEFT would refuse" not in proc.stderr


def test_with_ensure_weight_tying_no_module_is_said_to_be_ignored() -> None:
    """With ``ensure_weight_tying`` PEFT gives the layers tied to a targeted one (the lm_head of a
    tied embed_tokens) its LoRA and loads their tensors, though target_modules does not name them;
    which layers are tied, the model says, so no note claims PEFT ignores them (a review: it did)."""
    from clair_cli.io.lora_config import ignored_modules
    from clair_cli.io.peft_config import parse_config

    modules = ["model.embed_tokens", "lm_head"]
    plain = parse_config(lora_config(target_modules=["embed_tokens"]), "c.json")
    tied = parse_config(lora_config(target_modules=["embed_tokens"], ensure_weight_tying=True), "c.json")
    assert ignored_modules(plain, modules) == ["lm_head"]
    assert ignored_modules(tied, modules) == []
