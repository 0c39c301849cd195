"""Diffusion LoRA files found wrong by a fourth review from outside: sd-scripts metadata that says
LoHa / LoKr / OFT... beside plain LoRA tensors was audited as a LoRA; a diffusers file's ``.alpha``
tensors were "non-LoRA tensors" (scale 1 where diffusers' Flux loader applies alpha / r, and refused
by merge); one layer under two spellings (SGM and diffusers UNet names, Black Forest Labs and
diffusers Flux names) was audited as two modules. Each is now exit 2 with a message naming the file
and the problem, or the update diffusers applies."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_hostile_review import invoke, refused

from clair_cli.io.sources import open_adapter, resolve_sources

RANK = 4


def _open(path: Path):
    return open_adapter(resolve_sources([str(path)])[0])


def _deltas(path: Path) -> dict[str, torch.Tensor]:
    return {m.name: m.delta_weight() for m in _open(path).load()}


def _kohya(path: Path, metadata: dict[str, str] | None = None, names: tuple[str, ...] = ("lora_unet_x_to_q",)) -> Path:
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name in names:
        tensors[f"{name}.lora_down.weight"] = torch.randn(RANK, 8, generator=g)
        tensors[f"{name}.lora_up.weight"] = torch.randn(8, RANK, generator=g)
        tensors[f"{name}.alpha"] = torch.tensor(2.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata)
    return path


def _diffusers(path: Path, names: tuple[str, ...], metadata: dict[str, str] | None = None) -> Path:
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name in names:
        tensors[f"{name}.lora_A.weight"] = torch.randn(RANK, 8, generator=g)
        tensors[f"{name}.lora_B.weight"] = torch.randn(8, RANK, generator=g)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata)
    return path


def _lycoris(algo: str, **args: str) -> dict[str, str]:
    return {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": algo, **args})}


# 1. sd-scripts metadata that names a network other than LoRA, beside plain LoRA tensors.

CONTRADICTIONS = {
    "loha": (_lycoris("loha", conv_dim="4"), ["LoHa", "algo 'loha'"]),
    "LoKr": (_lycoris("LoKr", factor="8"), ["LoKr", "algo 'lokr'"]),  # LyCORIS lowercases the algo
    "ia3": (_lycoris("ia3"), ["IA3", "algo 'ia3'"]),
    "glora": (_lycoris("glora"), ["GLoRA"]),
    "full": (_lycoris("full"), ["full weight difference"]),
    "diag-oft": (_lycoris("diag-oft"), ["OFT", "algo 'diag-oft'"]),
    "boft": (_lycoris("boft"), ["BOFT"]),
    "unknown algo": (_lycoris("hypernet"), ["a LyCORIS algorithm clair does not know", "algo 'hypernet'"]),
    "dora_wd": (_lycoris("locon", dora_wd="True"), ["DoRA", "dora_wd 'True'"]),
    "sd-scripts OFT": ({"ss_network_module": "networks.oft"}, ["OFT", "ss_network_module 'networks.oft'"]),
    "sd-scripts OFT Flux": ({"ss_network_module": "networks.oft_flux"}, ["OFT", "'networks.oft_flux'"]),
    "sd-scripts LoKr": ({"ss_network_module": "networks.lokr"}, ["LoKr", "'networks.lokr'"]),
    "args not JSON": (
        {"ss_network_module": "lycoris.kohya", "ss_network_args": "algo=loha"},
        ["ss_network_args is not a JSON object", "'lycoris.kohya'"],
    ),
}


@pytest.mark.parametrize("case", sorted(CONTRADICTIONS))
def test_metadata_of_another_network_beside_plain_lora_tensors_is_refused(case: str, tmp_path: Path) -> None:
    metadata, words = CONTRADICTIONS[case]
    path = _kohya(tmp_path / "odd.safetensors", metadata)
    result = invoke("inspect", str(path))
    refused(result, "odd.safetensors", *words)
    if case != "args not JSON":
        assert "its tensors are a plain LoRA's (lora_down / lora_up / alpha)" in result.stderr, result.stderr
        assert "ss_network_module 'lycoris.kohya'" in result.stderr or "networks." in result.stderr


def test_a_contradicting_file_in_a_pool_stops_the_merge_before_anything_is_written(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    for k in range(5):
        _kohya(pool / f"s{k}.safetensors", {"ss_network_module": "networks.lora"})
    _kohya(pool / "s5.safetensors", _lycoris("loha"))
    out = tmp_path / "merged"
    result = invoke("merge", str(pool), "--out", str(out), "--device", "cpu", "--exit-zero")
    refused(result, "s5.safetensors", "LoHa", "algo 'loha'")
    assert not out.exists()
    # The same LyCORIS metadata under diffusers' names: refused too, in that layout's terms.
    path = _diffusers(tmp_path / "lyco.safetensors", ("unet.x.to_q",), _lycoris("lokr"))
    refused(invoke("inspect", str(path)), "lyco.safetensors", "LoKr", "(lora_A / lora_B)")


PLAIN = {
    "sd-scripts LoRA": {"ss_network_module": "networks.lora", "ss_network_args": json.dumps({"conv_dim": "4"})},
    "sd-scripts Flux": {"ss_network_module": "networks.lora_flux"},
    "LyCORIS lora": _lycoris("lora"),
    "LyCORIS LoCon": _lycoris("LoCon", conv_dim="8", conv_alpha="4"),
    "LyCORIS default algo": {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"conv_dim": "8"})},
    "LyCORIS no args": {"ss_network_module": "lycoris.kohya"},
    "dora_wd false": _lycoris("lora", dora_wd="False"),
    "another trainer": {"ss_network_module": "my_trainer.lora"},
    "sd-scripts DyLoRA": {"ss_network_module": "networks.dylora", "ss_network_args": json.dumps({"unit": "4"})},
    "LyCORIS DyLoRA": _lycoris("dylora", block_size="4"),
}


@pytest.mark.parametrize("case", sorted(PLAIN))
def test_metadata_of_a_plain_lora_or_a_dylora_is_read(case: str, tmp_path: Path) -> None:
    """LyCORIS's lora / locon are LoConModule (lora_down / lora_up / alpha); a DyLoRA saves a plain LoRA
    at its full rank (sd-scripts' DyLoRAModule.state_dict, LyCORIS's DyLoraModule.custom_state_dict)."""
    path = _kohya(tmp_path / "plain.safetensors", PLAIN[case])
    adapter = _open(path)
    assert adapter.modules["lora_unet_x_to_q"].scale == 2.0 / RANK
    dylora = [n for n in adapter.notes if "DyLoRA" in n]
    assert len(dylora) == ("DyLoRA" in case), adapter.notes
    assert invoke("inspect", str(path)).exit_code == 0


# 2. Alpha tensors in diffusers-named files.


def _quiet() -> None:
    for name in ("diffusers", "transformers", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def _tiny_flux():
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    _quiet()
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=8,
        axes_dims_rope=(2, 2, 4),
    )
    te = CLIPTextConfig(
        hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=1, vocab_size=1000
    )
    return transformer, CLIPTextModel(te)


def _flux_pipe():
    """An object with FluxPipeline's LoRA loader over a tiny transformer and CLIP text encoder."""
    from diffusers.loaders import FluxLoraLoaderMixin

    class Pipe(FluxLoraLoaderMixin):
        def __init__(self) -> None:
            self.transformer, self.text_encoder = _tiny_flux()
            self.hf_device_map = None

        @property
        def components(self) -> dict[str, torch.nn.Module]:
            return {"transformer": self.transformer, "text_encoder": self.text_encoder}

    return Pipe()


