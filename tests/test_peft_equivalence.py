"""clair's update of every module equals PEFT's own get_delta_weight."""

from __future__ import annotations

import json
from dataclasses import replace
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
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)


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
    # PEFT's MultiheadAttention LoRA also wraps out_proj (<mha>.base_layer.out_proj) with the
    # attention layer's own rank and alpha: the patterns match the attention layer's name.
    "mha": dict(target_modules=["mha", "q_proj"]),
    "mha_alpha_pattern": dict(target_modules=["mha", "q_proj"], alpha_pattern={"mha": 32}),
    "mha_rank_pattern": dict(target_modules=["mha", "q_proj"], rank_pattern={"mha": 2}, use_rslora=True),
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
        if name.endswith(".base_layer.out_proj"):  # as PEFT applies it, whichever version saved and loads it
            expected = _applied_out_proj(path, model, name.removesuffix(".base_layer.out_proj"))
            torch.testing.assert_close(module.delta_weight(), expected, rtol=1e-5, atol=1e-6)
            continue
        assert module.scale == pytest.approx(layer.scaling["default"])
        expected = layer.get_delta_weight("default").detach().double()
        got = module.delta_weight()
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def _applied_out_proj(path: Path, model: nn.Module, layer: str) -> torch.Tensor:
    """The update PEFT applies to a MultiheadAttention ``layer``'s out_proj: the saved adapter loaded into
    a copy of the base model and merged, minus the base weight (PEFT before 0.22 applies that LoRA twice;
    0.22 once, doubling lora_B of an adapter saved before 0.22: huggingface/peft#3774)."""
    import copy

    from peft import PeftModel

    base = copy.deepcopy(model).unload()
    before = base.get_submodule(layer).out_proj.weight.detach().clone()
    merged = PeftModel.from_pretrained(base, path).merge_and_unload()
    return (merged.get_submodule(layer).out_proj.weight.detach() - before).double()


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


def test_a_multihead_attention_merge_loads_in_peft_as_the_mean(tmp_path: Path) -> None:
    """PEFT gives a MultiheadAttention's in_proj and out_proj LoRAs one rank (the attention layer's):
    a merge whose out_proj mean has a lower rank than its in_proj mean is written at the larger
    rank in both (zero directions), or PEFT could not load it; and an ``alpha_pattern`` keyed on
    the attention layer sets out_proj's scale too (clair read 2.0 for PEFT's 8.0, and its merge
    loaded at a quarter of the mean)."""
    from peft import PeftModel
    from typer.testing import CliRunner

    from clair_cli.cli import app

    def base() -> nn.Module:
        torch.manual_seed(0)
        return Tiny().eval()

    config = dict(r=4, lora_alpha=8, target_modules=["mha", "q_proj"], init_lora_weights=False)
    deltas = []
    for k in range(6):
        torch.manual_seed(10 + k)
        model = get_peft_model(base(), LoraConfig(**config, alpha_pattern={"mha": 32}))
        out_proj = model.base_model.model.mha.base_layer.out_proj
        with torch.no_grad():  # one shared rank-1 out_proj update: its mean has rank 1
            out_proj.lora_A["default"].weight.copy_(torch.outer(torch.tensor([1.0, 0, 0, 0]), torch.arange(8.0) / 8))
            out_proj.lora_B["default"].weight.copy_(
                torch.outer(torch.linspace(-1, 1, 8), torch.tensor([1.0 + k, 0, 0, 0]))
            )
        assert out_proj.scaling["default"] == 8.0
        model.save_pretrained(tmp_path / "pool" / f"c{k}")
        deltas.append({n: m.get_delta_weight("default").detach().double() for n, m in _lora_layers(model).items()})
    result = CliRunner().invoke(
        app, ["merge", str(tmp_path / "pool"), "--out", str(tmp_path / "m"), "--method", "mean"]
    )
    assert result.exit_code == 0, result.output
    assert "PEFT ignores" not in result.output + (tmp_path / "m" / "README.md").read_text()  # out_proj is loaded
    merged = _lora_layers(PeftModel.from_pretrained(base(), tmp_path / "m"))
    assert set(merged) == {"mha", "mha.base_layer.out_proj", "q_proj"}
    for name, layer in merged.items():
        want = sum(d[name] for d in deltas) / len(deltas)
        torch.testing.assert_close(layer.get_delta_weight("default").double(), want, rtol=1e-4, atol=1e-5)
    ranks = {name: layer.r["default"] for name, layer in merged.items()}
    assert ranks["mha"] == ranks["mha.base_layer.out_proj"]
    written = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    # PEFT matches patterns against the attention layer: a key for its out_proj would match nothing
    assert not any("out_proj" in key for key in [*written["rank_pattern"], *written["alpha_pattern"]])


