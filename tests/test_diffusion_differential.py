"""A differential review of what clair reads from a diffusion LoRA file against what diffusers 0.42 applies
when it loads the same file (``load_lora_weights``, then the fused or PEFT delta of each layer).

1. One CLIP text encoder layer stored with and without ``text_model`` before it (kohya's
   ``lora_te_text_model_X`` and ``lora_te_X``, diffusers' ``text_encoder.text_model.X`` and
   ``text_encoder.X``) was audited as two modules; diffusers applies one of the two to the layer (it strips
   ``text_model`` where the model has none, as transformers 5's CLIPTextModel).
2. The SD UNet's time embedding under a name with one more index (``time_embedding_linear_1_0``,
   ``time_embed_0_5``) beside its own was audited as two modules; diffusers' Stable Diffusion loader
   drops that index and applies one of the two.
3. A PEFT adapter (``base_model.model.`` keys, ``adapter_config.json``) of a diffusion transformer was read at
   its config's scale without a word; diffusers' Flux.2 loader (and Krea 2's, ERNIE-Image's) reads the weights
   file alone and applies scale 1: now a note, and ``clair gate`` flags it.
4. The note on a kohya file's differing alphas named attention modules only; under transformers 5, diffusers'
   Stable Diffusion loader gives every module of the first text encoder (a CLIPTextModel) the file's most
   common alpha too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import transformer_lora_deltas
from safetensors.torch import save_file
from test_diffusion_formats import (
    _quiet,
    clair_deltas,
    fused_deltas,
    invoke,
    kohya_name,
    layers_of,
    pool_factors,
    tiny_pipeline,
)

from clair_cli.errors import AdapterFormatError
from clair_cli.io.diffusion import merged_diffusers_notes
from clair_cli.io.sources import SourceOptions, open_adapter, resolve_sources

FC1 = "encoder.layers.0.mlp.fc1"
OUT_PROJ = "encoder.layers.0.self_attn.out_proj"
PROJ_IN = "down_blocks.1.attentions.0.proj_in"  # a 1x1 conv of the tiny SD UNet (4-D factors)


def _pair(g: torch.Generator, d_out: int, d_in: int, conv: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = torch.randn(2, d_in, generator=g), torch.randn(d_out, 2, generator=g)
    return (a[:, :, None, None], b[:, :, None, None]) if conv else (a, b)


def _kohya(path: Path, modules: dict[str, tuple[int, int]], alphas: dict[str, float] | None = None) -> Path:
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, (d_out, d_in) in modules.items():
        a, b = _pair(g, d_out, d_in, conv=name.endswith("proj_in"))
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = a, b
        if alphas is not None:
            tensors[f"{name}.alpha"] = torch.tensor(alphas[name])
    save_file(tensors, str(path))
    return path


def _diffusers(path: Path, modules: dict[str, tuple[int, int]]) -> Path:
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for name, (d_out, d_in) in modules.items():
        a, b = _pair(g, d_out, d_in, conv=name.endswith("proj_in"))
        tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = a, b
    save_file(tensors, str(path))
    return path


def _open(path: Path, **options):
    (ref,) = resolve_sources([str(path)], SourceOptions(**options))
    return open_adapter(ref, SourceOptions(**options))


# 1. A text encoder layer with and without text_model.

TWINS = {
    "kohya": (
        _kohya,
        {
            "lora_unet_" + PROJ_IN.replace(".", "_"): (8, 8),
            "lora_te_text_model_" + FC1.replace(".", "_"): (16, 8),
            "lora_te_" + FC1.replace(".", "_"): (16, 8),
        },
    ),
    "diffusers": (
        _diffusers,
        {
            f"unet.{PROJ_IN}": (8, 8),
            f"text_encoder.text_model.{OUT_PROJ}": (8, 8),
            f"text_encoder.{OUT_PROJ}": (8, 8),
        },
    ),
}


@pytest.mark.parametrize("layout", sorted(TWINS))
def test_a_text_encoder_layer_with_and_without_text_model_is_refused(layout: str, tmp_path: Path) -> None:
    write, modules = TWINS[layout]
    path = write(tmp_path / "twins.safetensors", modules)
    plain, with_text_model = [m for m in modules if "unet" not in m][::-1]
    # What diffusers does with it: one text encoder layer, one of the two updates.
    fused = {k: v for k, v in fused_deltas(path).items() if k.startswith("text_encoder.")}
    assert len(fused) == 1
    with pytest.raises(AdapterFormatError) as caught:
        _open(path)
    message = str(caught.value)
    assert f"'{plain}'" in message and f"'{with_text_model}'" in message and "text_model" in message
    # Either spelling alone is read, as diffusers applies it.
    for drop in (plain, with_text_model):
        alone = write(tmp_path / "alone.safetensors", {m: s for m, s in modules.items() if m != drop})
        (ours,) = [d for m, d in clair_deltas(alone).items() if m.startswith(("lora_te_", "text_encoder."))]
        (theirs,) = [d for m, d in fused_deltas(alone).items() if m.startswith("text_encoder.")]
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_sdxls_second_text_encoder_keeps_text_model_and_its_twin_is_refused_too(tmp_path: Path) -> None:
    # CLIPTextModelWithProjection keeps its text_model under transformers 5: diffusers loads that spelling alone.
    modules = {
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q": (8, 8),
        "lora_te2_text_model_" + FC1.replace(".", "_"): (16, 8),
        "lora_te2_" + FC1.replace(".", "_"): (16, 8),
    }
    path = _kohya(tmp_path / "twins.safetensors", modules)
    fused = {k: v for k, v in fused_deltas(path, xl=True).items() if k.startswith("text_encoder_2.")}
    assert list(fused) == [f"text_encoder_2.text_model.{FC1}"]
    with pytest.raises(AdapterFormatError, match="text_model"):
        _open(path)


# 2. The time embedding under a name with one more index.


def _sd_loader_layers(names: list[str]) -> set[str]:
    """The UNet layers diffusers' Stable Diffusion loader loads kohya ``names`` into (no model needed)."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    _quiet()
    tensors = {}
    for name in names:
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = torch.zeros(1, 1), torch.zeros(1, 1)
    state, _alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(tensors)
    unet = convert_unet_state_dict_to_peft({k[len("unet.") :]: v for k, v in state.items() if k.startswith("unet.")})
    return {k.removesuffix(".lora_A.weight") for k in unet if k.endswith(".lora_A.weight")}


