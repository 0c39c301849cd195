"""A differential review: what PeftModel.from_pretrained applies from an adapter against what clair
reads as its update. Where the two differ, clair refuses the adapter, flags it (clair gate) or says so
in a note; each case below was a silent divergence."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from helpers import lora_config, run_cli, tiny_llama, write_adapter
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from test_hub import SHA_MAIN, FakeHub, _env

from clair_cli.errors import AdapterFormatError, UnsafeFormatError
from clair_cli.io import SourceOptions, open_adapters
from clair_cli.io.peft_config import parse_config


def _peft_adapter(directory: Path, model: torch.nn.Module, **config: object) -> Path:
    """A PEFT LoRA of ``model`` with non-zero factors, saved by PEFT itself."""
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, **config))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(directory)
    return directory


def _lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {
        name.removeprefix("base_model.model."): m
        for name, m in model.named_modules()
        if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling
    }


@pytest.mark.parametrize("other", ["pytorch_lora_weights.safetensors", "adapters.safetensors"])
def test_a_pickle_that_peft_loads_beside_another_weights_file_is_refused(tmp_path: Path, other: str) -> None:
    """Without adapter_model.safetensors PEFT loads adapter_model.bin; clair read the diffusers or
    MLX-LM file beside it (a review: a benign file beside a pickle whose updates were 1000 times larger)."""
    directory = _peft_adapter(tmp_path / "a", tiny_llama(), target_modules=["q_proj"])
    tensors = load_file(directory / "adapter_model.safetensors")
    (directory / "adapter_model.safetensors").rename(directory / other)
    payload = {k: v * 1000 if "lora_B" in k else v for k, v in tensors.items()}
    torch.save(payload, directory / "adapter_model.bin")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(tiny_llama(), str(directory))
    key = "model.layers.0.self_attn.q_proj"
    applied = _lora_layers(loaded)[key].lora_B["default"].weight
    torch.testing.assert_close(applied, payload[f"base_model.model.{key}.lora_B.weight"])  # the pickle's
    with pytest.raises(UnsafeFormatError, match="adapter_model.bin: pickle checkpoints are never loaded"):
        open_adapters([str(directory)])


def test_a_hub_repo_with_a_peft_config_is_not_read_from_an_mlx_file(tmp_path: Path) -> None:
    """A repo whose config PEFT loads and that has no adapter_model.safetensors: PEFT loads its
    adapter_model.bin (or nothing), never adapters.safetensors, which clair read."""
    src = write_adapter(tmp_path / "src", config=lora_config())
    files = {
        "adapter_config.json": (src / "adapter_config.json").read_bytes(),
        "adapters.safetensors": (src / "adapter_model.safetensors").read_bytes(),
        "adapter_model.bin": b"\x80",
    }
    with FakeHub({"owner/mixed": {"main": (SHA_MAIN, files)}}) as hub:
        proc = run_cli("inspect", "owner/mixed", "--json", "-", env=_env(hub, tmp_path / "home"))
        fetched = {path.rsplit("/", 1)[-1] for _, path, _ in hub.requests}
    assert proc.returncode == 2, proc.stdout
    assert "has adapter_config.json but no adapter_model.safetensors" in proc.stderr
    assert "adapters.safetensors" not in fetched


def test_a_config_whose_peft_type_is_null_is_refused_as_one_peft_cannot_load(tmp_path: Path) -> None:
    """``"peft_type": null``: PEFT fails on it (KeyError None) like on "lora"; clair says it is a config PEFT
    cannot load, not another kind of adapter than LoRA (its old message: "clair analyses LoRA adapters only")."""
    from peft import PeftConfig

    candidate = write_adapter(tmp_path / "candidate", config=lora_config(peft_type=None))
    with pytest.raises(KeyError, match="None"):
        PeftConfig.from_pretrained(str(candidate))
    proc = run_cli("inspect", str(candidate))
    assert proc.returncode == 2, proc.stdout
    (line, *_) = proc.stderr.strip().splitlines()
    assert str(candidate / "adapter_config.json") in line and "Traceback" not in proc.stderr
    assert "peft_type is null" in line and "PEFT cannot load this config" in line, line
    assert "LoRA adapters only" not in line
    assert '"peft_type": "LORA"' in proc.stderr  # the hint


def _tiny_llava() -> torch.nn.Module:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    text = LlamaConfig(
        hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2
    )
    vision = CLIPVisionConfig(
        hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4
    )
    text.vocab_size = 64
    return LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=vision, image_token_index=5))


@pytest.fixture(scope="module")
def llava_v4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llava LoRA in the key layout of transformers 4 (``language_model.model.layers...``)."""
    root = tmp_path_factory.mktemp("llava")
    directory = _peft_adapter(root / "a", _tiny_llava(), target_modules=r"model\.language_model.*\.q_proj")
    tensors = load_file(directory / "adapter_model.safetensors")
    v4 = {
        k.replace("base_model.model.model.language_model.", "base_model.model.language_model.model."): v
        for k, v in tensors.items()
    }
    assert v4 != tensors
    save_file(v4, directory / "adapter_model.safetensors")
    return directory


