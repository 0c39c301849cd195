"""Files whose effect under PeftModel.from_pretrained differs from the update clair reads (an
outside review): refused where PEFT would not load what clair reads, and flagged by clair gate
where PEFT applies more than clair analyses."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import lora_config, peft_at_least, run_cli, write_adapter
from pools import HIDDEN, MODULES, write_pool
from typer.testing import CliRunner

from clair_cli.cli import app
from clair_cli.errors import AdapterFormatError, IncompatibleAdapters
from clair_cli.io.sources import open_adapters

PREFIX = "base_model.model."


def _candidate(root: Path, extra: dict[str, torch.Tensor] | None = None, **config: Any) -> Path:
    """An honest candidate (it shares the pool's subspace), with ``extra`` tensors and config fields."""
    src = root / "pool" / "client_00"
    from safetensors.torch import load_file

    tensors = load_file(src / "adapter_model.safetensors") | (extra or {})
    cfg = json.loads((src / "adapter_config.json").read_text()) | config
    return write_adapter(root / "cand", tensors, cfg)


def _gate(root: Path, cand: Path, *flags: str) -> tuple[int, dict[str, Any]]:
    refs = [str(root / "pool" / f"client_{i:02d}") for i in range(1, 8)]
    out = root / f"gate{len(list(root.glob('gate*.json')))}.json"
    # In this process (what the gate decides is tested here, not the process: tests/test_commands.py runs it
    # as one); the report is checked against its schema by tests/conftest.py.
    args = ["gate", str(cand), *[x for r in refs for x in ("--reference", r)], "--json", str(out), *flags]
    result = CliRunner().invoke(app, args, env={"NO_COLOR": "1", "COLUMNS": "120"})
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(out.read_text())


@pytest.fixture()
def pool(tmp_path: Path) -> Path:
    write_pool(tmp_path / "pool", k=8, bad=())
    return tmp_path


CASES = {
    # PEFT loads a key named like a model parameter into the base model (load_state_dict, strict=False).
    "a base weight": ({f"{PREFIX}model.norm.weight": torch.full((HIDDEN,), 5.0)}, {}, "modules_to_save / full weights"),
    "DoRA magnitudes": (
        {f"{PREFIX}{m}.lora_magnitude_vector": torch.full((HIDDEN,), 100.0) for m in MODULES},
        {"use_dora": True},
        "DoRA magnitude vectors",
    ),
    "PiSSA": ({}, {"init_lora_weights": "pissa"}, "PEFT rewrites the base weights"),
    "Astra": ({}, {"init_lora_weights": "astra"}, "(Astra: PEFT rewrites the base weights)"),  # PEFT 0.22
    # PEFT refuses these as it loads the adapter (ValueError: Unknown initialization; PiSSA's own check).
    "PiSSA capitalised": ({}, {"init_lora_weights": "PiSSA"}, "which PEFT refuses as it loads the adapter"),
    "LoftQ capitalised": ({}, {"init_lora_weights": "LoftQ"}, "which PEFT refuses as it loads the adapter"),
    "a PiSSA variant PEFT lacks": ({}, {"init_lora_weights": "pissa_x"}, "which PEFT refuses as it loads"),
    "a number": ({}, {"init_lora_weights": 2}, "which PEFT refuses as it loads the adapter"),
    "a random init": ({}, {"init_lora_weights": False}, "a false init_lora_weights"),
    "a random init, 0": ({}, {"init_lora_weights": 0}, "a false init_lora_weights"),
    "a random init, null": ({}, {"init_lora_weights": None}, "a false init_lora_weights"),
    # PEFT (0.21 and 0.22) refuses a parameter of a layer target_modules also selects as it loads the adapter.
    "target_parameters on a targeted layer": (
        {},
        {"target_parameters": ["self_attn.q_proj.weight"]},
        "target_parameters naming the weight of a module target_modules also selects",
    ),
    # KaSA truncates the base weights' spectrum (a review: logits moved more than by the whole LoRA).
    "a variant": ({}, {"kasa_config": {}}, "KaSA (kasa_config) modifies the base weights"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_gate_flags_a_candidate_with_what_it_does_not_analyse(pool: Path, case: str) -> None:
    extra, config, phrase = CASES[case]
    cand = _candidate(pool, extra, **config)
    code, report = _gate(pool, cand)
    (verdict,) = [a for a in report["adapters"] if a["name"] == "cand"]
    assert code == 1 and verdict["flagged"], case
    (reason,) = [r for r in verdict["reasons"] if r["kind"] == "unanalysed"]
    assert reason["rule"] == "unanalysed" and any(phrase in p for p in reason["parts"]), reason
    assert "PEFT applies and clair does not analyse" in reason["text"]


def test_allow_unanalysed_judges_the_lora_update_alone(pool: Path) -> None:
    cand = _candidate(pool, {f"{PREFIX}{m}.lora_magnitude_vector": torch.ones(HIDDEN) for m in MODULES}, use_dora=True)
    code, report = _gate(pool, cand, "--allow-unanalysed")
    assert code == 0 and not report["flagged"]
    code, report = _gate(pool, _candidate(pool))  # a plain LoRA: nothing to allow
    assert code == 0 and not report["flagged"]


def _open(directory: Path) -> None:
    open_adapters([str(directory)])


def test_keys_of_another_adapter_name_are_refused(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for m in MODULES:
        tensors[f"{PREFIX}{m}.lora_A.x.weight"] = torch.randn(4, HIDDEN, generator=g)
        tensors[f"{PREFIX}{m}.lora_B.weight"] = torch.randn(HIDDEN, 4, generator=g)
    with pytest.raises(AdapterFormatError, match="carries the adapter name 'x'"):
        _open(write_adapter(tmp_path / "x", tensors, lora_config()))
    # ".default." is what PEFT loads under its default name.
    renamed = {k.replace(".x.", ".default."): v for k, v in tensors.items()}
    _open(write_adapter(tmp_path / "default", renamed, lora_config()))


def test_factors_with_and_without_the_key_prefix_are_refused(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for m in MODULES:
        tensors[f"{m}.lora_A.weight"] = torch.randn(4, HIDDEN, generator=g)  # PEFT keeps its own (random) lora_A
        tensors[f"{PREFIX}{m}.lora_B.weight"] = torch.randn(HIDDEN, 4, generator=g)
    with pytest.raises(AdapterFormatError, match="with and without PEFT's key prefix"):
        _open(write_adapter(tmp_path / "half", tensors, lora_config()))


def test_a_pool_of_different_layer_replications_is_refused(pool: Path) -> None:
    _candidate(pool, layer_replication=[[0, 1], [0, 1], [0, 2]])
    adapters = open_adapters([str(pool / "pool" / f"client_{i:02d}") for i in range(1, 6)] + [str(pool / "cand")])
    from clair_cli.pipeline import build_pool

    with pytest.raises(IncompatibleAdapters, match="layer_replication"):
        build_pool(adapters)
    proc = run_cli("audit", *(str(a.ref.weights_file.parent) for a in adapters))
    assert proc.returncode == 2 and "layer_replication" in proc.stderr and "Traceback" not in proc.stderr


def _tied(directory: Path, tamper: float = 1.0) -> Path:
    """A LoRA on a tied embed_tokens and lm_head, as save_pretrained writes it with
    ensure_weight_tying (lm_head's factors the embedding's, transposed); ``tamper`` scales lm_head's B."""
    g = torch.Generator().manual_seed(1)
    vocab = 24
    emb_a, emb_b = torch.randn(4, vocab, generator=g), torch.randn(HIDDEN, 4, generator=g)
    tensors = {
        f"{PREFIX}model.embed_tokens.lora_embedding_A": emb_a,
        f"{PREFIX}model.embed_tokens.lora_embedding_B": emb_b,
        f"{PREFIX}lm_head.lora_A.weight": emb_b.T.contiguous(),
        f"{PREFIX}lm_head.lora_B.weight": (emb_a.T * tamper).contiguous(),
    }
    config = lora_config(target_modules=["embed_tokens"], ensure_weight_tying=True)
    return write_adapter(directory, tensors, config)


def test_a_tied_lm_head_unlike_its_embedding_is_noted() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        (honest,) = open_adapters([str(_tied(Path(tmp) / "honest"))])
        (tampered,) = open_adapters([str(_tied(Path(tmp) / "tampered", tamper=-50.0))])
    assert honest.untied == [] and not honest.unanalysed()
    assert tampered.untied == ["lm_head"]
    assert any("ensure_weight_tying" in n for n in tampered.notes)
    assert any("ensure_weight_tying" in p for p in tampered.unanalysed())


def test_target_parameters_modules_are_not_noted_as_ignored(tmp_path: Path) -> None:
    config = lora_config(target_modules=[], target_parameters=["self_attn.q_proj.weight", "self_attn.v_proj.weight"])
    (adapter,) = open_adapters([str(write_adapter(tmp_path / "tp", None, config))])
    assert not any("does not select" in n for n in adapter.notes), adapter.notes


def test_per_expert_moe_patterns_are_unanalysed(tmp_path: Path) -> None:
    """transformers 5 fuses the experts and PEFT then ignores patterns on expert and router modules
    (a review: lora_alpha 800 with alpha_pattern 8 on every expert passed the audit while PEFT
    applied 100x what clair read) and scales rsLoRA gate/up experts by sqrt 2."""
    from helpers import random_factors

    moe = {f"model.layers.0.block_sparse_moe.experts.{e}.{w}": (16, 12) for e in range(2) for w in ("w1", "w3")}
    moe |= {f"model.layers.0.block_sparse_moe.experts.{e}.w2": (12, 16) for e in range(2)}
    moe["model.layers.0.self_attn.q_proj"] = (12, 12)
    tensors = random_factors(moe)
    targets = {"target_modules": ["w1", "w2", "w3", "q_proj"]}
    cases = {
        "plain": ({}, None),
        "pattern on q_proj only": ({"alpha_pattern": {"q_proj": 32}}, None),
        "pattern on experts": ({"lora_alpha": 800, "alpha_pattern": {"w1": 8, "w2": 8, "w3": 8}}, "PEFT ignores them"),
        "rsLoRA": ({"use_rslora": True}, "scales their updates by sqrt 2"),
    }
    for name, (config, phrase) in cases.items():
        (adapter,) = open_adapters([str(write_adapter(tmp_path / name, tensors, lora_config(**targets, **config)))])
        parts = adapter.unanalysed()
        assert (phrase is None and parts == []) or (phrase is not None and any(phrase in p for p in parts)), name


@pytest.mark.parametrize("value", [True, "gaussian", "Gaussian", "eva", "orthogonal", "lora_ga", "MiCA", "nora"])
def test_an_init_peft_loads_without_touching_the_base_weights_is_a_plain_lora(pool: Path, value: Any) -> None:
    code, report = _gate(pool, _candidate(pool, init_lora_weights=value))
    assert code == 0 and not report["flagged"], value


def test_which_inits_peft_refuses_as_it_loads(tmp_path: Path) -> None:
    """``unloadable_init`` against PEFT itself: each config saved and loaded on a tiny Llama."""
    from helpers import tiny_llama
    from peft import LoraConfig, PeftModel, get_peft_model

    from clair_cli.io.lora_config import unloadable_init

    get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    for value in ["PiSSA", "LoftQ", "EVA", "pissa_x", "foo", "Gaussian", "OLoRA", "gaussian", "eva", True]:
        (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"init_lora_weights": value}))
        try:
            PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
            refused = False
        except ValueError:
            refused = True
        assert unloadable_init({"init_lora_weights": value}) == refused, value


@pytest.mark.parametrize(
    ("megatron", "noted"),
    [
        ({"tensor_model_parallel_size": 2}, True),
        ({"tensor_model_parallel_size": "2"}, True),
        ({"num_layers": 2}, False),  # Megatron's default tensor_model_parallel_size is 1
        ({"tensor_model_parallel_size": 1}, False),
        (None, False),
    ],
)
def test_a_tensor_parallel_adapter_is_noted_as_possibly_one_ranks_shard(pool: Path, megatron: Any, noted: bool) -> None:
    cand = _candidate(pool, megatron_config=megatron, megatron_core="megatron.core")
    (adapter,) = open_adapters([str(cand)])
    assert any("tensor-parallel LoRA" in n and "shard" in n for n in adapter.notes) == noted


@pytest.mark.skipif(
    not peft_at_least("0.22"), reason="init_lora_weights 'astra' is PEFT 0.22's (0.21 refuses it as unknown)"
)
def test_an_astra_adapter_is_refused_for_a_merge_as_peft_rewrites_the_base_weights(tmp_path: Path) -> None:
    """PEFT 0.22's Astra, like CorDA, sets the base weights to W - scale * B0 @ A0 (B0, A0: the initial
    factors, from preprocess_astra's eigenvectors) whenever it builds the adapter, so the adapter's change
    to the base model is scale * (B @ A - B0 @ A0), not scale * B @ A: a merged plain LoRA would be another
    model. clair read it as an unknown init (a review: it merged two of them, exit 0)."""
    from helpers import tiny_llama
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import AstraConfig, preprocess_astra

    ids = torch.randint(0, 32, (4, 12), generator=torch.Generator().manual_seed(0))
    for k in range(2):
        model = tiny_llama()
        config = LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="astra", astra_config=AstraConfig()
        )
        preprocess_astra(model, config, run_model=lambda model=model: model(ids))
        peft_model = get_peft_model(model, config)
        torch.manual_seed(k)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.add_(0.1 * torch.randn_like(p))
        peft_model.save_pretrained(tmp_path / "pool" / f"c{k}")
        layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
        update = layer.get_delta_weight("default")
        change = (
            peft_model.merge_and_unload().model.layers[0].self_attn.q_proj.weight
            - tiny_llama().model.layers[0].self_attn.q_proj.weight
        )
        assert (change - update).abs().max() > 0.1 * update.abs().max()  # what PEFT applies is not scale * B @ A
    assert json.loads((tmp_path / "pool" / "c0" / "adapter_config.json").read_text())["init_lora_weights"] == "astra"

    from typer.testing import CliRunner

    from clair_cli.cli import app

    env = {"NO_COLOR": "1", "COLUMNS": "200"}
    out = tmp_path / "merged"
    result = CliRunner().invoke(app, ["merge", str(tmp_path / "pool"), "--out", str(out), "--method", "mean"], env=env)
    assert result.exit_code == 2, result.output
    assert "adapter_config.json: init_lora_weights 'astra' (Astra) makes PEFT rewrite the base model's" in " ".join(
        result.stderr.split()
    )
    assert "path_initial_model_for_weight_conversion" in result.stderr and not out.exists()
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "pool" / "c0"), "--json", "-"], env=env)
    assert result.exit_code == 0, result.output
    notes = json.loads(result.stdout)["adapters"][0]["notes"]
    assert any("(Astra): PEFT rewrites the base model's weights" in n for n in notes), notes
    assert not any("which PEFT refuses" in n for n in notes), notes


