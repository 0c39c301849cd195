"""A differential review of how clair reads and writes kohya / sd-scripts LoRA files against what
sd-scripts applies (networks/lora.py ``create_network_from_weights`` and ``LoRAModule``, networks/merge_lora.py
``merge_to_sd_model``, networks/lora_flux.py).

sd-scripts reads a module's ``lora_down``, ``lora_up`` and ``alpha`` and applies
``multiplier * alpha / dim * up @ down`` (``dim`` = ``lora_down.shape[0]``, ``alpha = dim`` where the file
stores none); clair reads the same update (:func:`sd_scripts_deltas` below reimplements those lines).

1. A kohya file with textual-inversion embeddings bundled beside its LoRA (``bundle_emb.<name>.<vector>``,
   as A1111 reads them and OneTrainer writes them) was refused as a file that mixes layouts, though sd-scripts
   (``create_network_from_weights`` reads ``lora_down`` and ``alpha`` keys alone and ``load_weights`` loads
   non-strictly) and ComfyUI (a "lora key not loaded" warning) apply its LoRA, and A1111 loads both: now read,
   the embeddings kept and not analysed (a merge needs ``--drop-extras``; refine keeps them).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from clair_cli.cli import app
from clair_cli.io.sources import SourceOptions, open_adapter, resolve_sources


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env={"NO_COLOR": "1", "COLUMNS": "200"})


def clair_deltas(source: Path) -> dict[str, torch.Tensor]:
    (ref,) = resolve_sources([str(source)], SourceOptions())
    return {m.name: m.delta_weight() for m in open_adapter(ref, SourceOptions()).load()}


def sd_scripts_deltas(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What sd-scripts adds to each weight at multiplier 1: create_network_from_weights (networks/lora.py, the
    module name is the key before its first ".", alpha = dim where none is stored), LoRAModule.__init__ (alpha 0
    also means dim; scale = alpha / lora_dim) and merge_to's linear, 1x1 and 3x3 conv branches."""
    out = {}
    for key, down in sd.items():
        if "." not in key or "lora_down" not in key:
            continue
        name = key.split(".")[0]
        up = sd[key.replace("lora_down", "lora_up")].float()
        down = down.float()
        dim = down.size(0)
        alpha = sd.get(name + ".alpha")
        alpha = dim if alpha is None or float(alpha.reshape(-1)[0]) == 0 else float(alpha.float().reshape(-1)[0])
        if down.dim() == 2:
            delta = up @ down
        elif down.shape[2:4] == (1, 1):
            delta = (up.squeeze(3).squeeze(2) @ down.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3)
        else:
            delta = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
        out[name] = delta * (alpha / dim)
    return out


def _lora(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "lora_unet_a_to_q.lora_down.weight": torch.randn(4, 8, generator=g),
        "lora_unet_a_to_q.lora_up.weight": torch.randn(6, 4, generator=g),
        "lora_unet_a_to_q.alpha": torch.tensor(2.0),
        "lora_unet_b_conv1.lora_down.weight": torch.randn(2, 5, 3, 3, generator=g),
        "lora_unet_b_conv1.lora_up.weight": torch.randn(7, 2, 1, 1, generator=g),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(3, 8, generator=g),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(16, 3, generator=g),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0, dtype=torch.bfloat16),
    }


BUNDLE = {"bundle_emb.mytoken.clip_l": torch.randn(2, 8), "bundle_emb.mytoken.clip_g": torch.randn(2, 16)}


