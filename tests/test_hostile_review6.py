"""Diffusion LoRA files, from a sixth review from outside: two kohya names of one UNet layer read as
two modules (diffusers keeps one), a merged ``lora_transformer_`` Flux file that diffusers could not
load (no alphas), notes on alphas that hold for diffusers' Stable Diffusion loader only, sd-scripts
Flux modules diffusers drops, and test files whose text-encoder names sd-scripts never writes.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_diffusion_formats import (
    RANK,
    alpha_of,
    clair_deltas,
    fused_deltas,
    layers_of,
    pool_factors,
    tiny_pipeline,
)
from test_hostile_review import invoke, refused
from test_hostile_review4 import _layer_shapes, flux_deltas

from clair_cli.io.sources import open_adapter, resolve_sources
from clair_cli.io.spellings import _sgm_remapped, refuse_two_spellings, sd_unet_layer


def _open(path: Path):
    return open_adapter(resolve_sources([str(path)])[0])


def _write(path: Path, names: dict[str, tuple[int, int]], alphas: dict[str, float] | None = None, r: int = 2) -> Path:
    """A kohya file of ``{module: (d_out, d_in)}`` (linear factors), with ``alphas`` by module."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, (d_out, d_in) in names.items():
        tensors[f"{name}.lora_down.weight"] = torch.randn(r, d_in, generator=g) / 4
        tensors[f"{name}.lora_up.weight"] = torch.randn(d_out, r, generator=g) / 4
        if alphas and name in alphas:
            tensors[f"{name}.alpha"] = torch.tensor(alphas[name])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


# 1. Two kohya names of one UNet layer: inside diffusers-named blocks, kohya's LDM / SGM names of a
# resnet's layers alias diffusers' (diffusers' _convert_unet_lora_key), and so do two names in an
# SGM-named file. diffusers keeps one of the two, clair read both.

ALIASES = [
    ("down_blocks_0_resnets_0_conv1", "down_blocks_0_resnets_0_in_layers_2"),
    ("down_blocks_0_resnets_0_conv2", "down_blocks_0_resnets_0_out_layers_3"),
    ("down_blocks_0_resnets_0_time_emb_proj", "down_blocks_0_resnets_0_emb_layers_1"),
    ("down_blocks_1_resnets_0_conv_shortcut", "down_blocks_1_resnets_0_skip_connection"),
    ("down_blocks_0_downsamplers_0_conv", "down_blocks_0_downsamplers_0_op"),
    ("mid_block_resnets_0_conv1", "mid_block_resnets_0_in_layers_2"),
    ("up_blocks_1_resnets_2_conv_shortcut", "up_blocks_1_resnets_2_skip_connection"),
    ("input_blocks_1_0_conv1", "input_blocks_1_0_in_layers_2"),
    ("input_blocks_1_0_emb_layers_1", "input_blocks_1_0_time_emb_proj"),
    ("output_blocks_3_0_conv2", "output_blocks_3_0_out_layers_3"),
    ("middle_block_2_emb_layers_1", "middle_block_2_time_emb_proj"),
    ("time_embedding_linear_1", "time_embed_0"),  # no block: SGM's time_embed is the SD loader's
]


def _diffusers_layers(names: list[str]) -> dict[str, str]:
    """``{module: layer}`` as diffusers 0.42's SD / SDXL loader maps kohya UNet names (two layers a
    block), each name on its own (two names of one layer are one key to diffusers)."""
    from diffusers.loaders.lora_conversion_utils import _convert_unet_lora_key, _maybe_map_sgm_blocks_to_diffusers
    from diffusers.utils import convert_unet_state_dict_to_peft

    out = {}
    for name in names:
        (key,) = _maybe_map_sgm_blocks_to_diffusers(
            {f"{name}.lora_down.weight": 0}, SimpleNamespace(layers_per_block=2)
        )
        (peft,) = convert_unet_state_dict_to_peft({_convert_unet_lora_key(key): 0})
        out[name] = peft.removesuffix(".lora_A.weight")
    return out


