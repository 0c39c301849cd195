"""Every local source form resolves to the right adapters, names and factors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import MODULES, lora_config, random_factors, write_adapter
from safetensors.torch import save_file

from clair_cli.errors import AdapterFormatError, AdapterNotFound, UnsafeFormatError, UsageError
from clair_cli.io import SourceOptions, open_adapters, resolve_sources


def test_directory_of_adapters_is_sorted_and_named_by_relative_path(pool_dir: Path) -> None:
    refs = resolve_sources([str(pool_dir)])
    assert [r.name for r in refs] == ["a", "b", "nested/c"]
    assert all(r.revision is None for r in refs)


def test_single_adapter_directory_is_named_by_its_folder(pool_dir: Path) -> None:
    (ref,) = resolve_sources([str(pool_dir / "a")])
    assert ref.name == "a"


def test_sources_keep_the_order_given(pool_dir: Path) -> None:
    refs = resolve_sources([str(pool_dir / "b"), str(pool_dir / "a")])
    assert [r.name for r in refs] == ["b", "a"]


def test_factors_and_scale_match_the_file(pool_dir: Path) -> None:
    (adapter,) = open_adapters([str(pool_dir / "a")])
    tensors = random_factors(MODULES, seed=1)
    assert list(adapter.modules) == sorted(MODULES)
    for module in adapter.load():
        assert module.scale == 2.0
        torch.testing.assert_close(module.A, tensors[f"base_model.model.{module.name}.lora_A.weight"])
        torch.testing.assert_close(module.B, tensors[f"base_model.model.{module.name}.lora_B.weight"])


def test_load_selected_modules_in_order(pool_dir: Path) -> None:
    (adapter,) = open_adapters([str(pool_dir / "a")])
    names = ["model.layers.1.self_attn.v_proj", "model.layers.0.self_attn.q_proj"]
    assert [m.name for m in adapter.load(names)] == names


def test_single_safetensors_with_config_beside(tmp_path: Path) -> None:
    write_adapter(tmp_path / "x")
    (adapter,) = open_adapters([str(tmp_path / "x" / "adapter_model.safetensors")])
    assert adapter.name == "x"
    assert adapter.base_model == "clair-test/tiny-base"


def test_single_safetensors_described_by_flags(tmp_path: Path) -> None:
    tensors = random_factors(MODULES, r=4)
    tensors.update(random_factors({"model.layers.2.mlp.up_proj": (8, 12)}, r=2, seed=5))
    save_file(tensors, tmp_path / "lora.safetensors")
    with pytest.raises(AdapterFormatError, match="no adapter_config.json beside it"):
        open_adapters([str(tmp_path / "lora.safetensors")])
    (adapter,) = open_adapters(
        [str(tmp_path / "lora.safetensors")], SourceOptions(lora_alpha=16, base_model="base/x", use_rslora=True)
    )
    assert adapter.name == "lora" and adapter.base_model == "base/x"
    scales = {m.name: m.scale for m in adapter.modules.values()}
    assert scales["model.layers.0.self_attn.q_proj"] == pytest.approx(16 / 2.0)
    assert scales["model.layers.2.mlp.up_proj"] == pytest.approx(16 / 2**0.5)


def test_single_safetensors_with_config_flag(tmp_path: Path) -> None:
    save_file(random_factors(MODULES), tmp_path / "lora.safetensors")
    (tmp_path / "cfg.json").write_text(json.dumps(lora_config(lora_alpha=2)))
    (adapter,) = open_adapters([str(tmp_path / "lora.safetensors")], SourceOptions(config=tmp_path / "cfg.json"))
    assert {m.scale for m in adapter.modules.values()} == {0.5}


def test_hand_made_keys_without_peft_prefix_and_with_adapter_name(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "layers.0.q.lora_A.default.weight": torch.randn(4, 6, generator=g),
        "layers.0.q.lora_B.default.weight": torch.randn(5, 4, generator=g),
    }
    write_adapter(tmp_path / "x", tensors, lora_config())
    (adapter,) = open_adapters([str(tmp_path / "x")])
    assert list(adapter.modules) == ["layers.0.q"]


@pytest.mark.parametrize("name", ["adapter_model.bin", "weights.pt", "model.ckpt"])
def test_pickle_files_are_refused_unopened(tmp_path: Path, name: str) -> None:
    d = tmp_path / "p"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps(lora_config()))
    (d / name).write_bytes(b"\x80\x04 this would be a pickle")
    target = d if name == "adapter_model.bin" else d / name
    with pytest.raises(UnsafeFormatError, match="pickle checkpoints are never loaded") as info:
        resolve_sources([str(target)])
    assert "safetensors" in (info.value.hint or "")


def test_directory_with_only_pickles_is_refused(tmp_path: Path) -> None:
    (tmp_path / "pool" / "c1").mkdir(parents=True)
    (tmp_path / "pool" / "c1" / "model.pt").write_bytes(b"\x80\x04")
    with pytest.raises(UnsafeFormatError):
        resolve_sources([str(tmp_path / "pool")])


def test_symlink_leading_outside_the_source_directory_is_read(tmp_path: Path) -> None:
    # A link to a regular file is read as that file, through the bounded reader (the layout of
    # a Hugging Face cache snapshot, and of a pool assembled from links).
    outside = write_adapter(tmp_path / "outside")
    pool = tmp_path / "pool"
    (pool / "linked").mkdir(parents=True)
    shutil.copy(outside / "adapter_config.json", pool / "linked" / "adapter_config.json")
    os.symlink(outside / "adapter_model.safetensors", pool / "linked" / "adapter_model.safetensors")
    (ref,) = resolve_sources([str(pool)])
    assert ref.name == "linked" and ref.path == os.path.join(str(pool), "linked")


def test_one_file_read_as_two_adapters_is_refused(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    real = write_adapter(pool / "real")
    (pool / "alias").mkdir()
    shutil.copy(real / "adapter_config.json", pool / "alias" / "adapter_config.json")
    os.symlink(real / "adapter_model.safetensors", pool / "alias" / "adapter_model.safetensors")
    with pytest.raises(UsageError, match="'?alias'? and '?real'? are the same file|alias and real are the same file"):
        resolve_sources([str(pool)])


def test_duplicate_names_are_refused(pool_dir: Path) -> None:
    with pytest.raises(UsageError, match="both named 'a'"):
        resolve_sources([str(pool_dir / "a"), str(pool_dir / "a")])


def test_missing_path_and_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(AdapterNotFound, match="no such file or directory"):
        resolve_sources([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterNotFound, match="no adapter found"):
        resolve_sources([str(tmp_path / "empty")])


def test_hidden_directories_are_skipped(tmp_path: Path) -> None:
    write_adapter(tmp_path / "pool" / ".cache" / "x")
    write_adapter(tmp_path / "pool" / "y")
    assert [r.name for r in resolve_sources([str(tmp_path / "pool")])] == ["y"]


def test_unsupported_parts_become_notes(tmp_path: Path) -> None:
    tensors = random_factors(MODULES)
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"] = torch.zeros(16)
    tensors["base_model.model.lm_head.weight"] = torch.zeros(3, 3)
    write_adapter(tmp_path / "x", tensors, lora_config(modules_to_save=["lm_head"], lora_bias=True))
    (adapter,) = open_adapters([str(tmp_path / "x")])
    assert len(adapter.modules) == 4
    assert any("LoRA bias in 1 module" in n for n in adapter.notes)
    assert any("lm_head.weight" in n for n in adapter.notes)


def test_lora_alpha_and_rslora_say_where_a_config_gives_the_scale(tmp_path: Path) -> None:
    """--lora-alpha and --rslora describe adapter files without a config; beside an adapter_config.json
    (or --config) they were silently not applied (a review, 2026-12-07): the adapter's note says so."""
    write_adapter(tmp_path / "a", random_factors(MODULES, seed=0), lora_config(lora_alpha=8))
    save_file(random_factors(MODULES, seed=1), str(tmp_path / "bare.safetensors"))
    plain = open_adapters([str(tmp_path / "a")])[0]
    (a,) = open_adapters([str(tmp_path / "a")], SourceOptions(lora_alpha=100.0, use_rslora=True))
    assert a.config.scale_for(next(iter(plain.modules))) == plain.config.scale_for(next(iter(plain.modules)))
    (note,) = [n for n in a.notes if "not applied" in n]
    assert (
        note.startswith("--lora-alpha 100 and --rslora not applied: its scale is the one ")
        and "a/adapter_config.json" in note
    )
    (bare,) = open_adapters([str(tmp_path / "bare.safetensors")], SourceOptions(lora_alpha=100.0))
    assert not any("not applied" in n for n in bare.notes)  # a file without a config takes them
    (one,) = open_adapters([str(tmp_path / "a")], SourceOptions(lora_alpha=100.0))
    assert any(n.startswith("--lora-alpha 100 not applied:") and "it describes" in n for n in one.notes)
