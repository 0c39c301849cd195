"""Diffusion LoRA files found misread by a ninth review from outside (diffusion layouts): each
is now read as the loader that applies it reads it, or refused with the file and the problem named."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from clair_cli.cli import app
from clair_cli.io.sources import SourceOptions, open_adapter, resolve_sources

CLIP_FC1 = "text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1"


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env={"NO_COLOR": "1", "COLUMNS": "200"})


def _open(path: Path, **options):
    (ref,) = resolve_sources([str(path)], SourceOptions(**options))
    return open_adapter(ref, SourceOptions(**options))


def test_a_comfyui_text_encoder_lora_alone_is_read_with_its_alphas(tmp_path: Path) -> None:
    """ComfyUI's LoraSave given only a text encoder's difference writes every key under text_encoders.:
    read as a ComfyUI file (alpha / rank, as ComfyUI applies it), not as a bare PEFT file whose alpha
    tensors are left out (scale 1 with --lora-alpha, which named no alpha of the file)."""
    g = torch.Generator().manual_seed(0)
    for spelling in (("lora_A", "lora_B"), ("lora_down", "lora_up")):
        path = tmp_path / f"te_{spelling[0]}.safetensors"
        save_file(
            {
                f"{CLIP_FC1}.{spelling[0]}.weight": torch.randn(2, 8, generator=g),
                f"{CLIP_FC1}.{spelling[1]}.weight": torch.randn(8, 2, generator=g),
                f"{CLIP_FC1}.alpha": torch.tensor(16.0),
            },
            str(path),
        )
        adapter = _open(path)  # no config, no --lora-alpha needed
        assert adapter.layout == "comfyui"
        assert adapter.modules[CLIP_FC1].scale == 8.0
        assert _open(path, lora_alpha=2.0).modules[CLIP_FC1].scale == 8.0  # the file's own alpha
        result = invoke("inspect", str(path), "--json", "-")
        assert result.exit_code == 0, result.output
        (shown,) = json.loads(result.output)["adapters"]
        assert shown["layout"] == "comfyui" and shown["modules"][0]["scale"] == 8.0


HUNYUAN_FINAL = "diffusion_model.final_layer.adaLN_modulation.1"


def test_a_merge_never_writes_a_hunyuan_final_modulation_module_clair_refuses_to_read(tmp_path: Path) -> None:
    """Rank-1 final_layer.adaLN_modulation.1 modules of HunyuanVideo ComfyUI files are read (diffusers refuses
    such a file, ComfyUI applies B @ A); their mean is of a higher rank, which diffusers' loader applies
    otherwise (it swaps lora_A's rank rows) and clair refuses to read. The merge used to write it (exit 0);
    it now refuses (exit 2, nothing written), and writes it at --merge-rank 1."""
    pool = tmp_path / "pool"
    pool.mkdir()
    g = torch.Generator().manual_seed(0)
    for k in range(6):
        tensors = {}
        for module, (d_out, d_in) in {
            "diffusion_model.double_blocks.0.img_attn_qkv": (24, 8),
            HUNYUAN_FINAL: (16, 8),
        }.items():
            tensors[f"{module}.lora_A.weight"] = torch.randn(1, d_in, generator=g)
            tensors[f"{module}.lora_B.weight"] = torch.randn(d_out, 1, generator=g)
        save_file(tensors, str(pool / f"h{k}.safetensors"))
    out = tmp_path / "out"
    result = invoke("merge", str(pool), "--method", "mean", "--out", str(out), "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert HUNYUAN_FINAL in result.output and "nothing was written" in result.output
    assert not out.exists()
    result = invoke("merge", str(pool), "--method", "mean", "--merge-rank", "1", "--out", str(out), "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert invoke("inspect", str(out)).exit_code == 0  # clair reads what it wrote


def test_a_subnormal_alpha_is_named_as_stored(tmp_path: Path) -> None:
    """An alpha of 1e-44 (a subnormal float32) was refused as "is 0.0": the commands flush subnormal
    numbers to zero, its conversion included. The refusal names what the file stores."""
    path = tmp_path / "k.safetensors"
    module = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file(
        {
            f"{module}.lora_down.weight": torch.randn(2, 8),
            f"{module}.lora_up.weight": torch.randn(8, 2),
            f"{module}.alpha": torch.tensor(1e-44),
        },
        str(path),
    )
    result = invoke("inspect", str(path))
    assert result.exit_code == 2, result.output
    assert "subnormal" in result.output and "is 0.0" not in result.output
