"""MLX-LM LoRA adapters (``mlx_lm.lora``): refused with how to convert them, and the conversion
script (``examples/mlx_to_peft.py``) gives a PEFT adapter whose update, as clair reads it and as
PEFT applies it, is MLX-LM's ``scale * (lora_a @ lora_b)^T``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_cli, tiny_llama
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
MODULES = [f"model.layers.{layer}.self_attn.{p}" for layer in (0, 1) for p in ("q_proj", "v_proj")]
RANK, SCALE, WIDTH = 4, 20.0, 16


def mlx_adapter(directory: Path, seed: int, fine_tune_type: str = "lora") -> dict[str, torch.Tensor]:
    """An MLX-LM adapter directory of the tiny Llama's shapes; returns its tensors."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for m in MODULES:
        tensors[f"{m}.lora_a"] = torch.randn(WIDTH, RANK, generator=g) * 0.1
        tensors[f"{m}.lora_b"] = torch.randn(RANK, WIDTH, generator=g) * 0.01
    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "adapters.safetensors"))
    config = {
        "model": "mlx-community/tiny-llama",
        "fine_tune_type": fine_tune_type,
        "num_layers": 2,
        "lora_parameters": {"rank": RANK, "scale": SCALE, "dropout": 0.0},
    }
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return tensors


def converter():
    spec = importlib.util.spec_from_file_location("mlx_to_peft", ROOT / "examples" / "mlx_to_peft.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.convert


def test_an_mlx_adapter_directory_is_refused_with_how_to_convert_it(tmp_path: Path) -> None:
    for k in range(5):
        mlx_adapter(tmp_path / "pool" / f"c{k}", k)
    proc = run_cli("audit", str(tmp_path / "pool"), "-q")
    assert proc.returncode == 2
    assert "c0: an MLX-LM adapter (adapters.safetensors)" in proc.stderr
    assert "lora_alpha = scale * rank" in proc.stderr and "Traceback" not in proc.stderr
    # The weights file named alone, described by flags: its keys are told for MLX-LM's.
    proc = run_cli("inspect", str(tmp_path / "pool" / "c0" / "adapters.safetensors"), "--lora-alpha", "8", "-q")
    assert proc.returncode == 2
    assert "an MLX-LM adapter's tensors" in proc.stderr and "Traceback" not in proc.stderr


def test_the_converted_adapter_is_mlx_lms_update_as_clair_reads_it_and_peft_applies_it(tmp_path: Path) -> None:
    from test_merge_review import peft_deltas

    from clair_cli.io.sources import SourceOptions, open_adapters

    tensors = mlx_adapter(tmp_path / "mlx", 0)
    converter()(tmp_path / "mlx", tmp_path / "peft")
    (adapter,) = open_adapters([str(tmp_path / "peft")], SourceOptions())
    read = {m.name: (m.scale * m.B.double() @ m.A.double()).numpy() for m in adapter.load(dtype=torch.float64)}
    applied = peft_deltas(tmp_path / "peft", lambda: tiny_llama(WIDTH))
    assert sorted(read) == sorted(applied) == sorted(MODULES)
    for m in MODULES:
        expected = (SCALE * (tensors[f"{m}.lora_a"].double() @ tensors[f"{m}.lora_b"].double()).T).numpy()
        np.testing.assert_allclose(read[m], expected, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(applied[m], expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("what", ["dora", "experts"])
def test_the_converter_refuses_what_is_not_a_plain_lora(tmp_path: Path, what: str) -> None:
    tensors = mlx_adapter(tmp_path / "mlx", 0, fine_tune_type="dora" if what == "dora" else "lora")
    if what == "experts":  # an MoE expert stack (LoRASwitchLinear): 3-D factors
        tensors["model.layers.0.mlp.switch_mlp.gate_proj.lora_a"] = torch.zeros(4, RANK, WIDTH)
        save_file(tensors, str(tmp_path / "mlx" / "adapters.safetensors"))
    with pytest.raises(SystemExit, match="dora" if what == "dora" else "not a LoRA factor of a linear layer"):
        converter()(tmp_path / "mlx", tmp_path / "peft")
    assert not (tmp_path / "peft" / "adapter_model.safetensors").exists()