def flux_deltas(path: Path) -> dict[str, torch.Tensor]:
    """What diffusers' Flux loader (FluxLoraLoaderMixin.load_lora_weights) adds to each layer, by module."""
    from peft.tuners.lora import LoraLayer

    pipe = _flux_pipe()
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    out = {}
    for component in ("transformer", "text_encoder"):
        for name, module in getattr(pipe, component).named_modules():
            if isinstance(module, LoraLayer):
                for adapter in module.lora_A:
                    out[f"{component}.{name}"] = module.get_delta_weight(adapter)
    return out


FLUX_MODULES = (
    "transformer.transformer_blocks.0.attn.to_q",
    "transformer.transformer_blocks.0.attn.to_k",
    "transformer.transformer_blocks.0.ff.net.2",
    "transformer.single_transformer_blocks.0.attn.to_q",
    "transformer.single_transformer_blocks.0.proj_out",
    "text_encoder.encoder.layers.0.self_attn.q_proj",
    "text_encoder.encoder.layers.0.mlp.fc1",
)


def _layer_shapes() -> dict[str, tuple[int, ...]]:
    transformer, te = _tiny_flux()
    return {
        f"{c}.{n}": tuple(m.weight.shape)
        for c, model in (("transformer", transformer), ("text_encoder", te))
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    }


