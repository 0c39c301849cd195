"""Diffusion LoRA files, from a seventh review from outside, of what diffusers' loaders apply against
what clair reads: the modules of ComfyUI-layout and sd-scripts Flux files that diffusers' Flux loader
drops (outside the blocks, T5) had no note, and diffusers' HunyuanVideo loader applies a ComfyUI file's
``final_layer.adaLN_modulation.1`` otherwise than ComfyUI (it reorders lora_A's rank rows).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import transformer_lora_deltas
from safetensors.torch import load_file, save_file
from test_diffusion_formats import clair_deltas
from test_hostile_review import invoke, refused
from test_hostile_review4 import _layer_shapes, flux_deltas

from clair_cli.io.sources import open_adapter, resolve_sources


def _open(path: Path):
    return open_adapter(resolve_sources([str(path)])[0])


def _write(path: Path, modules: dict[str, tuple[int, int]], down: str = "lora_down", up: str = "lora_up", r: int = 2):
    """A file of ``{module: (d_out, d_in)}``, factors named ``<module>.<down>.weight`` / ``<module>.<up>.weight``."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, (d_out, d_in) in modules.items():
        tensors[f"{name}.{down}.weight"] = torch.randn(r, d_in, generator=g) / 4
        tensors[f"{name}.{up}.weight"] = torch.randn(d_out, r, generator=g) / 4
    save_file(tensors, str(path))
    return path


# 1. Flux modules that diffusers' Flux loader does not apply.


def _comfy_flux(shapes: dict[str, tuple[int, ...]], t5: bool = False) -> dict[str, tuple[int, int]]:
    q = shapes["transformer.transformer_blocks.0.attn.to_q"]
    modules = {
        "diffusion_model.double_blocks.0.img_attn.qkv": (3 * q[0], q[1]),
        "diffusion_model.double_blocks.0.img_attn.proj": shapes["transformer.transformer_blocks.0.attn.to_out.0"],
        "diffusion_model.img_in": shapes["transformer.x_embedder"],
        "diffusion_model.final_layer.linear": shapes["transformer.proj_out"],
    }
    if t5:
        modules["text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q"] = (8, 8)
    return modules


def test_comfy_flux_modules_that_diffusers_drops_are_named_in_a_note(tmp_path: Path) -> None:
    path = _write(tmp_path / "flux.safetensors", _comfy_flux(_layer_shapes(), t5=True))
    notes = _open(path).notes
    assert any(
        "3 module(s) that diffusers' Flux loader (0.42) does not apply (e.g. diffusion_model.final_layer.linear;" in n
        and "outside Flux's blocks" in n
        and "a text encoder other than clip_l" in n
        for n in notes
    ), notes
    theirs, ours = flux_deltas(path), clair_deltas(path)
    assert set(theirs) == {f"transformer.transformer_blocks.0.attn.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")}
    torch.testing.assert_close(
        ours["diffusion_model.double_blocks.0.img_attn.proj"], theirs["transformer.transformer_blocks.0.attn.to_out.0"]
    )


def test_a_comfy_flux_file_of_lora_a_and_lora_b_says_diffusers_applies_none_of_it(tmp_path: Path) -> None:
    path = _write(tmp_path / "flux.safetensors", _comfy_flux(_layer_shapes()), "lora_A", "lora_B")
    notes = _open(path).notes
    assert any("diffusers' Flux loader (0.42) applies none of this file's modules" in n for n in notes), notes
    assert flux_deltas(path) == {}


def test_comfy_files_diffusers_applies_whole_have_no_flux_note(tmp_path: Path) -> None:
    shapes = _layer_shapes()
    blocks = {k: v for k, v in _comfy_flux(shapes).items() if "blocks" in k}
    assert not _open(_write(tmp_path / "blocks.safetensors", blocks)).notes
    assert len(flux_deltas(tmp_path / "blocks.safetensors")) == 4
    wan = {"diffusion_model.blocks.0.self_attn.q": (8, 8), "diffusion_model.head.head": (4, 8)}
    assert not _open(_write(tmp_path / "wan.safetensors", wan)).notes
    hunyuan = {"diffusion_model.double_blocks.0.img_attn_qkv": (24, 8), "diffusion_model.img_in.proj": (8, 4)}
    assert not _open(_write(tmp_path / "hunyuan.safetensors", hunyuan, "lora_A", "lora_B")).notes