@pytest.mark.parametrize("pair", ALIASES, ids=[b for _, b in ALIASES])
def test_two_kohya_names_of_one_unet_layer_are_refused(pair: tuple[str, str], tmp_path: Path) -> None:
    a, b = (f"lora_unet_{n}" for n in pair)
    theirs = _diffusers_layers([a, b])
    assert theirs[a] == theirs[b], theirs  # diffusers' own mapping: one layer, one of the two kept
    path = _write(tmp_path / "alias.safetensors", {a: (4, 4), b: (4, 4)})
    refused(invoke("inspect", str(path)), "alias.safetensors", a, b, "name one UNet layer", theirs[a])


def test_an_alias_hidden_in_a_pool_stops_audit_merge_and_refine(tmp_path: Path) -> None:
    conv = tiny_pipeline().unet.down_blocks[0].resnets[0].conv1.weight.shape
    g = torch.Generator().manual_seed(0)
    for k in range(6):
        names = ["lora_unet_down_blocks_0_resnets_0_conv1"] + (
            ["lora_unet_down_blocks_0_resnets_0_in_layers_2"] * (k == 5)
        )
        tensors = {}
        for name in names:
            tensors[f"{name}.lora_down.weight"] = torch.randn(2, *conv[1:], generator=g) * (
                5 if "in_layers" in name else 0.1
            )
            tensors[f"{name}.lora_up.weight"] = torch.randn(conv[0], 2, 1, 1, generator=g)
        (tmp_path / "pool").mkdir(exist_ok=True)
        save_file(tensors, str(tmp_path / "pool" / f"style_{k}.safetensors"))
    for args in (["audit", "--intersect"], ["merge", "--intersect", "--out", str(tmp_path / "m")]):
        refused(invoke(*args, str(tmp_path / "pool"), "--device", "cpu"), "style_5.safetensors", "in_layers_2")
    assert not (tmp_path / "m").exists()


def _sdxl_sgm_names() -> list[str]:
    """The modules of an sd-scripts SDXL LoRA with conv layers (LoCon): SDXL's SGM UNet, every
    attention, resnet and sampler layer, the embeddings and conv_in / conv_out."""
    resnet = ("in_layers_2", "out_layers_3", "emb_layers_1")

    def attention(prefix: str, depth: int) -> list[str]:
        out = [f"{prefix}_proj_in", f"{prefix}_proj_out"]
        for t in range(depth):
            block = f"{prefix}_transformer_blocks_{t}"
            out += [f"{block}_{a}_{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out_0")]
            out += [f"{block}_ff_net_0_proj", f"{block}_ff_net_2"]
        return out

    names = ["input_blocks_0_0", "time_embed_0", "time_embed_2", "label_emb_0_0", "label_emb_0_2", "out_2"]
    depth = {4: 2, 5: 2, 7: 10, 8: 10}
    for i in range(1, 9):
        if i in (3, 6):
            names.append(f"input_blocks_{i}_0_op")
            continue
        names += [f"input_blocks_{i}_0_{p}" for p in resnet] + [f"input_blocks_{i}_0_skip_connection"] * (i in (4, 7))
        names += attention(f"input_blocks_{i}_1", depth[i]) if i in depth else []
    names += [f"middle_block_{j}_{p}" for j in (0, 2) for p in resnet] + attention("middle_block_1", 10)
    for i in range(9):
        names += [f"output_blocks_{i}_0_{p}" for p in (*resnet, "skip_connection")]
        names += attention(f"output_blocks_{i}_1", 10 if i < 3 else 2) if i < 6 else []
        names += [f"output_blocks_{i}_2_conv"] if i in (2, 5) else []
    return [f"lora_unet_{n}" for n in names]