def _same(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(theirs)
    for name, delta in ours.items():
        torch.testing.assert_close(delta.float(), theirs[name], rtol=1e-5, atol=1e-6, msg=name)


ALPHAS = {
    "float32": torch.tensor(3.0),
    "float16": torch.tensor(3.0, dtype=torch.float16),
    "bfloat16": torch.tensor(0.1, dtype=torch.bfloat16),
    "int64": torch.tensor(3),  # svd_merge_lora.py's torch.tensor(module_new_rank) saved without --save_precision
    "1-element": torch.tensor([3.0]),
    "1x1": torch.tensor([[3.0]]),
    "none": None,
}


@pytest.mark.parametrize("alpha", sorted(ALPHAS))
def test_kohya_updates_equal_what_sd_scripts_applies(alpha: str, tmp_path: Path) -> None:
    tensors = {k: v for k, v in _lora().items() if not k.endswith(".alpha")}
    if ALPHAS[alpha] is not None:
        for key in [k for k in tensors if k.endswith(".lora_down.weight")]:
            tensors[key.replace(".lora_down.weight", ".alpha")] = ALPHAS[alpha].clone()
    path = tmp_path / "plain.safetensors"
    save_file(tensors, str(path))
    _same(clair_deltas(path), sd_scripts_deltas(load_file(str(path))))


def test_bundled_embeddings_are_kept_beside_the_lora(tmp_path: Path) -> None:
    path = tmp_path / "bundled.safetensors"
    save_file({**_lora(), **BUNDLE}, str(path))
    result = invoke("inspect", str(path))
    assert result.exit_code == 0, result.output
    assert "2 bundled embedding tensors" in result.output and "bundle_emb.mytoken.clip_l" in result.output
    (ref,) = resolve_sources([str(path)], SourceOptions())
    adapter = open_adapter(ref, SourceOptions())
    assert adapter.layout == "kohya"
    assert adapter.extras == {"bundled textual-inversion embeddings": sorted(BUNDLE)}
    # sd-scripts applies the LoRA alone (create_network_from_weights reads lora_down / alpha keys only)
    _same(clair_deltas(path), sd_scripts_deltas(load_file(str(path))))


def test_a_merge_of_bundled_files_drops_the_embeddings_only_when_asked(tmp_path: Path) -> None:
    paths = []
    for k in range(5):
        path = tmp_path / f"in{k}.safetensors"
        save_file({**_lora(k), **(BUNDLE if k < 2 else {})}, str(path))
        paths.append(str(path))
    refused = invoke("merge", *paths, "-o", str(tmp_path / "m"), "-m", "mean")
    assert refused.exit_code == 2, refused.output
    assert "bundled textual-inversion embeddings" in refused.output and "--drop-extras" in refused.output
    merged = invoke("merge", *paths, "-o", str(tmp_path / "m"), "-m", "mean", "--drop-extras")
    assert merged.exit_code == 0, merged.output
    out = load_file(str(tmp_path / "m" / "pytorch_lora_weights.safetensors"))
    assert not any(k.startswith("bundle_emb.") for k in out)
    mean = {}
    for p in paths:
        for name, delta in sd_scripts_deltas(load_file(p)).items():
            mean[name] = mean.get(name, 0) + delta / len(paths)
    theirs = sd_scripts_deltas(out)
    assert sorted(theirs) == sorted(mean)
    for name, delta in theirs.items():
        torch.testing.assert_close(delta, mean[name], rtol=1e-4, atol=1e-5, msg=name)
    refined = invoke("refine", *paths, "-o", str(tmp_path / "r"), "--exit-zero")
    assert refined.exit_code == 0, refined.output
    with safe_open(str(tmp_path / "r" / "in0" / "pytorch_lora_weights.safetensors"), "pt") as f:
        for key, value in BUNDLE.items():
            assert torch.equal(f.get_tensor(key), value)


@pytest.mark.parametrize("key", ["bundle_emb.mytoken", "bundle_emb..clip_l"])
def test_a_malformed_bundled_embedding_is_refused(key: str, tmp_path: Path) -> None:
    path = tmp_path / "odd.safetensors"
    save_file({**_lora(), key: torch.randn(2, 8)}, str(path))
    result = invoke("inspect", str(path))
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[0]
    assert line.startswith("Error: ") and "odd.safetensors" in line and key in line, result.output


def _split_qkv_module(dim: int, splits: list[int], d_in: int, g: torch.Generator):
    """A module as sd-scripts' split_qkv trains it (a LoRA of rank ``dim`` per part of the output) and as its
    LoRANetwork.state_dict saves it (networks/lora_flux.py): lora_down the parts' downs stacked, lora_up
    block-diagonal."""
    downs = [torch.randn(dim, d_in, generator=g) for _ in splits]
    ups = [torch.randn(s, dim, generator=g) for s in splits]
    up = torch.zeros(sum(splits), dim * len(splits))
    i = 0
    for j, s in enumerate(splits):
        up[i : i + s, j * dim : (j + 1) * dim] = ups[j]
        i += s
    # LoRAModule.forward: cat(lora_up[i](lora_down[i](x))) * scale
    trained = torch.cat([u @ d for u, d in zip(ups, downs, strict=True)])
    return torch.cat(downs), up, trained


def test_split_qkv_files_are_read_as_loaders_apply_them_with_a_note(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    dim, alpha = 2, 1.0
    qkv_down, qkv_up, qkv_trained = _split_qkv_module(dim, [4, 4, 4], 6, g)
    lin_down, lin_up, lin_trained = _split_qkv_module(dim, [4, 4, 4, 16], 6, g)
    tensors = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": qkv_down,
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": qkv_up,
        "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(alpha),
        "lora_unet_single_blocks_0_linear1.lora_down.weight": lin_down,
        "lora_unet_single_blocks_0_linear1.lora_up.weight": lin_up,
        "lora_unet_single_blocks_0_linear1.alpha": torch.tensor(alpha),
    }
    metadata = {"ss_network_module": "networks.lora_flux", "ss_network_args": '{"split_qkv": "True"}'}
    path = tmp_path / "split.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    ours = clair_deltas(path)
    _same(ours, sd_scripts_deltas(tensors))
    # a third and a quarter of what training applied (scale alpha / dim there)
    torch.testing.assert_close(ours["lora_unet_double_blocks_0_img_attn_qkv"] * 3, qkv_trained * alpha / dim)
    torch.testing.assert_close(ours["lora_unet_single_blocks_0_linear1"] * 4, lin_trained * alpha / dim)
    result = invoke("inspect", str(path))
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "split_qkv" in text and "2 fused module(s)" in text and "sd-scripts#2204" in text, result.output
    save_file(tensors, str(path), metadata={**metadata, "ss_network_args": '{"split_qkv": "False"}'})
    assert "split_qkv" not in invoke("inspect", str(path)).output