@pytest.mark.parametrize(
    "own, alias",
    [
        ("time_embedding_linear_1", "time_embedding_linear_1_0"),
        ("time_embedding_linear_2", "time_embedding_linear_2_3"),
        ("time_embedding_linear_1", "time_embed_0_5"),
        ("time_embed_2", "time_embedding_linear_2_1"),
    ],
)
@pytest.mark.parametrize("blocks", [True, False], ids=["with blocks", "alone"])
def test_the_time_embedding_under_a_name_with_one_more_index_beside_its_own_is_refused(
    own: str, alias: str, blocks: bool, tmp_path: Path
) -> None:
    names = ["lora_unet_" + own, "lora_unet_" + alias]
    assert len(_sd_loader_layers(names)) == 1  # one layer to diffusers, which keeps one of the two
    modules = dict.fromkeys(names, (8, 8))
    if blocks:
        modules["lora_unet_" + PROJ_IN.replace(".", "_")] = (8, 8)
    with pytest.raises(AdapterFormatError) as caught:
        _open(_kohya(tmp_path / "twins.safetensors", modules))
    assert "name one UNet layer" in str(caught.value)


ADD_EMBEDDING = {"lora_unet_add_embedding_linear_1": (16, 56), "lora_unet_add_embedding_linear_2": (16, 16)}
SDXL_ATTN = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"


