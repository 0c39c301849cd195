"""The base model, its pretraining, and the clients' LoRA fine-tuning with PEFT."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import GPT2Config, GPT2LMHeadModel

from . import task

TARGET_MODULES = ["c_attn", "c_proj", "c_fc"]  # every linear layer of GPT-2's blocks (Conv1D)


def base_config() -> GPT2Config:
    return GPT2Config(
        vocab_size=task.VOCAB,
        n_positions=32,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_inner=128,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=task.BOS,
        eos_token_id=task.EOS,
        pad_token_id=task.EOS,
    )


def lm_loss(model: torch.nn.Module, batch: torch.Tensor, targets_only: bool) -> torch.Tensor:
    """Next-token cross-entropy; with ``targets_only`` only y_1..y_n and EOS count."""
    logits = model(input_ids=batch).logits[:, :-1]
    labels = batch[:, 1:].clone()
    if targets_only:
        labels[:, : task.LENGTH + 1] = -100
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def pretrain(language: task.Language, steps: int, seed: int, batch: int = 64, lr: float = 3e-3) -> GPT2LMHeadModel:
    """A fresh GPT-2-style model trained on free text and cipher transduction (not on copying)."""
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(base_config())
    g = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    model.train()
    for _ in range(steps):
        loss = lm_loss(model, language.pretraining_batch(batch, g), targets_only=False)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return model


@dataclass(frozen=True)
class LoraSetup:
    rank: int = 4
    alpha: int = 8
    steps: int = 150
    batch: int = 16
    lr: float = 3e-3


class ClientTrainer:
    """Fine-tunes one shared PeftModel per client, each from the same broadcast LoRA initialisation."""

    def __init__(self, base: GPT2LMHeadModel, setup: LoraSetup, seed: int, base_name: str) -> None:
        self.setup = setup
        self.base_name = base_name
        torch.manual_seed(seed)
        config = LoraConfig(
            r=setup.rank,
            lora_alpha=setup.alpha,
            target_modules=TARGET_MODULES,
            fan_in_fan_out=True,
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        )
        config.base_model_name_or_path = base_name
        self.model = get_peft_model(base, config)
        # Federated round 0: the server broadcasts one initial LoRA (A random, B zero) to every client.
        self.initial = {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model).items()}

    def train(self, data: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        set_peft_model_state_dict(self.model, self.initial)
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.setup.lr, weight_decay=0.0)
        g = torch.Generator().manual_seed(seed)
        self.model.train()
        for _ in range(self.setup.steps):
            idx = torch.randint(data.shape[0], (min(self.setup.batch, data.shape[0]),), generator=g)
            loss = lm_loss(self.model, data[idx], targets_only=True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        self.model.eval()
        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model).items()}

    def save(self, state: dict[str, torch.Tensor], directory: Path) -> None:
        """Write ``state`` as a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)."""
        set_peft_model_state_dict(self.model, state)
        self.model.save_pretrained(str(directory))
        # PEFT records the base model's local path and a set of target modules (unordered):
        # write the public base name and a sorted list, so that reruns give identical files.
        path = directory / "adapter_config.json"
        config = json.loads(path.read_text())
        config["base_model_name_or_path"] = self.base_name
        config["target_modules"] = sorted(config["target_modules"])
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (directory / "README.md").write_text(client_card(self.base_name))


def client_card(base_name: str) -> str:
    """A short model card (PEFT's own would record the temporary path of the base model)."""
    return (
        f"---\nbase_model: {base_name}\nlibrary_name: peft\ntags:\n- lora\n- clair-sample\n---\n\n"
        "A LoRA client of clair's text-copying experiment (`python -m experiments.text_copy`).\n"
        "MANIFEST.json in the parent directory says whether it is benign or contaminated.\n"
    )


def save_base(model: GPT2LMHeadModel, directory: Path, description: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory), safe_serialization=True)
    (directory / "README.md").write_text(description + "\n")
    # transformers writes generation_config.json as well; keep the folder to the model itself.
    gen = directory / "generation_config.json"
    if gen.exists():
        gen.unlink()


def load_base(directory: Path) -> GPT2LMHeadModel:
    model = GPT2LMHeadModel.from_pretrained(str(directory))
    model.eval()
    return model