@pytest.mark.parametrize(
    ("key", "flagged"),
    [(r"language_model\.model\.layers\.0\.self_attn\.q_proj", True), ("layers.0.self_attn.q_proj", False)],
)
def test_patterns_of_a_transformers4_vision_language_layout_are_flagged(
    llava_v4: Path, tmp_path: Path, key: str, flagged: bool
) -> None:
    """transformers 5 renames a transformers-4 Llava's modules, and PEFT the adapter's keys with them,
    before it matches the patterns: a key for the old name matched nothing there (a review: lora_alpha
    800, alpha_pattern 8 on the old name; PEFT applied a 100 times larger update than clair read)."""
    directory = tmp_path / "a"
    shutil.copytree(llava_v4, directory)
    config = json.loads((directory / "adapter_config.json").read_text())
    config |= {"target_modules": ["q_proj"], "lora_alpha": 800, "alpha_pattern": {key: 8}}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(_tiny_llava(), str(directory))
    peft_scale = _lora_layers(loaded)["model.language_model.layers.0.self_attn.q_proj"].scaling["default"]
    (adapter,) = open_adapters([str(directory)], SourceOptions(base_model="tiny"))
    clair_scale = adapter.modules["language_model.model.layers.0.self_attn.q_proj"].scale
    assert (peft_scale != clair_scale) == flagged  # PEFT's 800 / 4 where clair reads the pattern's 8 / 4
    said = [u for u in adapter.unanalysed() if "transformers-5 name" in u]
    assert bool(said) == flagged
    assert any("transformers-5 name" in n for n in adapter.notes) == flagged


def test_a_config_without_target_modules_is_noted(tmp_path: Path) -> None:
    """PEFT targets its default modules for the architecture (q_proj and v_proj for Llama) and ignores
    the file's others, which clair analysed without a word."""
    directory = _peft_adapter(tmp_path / "a", tiny_llama(), target_modules=["q_proj", "k_proj"])
    config = json.loads((directory / "adapter_config.json").read_text())
    del config["target_modules"]
    (directory / "adapter_config.json").write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(tiny_llama(), str(directory))
    assert not any(name.endswith("k_proj") for name in _lora_layers(loaded))
    (adapter,) = open_adapters([str(directory)])
    assert any(name.endswith("k_proj") for name in adapter.modules)
    assert any("gives no target_modules" in n for n in adapter.notes)


def test_modules_all_linear_does_not_select_are_noted_as_ignored(tmp_path: Path) -> None:
    """PEFT's "all-linear" leaves out the output layer and every non-linear layer: PEFT loads no LoRA of
    lm_head or of an embedding under it."""
    directory = _peft_adapter(tmp_path / "a", tiny_llama(), target_modules=["q_proj", "lm_head", "embed_tokens"])
    config = json.loads((directory / "adapter_config.json").read_text())
    config["target_modules"] = "all-linear"
    (directory / "adapter_config.json").write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(tiny_llama(), str(directory))
    assert {"lm_head", "model.embed_tokens"}.isdisjoint(_lora_layers(loaded))
    (adapter,) = open_adapters([str(directory)])
    (note,) = [n for n in adapter.notes if "PEFT ignores those tensors" in n]
    assert "does not select 2 module(s)" in note


@pytest.mark.parametrize("peft_type", ["lora", "Lora", None])
def test_a_config_whose_peft_type_peft_cannot_look_up_is_refused(tmp_path: Path, peft_type: str | None) -> None:
    """PEFT looks ``peft_type`` up among its types' names, case-sensitively: PeftModel.from_pretrained (and
    transformers' load_adapter, through PeftConfig) fails on "lora" and on a config without one, while clair
    read both as LoRA, and gate passed the adapter (a review: exit 0 for a candidate nobody loads)."""
    refs = [str(write_adapter(tmp_path / "refs" / f"r{k}", seed=k)) for k in range(6)]
    config = lora_config(peft_type=peft_type)
    if peft_type is None:
        del config["peft_type"]
    candidate = write_adapter(tmp_path / "candidate", config=config, seed=9)
    with pytest.raises(KeyError, match=repr(peft_type or "peft_type")), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        PeftModel.from_pretrained(tiny_llama(), str(candidate))
    with pytest.raises(AdapterFormatError, match="PEFT loads only"):
        open_adapters([str(candidate)])
    proc = run_cli("gate", str(candidate), *sum((["-r", r] for r in refs), []), "--device", "cpu")
    assert proc.returncode == 2, proc.stdout
    (line, *_) = proc.stderr.strip().splitlines()
    assert str(candidate / "adapter_config.json") in line and "peft_type" in line and "Traceback" not in proc.stderr
    (candidate / "adapter_config.json").write_text(json.dumps(lora_config()))  # the same adapter, as PEFT writes it
    assert run_cli("gate", str(candidate), *sum((["-r", r] for r in refs), []), "--device", "cpu").returncode == 0
    # A config given in code (Flower's ClairStrategy, diffusers' metadata) may leave peft_type out, and so
    # may one given with --config to describe a loose weights file (no PEFT loader opens either).
    assert parse_config({"r": 4, "lora_alpha": 8}, "LoraConfig").r == 4
    described = tmp_path / "described.json"
    described.write_text(json.dumps(config))
    (loose,) = open_adapters([str(candidate / "adapter_model.safetensors")], SourceOptions(config=described))
    assert loose.config.r == config["r"]