def test_sd_scripts_flux_t5_modules_are_named_in_a_note(tmp_path: Path) -> None:
    shapes = _layer_shapes()
    modules = {
        "lora_unet_double_blocks_0_img_attn_proj": shapes["transformer.transformer_blocks.0.attn.to_out.0"],
        "lora_te1_text_model_encoder_layers_0_mlp_fc1": shapes["text_encoder.encoder.layers.0.mlp.fc1"],
        "lora_te3_encoder_block_0_layer_0_SelfAttention_q": (8, 8),
    }
    path = _write(tmp_path / "flux.safetensors", modules)
    notes = _open(path).notes
    assert any(
        "1 T5 text-encoder module(s) (lora_te2_ / lora_te3_, e.g. lora_te3_encoder_block_0_layer_0_SelfAttention_q)"
        in n
        and "does not apply them" in n
        for n in notes
    ), notes
    assert sorted(flux_deltas(path)) == [
        "text_encoder.encoder.layers.0.mlp.fc1",
        "transformer.transformer_blocks.0.attn.to_out.0",
    ]
    del modules["lora_te3_encoder_block_0_layer_0_SelfAttention_q"]
    assert not _open(_write(tmp_path / "clip.safetensors", modules)).notes


# 2. diffusers' HunyuanVideo loader swaps the halves of final_layer.adaLN_modulation.1's lora_A rows too.


def _tiny_hunyuan():
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    return HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=1,
        patch_size_t=1,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 2, 4),
    )


def _hunyuan_deltas(path: Path) -> dict[str, torch.Tensor]:
    """What diffusers' HunyuanVideo loader adds to each layer of a tiny transformer, by module."""
    from diffusers.loaders import HunyuanVideoLoraLoaderMixin

    return transformer_lora_deltas(HunyuanVideoLoraLoaderMixin, _tiny_hunyuan(), path)


def _hunyuan_file(path: Path, r: int) -> Path:
    shapes = {n: tuple(m.weight.shape) for n, m in _tiny_hunyuan().named_modules() if isinstance(m, torch.nn.Linear)}
    q = shapes["transformer_blocks.0.attn.to_q"]
    modules = {
        "diffusion_model.double_blocks.0.img_attn_qkv": (3 * q[0], q[1]),
        "diffusion_model.final_layer.adaLN_modulation.1": shapes["norm_out.linear"],
    }
    return _write(path, modules, "lora_A", "lora_B", r=r)


@pytest.mark.parametrize("r", [2, 3])
def test_a_hunyuan_final_modulation_module_diffusers_applies_otherwise_is_refused(r: int, tmp_path: Path) -> None:
    path = _hunyuan_file(tmp_path / "hunyuan.safetensors", r)
    tensors = load_file(str(path))
    name = "diffusion_model.final_layer.adaLN_modulation.1"
    comfy = tensors[f"{name}.lora_B.weight"] @ tensors[f"{name}.lora_A.weight"]  # what ComfyUI applies
    shift, scale = comfy.chunk(2)
    theirs = _hunyuan_deltas(path)["norm_out.linear"]
    assert not torch.allclose(theirs, torch.cat([scale, shift]), atol=1e-4)  # not ComfyUI's update, swapped
    refused(invoke("inspect", str(path)), "final_layer.adaLN_modulation.1", "HunyuanVideo loader", "rank")


def test_a_rank_one_hunyuan_final_modulation_module_and_a_flux_one_are_read(tmp_path: Path) -> None:
    path = _hunyuan_file(tmp_path / "hunyuan.safetensors", 1)
    assert "diffusion_model.final_layer.adaLN_modulation.1" in clair_deltas(path)  # as ComfyUI applies it
    with pytest.raises(ValueError):  # diffusers' swap cannot split one row: it refuses the file
        _hunyuan_deltas(path)
    name = "diffusion_model.final_layer.adaLN_modulation.1"
    flux = {"diffusion_model.double_blocks.0.img_attn.qkv": (24, 8), name: (8, 8)}  # Flux's names: no HunyuanVideo qkv
    assert name in _open(_write(tmp_path / "flux.safetensors", flux)).modules