def _sd15_names() -> list[str]:
    """Every Linear / Conv2d layer of SD 1.5's UNet, under sd-scripts' names (diffusers' paths)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel()  # SD 1.5's config
    layers = (torch.nn.Linear, torch.nn.Conv2d)
    return [f"lora_unet_{n.replace('.', '_')}" for n, m in unet.named_modules() if isinstance(m, layers)]


@pytest.mark.parametrize("family", ["SD 1.5, diffusers names", "SDXL, SGM names"])
def test_every_layer_of_a_clean_unet_file_is_its_own_and_mapped_as_diffusers_maps_it(family: str) -> None:
    names = _sd15_names() if family.startswith("SD 1.5") else _sdxl_sgm_names()
    refuse_two_spellings(Path("clean.safetensors"), names, "kohya")  # not refused
    theirs = _diffusers_layers(names)
    ours = {m: sd_unet_layer(key) for m, key in _sgm_remapped([f"{n}.lora_down.weight" for n in names]).items()}
    assert ours == theirs
    assert len(set(ours.values())) == len(names)


def test_the_mirror_of_diffusers_mapping_holds_for_every_alias() -> None:
    names = sorted({f"lora_unet_{n}" for pair in ALIASES for n in pair if "blocks" in n and "input" not in n})
    names = [n for n in names if not n.startswith(("lora_unet_middle", "lora_unet_output"))]
    ours = {m: sd_unet_layer(key) for m, key in _sgm_remapped([f"{n}.lora_down.weight" for n in names]).items()}
    assert ours == _diffusers_layers(names)


# 2. A merged lora_transformer_ (diffusers' Flux names in kohya's layout) file whose ranks differ had
# no alphas, and diffusers' Flux loader needs one in every module.

TRANSFORMER = {
    "lora_transformer_transformer_blocks_0_attn_to_q": "transformer.transformer_blocks.0.attn.to_q",
    "lora_transformer_transformer_blocks_0_attn_to_k": "transformer.transformer_blocks.0.attn.to_k",
    "lora_transformer_transformer_blocks_0_attn_to_out_0": "transformer.transformer_blocks.0.attn.to_out.0",
    "lora_transformer_single_transformer_blocks_0_attn_to_q": "transformer.single_transformer_blocks.0.attn.to_q",
}


def test_a_merged_lora_transformer_file_of_several_ranks_loads_in_diffusers_as_computed(tmp_path: Path) -> None:
    shapes = _layer_shapes()
    g = torch.Generator().manual_seed(0)
    shared = {n: torch.linalg.qr(torch.randn(shapes[m][0], 2, generator=g))[0] for n, m in TRANSFORMER.items()}
    for k in range(6):
        tensors = {}
        for i, (name, module) in enumerate(TRANSFORMER.items()):
            r, (d_out, d_in) = (4 if i % 2 == 0 else 2), shapes[module]
            tensors[f"{name}.lora_down.weight"] = torch.randn(r, d_in, generator=g) / 4
            up = shared[name] @ torch.randn(2, r, generator=g) + 0.02 * torch.randn(d_out, r, generator=g)
            tensors[f"{name}.lora_up.weight"] = up * (10 if k == 5 else 1)
            tensors[f"{name}.alpha"] = torch.tensor(float(r) * (0.5, 1.0, 2.0)[k % 3])
        (tmp_path / "pool").mkdir(exist_ok=True)
        save_file(tensors, str(tmp_path / "pool" / f"flux_{k}.safetensors"))
    out = tmp_path / "merged"
    result = invoke("merge", str(tmp_path / "pool"), "--out", str(out), "--device", "cpu", "--exit-zero")
    assert result.exit_code == 0, result.output
    merged = load_file(out / "pytorch_lora_weights.safetensors")
    ranks = {
        k.removesuffix(".lora_down.weight"): v.shape[0] for k, v in merged.items() if k.endswith("lora_down.weight")
    }
    assert len(set(ranks.values())) > 1
    assert {k: float(v) for k, v in merged.items() if k.endswith(".alpha")} == {
        f"{name}.alpha": float(r) for name, r in ranks.items()
    }
    ours = {TRANSFORMER[name]: delta for name, delta in clair_deltas(out).items()}
    theirs = flux_deltas(out / "pytorch_lora_weights.safetensors")
    assert sorted(ours) == sorted(theirs)
    for name, delta in ours.items():
        torch.testing.assert_close(delta, theirs[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_lora_transformer_file_without_alphas_has_a_note(tmp_path: Path) -> None:
    shapes = _layer_shapes()
    path = _write(tmp_path / "flux.safetensors", {n: shapes[m] for n, m in TRANSFORMER.items()})
    notes = _open(path).notes
    assert any("refuses a lora_transformer_ file without an alpha in every module" in n for n in notes), notes


# 3. The alpha notes hold for diffusers' Stable Diffusion / SDXL loader only: its Flux loader folds each
# module's own alpha into an sd-scripts Flux file's factors (alpha = rank where none is stored).


def _bfl(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, int]]:
    q = shapes["transformer.transformer_blocks.0.attn.to_q"]
    return {
        "lora_unet_double_blocks_0_img_attn_qkv": (3 * q[0], q[1]),
        "lora_unet_double_blocks_0_img_attn_proj": shapes["transformer.transformer_blocks.0.attn.to_out.0"],
        "lora_unet_double_blocks_0_txt_attn_proj": shapes["transformer.transformer_blocks.0.attn.to_add_out"],
        "lora_unet_double_blocks_0_img_mlp_0": shapes["transformer.transformer_blocks.0.ff.net.0.proj"],
    }


def test_an_sd_scripts_flux_file_of_differing_alphas_has_no_alpha_note_and_reads_as_diffusers_applies_it(
    tmp_path: Path,
) -> None:
    names = _bfl(_layer_shapes())
    alphas = dict(zip(list(names)[:3], (1.0, 1.0, 8.0), strict=True))  # img_mlp_0: none
    path = _write(tmp_path / "flux.safetensors", names, alphas, r=4)
    adapter = _open(path)
    assert not any("alpha" in n for n in adapter.notes), adapter.notes
    ours, theirs = clair_deltas(path), flux_deltas(path)
    for name, module in (
        ("img_attn_proj", "attn.to_out.0"),
        ("txt_attn_proj", "attn.to_add_out"),
        ("img_mlp_0", "ff.net.0.proj"),
    ):
        torch.testing.assert_close(
            ours[f"lora_unet_double_blocks_0_{name}"], theirs[f"transformer.transformer_blocks.0.{module}"]
        )


def test_an_sd_file_of_differing_alphas_keeps_its_notes(tmp_path: Path) -> None:
    layers = layers_of(tiny_pipeline())
    names = {f"lora_unet_{m.replace('.', '_')}": s for m, s in layers["unet"].items() if len(s) == 2}
    first, second, third = list(names)[:3]
    path = _write(tmp_path / "sd.safetensors", names, {first: 1.0, second: 8.0})
    notes = _open(path).notes
    assert any("Stable Diffusion / SDXL loader (0.42) applies the most common alpha" in n for n in notes), notes
    assert any("Stable Diffusion / SDXL loader (0.42) gives them" in n for n in notes), notes
    assert third


# 4. diffusers' Flux loader drops an sd-scripts Flux file's modules outside the blocks.


def test_sd_scripts_flux_modules_that_diffusers_drops_are_named_in_a_note(tmp_path: Path) -> None:
    shapes = _layer_shapes()
    names = {
        **_bfl(shapes),
        "lora_unet_img_in": shapes["transformer.x_embedder"],
        "lora_unet_final_layer_linear": shapes["transformer.proj_out"],
    }
    path = _write(tmp_path / "flux.safetensors", names)
    notes = _open(path).notes
    assert any(
        "2 module(s) outside Flux's blocks (e.g. lora_unet_final_layer_linear" in n and "does not apply them" in n
        for n in notes
    ), notes
    theirs = flux_deltas(path)
    assert "transformer.x_embedder" not in theirs and "transformer.proj_out" not in theirs  # what the note says
    assert "transformer.transformer_blocks.0.attn.to_out.0" in theirs
    notes = _open(_write(tmp_path / "blocks.safetensors", _bfl(shapes))).notes
    assert not any("outside Flux's blocks" in n for n in notes), notes


# 5. sd-scripts' text-encoder names: lora_te_text_model_encoder_layers_N_... (the test pools above use
# the paths of transformers 5's CLIPTextModel, which has no text_model level). diffusers 0.42 applies a
# text encoder's q_proj / k_proj / v_proj only beside an out_proj module: a note says so.


def real_kohya_name(module: str, xl: bool = False) -> str:
    """sd-scripts' own name of a module of the tiny pipelines (``text_model_`` in the text encoders)."""
    component, _, path = module.partition(".")
    if component == "unet":
        return f"lora_unet_{path.replace('.', '_')}"
    prefix = {"text_encoder": "lora_te1_" if xl else "lora_te_", "text_encoder_2": "lora_te2_"}[component]
    # CLIPTextModelWithProjection (SDXL's second text encoder) keeps its text_model level.
    return f"{prefix}{'' if path.startswith('text_model.') else 'text_model_'}{path.replace('.', '_')}"


