"""clair's update of every module equals PEFT's own get_delta_weight."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from clair_cli.io import SourceOptions, open_adapters


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.q_proj = nn.Linear(8, 6)
        self.v_proj = nn.Linear(8, 6)
        self.c_attn = Conv1D(12, 8)
        self.conv = nn.Conv2d(3, 5, 3)
        self.head = nn.Linear(6, 4)


CASES = {
    "plain": dict(target_modules=["q_proj", "v_proj", "head"]),
    "rslora": dict(target_modules=["q_proj", "v_proj"], use_rslora=True),
    "rank_pattern": dict(target_modules=["q_proj", "v_proj", "head"], rank_pattern={"q_proj": 2, "head": 6}),
    "alpha_pattern": dict(target_modules=["q_proj", "v_proj", "head"], alpha_pattern={"v_proj": 3, "head": 32}),
    "patterns_rslora": dict(
        target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 8}, alpha_pattern={"q_proj": 5}, use_rslora=True
    ),
    "fan_in_fan_out": dict(target_modules=["c_attn"], fan_in_fan_out=True),
    "embedding": dict(target_modules=["embed"]),
    "conv": dict(target_modules=["conv"]),
    "dora": dict(target_modules=["q_proj"], use_dora=True),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, nn.Module]]:
    root = tmp_path_factory.mktemp("peft")
    out = {}
    for i, (name, kw) in enumerate(CASES.items()):
        torch.manual_seed(i)
        model = get_peft_model(Tiny(), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kw))
        model.save_pretrained(root / name)
        out[name] = (root / name, model)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_update_equals_peft_delta_weight(case: str, saved: dict[str, tuple[Path, nn.Module]]) -> None:
    path, model = saved[case]
    (adapter,) = open_adapters([str(path)], SourceOptions(base_model="tiny"))
    peft_layers = {
        name.removeprefix("base_model.model."): mod
        for name, mod in model.named_modules()
        if hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "scaling", {})
    }
    loaded = {m.name: m for m in adapter.load(dtype=torch.float64)}
    assert set(loaded) == set(peft_layers)
    for name, module in loaded.items():
        layer = peft_layers[name]
        assert module.scale == pytest.approx(layer.scaling["default"])
        expected = layer.get_delta_weight("default").detach().double()
        got = module.delta_weight()
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_dora_is_loaded_with_a_note(saved: dict[str, tuple[Path, nn.Module]]) -> None:
    (adapter,) = open_adapters([str(saved["dora"][0])])
    assert list(adapter.modules) == ["q_proj"]
    assert any("DoRA" in n for n in adapter.notes)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_adapters_are_upcast(tmp_path: Path, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = get_peft_model(Tiny(), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj"]))
    model = model.to(dtype)
    model.save_pretrained(tmp_path / "half")
    (adapter,) = open_adapters([str(tmp_path / "half")])
    (module,) = adapter.load()
    assert module.A.dtype == torch.float32
    assert adapter.dtypes == [str(dtype).removeprefix("torch.")]
    layer = model.base_model.model.q_proj
    expected = (layer.lora_B["default"].weight.float() @ layer.lora_A["default"].weight.float()) * 2.0
    torch.testing.assert_close(module.delta(), expected.detach())
