"""The model, its LoRA and the synthetic task, shared by the ServerApp and the ClientApp.

A frozen two-layer MLP (the "base model", the same on every node: drawn from a fixed seed)
classifies 16-dimensional points into 4 classes. The labels come from a teacher: the base
model plus a planted low-rank change of both layers, which LoRA of rank 4 on ``fc1`` and
``fc2`` can learn. Each client draws its own points from its partition's seed.

LoRA is written here in plain torch (PEFT's import alone takes seconds per simulated node);
its state dict has the keys ``get_peft_model_state_dict`` writes
(``base_model.model.fc1.lora_A.weight``, ...), which is what ClairStrategy reads. A client
using PEFT sends exactly the same thing.
"""

from __future__ import annotations

import torch
from torch import nn

IN, HIDDEN, CLASSES = 16, 32, 4
RANK, ALPHA = 4, 8
MODULES = ("fc1", "fc2")
PREFIX = "base_model.model."
BASE_SEED = 0
TEACHER_SEED = 1
TEST_SEED = 10_000


def lora_config() -> dict[str, object]:
    """The clients' LoRA, as PEFT's ``LoraConfig(...).to_dict()`` would give it."""
    return {"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": list(MODULES)}


class LoraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus ``alpha / r * B @ A`` (PEFT's LoRA, without dropout)."""

    def __init__(self, base: nn.Linear, generator: torch.Generator) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, RANK, bias=False)
        self.lora_B = nn.Linear(RANK, base.out_features, bias=False)
        with torch.no_grad():  # PEFT's initialisation: A random, B zero
            self.lora_A.weight.copy_(torch.randn(RANK, base.in_features, generator=generator) / base.in_features**0.5)
            self.lora_B.weight.zero_()
        self.scale = ALPHA / RANK

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * self.lora_B(self.lora_A(x))


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(BASE_SEED)
        fc1, fc2 = nn.Linear(IN, HIDDEN), nn.Linear(HIDDEN, CLASSES)
        with torch.no_grad():
            for layer in (fc1, fc2):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) / layer.in_features**0.5)
                layer.bias.zero_()
        self.fc1 = LoraLinear(fc1, g)
        self.fc2 = LoraLinear(fc2, g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def lora_state(model: Model) -> dict[str, torch.Tensor]:
    """The LoRA factors under PEFT's key names."""
    return {
        f"{PREFIX}{m}.{part}.weight": getattr(getattr(model, m), part).weight.detach().clone()
        for m in MODULES
        for part in ("lora_A", "lora_B")
    }


def load_lora(model: Model, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for m in MODULES:
            for part in ("lora_A", "lora_B"):
                getattr(getattr(model, m), part).weight.copy_(state[f"{PREFIX}{m}.{part}.weight"])


@torch.no_grad()
def _teacher_logits(x: torch.Tensor) -> torch.Tensor:
    """The base model with a planted rank-2 change of each layer."""
    base = Model()
    g = torch.Generator().manual_seed(TEACHER_SEED)
    h = base.fc1.base(x) + 3.0 * (x @ torch.randn(IN, 2, generator=g)) @ torch.randn(2, HIDDEN, generator=g) / IN
    h = torch.relu(h)
    return (
        base.fc2.base(h)
        + 3.0 * (h @ torch.randn(HIDDEN, 2, generator=g)) @ torch.randn(2, CLASSES, generator=g) / HIDDEN
    )


def load_data(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points and their teacher labels, drawn from ``seed``."""
    x = torch.randn(n, IN, generator=torch.Generator().manual_seed(seed))
    return x, _teacher_logits(x).argmax(dim=1)


def train(model: Model, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, seed: int) -> float:
    """``steps`` Adam steps on batches of 32 of the LoRA factors; the last batch's loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        idx = torch.randint(len(x), (32,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss)


@torch.no_grad()
def accuracy(model: Model, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(dim=1) == y).float().mean())