def _write_real(path: Path, factors: dict[str, tuple], alpha: float, xl: bool = False) -> Path:
    tensors = {}
    for module, (a, b) in factors.items():
        name = real_kohya_name(module, xl)
        tensors[f"{name}.lora_down.weight"] = a.contiguous()
        tensors[f"{name}.lora_up.weight"] = b.contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("xl", [False, True], ids=["SD", "SDXL"])
def test_files_of_sd_scripts_text_encoder_names_read_as_diffusers_fuses_them(xl: bool, tmp_path: Path) -> None:
    factors = pool_factors(layers_of(tiny_pipeline(xl)))[1]
    path = _write_real(tmp_path / "real.safetensors", factors, alpha_of(1), xl)
    assert any("_text_model_encoder_layers_0_self_attn_out_proj" in k for k in load_file(path))
    ours = clair_deltas(path)
    theirs = {real_kohya_name(m, xl): d for m, d in fused_deltas(path, xl=xl).items()}
    assert sorted(ours) == sorted(theirs)
    for name, delta in ours.items():
        torch.testing.assert_close(delta, theirs[name], rtol=1e-5, atol=1e-6, msg=name)
    assert not any("out_proj module" in n for n in _open(path).notes)


@pytest.mark.parametrize("with_mlp", [True, False], ids=["beside mlp", "alone"])
def test_text_encoder_attention_without_out_proj_has_a_note(with_mlp: bool, tmp_path: Path) -> None:
    te = layers_of(tiny_pipeline())["text_encoder"]
    parts = ["self_attn.q_proj", "self_attn.v_proj"] + ["mlp.fc1"] * with_mlp
    names = {real_kohya_name(f"text_encoder.encoder.layers.0.{p}"): te[f"encoder.layers.0.{p}"] for p in parts}
    path = _write(tmp_path / "te.safetensors", names, r=RANK)
    notes = _open(path).notes
    what = "does not apply them" if with_mlp else "refuses the file"
    assert any("2 text_encoder attention module(s)" in n and what in n for n in notes), notes
    if with_mlp:  # what the note says
        applied = fused_deltas(path)
        assert sorted(applied) == ["text_encoder.encoder.layers.0.mlp.fc1"], sorted(applied)
    else:
        with pytest.raises(ValueError, match="Could not automatically infer state dict type"):
            fused_deltas(path)


def test_an_sd15_file_in_sgm_names_with_blocks_10_and_11_is_read() -> None:
    """SD 1.5's SGM input blocks run to 11: diffusers' substring match takes input_blocks_10 and 11
    for block 1 (and then fails on the file; ComfyUI and A1111 read it). Not two names of one layer."""
    resnet = ("in_layers_2", "out_layers_3", "emb_layers_1")
    names = [f"lora_unet_input_blocks_{i}_0_{p}" for i in (1, 2, 4, 5, 7, 8, 10, 11) for p in resnet]
    names += [f"lora_unet_input_blocks_{i}_0_op" for i in (3, 6, 9)]
    refuse_two_spellings(Path("sd15.safetensors"), names, "kohya")  # not refused
    layers = {sd_unet_layer(key) for key in _sgm_remapped([f"{n}.lora_down.weight" for n in names]).values()}
    assert len(layers) == len(names)
