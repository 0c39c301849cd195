"""A kohya / ComfyUI / diffusers alpha tensor stored as float64 with a value float32 cannot hold.

sd-scripts casts a stored alpha to float32 before it uses it (networks/lora.py ``LoRAModule.__init__``:
``alpha.detach().float()``, then ``alpha == 0`` means ``lora_dim``), while ComfyUI, A1111 and diffusers
apply the float64 value (``.item()``). An alpha of 1e-45 in float64 made clair read the module at scale
about 1e-46, an update of nothing, where sd-scripts applies scale 1 (the full ``up @ down``): a payload
the audit saw as empty. Such an alpha (below float32's smallest normal number, or above its largest) is
refused, with the file and the tensor named.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from clair_cli.cli import app


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args], env={"NO_COLOR": "1", "COLUMNS": "300"})


def _kohya(path: Path, alpha: torch.Tensor, size: float = 1.0) -> Path:
    g = torch.Generator().manual_seed(0)
    save_file(
        {
            "lora_unet_a_to_q.lora_down.weight": torch.randn(4, 8, generator=g) * size,
            "lora_unet_a_to_q.lora_up.weight": torch.randn(6, 4, generator=g) * size,
            "lora_unet_a_to_q.alpha": alpha,
        },
        str(path),
    )
    return path


# (alpha, factor size): 1e39 beside factors of 1e-20 makes an ordinary update in float64, Inf in sd-scripts
@pytest.mark.parametrize(("value", "size"), [(1e-45, 1.0), (1e-300, 1.0), (1e39, 1e-20)])
def test_a_float64_alpha_outside_float32s_range_is_refused(tmp_path: Path, value: float, size: float) -> None:
    path = _kohya(tmp_path / "lora.safetensors", torch.tensor(value, dtype=torch.float64), size)
    result = invoke("inspect", path)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "lora_unet_a_to_q.alpha" in result.output and "float32" in result.output
    assert str(path) in result.output


def test_a_float64_alpha_float32_holds_is_read(tmp_path: Path) -> None:
    path = _kohya(tmp_path / "lora.safetensors", torch.tensor(2.0, dtype=torch.float64))
    result = invoke("inspect", path)
    assert result.exit_code == 0, result.output