def test_a_module_only_named_like_an_attention_out_proj_takes_its_own_patterns() -> None:
    """``<x>.base_layer.out_proj`` is a MultiheadAttention's out_proj only where ``<x>`` has a LoRA
    of its own (a review: a plain submodule so named got the default rank and was refused)."""
    from clair_cli.io.peft_config import parse_config
    from clair_cli.types import attention_layers

    config = parse_config({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "rank_pattern": {"out_proj": 2}}, "c.json")
    assert config.rank_for("block.base_layer.out_proj") == 2
    assert attention_layers(["block.base_layer.out_proj", "q_proj"]) == frozenset()
    layers = attention_layers(["mha", "mha.base_layer.out_proj"])
    assert layers == {"mha"}
    assert replace(config, attention_layers=layers).rank_for("mha.base_layer.out_proj") == 4  # mha's: r


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {
        name.removeprefix("base_model.model."): mod
        for name, mod in model.named_modules()
        if hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "scaling", {})
    }


def test_an_attention_pair_is_written_at_one_rank_and_nothing_is_held_back() -> None:
    """The merge writes a MultiheadAttention's two modules at the larger rank (zero directions
    appended: the same updates), and a module whose peer never comes is still written."""
    from clair_cli.core.merge import MergeResult
    from clair_cli.pipeline import _Written

    def result(rank: int) -> MergeResult:
        return MergeResult(torch.randn(rank, 8), torch.randn(6, rank), "mean", [0, 1], {})

    names = ["mha", "mha.base_layer.out_proj", "q_proj"]
    written = _Written(names, None)
    small, large = result(1), result(3)
    written.add("mha.base_layer.out_proj", small)
    written.add("q_proj", result(2))
    written.add("mha", large)
    out = written.finish()
    assert {n: r.rank for n, r in out.items()} == {"mha.base_layer.out_proj": 3, "q_proj": 2, "mha": 3}
    torch.testing.assert_close(out["mha.base_layer.out_proj"].B @ out["mha.base_layer.out_proj"].A, small.B @ small.A)
    alone = _Written(names, None)
    alone.add("mha", large)
    assert alone.finish() == {"mha": large}


def test_refine_refuses_dora_adapters(tmp_path: Path) -> None:
    """``clair refine`` keeps an adapter's config and tensors and changes its factors; PEFT applies DoRA
    as ``m * (W + s*B@A) / ||W + s*B@A||`` with the kept magnitudes, so a refined DoRA adapter would
    not apply the projected update it reports (a review: on a tiny Llama it applied a change of norm
    1.1 for a projected update of norm 14.7). Refused, naming the config file, before anything is written."""
    from typer.testing import CliRunner

    from clair_cli.cli import app

    for k in range(5):
        torch.manual_seed(20 + k)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=k == 3, init_lora_weights=False)
        get_peft_model(Tiny(), config).save_pretrained(tmp_path / "pool" / f"c{k}")
    result = CliRunner().invoke(app, ["refine", str(tmp_path / "pool"), "--out", str(tmp_path / "r"), "--exit-zero"])
    assert result.exit_code == 2, result.output
    assert "DoRA" in result.output and "c3" in result.output and "adapter_config.json" in result.output
    assert not (tmp_path / "r").exists()