@pytest.mark.skipif(
    not peft_at_least("0.22"), reason="init_lora_weights 'nora' is PEFT 0.22's (0.21 refuses it as unknown)"
)
def test_a_nora_adapter_is_a_plain_lora_peft_loads(tmp_path: Path) -> None:
    """PEFT 0.22's NoRA only normalises lora_A's columns at initialisation and leaves the base weights
    alone: PEFT loads the adapter and applies scale * B @ A. clair said PEFT refuses it as an unknown
    initialization (and clair gate flagged it); "Nora" and "NORA" PEFT does refuse (it matches as written)."""
    from helpers import tiny_llama
    from peft import LoraConfig, PeftModel, get_peft_model

    from clair_cli.io.lora_config import unloadable_init

    model = get_peft_model(
        tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="nora")
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "nora")
    config = json.loads((tmp_path / "nora" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "nora"
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "nora"))
    layers = {n.removeprefix("base_model.model."): m for n, m in loaded.named_modules() if hasattr(m, "lora_A")}
    (adapter,) = open_adapters([str(tmp_path / "nora")])
    assert not any("PEFT refuses" in n for n in adapter.notes) and adapter.unanalysed() == [], adapter.notes
    for module in adapter.load(dtype=torch.float64):
        want = layers[module.name].get_delta_weight("default").double()
        torch.testing.assert_close(module.delta_weight(), want, rtol=1e-5, atol=1e-6)
    for value in ["Nora", "NORA"]:
        (tmp_path / "nora" / "adapter_config.json").write_text(json.dumps(config | {"init_lora_weights": value}))
        with pytest.raises(ValueError, match="Unknown initialization"):
            PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "nora"))
        assert unloadable_init({"init_lora_weights": value}), value


