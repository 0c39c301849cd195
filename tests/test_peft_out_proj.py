"""A MultiheadAttention's out_proj LoRA as PEFT applies it, whichever PEFT version saved the adapter.

PEFT before 0.22 applied that LoRA twice (huggingface/peft#3774); PEFT 0.22 applies it once and doubles
``lora_B`` on load for an adapter whose config says it was saved before 0.22 (or says no version). clair
reads each adapter's out_proj update as PEFT applies it, and writes a merged one that PEFT of either
version applies as the mean of what it applies of the inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import peft_at_least
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from typer.testing import CliRunner

from clair_cli.cli import app
from clair_cli.io import SourceOptions, open_adapters
from clair_cli.io.peft_config import saved_before_out_proj_fix

LAYER = "mha"
OUT_PROJ = f"{LAYER}.base_layer.out_proj"


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.q_proj = nn.Linear(8, 8)


def base() -> nn.Module:
    torch.manual_seed(0)
    return Attention().eval()


def applied(path: Path) -> dict[str, torch.Tensor]:
    """What the installed PEFT applies of the adapter at ``path``: merged into the base model, minus the base."""
    before = {n: p.detach().clone() for n, p in base().named_parameters()}
    merged = PeftModel.from_pretrained(base(), path).merge_and_unload()
    return {n: (p.detach() - before[n]).double() for n, p in merged.named_parameters() if n in before}


def save_pool(root: Path, versions: list[str | None | object]) -> list[Path]:
    """Adapters saved by the installed PEFT, their configs' peft_version then set to ``versions[k]``
    (``...``: the key removed, as PEFT before 0.18 wrote it; None: JSON null)."""
    paths = []
    for k, version in enumerate(versions):
        torch.manual_seed(20 + k)
        model = get_peft_model(
            base(), LoraConfig(r=4, lora_alpha=8, target_modules=[LAYER, "q_proj"], init_lora_weights=False)
        )
        path = root / f"c{k}"
        model.save_pretrained(path)
        config = json.loads((path / "adapter_config.json").read_text())
        if version is ...:
            config.pop("peft_version", None)
        else:
            config["peft_version"] = version
        (path / "adapter_config.json").write_text(json.dumps(config))
        paths.append(path)
    return paths


def read_out_proj(path: Path) -> torch.Tensor:
    (adapter,) = open_adapters([str(path)], SourceOptions())
    return {m.name: m for m in adapter.load(dtype=torch.float64)}[OUT_PROJ].delta_weight()


@pytest.mark.parametrize(
    ("said", "doubled"),
    [
        (..., True),  # no key: saved before PEFT 0.18
        (None, False),  # null: PEFT keeps it as its own version
        ("0.17.1", True),
        ("0.21.0", True),
        ("0.21.1", True),
        ("0.21.1.dev0", False),  # main after the fix stayed on 0.21.x dev versions
        ("0.21.2.dev0@0123abc", False),
        ("0.22.0", False),
        ("0.22.0.dev0", False),
        ("0.22.0+local", False),
        ("1.0.0", False),
        ("0.20.0.dev0@abc", True),
        ("not a version", None),
        (5, None),
        (["0.22.0"], None),
    ],
)
def test_which_configs_peft_doubles_out_proj_for(said: object, doubled: bool | None) -> None:
    """PEFT 0.22's rule (LoraModel._remap_adapter_state_dict_for_load), value by value."""
    data = {} if said is ... else {"peft_version": said}
    assert saved_before_out_proj_fix(data) is doubled


def test_out_proj_is_read_as_the_installed_peft_applies_it(tmp_path: Path) -> None:
    """An adapter saved by the installed PEFT, its config as saved: clair's out_proj update is what PEFT applies."""
    from peft import __version__

    (path,) = save_pool(tmp_path, [__version__])
    torch.testing.assert_close(read_out_proj(path), applied(path)[f"{LAYER}.out_proj.weight"], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not peft_at_least("0.22"), reason="PEFT before 0.22 applies out_proj twice whatever the config")
@pytest.mark.parametrize("said", [..., "0.21.0", "0.22.0", None, "0.21.2.dev0@abc"])
def test_out_proj_of_each_peft_version_is_read_as_peft_applies_it(tmp_path: Path, said: object) -> None:
    (path,) = save_pool(tmp_path, [said])
    want = applied(path)[f"{LAYER}.out_proj.weight"]
    torch.testing.assert_close(read_out_proj(path), want, rtol=1e-5, atol=1e-6)
    # the version that changes it: twice the factors' product, or once
    (adapter,) = open_adapters([str(path)], SourceOptions())
    doubled = saved_before_out_proj_fix({} if said is ... else {"peft_version": said})
    assert adapter.modules[OUT_PROJ].scale == pytest.approx(2.0 * (2.0 if doubled else 1.0))
    assert adapter.modules[LAYER].scale == pytest.approx(2.0)
    assert any("MultiheadAttention" in n and "twice" in n for n in adapter.notes) is doubled


@pytest.mark.parametrize(
    "versions",
    [
        pytest.param(["installed"] * 3, id="as-saved"),
        pytest.param([...] * 3, id="no-version"),
        pytest.param(["0.21.0", ..., "0.22.0", None], id="mixed"),
    ],
)
def test_a_merge_applies_the_mean_of_what_peft_applies(tmp_path: Path, versions: list[object]) -> None:
    """The merged adapter (no peft_version in its config, out_proj's B stored at half the merged update)
    is applied by the installed PEFT as the mean of what it applies of the inputs."""
    from peft import __version__

    mixed = len({str(v) for v in versions}) > 1
    if mixed and not peft_at_least("0.22"):
        pytest.skip("PEFT before 0.22 applies every out_proj LoRA twice, whatever version its config says")
    paths = save_pool(tmp_path / "pool", [__version__ if v == "installed" else v for v in versions])
    inputs = [applied(p) for p in paths]
    result = CliRunner().invoke(
        app, ["merge", str(tmp_path / "pool"), "--out", str(tmp_path / "m"), "--method", "mean"]
    )
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert "peft_version" not in config
    assert "stores half the merged update" in " ".join((tmp_path / "m" / "README.md").read_text().split())
    got = applied(tmp_path / "m")
    for name in (f"{LAYER}.out_proj.weight", f"{LAYER}.in_proj_weight", "q_proj.weight"):
        want = sum(d[name] for d in inputs) / len(inputs)
        assert want.abs().max() > 0.01
        torch.testing.assert_close(got[name], want, rtol=1e-4, atol=1e-5)
    # and clair reads its own output back as it computed it
    torch.testing.assert_close(read_out_proj(tmp_path / "m"), got[f"{LAYER}.out_proj.weight"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("said", ["0.22.x", 22])
def test_a_peft_version_that_is_no_version_is_refused_where_peft_reads_it(tmp_path: Path, said: object) -> None:
    (path,) = save_pool(tmp_path / "pool", [said])
    result = CliRunner().invoke(app, ["inspect", str(path)])
    assert result.exit_code == 2, result.output
    assert "adapter_config.json" in result.output and "not a version" in result.output
    assert "Traceback" not in result.output
    # PEFT reads it only to load an out_proj LoRA: an adapter without one is read
    torch.manual_seed(1)
    model = get_peft_model(base(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    config["peft_version"] = said
    (tmp_path / "plain" / "adapter_config.json").write_text(json.dumps(config))
    assert CliRunner().invoke(app, ["inspect", str(tmp_path / "plain")]).exit_code == 0
