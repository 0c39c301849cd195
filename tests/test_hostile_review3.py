"""Diffusion LoRA files (kohya / diffusers) found wrong by a third review from outside: a corrupt
file reported as a missing config, LoRA files skipped silently, diffusers layouts not recognised,
a false note, stale metadata in outputs, per-component rsLoRA refused, one module under two
spellings audited twice, and odd tensors treated unlike the docs say. Each is now exit 2 with a
message naming the file and the problem, a note that holds, or the right result."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from helpers import MODULES, random_factors, write_adapter
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_diffusion_formats import (
    RANK,
    TE_TARGETS,
    UNET_TARGETS,
    _same,
    clair_deltas,
    fused_deltas,
    layers_of,
    pool_factors,
    tiny_pipeline,
    write_kohya,
)
from test_hostile_review import invoke, refused

from clair_cli.io.diffusion import KOHYA_ALPHAS_NOTE, layout_of
from clair_cli.io.safetensors_file import TensorInfo
from clair_cli.io.sources import open_adapter, resolve_sources


def _kohya(path: Path, alpha: float | None = 4.0, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "lora_unet_x_to_q.lora_down.weight": torch.randn(4, 8, generator=g),
        "lora_unet_x_to_q.lora_up.weight": torch.randn(8, 4, generator=g),
    }
    if alpha is not None:
        tensors["lora_unet_x_to_q.alpha"] = torch.tensor(alpha)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def _open(path: Path):
    return open_adapter(resolve_sources([str(path)])[0])


# 1. A corrupt kohya / diffusers file was "no adapter_config.json beside it" (the header error swallowed).


def test_a_corrupt_diffusion_file_is_reported_as_corrupt_not_as_lacking_a_config(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    for k in range(5):
        _kohya(pool / f"s{k}.safetensors", seed=k)
    truncated = pool / "s4.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:-20])  # an interrupted download
    huge = tmp_path / "huge.safetensors"  # a header that declares 1 TiB
    entry = {"lora_unet_x_to_q.alpha": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}
    huge.write_bytes(struct.pack("<Q", 1 << 40) + json.dumps(entry).encode() + b"\0" * 4)
    # One tensor name twice (Python's json keeps the last entry, other readers the first).
    dup = tmp_path / "dup.safetensors"
    one = '{"dtype":"F32","shape":[],"data_offsets":[0,4]}'
    header = (
        '{"lora_unet_x_to_q.lora_down.weight":{"dtype":"F32","shape":[1,1],"data_offsets":[4,8]},'
        '"lora_unet_x_to_q.lora_up.weight":{"dtype":"F32","shape":[1,1],"data_offsets":[8,12]},'
        f'"lora_unet_x_to_q.alpha":{one},"lora_unet_x_to_q.alpha":{one}}}'
    ).encode()
    dup.write_bytes(struct.pack("<Q", len(header)) + header + struct.pack("<3f", 1.0, 1.0, 1.0))
    for args, words in (
        (["inspect", str(truncated)], ["s4.safetensors", "truncated"]),
        (["audit", str(pool), "--device", "cpu"], ["s4.safetensors", "truncated"]),
        (["inspect", str(huge)], ["huge.safetensors", "header length", "not a safetensors file"]),
        (["inspect", str(dup)], ["dup.safetensors", "'lora_unet_x_to_q.alpha' twice"]),
    ):
        result = invoke(*args)
        refused(result, *words)
        assert "adapter_config.json" not in result.stderr, result.stderr


# 2. Loose LoRA files beside an adapter directory were skipped silently.


def test_loose_lora_files_beside_adapter_directories_are_refused_not_skipped(tmp_path: Path) -> None:
    loras = tmp_path / "loras"
    for k in range(6):
        _kohya(loras / f"style_{k}.safetensors", seed=k)
    _kohya(loras / "merged" / "pytorch_lora_weights.safetensors", seed=9)  # e.g. an earlier merge, kept beside
    result = invoke("audit", str(loras), "--device", "cpu")
    refused(result, "6 LoRA files", "style_0.safetensors", "beside its adapter directories", "merged")
    assert "loras/merged" in result.stderr and "loras/style_0.safetensors" in result.stderr  # what to name instead
    result = invoke("inspect", str(loras))
    assert result.exit_code == 2 and "7 adapters, 6 unreadable" in result.output, result.output
    # Each file named on its own (or the folder alone) is read.
    assert invoke("inspect", str(loras / "style_0.safetensors"), str(loras / "merged")).exit_code == 0
    # A base model's weights beside PEFT adapters (no LoRA tensor names) are still not adapters.
    pool = tmp_path / "pool"
    for k in range(5):
        write_adapter(pool / f"client_{k}", random_factors(MODULES, seed=k))
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.randn(16, 12)}, str(pool / "model.safetensors"))
    result = invoke("inspect", str(pool))
    assert result.exit_code == 0 and "5 adapters" in result.output, result.output


# 3. diffusers files whose transformer modules are not under "transformer_blocks." were not diffusers files.

LAYOUTS = {
    "Wan": (["transformer.blocks.0.attn1.to_q.lora_A.weight", "transformer.blocks.0.attn1.to_q.lora_B.weight"], 1),
    "Wan ffn": (["transformer.blocks.0.ffn.net.0.proj.lora_A.weight"], 1),
    "Lumina2": (["transformer.layers.0.attention.to_q.lora_A.weight"], 1),
    "HiDream": (["transformer.double_stream_blocks.0.block.attn1.to_q.lora_A.weight"], 1),
    "Flux embedders": (["transformer.x_embedder.lora_A.weight", "transformer.proj_out.lora_B.weight"], 1),
    "Stable Cascade prior": (["prior.down_blocks.0.0.attention.attn.to_q.lora_A.weight"], 1),
    # LLM module paths under "transformer." stay PEFT (stripped keys): GPT-2, MPT / DBRX, OpenELM, ChatGLM.
    "GPT-2": (["transformer.h.0.attn.c_attn.lora_A.weight"], 0),
    "MPT": (["transformer.blocks.0.attn.Wqkv.lora_A.weight", "transformer.blocks.0.ffn.up_proj.lora_B.weight"], 0),
    "OpenELM": (["transformer.layers.0.attn.qkv_proj.lora_A.weight"], 0),
    "ChatGLM": (["transformer.encoder.layers.0.self_attention.query_key_value.lora_A.weight"], 0),
    "PEFT": (["base_model.model.transformer.blocks.0.attn1.to_q.lora_A.weight"], 0),
}


@pytest.mark.parametrize("case", sorted(LAYOUTS))
def test_diffusers_files_are_told_by_their_structure(case: str, tmp_path: Path) -> None:
    keys, diffusers = LAYOUTS[case]
    tensors = {k: TensorInfo(k, "F32", (4, 4), 64) for k in keys}
    assert layout_of(Path("x.safetensors"), tensors, {}) == ("diffusers" if diffusers else "peft")
    if case == "Wan":  # read without a config, as diffusers' WanPipeline.save_lora_weights writes it
        path = tmp_path / "wan.safetensors"
        g = torch.Generator().manual_seed(0)
        save_file({k: torch.randn(4, 8, generator=g) if "lora_A" in k else torch.randn(8, 4) for k in keys}, path)
        adapter = _open(path)
        assert adapter.layout == "diffusers" and {m.scale for m in adapter.modules.values()} == {1.0}


# 4. "alphas differ between modules" on a kohya file that stores no alpha (alpha = rank everywhere).


def test_the_kohya_alphas_note_compares_only_alphas_the_file_stores(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, rank in (("lora_unet_a_to_q", 4), ("lora_unet_b_to_q", 8)):
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, 8, generator=g)
        tensors[f"{name}.lora_up.weight"] = torch.randn(8, rank, generator=g)
    no_alphas = tmp_path / "merged.safetensors"  # as clair's own merge of modules of two ranks writes it
    save_file(tensors, str(no_alphas))
    adapter = _open(no_alphas)
    assert {m.scale for m in adapter.modules.values()} == {1.0}
    assert KOHYA_ALPHAS_NOTE not in adapter.notes, adapter.notes
    stored = tmp_path / "stored.safetensors"
    save_file(
        {**tensors, "lora_unet_a_to_q.alpha": torch.tensor(4.0), "lora_unet_b_to_q.alpha": torch.tensor(8.0)}, stored
    )
    assert KOHYA_ALPHAS_NOTE in _open(stored).notes
    # Some modules without an alpha: diffusers gives them the file's stored alpha (4 here, not b's rank 8).
    partial = tmp_path / "partial.safetensors"
    save_file({**tensors, "lora_unet_a_to_q.alpha": torch.tensor(4.0)}, partial)
    notes = _open(partial).notes
    assert KOHYA_ALPHAS_NOTE not in notes and any("store no alpha (e.g. lora_unet_b_to_q)" in n for n in notes)
    save_file({**tensors, "lora_unet_a_to_q.alpha": torch.tensor(8.0)}, partial)  # 8 = b's rank: the same scale
    assert _open(partial).notes == []


# 5. refine copied sd-scripts' content hashes of the source; merge dropped the base model's metadata.


def test_outputs_drop_stale_content_hashes_and_keep_the_agreed_base_model_metadata(tmp_path: Path) -> None:
    layers = {"unet": {"a.to_q": (16, 12), "a.to_k": (16, 12), "b.to_v": (16, 12)}}
    pool = tmp_path / "pool"
    for k, factors in enumerate(pool_factors(layers)[:6]):
        path = write_kohya(pool / f"s{k}.safetensors", factors, 4.0)
        metadata = {
            "ss_base_model_version": "sdxl_base_v1-0",
            "ss_network_module": "networks.lora",
            "ss_network_dim": "4",
            "ss_output_name": f"style{k}",  # differs between inputs
            "sshs_model_hash": f"{k:064x}",
            "sshs_legacy_hash": f"{k:08x}",
            "modelspec.hash_sha256": f"0x{k:064x}",
            "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        }
        save_file(load_file(str(path)), str(path), metadata)
    assert invoke("refine", str(pool), "--out", str(tmp_path / "r"), "--device", "cpu", "--exit-zero").exit_code == 0
    refined = sorted((tmp_path / "r").glob("*/pytorch_lora_weights.safetensors"))
    assert refined
    for file in refined:
        meta = safe_open(str(file), "pt").metadata()
        assert not any(k.startswith("sshs_") or k == "modelspec.hash_sha256" for k in meta), meta
        assert (
            meta["ss_base_model_version"] == "sdxl_base_v1-0"
            and meta["ss_output_name"] == f"style{file.parent.name[1:]}"
        )
    result = invoke("merge", str(pool), "--out", str(tmp_path / "m"), "--device", "cpu", "--exit-zero")
    assert result.exit_code == 0, result.output
    meta = safe_open(str(tmp_path / "m" / "pytorch_lora_weights.safetensors"), "pt").metadata()
    assert meta == {
        "format": "pt",
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_network_module": "networks.lora",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
    }


# 6. diffusers metadata whose components differ on use_rslora was refused; diffusers applies each.


def test_components_that_differ_on_rslora_are_read_as_diffusers_applies_them(tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    factors = pool_factors(layers_of(tiny_pipeline()))[0]
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for module, (a, b) in factors.items():
        component, _, path = module.partition(".")
        layers.setdefault(component, {})[f"{path}.lora_A.weight"] = a.contiguous()
        layers[component][f"{path}.lora_B.weight"] = b.contiguous()
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "lora",
        unet_lora_layers=layers["unet"],
        text_encoder_lora_layers=layers["text_encoder"],
        unet_lora_adapter_metadata=LoraConfig(
            r=RANK, lora_alpha=8, use_rslora=True, target_modules=list(UNET_TARGETS)
        ).to_dict(),
        text_encoder_lora_adapter_metadata=LoraConfig(r=RANK, lora_alpha=8, target_modules=list(TE_TARGETS)).to_dict(),
        safe_serialization=True,
    )
    adapter = _open(tmp_path / "lora")
    scales = {m.split(".", 1)[0]: spec.scale for m, spec in adapter.modules.items()}
    assert scales == {"unet": 8 / RANK**0.5, "text_encoder": 8 / RANK}
    assert any("differ on use_rslora" in n for n in adapter.notes), adapter.notes
    _same(clair_deltas(tmp_path / "lora"), fused_deltas(tmp_path / "lora"))


# 7. One SD 1.x text-encoder module under two spellings (lora_te_ and lora_te1_) was audited as two.


def test_one_kohya_module_under_two_spellings_is_refused(tmp_path: Path) -> None:
    path = _kohya(tmp_path / "twice.safetensors")
    tensors = load_file(str(path))
    for spelling in ("lora_te_", "lora_te1_"):
        tensors[f"{spelling}text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.randn(4, 8)
        tensors[f"{spelling}text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.randn(8, 4)
    save_file(tensors, str(path))
    refused(
        invoke("inspect", str(path)),
        "twice.safetensors",
        "'lora_te_text_model_encoder_layers_0_mlp_fc1'",
        "'lora_te1_text_model_encoder_layers_0_mlp_fc1'",
        "first text encoder",
    )


# 8. A float8 alpha was "must be one number"; LyCORIS tensors under diffusers' names were only a note.


@pytest.mark.parametrize(
    "extra, words",
    [
        ({"lora_unet_x_to_q.alpha": torch.tensor(4.0).to(torch.float8_e4m3fn)}, ["has dtype F8_E4M3"]),
        ({"unet.x.conv.lora_mid.weight": torch.randn(4, 4, 3, 3)}, ["'unet.x.conv.lora_mid.weight'", "Tucker"]),
        ({"unet.x.to_q.diff": torch.randn(8, 8)}, ["'unet.x.to_q.diff'", "full weight difference"]),
        ({"unet.x.to_q.diff_b": torch.randn(8)}, ["'unet.x.to_q.diff_b'", "full weight difference"]),
    ],
)
def test_odd_alphas_and_lycoris_tensors_under_diffusers_names_are_refused(
    extra: dict[str, torch.Tensor], words: list[str], tmp_path: Path
) -> None:
    path = tmp_path / "odd.safetensors"
    if next(iter(extra)).startswith("lora_unet_"):
        _kohya(path, alpha=None)
    else:
        save_file(
            {"unet.x.to_q.lora_A.weight": torch.randn(4, 8), "unet.x.to_q.lora_B.weight": torch.randn(8, 4)}, path
        )
    save_file({**load_file(str(path)), **extra}, str(path))
    result = invoke("inspect", str(path))
    refused(result, "odd.safetensors", *words)
    assert "must be one number" not in result.stderr