def test_lora_bias_with_a_multihead_attention_lora_is_said_to_load_in_no_peft_from_022(tmp_path: Path) -> None:
    """PEFT 0.22 refuses lora_bias on its MultiheadAttention LoRA as it builds the layer (huggingface/peft#3935),
    whether or not the file holds the biases, so such an adapter (saved by PEFT 0.21) loads under no PEFT
    from 0.22 on: clair says so and clair gate flags it; lora_bias on other layers alone is not that."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from torch import nn

    from clair_cli.io.adapter import MHA_LORA_BIAS

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
            self.q_proj = nn.Linear(8, 8)

    for name, targets in (("mha", ["mha", "q_proj"]), ("linear", ["q_proj"])):
        lora = LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False)
        get_peft_model(Attention(), lora).save_pretrained(tmp_path / name)
        config = json.loads((tmp_path / name / "adapter_config.json").read_text())
        (tmp_path / name / "adapter_config.json").write_text(json.dumps(config | {"lora_bias": True}))
        if name == "mha" and peft_at_least("0.22"):
            with pytest.raises(ValueError, match="MultiheadAttention does not support lora_bias=True"):
                PeftModel.from_pretrained(Attention(), str(tmp_path / name))
        (adapter,) = open_adapters([str(tmp_path / name)])
        noted = [n for n in adapter.notes if "PEFT 0.22 and later refuse to load this adapter" in n]
        if name == "mha":
            assert len(noted) == 1 and "lora_bias with the LoRA of 1 MultiheadAttention layer (mha)" in noted[0]
            assert MHA_LORA_BIAS in adapter.unanalysed()
        else:
            assert noted == [] and MHA_LORA_BIAS not in adapter.unanalysed(), adapter.notes


@pytest.mark.parametrize("targets", [r".*\.q_proj", "all-linear"])
def test_layers_to_transform_with_a_target_modules_string_is_refused_as_peft_refuses_it(
    tmp_path: Path, targets: str
) -> None:
    """PEFT's config refuses layers_to_transform beside a target_modules string (LoraConfig in 0.21, every
    PeftConfig in 0.22), so PeftModel.from_pretrained loads nothing; clair read such an adapter (exit 0)."""
    from helpers import tiny_llama
    from peft import LoraConfig, PeftModel, get_peft_model
    from typer.testing import CliRunner

    from clair_cli.cli import app

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
    for k in range(5):
        torch.manual_seed(k)
        get_peft_model(tiny_llama(), lora).save_pretrained(tmp_path / "pool" / f"c{k}")
        path = tmp_path / "pool" / f"c{k}" / "adapter_config.json"
        path.write_text(
            json.dumps(json.loads(path.read_text()) | {"target_modules": targets, "layers_to_transform": [0]})
        )
    with pytest.raises(ValueError, match="`layers_to_transform` cannot be used when `target_modules` is a str"):
        PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "pool" / "c0"))
    env = {"NO_COLOR": "1", "COLUMNS": "200"}
    for args in (
        ["inspect", str(tmp_path / "pool" / "c0")],
        ["audit", str(tmp_path / "pool")],
        ["merge", str(tmp_path / "pool"), "--out", str(tmp_path / "m"), "--method", "mean"],
    ):
        result = CliRunner().invoke(app, args, env=env)
        assert result.exit_code == 2, result.output
        said = " ".join(result.stderr.split())
        assert "adapter_config.json: layers_to_transform [0] is given with a target_modules string" in said, said
        assert "which PEFT refuses as it loads the config" in said and "Traceback" not in result.output
    assert not (tmp_path / "m").exists()


def test_target_parameters_on_a_layer_target_modules_selects_is_said_to_load_in_no_peft(tmp_path: Path) -> None:
    """PEFT (0.21 and 0.22) refuses an adapter whose target_parameters names a parameter of a layer its
    target_modules also selects, as it loads it ("Trying to wrap an `nn.Parameter` of layer ... Make sure that this
    layer is not also targeted with `target_modules`"), whatever the file holds: clair read such an adapter as a
    plain LoRA, and clair gate passed it. It is noted and flagged, as other configs PEFT refuses as it loads them."""
    from helpers import tiny_llama
    from peft import LoraConfig, PeftModel, get_peft_model

    from clair_cli.io.adapter import PARAMETER_COLLISION

    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
    get_peft_model(tiny_llama(), lora).save_pretrained(tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(path.read_text()) | {"init_lora_weights": True}
    refused = (
        "Trying to wrap an `nn.Parameter` of layer 'model.layers.0.self_attn.q_proj' of type Linear, which is "
        "not a valid target"
    )
    both = "model.layers.0.self_attn.q_proj, model.layers.1.self_attn.q_proj"
    cases = {
        # Refused: the entry names q_proj's weight (whole or as a suffix), and target_modules selects q_proj.
        (("q_proj",), ("q_proj.weight",)): both,
        (("q_proj",), ("model.layers.0.self_attn.q_proj.weight",)): "model.layers.0.self_attn.q_proj",
        ((r".*\.q_proj",), ("q_proj.weight",)): both,
        (("q_proj",), ("weight",)): both,
        # Loaded: another layer's weight, a parameter q_proj does not hold, and no module targeted.
        (("q_proj",), ("v_proj.weight",)): None,
        (("q_proj",), ("q_proj.bias",)): None,
        ((), ("q_proj.weight",)): None,
    }
    for (targets, params), refuses in cases.items():
        target_modules: Any = targets[0] if targets and targets[0].startswith(".*") else list(targets)
        path.write_text(json.dumps(config | {"target_modules": target_modules, "target_parameters": list(params)}))
        if refuses:
            with pytest.raises(ValueError, match=re.escape(refused)):
                PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a"))
        else:
            PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a"))
        (adapter,) = open_adapters([str(tmp_path / "a")])
        noted = [n for n in adapter.notes if "refuses to load this adapter (ValueError: Trying to wrap" in n]
        if refuses:
            assert len(noted) == 1, (targets, params, adapter.notes)
            assert f"its target_modules also selects ({refuses}): PEFT (0.21 and 0.22) refuses" in noted[0], noted
            assert any(p.startswith(PARAMETER_COLLISION) for p in adapter.unanalysed()), adapter.unanalysed()
        else:
            assert noted == [] and adapter.unanalysed() == [], (targets, params, adapter.notes)


def test_loftq_of_embedding_and_conv_layers_alone_says_what_each_peft_does(tmp_path: Path) -> None:
    """PEFT 0.22 gives Embedding and conv layers a plain LoRA under LoftQ (their base weights untouched) and PEFT
    0.21.2 fails to load such an adapter (loftq_init called without its config), while LoftQ quantises every Linear
    layer target_modules selects, which the files cannot rule out: still refused for a merge and flagged by gate,
    with what each PEFT does said; a LoftQ adapter of Linear layers keeps the general message."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from torch import nn

    from clair_cli.io.lora_config import refuse_base_rewriting

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.Embedding(32, 16)
            self.conv = nn.Conv2d(4, 8, 3)
            self.lin = nn.Linear(16, 16)

    loftq = {"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4, "loftq_iter": 1}}
    for name, targets in (("unlinear", ["emb", "conv"]), ("linear", ["emb", "lin"])):
        lora = LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False)
        get_peft_model(Model(), lora).save_pretrained(tmp_path / name)
        path = tmp_path / name / "adapter_config.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | loftq))
    base = Model()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    if peft_at_least("0.22"):
        loaded = PeftModel.from_pretrained(base, str(tmp_path / "unlinear")).get_base_model()
        assert torch.equal(loaded.emb.base_layer.weight, before["emb.weight"])
        assert torch.equal(loaded.conv.base_layer.weight, before["conv.weight"])
    else:
        with pytest.raises(TypeError, match="loftq_init\\(\\) missing 1 required positional argument: 'config'"):
            PeftModel.from_pretrained(base, str(tmp_path / "unlinear"))
    unlinear, linear = open_adapters([str(tmp_path / "unlinear"), str(tmp_path / "linear")])
    said = " ".join(unlinear.notes)
    assert "'loftq' (LoftQ with LoRAs of Embedding / conv layers only): PEFT 0.22 leaves" in said, said
    assert "quantises the base weights of any Linear layer target_modules also selects" in said, said
    assert "PEFT 0.21.2 fails to load it (TypeError" in said and "PEFT rewrites the base model's weights" not in said
    assert any("PEFT 0.21.2 fails to load it" in p for p in unlinear.unanalysed()), unlinear.unanalysed()
    with pytest.raises(IncompatibleAdapters, match="Embedding / conv layers only") as refused:
        refuse_base_rewriting([unlinear], "merged adapter")
    assert "PEFT 0.21.2 fails to load it" in str(refused.value) and '"init_lora_weights": true' in refused.value.hint
    assert "PEFT rewrites the base model's weights" in " ".join(linear.notes)
    assert "(LoftQ: PEFT rewrites the base weights)" in " ".join(linear.unanalysed())
    with pytest.raises(IncompatibleAdapters, match="makes PEFT rewrite the base model's weights"):
        refuse_base_rewriting([linear], "merged adapter")