def write_flux(path: Path, alphas: dict[str, float], ranks: dict[str, int] | None = None, seed: int = 0) -> Path:
    """A Flux LoRA under diffusers' names with ``<module>.alpha`` tensors (as SimpleTuner and others write)."""
    shapes = _layer_shapes()
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for module in FLUX_MODULES:
        (d_out, d_in), r = shapes[module], (ranks or {}).get(module, RANK)
        tensors[f"{module}.lora_A.weight"] = torch.randn(r, d_in, generator=g) / 4
        tensors[f"{module}.lora_B.weight"] = torch.randn(d_out, r, generator=g) / 4
        if module in alphas:
            tensors[f"{module}.alpha"] = torch.tensor(alphas[module])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def _same(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(theirs)
    for name, delta in ours.items():
        torch.testing.assert_close(delta, theirs[name], rtol=1e-5, atol=1e-6, msg=name)


ALPHAS = {
    "one alpha": (dict.fromkeys(FLUX_MODULES, 8.0), None),
    "alphas differ": (dict(zip(FLUX_MODULES, (8.0, 8.0, 1.0, 2.0, 16.0, 4.0, 0.5), strict=True)), None),
    "ranks differ": (dict.fromkeys(FLUX_MODULES, 8.0), {FLUX_MODULES[0]: 2, FLUX_MODULES[4]: 8, FLUX_MODULES[6]: 1}),
    "transformer only": (dict.fromkeys(FLUX_MODULES[:5], 2.0), None),  # the text encoder's: alpha = r
}


@pytest.mark.parametrize("case", sorted(ALPHAS))
def test_diffusers_alpha_tensors_are_read_as_diffusers_applies_them(case: str, tmp_path: Path) -> None:
    alphas, ranks = ALPHAS[case]
    path = write_flux(tmp_path / "flux.safetensors", alphas, ranks)
    adapter = _open(path)
    assert adapter.layout == "diffusers" and not adapter.extras, adapter.extras
    for module, spec in adapter.modules.items():
        assert spec.scale == alphas.get(module, spec.rank) / spec.rank, module
    assert any("hold an alpha tensor" in n for n in adapter.notes), adapter.notes
    _same(_deltas(path), flux_deltas(path))


def test_merge_and_refine_of_diffusers_files_with_alphas_load_in_diffusers_as_computed(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    for k in range(6):
        alphas = dict(zip(FLUX_MODULES, (8.0, 4.0, 2.0, 8.0, 1.0, 4.0, 2.0 + k), strict=True))
        write_flux(pool / f"f{k}.safetensors", alphas, seed=k)
    merged = tmp_path / "merged"
    result = invoke("merge", str(pool), "--out", str(merged), "--device", "cpu", "--exit-zero")
    assert result.exit_code == 0, result.output
    file = merged / "pytorch_lora_weights.safetensors"
    assert not any(k.endswith(".alpha") for k in load_file(file))  # scale 1: alpha = r in diffusers
    _same(_deltas(merged), flux_deltas(file))
    refined = tmp_path / "refined"
    result = invoke("refine", str(pool), "--out", str(refined), "--device", "cpu", "--exit-zero")
    assert result.exit_code == 0, result.output
    files = sorted(refined.glob("*/pytorch_lora_weights.safetensors"))
    assert files
    for file in files:
        source = pool / f"{file.parent.name}.safetensors"
        with safe_open(str(source), "pt") as f, safe_open(str(file), "pt") as g:
            assert set(f.keys()) == set(g.keys())
            for key in (k for k in f.keys() if k.endswith(".alpha")):  # noqa: SIM118 - safe_open has no __iter__
                assert torch.equal(f.get_tensor(key), g.get_tensor(key)), key
        _same(_deltas(file.parent), flux_deltas(file))


def _flux_file(tmp_path: Path, extra: dict[str, torch.Tensor], drop: str | None = None, **metadata: str) -> Path:
    path = write_flux(tmp_path / "odd.safetensors", dict.fromkeys(FLUX_MODULES, 8.0))
    tensors = {k: v for k, v in load_file(path).items() if drop is None or not k.startswith(f"{drop}.alpha")}
    save_file({**tensors, **extra}, str(path), metadata or None)
    return path


@pytest.mark.parametrize(
    "config",
    [
        {"transformer.r": RANK, "transformer.lora_alpha": 8},
        # SimpleTuner's ComfyUI export: its LoraConfig unprefixed, its alphas taken from it (an outside review)
        {"r": RANK, "lora_alpha": 8, "target_modules": ["to_q", "to_k"], "use_rslora": False},
    ],
)
def test_alpha_tensors_beside_metadata_that_agrees_are_read_as_comfyui_applies_them(
    config: dict, tmp_path: Path
) -> None:
    path = _flux_file(tmp_path, {}, lora_adapter_metadata=json.dumps(config))
    adapter = _open(path)
    for module, spec in adapter.modules.items():  # every module stores alpha 8 (the text encoder's: no config)
        assert spec.scale == pytest.approx(8.0 / spec.rank), module
    # the transformer's five modules are described by the config (prefixed, or SimpleTuner's flat one), the text
    # encoder's two are not
    assert any("(5 of them described by the lora_adapter_metadata config too" in n for n in adapter.notes), (
        adapter.notes
    )
    with pytest.raises(ValueError, match="network_alphas"):  # what the note says of diffusers
        flux_deltas(path)


def test_alpha_tensors_beside_metadata_are_compared_to_their_own_precision(tmp_path: Path) -> None:
    """A bfloat16 alpha of 0.1 is 0.10009765625: the same alpha as the config's 0.1."""
    extra = {f"{m}.alpha": torch.tensor(0.1, dtype=torch.bfloat16) for m in FLUX_MODULES}
    path = _flux_file(tmp_path, extra, lora_adapter_metadata=json.dumps({"r": RANK, "lora_alpha": 0.1}))
    adapter = _open(path)
    assert all(spec.scale == pytest.approx(0.10009765625 / spec.rank) for spec in adapter.modules.values())


@pytest.mark.parametrize("broken", ["no lora_A", "rank 0"])
def test_a_broken_module_with_an_alpha_beside_metadata_is_refused_for_what_it_lacks(
    broken: str, tmp_path: Path
) -> None:
    """Checking the alphas against the metadata once raised a KeyError (an internal error) on a module
    without both factors; it is refused as without metadata."""
    path = _flux_file(
        tmp_path, {}, lora_adapter_metadata=json.dumps({"transformer.r": RANK, "transformer.lora_alpha": 8})
    )
    tensors = load_file(path)
    module = FLUX_MODULES[0]
    if broken == "no lora_A":
        del tensors[f"{module}.lora_A.weight"]
        words = ["has lora_B but no lora_A"]
    else:
        tensors[f"{module}.lora_A.weight"] = torch.zeros(0, tensors[f"{module}.lora_A.weight"].shape[1])
        tensors[f"{module}.lora_B.weight"] = torch.zeros(tensors[f"{module}.lora_B.weight"].shape[0], 0)
        words = ["has rank 0"]
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    save_file(tensors, str(path), metadata)
    refused(invoke("inspect", str(path)), "odd.safetensors", f"'{module}'", *words)


def test_alpha_files_that_diffusers_refuses_or_reads_two_ways_are_refused(tmp_path: Path) -> None:
    for config in ({"transformer.r": RANK, "transformer.lora_alpha": 16}, {"r": RANK, "lora_alpha": 4}):
        path = _flux_file(tmp_path, {}, lora_adapter_metadata=json.dumps(config))
        result = invoke("inspect", str(path))
        refused(
            result, "odd.safetensors", "its alpha tensor says alpha=8", "lora_adapter_metadata config", "two scales"
        )
    path = _flux_file(tmp_path, {}, lora_adapter_metadata=json.dumps({"r": RANK + 1, "lora_alpha": 8}))
    refused(invoke("inspect", str(path)), "odd.safetensors", f"r={RANK + 1}", "two scales")
    path = _flux_file(tmp_path, {}, drop=FLUX_MODULES[2])
    refused(
        invoke("inspect", str(path)),
        "odd.safetensors",
        "4 transformer module(s) store an alpha tensor and 1 none",
        f"'{FLUX_MODULES[2]}'",
    )
    path = _flux_file(tmp_path, {f"{FLUX_MODULES[0]}.alpha": torch.tensor(8, dtype=torch.int64)})
    refused(invoke("inspect", str(path)), "odd.safetensors", "has dtype I64", "diffusers refuses others")
    with pytest.raises(ValueError, match="alpha key"):
        flux_deltas(path)
    path = _flux_file(tmp_path, {"transformer.transformer_blocks.0.attn.to_v.alpha": torch.tensor(8.0)})
    refused(invoke("inspect", str(path)), "'transformer.transformer_blocks.0.attn.to_v.alpha' is an alpha without")
    path = _flux_file(tmp_path, {f"{FLUX_MODULES[0]}.alpha": torch.tensor(0.0)})
    refused(invoke("inspect", str(path)), "odd.safetensors", "alpha must be a finite positive number")


@pytest.mark.parametrize("component", ["unet", "text_encoder_2", "prior"])
def test_alpha_tensors_beside_a_component_that_diffusers_refuses_them_in_are_refused(
    component: str, tmp_path: Path
) -> None:
    module = f"{component}.down_blocks.1.attentions.0.proj_in" if component == "unet" else f"{component}.x.to_q"
    path = _diffusers(tmp_path / "sd.safetensors", (module, "text_encoder.text_model.x.q_proj"))
    save_file({**load_file(path), f"{module}.alpha": torch.tensor(8.0)}, str(path))
    refused(
        invoke("inspect", str(path)),
        "sd.safetensors",
        f"'{module}.alpha' is an alpha tensor in a file with {component}. modules",
        "Invalid LoRA checkpoint",
    )


def test_stable_diffusion_refuses_alpha_tensors_as_the_message_says(tmp_path: Path) -> None:
    from test_diffusion_formats import layers_of, tiny_pipeline

    pipe = tiny_pipeline()
    module, shape = next(iter(layers_of(pipe)["unet"].items()))
    tensors = {
        f"unet.{module}.lora_A.weight": torch.randn(RANK, *shape[1:]),
        f"unet.{module}.lora_B.weight": torch.randn(shape[0], RANK, *([1] * (len(shape) - 2))),
        f"unet.{module}.alpha": torch.tensor(8.0),
    }
    save_file(tensors, str(tmp_path / "sd.safetensors"))
    with pytest.raises(ValueError, match="Invalid LoRA checkpoint"):
        pipe.load_lora_weights(str(tmp_path), weight_name="sd.safetensors")
    refused(invoke("inspect", str(tmp_path / "sd.safetensors")), "sd.safetensors", "Invalid LoRA checkpoint")


def test_alphas_beside_old_lora_down_keys_stay_refused_as_the_old_layout(tmp_path: Path) -> None:
    name = "transformer.transformer_blocks.0.attn.to_q"
    path = tmp_path / "old.safetensors"
    save_file(
        {
            f"{name}.lora.down.weight": torch.randn(RANK, 8),
            f"{name}.lora.up.weight": torch.randn(8, RANK),
            f"{name}.alpha": torch.tensor(8.0),
        },
        str(path),
    )
    refused(invoke("inspect", str(path)), "old.safetensors", "old attention-processor layout")


# 3. One layer under two spellings (SGM / diffusers UNet names, BFL / diffusers Flux names).

TWINS = {
    "SGM input block": (
        ("lora_unet_input_blocks_4_1_proj_in", "lora_unet_down_blocks_1_attentions_0_proj_in"),
        ["one layer under two spellings", "drops the SGM ones"],
    ),
    "SGM middle block": (
        (
            "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q",
            "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q",
        ),
        ["one layer under two spellings", "SGM / LDM UNet names"],
    ),
    "SGM output resnet": (
        ("lora_unet_output_blocks_4_0_in_layers_2", "lora_unet_up_blocks_1_resnets_1_conv1"),
        ["one layer under two spellings"],
    ),
    "SGM downsampler": (
        ("lora_unet_input_blocks_3_0_op", "lora_unet_down_blocks_0_downsamplers_0_conv"),
        ["one layer under two spellings"],
    ),
    # A layer outside the blocks counts by the spelling of the file's blocks (here diffusers' UNet,
    # which has no time_embed of its own).
    "SGM time embedding": (
        ("lora_unet_time_embed_0", "lora_unet_time_embedding_linear_1"),
        ["one layer under two spellings"],
        ("lora_unet_down_blocks_0_resnets_0_conv1",),
    ),
    "SGM conv_out": (
        ("lora_unet_out_2", "lora_unet_conv_out"),
        ["one layer under two spellings"],
        ("lora_unet_down_blocks_0_resnets_0_conv1",),
    ),
    # The reviews' slip-throughs: BFL's and SAI's final layer and SD3's patch embedding beside diffusers' names.
    "BFL final layer": (
        ("lora_unet_final_layer_linear", "lora_unet_proj_out"),
        ["one layer under two spellings", "diffusers' names"],
        ("lora_unet_double_blocks_0_img_attn_qkv",),
    ),
    "BFL final modulation": (
        ("lora_unet_final_layer_adaLN_modulation_1", "lora_unet_norm_out_linear"),
        ["one layer under two spellings"],
        ("lora_unet_single_blocks_0_linear1",),
    ),
    "MMDiT patch embedding": (
        ("lora_unet_x_embedder_proj", "lora_unet_pos_embed_proj"),
        ["one layer under two spellings"],
        ("lora_unet_joint_blocks_0_x_block_attn_qkv",),
    ),
    "BFL final layer under lora_transformer_": (
        ("lora_unet_final_layer_linear", "lora_transformer_proj_out"),
        ["one layer under two spellings", "drops every lora_unet_ module"],
    ),
    "MMDiT context block": (
        ("lora_unet_joint_blocks_1_context_block_attn_qkv", "lora_unet_transformer_blocks_1_attn_add_k_proj"),
        ["one layer under two spellings", "SAI MMDiT names"],
    ),
    "BFL qkv": (
        ("lora_unet_double_blocks_0_img_attn_qkv", "lora_transformer_transformer_blocks_0_attn_to_k"),
        ["one layer under two spellings", "Black Forest Labs Flux names", "drops every lora_unet_ module"],
    ),
    "BFL linear1": (
        ("lora_unet_single_blocks_2_linear1", "lora_transformer_single_transformer_blocks_2_proj_mlp"),
        ["one layer under two spellings"],
    ),
    "BFL img_in": (("lora_unet_img_in", "lora_transformer_x_embedder"), ["one layer under two spellings"]),
}
MIXED = {
    "SGM and diffusers UNet blocks": (
        ("lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_up_blocks_0_resnets_0_conv1"),
        ["spells its denoiser two ways", "drops the SGM ones"],
    ),
    "BFL final layer and lora_transformer_": (
        ("lora_unet_final_layer_linear", "lora_transformer_x_embedder"),
        ["spells its denoiser two ways", "drops every lora_unet_ module"],
    ),
    "diffusers names under both prefixes": (
        ("lora_unet_transformer_blocks_0_attn_to_q", "lora_transformer_transformer_blocks_0_attn_to_q"),
        ["spells its denoiser two ways"],
    ),
    "SD3 MMDiT and lora_transformer_": (
        ("lora_unet_joint_blocks_0_x_block_attn_qkv", "lora_transformer_transformer_blocks_3_attn_to_q"),
        ["spells its denoiser two ways", "SAI MMDiT names"],
    ),
    "BFL and diffusers blocks under lora_unet_": (
        ("lora_unet_double_blocks_0_img_mlp_0", "lora_unet_single_transformer_blocks_1_attn_to_q"),
        ["spells its denoiser two ways"],
    ),
}


@pytest.mark.parametrize("case", sorted(TWINS) + sorted(MIXED))
def test_a_kohya_file_that_spells_one_model_two_ways_is_refused(case: str, tmp_path: Path) -> None:
    names, words, *more = TWINS.get(case) or MIXED[case]
    extra = tuple(more[0]) if more else ()
    path = _kohya(tmp_path / "twice.safetensors", names=names + extra)
    result = invoke("inspect", str(path))
    refused(result, "twice.safetensors", *(f"'{n}'" for n in names), *words)
    assert ("is also stored as" in result.stderr) == (case in TWINS), result.stderr
    pool = tmp_path / "pool"
    for k in range(5):
        _kohya(pool / f"s{k}.safetensors", names=names[:1] + extra)
    _kohya(pool / "s5.safetensors", names=names + extra)
    out = tmp_path / "merged"
    refused(invoke("merge", str(pool), "--out", str(out), "--device", "cpu", "--exit-zero"), "s5.safetensors")
    assert not out.exists()


@pytest.mark.parametrize(
    "names",
    [
        ("unet.input_blocks.4.1.proj_in", "unet.down_blocks.1.attentions.0.proj_in"),
        ("transformer.double_blocks.0.img_attn.qkv", "transformer.transformer_blocks.0.attn.to_v"),
    ],
)
def test_a_diffusers_file_that_spells_one_layer_two_ways_is_refused(names: tuple[str, str], tmp_path: Path) -> None:
    path = _diffusers(tmp_path / "twice.safetensors", names)
    refused(invoke("inspect", str(path)), "twice.safetensors", *(f"'{n}'" for n in names), "one layer under two")


def test_bfl_dotted_names_beside_kohya_names_are_refused(tmp_path: Path) -> None:
    """diffusers' Flux loader renames diffusion_model. to lora_unet_ (ComfyUI files): the two spellings
    of one layer then overwrite each other. clair refuses the file as two layouts."""
    path = _kohya(tmp_path / "twice.safetensors", names=("lora_unet_double_blocks_0_img_attn_qkv",))
    dotted = "diffusion_model.double_blocks.0.img_attn.qkv"
    extra = {f"{dotted}.lora_down.weight": torch.randn(RANK, 8), f"{dotted}.lora_up.weight": torch.randn(8, RANK)}
    save_file({**load_file(path), **extra}, str(path))
    refused(invoke("inspect", str(path)), "twice.safetensors", "mixes kohya keys", f"'{dotted}.lora_down.weight'")


ONE_SPELLING = {
    # sd-scripts' SDXL: its own SGM UNet, conv_in / conv_out and the embeddings included; two text encoders.
    "sd-scripts SDXL": (
        "lora_unet_input_blocks_0_0",
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "lora_unet_middle_block_1_proj_in",
        "lora_unet_output_blocks_2_2_conv",
        "lora_unet_time_embed_0",
        "lora_unet_label_emb_0_0",
        "lora_unet_out_2",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj",
    ),
    # sd-scripts' Flux (networks.lora_flux): BFL names under lora_unet_; CLIP-L and T5 text encoders.
    "sd-scripts Flux": (
        "lora_unet_double_blocks_0_img_attn_qkv",
        "lora_unet_single_blocks_0_linear1",
        "lora_unet_img_in",
        "lora_unet_final_layer_linear",
        "lora_te1_text_model_encoder_layers_0_mlp_fc1",
        "lora_te3_encoder_block_0_layer_0_SelfAttention_q",
    ),
    "diffusers Flux under lora_transformer_": (
        "lora_transformer_transformer_blocks_0_attn_to_q",
        "lora_transformer_single_transformer_blocks_0_proj_out",
        "lora_transformer_x_embedder",
        "lora_te1_text_model_encoder_layers_0_mlp_fc1",
    ),
    "SD 1.x": (
        "lora_unet_down_blocks_0_attentions_0_proj_in",
        "lora_unet_mid_block_attentions_0_proj_out",
        "lora_unet_conv_in",
        "lora_te_text_model_encoder_layers_0_mlp_fc1",
    ),
}


@pytest.mark.parametrize("case", sorted(ONE_SPELLING))
def test_files_of_one_spelling_are_read(case: str, tmp_path: Path) -> None:
    path = _kohya(tmp_path / "one.safetensors", names=ONE_SPELLING[case])
    assert sorted(_open(path).modules) == sorted(ONE_SPELLING[case])


# diffusers' transformer models whose layers outside the blocks carry words of another model's spelling
# (an outside review of the first version, which refused them: OneTrainer's default "full" layer preset,
# ai-toolkit's transformer_only: false and PEFT's all-linear train them; diffusers and ComfyUI load them).
OWN_LAYERS = {
    "Qwen-Image": ("img_in", "txt_in", "time_text_embed.timestep_embedder.linear_1", "proj_out"),
    "Sana": ("time_embed.emb.timestep_embedder.linear_1", "time_embed.linear", "caption_projection.linear_1"),
    "LTX-Video": ("time_embed.emb.timestep_embedder.linear_1", "proj_in"),
    "CogVideoX": ("time_embedding.linear_1", "patch_embed.proj"),
}


@pytest.mark.parametrize("model", sorted(OWN_LAYERS))
@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_transformer_layers_named_like_another_spelling_are_read(model: str, layout: str, tmp_path: Path) -> None:
    inner = (*OWN_LAYERS[model], "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k")
    if layout == "diffusers":
        names = tuple(f"transformer.{n}" for n in inner)
        path = _diffusers(tmp_path / "own.safetensors", names)
    else:  # OneTrainer's kohya output of these models: diffusers' names under lora_unet_
        names = tuple("lora_unet_" + n.replace(".", "_") for n in inner)
        path = _kohya(tmp_path / "own.safetensors", names=names)
    assert sorted(_open(path).modules) == sorted(names)


def test_what_the_messages_say_diffusers_does_with_two_spellings() -> None:
    """The refusals say diffusers drops one spelling: its SDXL loader the SGM modules of a file that also
    has diffusers' UNet names, its Flux loader the lora_unet_ modules of a file with lora_transformer_ ones."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_kohya_flux_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )

    sgm, unet = "lora_unet_input_blocks_4_1_proj_in", "lora_unet_down_blocks_1_attentions_0_proj_in"
    both = {f"{n}.lora_down.weight": torch.zeros(RANK, 8) for n in (sgm, unet)}
    kept = _maybe_map_sgm_blocks_to_diffusers(dict(both), SimpleNamespace(layers_per_block=2))
    assert set(kept) == {f"{unet}.lora_down.weight"}
    tensors = {}
    for name in ("lora_unet_double_blocks_0_img_attn_proj", "lora_transformer_transformer_blocks_0_attn_to_out_0"):
        tensors.update(
            {
                f"{name}.lora_down.weight": torch.zeros(RANK, 8),
                f"{name}.lora_up.weight": torch.zeros(8, RANK),
                f"{name}.alpha": torch.tensor(4.0),
            }
        )
    converted = _convert_kohya_flux_lora_to_diffusers(tensors)
    assert set(converted) == {f"transformer.transformer_blocks.0.attn.to_out.0.lora_{p}.weight" for p in "AB"}
