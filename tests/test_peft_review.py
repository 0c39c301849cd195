"""LoraConfig fields whose effect clair read differently from PEFT (review of PEFT's LoraConfig, field by
field): rank_pattern / alpha_pattern of target_parameters LoRAs, the head a task type takes out of LoRA,
and an empty layers_pattern."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import MODULES, lora_config, random_factors, run_cli, write_adapter
from peft import LoraConfig, get_peft_model
from torch import nn

from clair_cli.errors import AdapterFormatError
from clair_cli.io import SourceOptions, open_adapters

HAS_TARGET_PARAMETERS = "target_parameters" in LoraConfig.__dataclass_fields__


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Module()
        self.block.q_proj = nn.Linear(8, 6)
        self.block.v_proj = nn.Linear(8, 6)


def _open(path: Path):
    (adapter,) = open_adapters([str(path)], SourceOptions(base_model="tiny"))
    return adapter


@pytest.mark.skipif(not HAS_TARGET_PARAMETERS, reason="this PEFT has no target_parameters")
# PEFT warns that a parameter's key matched no module, and applies it to the parameter.
@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match")
@pytest.mark.parametrize(
    "patterns",
    [
        # A key for the module's name: PEFT matches "block.q_proj.weight", which it does not end; default alpha.
        dict(alpha_pattern={"q_proj": 3}),
        # A key for the parameter's name: PEFT applies it.
        dict(alpha_pattern={"q_proj.weight": 3}),
        dict(rank_pattern={"q_proj.weight": 2}, alpha_pattern={"weight": 5}),
        dict(rank_pattern={"q_proj": 2}, use_rslora=True),
    ],
)
def test_target_parameters_patterns_match_the_parameter_name(tmp_path: Path, patterns: dict) -> None:
    torch.manual_seed(0)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=[], target_parameters=["q_proj.weight"], init_lora_weights=False, **patterns
    )
    model = get_peft_model(Tiny(), config)
    model.save_pretrained(tmp_path / "a")
    (layer,) = [m for n, m in model.named_modules() if n.endswith("block.q_proj") and hasattr(m, "scaling")]
    spec = _open(tmp_path / "a").modules["block.q_proj"]
    assert spec.rank == layer.r["default"]
    assert spec.scale == pytest.approx(layer.scaling["default"])


@pytest.mark.skipif(not HAS_TARGET_PARAMETERS, reason="this PEFT has no target_parameters")
def test_patterns_over_several_parameters_of_one_layer_are_refused(tmp_path: Path) -> None:
    """PEFT nests the wrappers of two parameters of one layer (<layer> and <layer>.base_layer); which
    parameter each pair of factors belongs to, and so which pattern applies, the file does not say."""
    tensors = random_factors({"block": (6, 8), "block.base_layer": (6, 8)})
    config = lora_config(target_modules=[], target_parameters=["block.w1", "block.w2"], alpha_pattern={"w1": 3})
    write_adapter(tmp_path / "a", tensors, config)
    with pytest.raises(AdapterFormatError, match="one of several target_parameters of one layer"):
        _open(tmp_path / "a")
    proc = run_cli("inspect", str(tmp_path / "a"))
    assert proc.returncode == 2, proc.stderr
    assert "adapter_model.safetensors" in proc.stderr and "target_parameters" in proc.stderr
    # Without patterns every parameter gets r and lora_alpha: read as before.
    write_adapter(tmp_path / "b", tensors, lora_config(target_modules=[], target_parameters=["block.w1", "block.w2"]))
    assert set(_open(tmp_path / "b").modules) == {"block", "block.base_layer"}
    # Patterns that give both parameters one rank and alpha (none of them, or both alike): which one
    # a pair belongs to does not change its scale, so it is read.
    for name, pattern, scale in (("c", {"elsewhere": 3}, 8 / 4), ("d", {r"w\d": 3}, 3 / 4)):
        both = lora_config(target_modules=[], target_parameters=["block.w1", "block.w2"], alpha_pattern=pattern)
        write_adapter(tmp_path / name, tensors, both)
        modules = _open(tmp_path / name).modules
        assert {m: s.scale for m, s in modules.items()} == {"block": scale, "block.base_layer": scale}


@pytest.mark.parametrize(
    ("task_type", "head"), [("SEQ_CLS", "score"), ("TOKEN_CLS", "classifier"), ("QUESTION_ANS", "qa_outputs")]
)
def test_the_head_a_task_type_adds_to_modules_to_save_is_not_said_to_be_loaded(
    tmp_path: Path, task_type: str, head: str
) -> None:
    """PEFT's model class for a task type with a head adds the head to modules_to_save when it loads the
    adapter (whatever the config lists), which takes it out of LoRA: a LoRA of the head is not applied."""
    tensors = random_factors({**MODULES, head: (3, 16), f"{head}.dense": (3, 16)})
    tensors[f"base_model.model.{head}.weight"] = torch.zeros(3, 16)
    config = lora_config(target_modules=["q_proj", "v_proj", head, "dense"], task_type=task_type, modules_to_save=None)
    write_adapter(tmp_path / "a", tensors, config)
    notes = " ".join(_open(tmp_path / "a").notes)
    assert "does not select 2 module(s)" in notes, notes
    # Another task type adds nothing.
    write_adapter(tmp_path / "b", tensors, {**config, "task_type": "CAUSAL_LM"})
    assert "does not select" not in " ".join(_open(tmp_path / "b").notes)


def test_an_empty_layers_pattern_is_peft_default(tmp_path: Path) -> None:
    """PEFT reads layers_pattern "" (or []) as its default layer pattern, not as a pattern that matches nothing."""
    tensors = random_factors({m: s for m, s in MODULES.items() if ".1." in m})
    for pattern in ("", [], None):
        config = lora_config(layers_to_transform=[1], layers_pattern=pattern)
        write_adapter(tmp_path / repr(pattern), tensors, config)
        assert "does not select" not in " ".join(_open(tmp_path / repr(pattern)).notes), pattern


def test_a_layers_pattern_is_compiled_once_as_peft_compiles_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PEFT compiles a layers_pattern inside its own expression only, so "*layers" (no expression by itself) loads
    there; clair compiled each entry alone too, refusing that one, and then wrapped, and prepared a string
    layers_pattern again for every module it matched."""
    import re

    from helpers import tiny_llama
    from peft import PeftModel

    from clair_cli.io import lora_config
    from clair_cli.io.patterns import LAYERS_PATTERN_WRAP
    from clair_cli.io.peft_config import parse_config

    torch.manual_seed(0)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], layers_to_transform=[1], layers_pattern="*layers")
    get_peft_model(tiny_llama(), config).save_pretrained(tmp_path / "a")
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a"))
    layer = "model.layers.1.self_attn.q_proj"
    assert [n for n, m in loaded.named_modules() if hasattr(m, "lora_A")] == [f"base_model.model.{layer}"]
    assert list(_open(tmp_path / "a").modules) == [layer]

    compiled: list[str] = []
    compile_ = re.compile

    def counted(pattern: str, flags: int = 0) -> re.Pattern[str]:
        compiled.append(pattern)
        return compile_(pattern, flags)

    monkeypatch.setattr(re, "compile", counted)
    raw = {"peft_type": "LORA", "target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": ["blk"]}
    parse_config(raw, "adapter_config.json")
    assert [p for p in compiled if "blk" in p] == [LAYERS_PATTERN_WRAP.format(key="blk")]

    judged: list[str] = []
    risk = lora_config.pattern_risk
    monkeypatch.setattr(lora_config, "pattern_risk", lambda key, *a, **k: judged.append(key) or risk(key, *a, **k))
    monkeypatch.setattr(lora_config, "_PREPARED", {})
    layer_0_only = [True] + [False] * 49
    for pattern in ("layers", ["layers"]):
        raw = {"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": pattern}
        selected = [lora_config.peft_selects(raw, f"model.layers.{i}.self_attn.q_proj") for i in range(50)]
        assert selected == layer_0_only, pattern
    assert judged == ["layers", "layers"]