def test_sdxls_add_embedding_under_kohya_names_diffusers_applies_to_no_layer_is_read_with_a_note(
    tmp_path: Path,
) -> None:
    """diffusers' SD / SDXL loader turns lora_unet_add_embedding_linear_1 and _2 into add.embedding.linear, no
    layer of the UNet: it applied neither while clair audited both without a word (a review: updates of norm
    40.8 and 12.5 in clair's audit, none in the fused pipeline). ComfyUI applies them to label_emb: clair reads
    them, and says what diffusers does."""
    assert _sd_loader_layers(list(ADD_EMBEDDING)) == {"add.embedding.linear"}  # one name, of no layer
    path = _kohya(tmp_path / "add.safetensors", {**ADD_EMBEDDING, SDXL_ATTN: (8, 8)})
    theirs = fused_deltas(path, xl=True)
    assert list(theirs) == ["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]
    adapter = _open(path)
    assert sorted(adapter.modules) == sorted([*ADD_EMBEDDING, SDXL_ATTN])
    (note,) = [n for n in adapter.notes if "applies to no layer" in n]
    assert note.startswith("2 UNet module(s)") and all(m in note for m in ADD_EMBEDDING)
    assert "refuses a file" not in note
    # Without another UNet module diffusers refuses the file (PEFT finds no target module): the note says so.
    alone = _kohya(tmp_path / "alone.safetensors", {**ADD_EMBEDDING, "lora_te1_" + FC1.replace(".", "_"): (16, 8)})
    with pytest.raises(ValueError, match="add.embedding.linear"):
        fused_deltas(alone, xl=True)
    assert any("refuses a file whose UNet LoRA has no other module" in n for n in _open(alone).notes)
    # SGM's names and diffusers' file layout name real layers: diffusers applies them, and there is no note.
    sgm = _kohya(
        tmp_path / "sgm.safetensors", {"lora_unet_label_emb_0_0": (16, 56), "lora_unet_label_emb_0_2": (16, 16)}
    )
    assert sorted(fused_deltas(sgm, xl=True)) == ["unet.add_embedding.linear_1", "unet.add_embedding.linear_2"]
    assert not [n for n in _open(sgm).notes if "applies to no layer" in n]
    named = {
        f"unet.{m.removeprefix('lora_unet_').replace('_linear_', '.linear_')}": s for m, s in ADD_EMBEDDING.items()
    }
    diffusers_file = _diffusers(tmp_path / "d.safetensors", named)
    assert sorted(fused_deltas(diffusers_file, xl=True)) == sorted(named)
    assert not [n for n in _open(diffusers_file).notes if "applies to no layer" in n]


def test_a_merge_of_files_with_sdxls_add_embedding_loads_in_diffusers_and_says_what_it_skips(tmp_path: Path) -> None:
    """The merged kohya file keeps the add_embedding modules (ComfyUI applies them); diffusers loads it, applies
    the other modules as clair merged them, and skips those two, as the merge's note says."""
    for k in range(3):
        g = torch.Generator().manual_seed(10 + k)
        tensors = {}
        for name, (d_out, d_in) in {**ADD_EMBEDDING, SDXL_ATTN: (8, 8)}.items():
            a, b = _pair(g, d_out, d_in)
            tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = a, b
        (tmp_path / "pool").mkdir(exist_ok=True)
        save_file(tensors, str(tmp_path / "pool" / f"style_{k}.safetensors"))
    out, report = tmp_path / "merged", tmp_path / "report.json"
    args = ["merge", str(tmp_path / "pool"), "--out", str(out), "--method", "mean", "--device", "cpu"]
    result = invoke(*args, "--json", str(report))
    assert result.exit_code == 0, result.output
    merged = out / "pytorch_lora_weights.safetensors"
    ours = clair_deltas(merged)
    theirs = fused_deltas(merged, xl=True)
    assert sorted(ours) == sorted([*ADD_EMBEDDING, SDXL_ATTN])
    (applied,) = theirs.values()
    torch.testing.assert_close(ours[SDXL_ATTN], applied, rtol=1e-5, atol=1e-6)
    notes = json.loads(report.read_text())["notes"]
    assert any(n.startswith("the merged file: 2 UNet module(s) that diffusers'") for n in notes), notes


# 3. A diffusion transformer's PEFT adapter at a scale other than 1.


def _tiny_flux2():
    from diffusers import Flux2Transformer2DModel

    _quiet()
    torch.manual_seed(0)
    return Flux2Transformer2DModel(
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        timestep_guidance_channels=8,
        axes_dims_rope=(2, 2, 2, 2),
    )


def _flux2_deltas(directory: Path) -> dict[str, torch.Tensor]:
    """What diffusers' Flux.2 loader adds to each layer of a tiny transformer, by module."""
    from diffusers.loaders import Flux2LoraLoaderMixin

    return transformer_lora_deltas(Flux2LoraLoaderMixin, _tiny_flux2(), directory / "adapter_model.safetensors")


def _peft_adapter(directory: Path, modules: dict[str, tuple[int, int]], lora_alpha: float) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(2)
    tensors = {}
    for name, (d_out, d_in) in modules.items():
        a, b = _pair(g, d_out, d_in)
        tensors[f"base_model.model.{name}.lora_A.weight"], tensors[f"base_model.model.{name}.lora_B.weight"] = a, b
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    targets = sorted({m.rsplit(".", 1)[-1] for m in modules})
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": lora_alpha, "target_modules": targets}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


FLUX2 = {"transformer_blocks.0.attn.to_q": (16, 16), "transformer_blocks.0.attn.to_k": (16, 16)}


def test_a_diffusion_transformers_peft_adapter_at_another_scale_than_one_is_flagged(tmp_path: Path) -> None:
    adapter_dir = _peft_adapter(tmp_path / "flux2", FLUX2, lora_alpha=0.25)
    adapter = _open(adapter_dir)
    ours = {m.name: m.delta_weight() for m in adapter.load()}
    theirs = _flux2_deltas(adapter_dir)
    assert sorted(ours) == sorted(theirs)
    for name, delta in ours.items():  # PEFT's scale 0.25 / 2 against diffusers' 1
        torch.testing.assert_close(delta * 8, theirs[name], rtol=1e-5, atol=1e-5)
    assert any(
        "diffusers' loaders that read PEFT-format weights" in n and "clair gate flags it" in n for n in adapter.notes
    )
    assert any("apply scale 1" in why for why in adapter.unanalysed())


def test_a_diffusion_transformers_peft_adapter_at_scale_one_and_an_llms_are_not_flagged(tmp_path: Path) -> None:
    adapter_dir = _peft_adapter(tmp_path / "flux2", FLUX2, lora_alpha=2)
    adapter = _open(adapter_dir)
    ours = {m.name: m.delta_weight() for m in adapter.load()}
    theirs = _flux2_deltas(adapter_dir)
    for name, delta in ours.items():
        torch.testing.assert_close(delta, theirs[name], rtol=1e-5, atol=1e-5)
    assert not adapter.unanalysed()
    for k, name in enumerate(("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.to_q")):
        llm = _peft_adapter(tmp_path / f"llm{k}", {name: (16, 16)}, lora_alpha=16)  # an LLM's, whatever its names
        assert not _open(llm).unanalysed()


# 4. The note on differing kohya alphas.


def test_the_alphas_note_names_the_text_encoder_modules_diffusers_scales_otherwise(tmp_path: Path) -> None:
    te = {f"lora_te_text_model_encoder_layers_{i}_mlp_fc1": (16, 8) for i in (0, 1)}
    te["lora_te_text_model_encoder_layers_0_mlp_fc2"] = (8, 16)
    alphas = dict(zip(te, (1.0, 1.0, 8.0), strict=True))
    path = _kohya(tmp_path / "alphas.safetensors", te, alphas)
    theirs = fused_deltas(path)["text_encoder.encoder.layers.0.mlp.fc2"]
    ours = clair_deltas(path)["lora_te_text_model_encoder_layers_0_mlp_fc2"]
    torch.testing.assert_close(ours / 8, theirs, rtol=1e-5, atol=1e-6)  # diffusers: the most common alpha, 1
    (note,) = [n for n in _open(path).notes if n.startswith("alphas differ")]
    assert "every module of a CLIPTextModel" in note


def test_lora_te_modules_beside_sdxls_encoders_are_read_as_diffusers_applies_them_with_a_note(tmp_path: Path) -> None:
    """An SDXL kohya file whose first text encoder's modules are named lora_te_ (SD 1.x's prefix) beside
    lora_te2_ ones, or beside UNet layers only SDXL has: diffusers (and ComfyUI) apply them to the first
    text encoder, as clair reads them; sd-scripts' SDXL network names that encoder's modules lora_te1_ and
    skips them. Said in a note (a review found the loaders disagree), of a merge of such files too; a file
    of lora_te1_ / lora_te2_ names, or an SD 1.x file of lora_te_ names, has none."""
    (factors,) = pool_factors(layers_of(tiny_pipeline(True)))[:1]
    tensors, names = {}, {}
    for module, (a, b) in factors.items():
        name = kohya_name(module, xl=True).replace("lora_te1_", "lora_te_")
        names[name] = module
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = a.contiguous(), b.contiguous()
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, str(path))
    plain = sorted(n for n in names if n.startswith("lora_te_"))
    assert plain and any(n.startswith("lora_te2_") for n in names)
    theirs, ours = fused_deltas(path, xl=True), clair_deltas(path)
    for name in plain:  # diffusers applies them to the first text encoder, as clair reads them
        assert names[name].startswith("text_encoder.")
        torch.testing.assert_close(ours[name].float(), theirs[names[name]], rtol=1e-5, atol=1e-6)
    (note,) = [n for n in _open(path).notes if "sd-scripts' SDXL network" in n]
    assert note.startswith(f"{len(plain)} text-encoder module(s) named lora_te_ (e.g. {plain[0]})")
    assert [n for n in merged_diffusers_notes("kohya", list(names)) if "sd-scripts' SDXL network" in n]
    fc1 = FC1.replace(".", "_")
    # SDXL told by its UNet alone: a second transformer block (SGM's names here) or label_emb, which SD 1.x lacks.
    for unet in ("lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q", "lora_unet_label_emb_0_0"):
        sgm = _kohya(tmp_path / "sgm.safetensors", {"lora_te_" + fc1: (16, 8), unet: (8, 8)})
        assert [n for n in _open(sgm).notes if "sd-scripts' SDXL network" in n], unet
    xl = _kohya(tmp_path / "xl.safetensors", {"lora_te1_" + fc1: (16, 8), "lora_te2_" + fc1: (16, 8)})
    sd15_attn = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # SDXL's down_blocks.0 has none
    sd15 = _kohya(tmp_path / "sd15.safetensors", {"lora_te_" + fc1: (16, 8), sd15_attn: (8, 8)})
    for other in (xl, sd15):
        assert not [n for n in _open(other).notes if "sd-scripts' SDXL network" in n]
