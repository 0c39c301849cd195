"""What PEFT loads from clair's outputs is the update clair computed: cases a differential review
of the written adapters found (each merged module's ``get_delta_weight`` against the formula)."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from typer.testing import CliRunner

from clair_cli.cli import app
from clair_cli.core.merge import merge


class Uneven(nn.Module):
    """One layer of unequal sides (4 -> 12 or 12 -> 4): a projection rank between the two."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.up = nn.Linear(d_in, d_out)


def uneven(side: str) -> Uneven:
    """The basis of ``side`` is on the module's larger side (12), the other side is 4."""
    torch.manual_seed(0)
    return (Uneven(4, 12) if side == "out" else Uneven(12, 4)).eval()


def deltas(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name.removeprefix("base_model.model."): layer.get_delta_weight("default").detach().double()
        for name, layer in model.named_modules()
        if isinstance(layer, LoraLayer) and "default" in layer.scaling
    }


@pytest.mark.parametrize("side", ["out", "in"])
def test_the_projected_merge_takes_a_basis_wider_than_the_other_side(side: str) -> None:
    """``merge`` factors the projected mean at any basis width: a basis of more columns than the
    other side of the module has (here 9 > 4) used to fail in the SVD of the small core."""
    g = torch.Generator().manual_seed(0)
    d_out, d_in, q = (12, 4, 9) if side == "out" else (4, 12, 9)
    A = [torch.randn(3, d_in, generator=g, dtype=torch.float64) for _ in range(4)]
    B = [torch.randn(d_out, 3, generator=g, dtype=torch.float64) for _ in range(4)]
    basis = torch.linalg.qr(torch.randn(d_out if side == "out" else d_in, q, generator=g, dtype=torch.float64))[0]
    a, b = merge(A, B, [0.5] * 4, basis, side=side)
    mean = sum(0.5 * bk @ ak for ak, bk in zip(A, B, strict=True)) / 4
    want = basis @ basis.T @ mean if side == "out" else mean @ basis @ basis.T
    torch.testing.assert_close(b @ a, want)


@pytest.mark.parametrize("side", ["out", "in"])
def test_a_projection_rank_above_a_modules_smaller_side_loads_as_the_projected_mean(side: str, tmp_path: Path) -> None:
    """``--project-rank 9`` on a 12 x 4 module (a 4 x 12 one with ``--side in``): the basis, on the
    module's larger side, has 9 columns, and PEFT loads ``U U^T`` of the mean (it used to fail)."""
    pool = tmp_path / "pool"
    inputs = []
    for k in range(5):
        base = uneven(side)
        torch.manual_seed(100 + k)
        model = get_peft_model(
            base, LoraConfig(r=2 + k % 2, lora_alpha=4, target_modules=["up"], init_lora_weights=False)
        )
        model.save_pretrained(pool / f"a{k}")
        inputs.append(deltas(model)["up"])
    out, report = tmp_path / "merged", tmp_path / "report.json"
    args = ["merge", str(pool), "--out", str(out), "--project-rank", "9", "--side", side, "--norm-bound", "off"]
    result = CliRunner().invoke(app, [*args, "--exit-zero", "-q", "--json", str(report)])
    assert result.exit_code == 0, result.output
    used = [k for k, a in enumerate(json.loads(report.read_text())["adapters"]) if not a["flagged"]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = deltas(PeftModel.from_pretrained(uneven(side), str(out)))["up"]
    assert not [w for w in caught if re.search("missing|unexpected", str(w.message), re.I)]
    units = [inputs[k] / inputs[k].norm() for k in used]
    mean = sum(inputs[k] for k in used) / len(used)
    if side == "out":
        U = torch.linalg.svd(torch.cat(units, dim=1))[0][:, :9]
        want = U @ U.T @ mean
    else:
        V = torch.linalg.svd(torch.cat(units, dim=0))[2][:9].T
        want = mean @ V @ V.T
    assert float((got - want).norm() / want.norm()) < 1e-5


# ---- diffusers files: a text encoder diffusers refuses ----------------------------------------


def _diffusers_file(directory: Path, te_modules: tuple[str, ...]) -> Path:
    """A diffusers file (diffusers' own ``save_lora_weights``) of the tiny pipeline's UNet modules and
    the text encoder's modules ending in ``te_modules``."""
    from test_diffusion_formats import layers_of, pool_factors, tiny_pipeline, write_diffusers

    factors = pool_factors(layers_of(tiny_pipeline()), seed=len(directory.name))[0]
    kept = {m: f for m, f in factors.items() if m.startswith("unet.") or m.endswith(te_modules)}
    write_diffusers(directory, kept, None)
    return directory / "pytorch_lora_weights.safetensors"


def test_an_intersection_that_leaves_a_text_encoder_diffusers_refuses_is_noted(tmp_path: Path) -> None:
    """Each input's text encoder has an attention module (q_proj in one, v_proj in the other), so
    diffusers loads both; their intersection keeps fc1 alone, and diffusers 0.42 refuses that file
    (Could not automatically infer state dict type). The merge says so: on the console, in the card and
    in the JSON report (a baseline's report used to hold only the method's own notes, not the console's)."""
    from test_diffusion_formats import fused_deltas

    files = [
        _diffusers_file(tmp_path / "pool" / "a", ("q_proj", "fc1")),
        _diffusers_file(tmp_path / "pool" / "b", ("v_proj", "fc1")),
    ]
    for f in files:
        assert fused_deltas(f)  # diffusers loads each input
    out = tmp_path / "merged"
    args = ["merge", str(tmp_path / "pool"), "--out", str(out), "--method", "mean", "--intersect", "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--json", str(tmp_path / "report.json")], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    with pytest.raises(ValueError, match="infer state dict type"):
        fused_deltas(out / "pytorch_lora_weights.safetensors")
    said = "the merged file holds 2 text_encoder module(s) (e.g. text_encoder.encoder.layers.0.mlp.fc1) but no"
    assert f"note: {said}" in result.output
    assert "diffusers (0.42) refuses the file" in (out / "README.md").read_text().replace("\\_", "_")
    notes = json.loads((tmp_path / "report.json").read_text())["notes"]
    assert any(n.startswith(said) for n in notes), notes  # a baseline's report: every note it printed


def test_a_kohya_intersection_that_leaves_text_encoder_attention_without_out_proj_is_noted(tmp_path: Path) -> None:
    """kohya files whose text encoders hold q_proj and v_proj, one with out_proj in layer 0, the
    other in layer 1 (and fc1): diffusers loads each. Their intersection keeps q_proj and v_proj
    without out_proj, a text encoder diffusers 0.42 reads in a layout it cannot tell, so it refuses
    the file; the merge says so, as the note on such an input does."""
    from test_diffusion_formats import fused_deltas, layers_of, pool_factors, tiny_pipeline, write_kohya

    factors = pool_factors(layers_of(tiny_pipeline()))
    for k, own in enumerate(
        [("q_proj", "v_proj", "0.self_attn.out_proj"), ("q_proj", "v_proj", "1.self_attn.out_proj", "fc1")]
    ):
        kept = {m: f for m, f in factors[k].items() if m.startswith("unet.") or m.endswith(own)}
        write_kohya(tmp_path / "pool" / f"style_{k}.safetensors", kept, 4.0)
    for f in sorted((tmp_path / "pool").iterdir()):
        assert fused_deltas(f)  # diffusers loads each input
    out = tmp_path / "merged"
    args = ["merge", str(tmp_path / "pool"), "--out", str(out), "--method", "mean", "--intersect", "--device", "cpu"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    with pytest.raises(ValueError, match="infer state dict type"):
        fused_deltas(out / "pytorch_lora_weights.safetensors")
    assert "note: the merged file: 4 text_encoder attention module(s)" in result.output, result.output


def test_an_input_whose_text_encoder_diffusers_refuses_is_noted(tmp_path: Path) -> None:
    from clair_cli.io.sources import SourceOptions, open_adapter, resolve_sources

    def notes(path: Path) -> list[str]:
        (ref,) = resolve_sources([str(path)], SourceOptions())
        return [n for n in open_adapter(ref, SourceOptions()).notes if "refuses the file" in n]

    assert notes(_diffusers_file(tmp_path / "mlp", ("fc1",)))
    assert not notes(_diffusers_file(tmp_path / "attn", ("out_proj", "fc1")))


def test_a_baseline_merges_report_holds_every_note_it_prints(tmp_path: Path) -> None:
    """``--method mean --intersect``: the notes printed after the merge (the modules ``--intersect``
    left out, the task types that differ) are in the JSON report too, as in the clair merge's."""
    from helpers import tiny_llama

    for k, (targets, task) in enumerate([(["q_proj"], "SEQ_CLS"), (["q_proj", "v_proj"], None)]):
        model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=targets, task_type=task))
        model.save_pretrained(tmp_path / "pool" / f"a{k}")
    report = tmp_path / "report.json"
    args = ["merge", str(tmp_path / "pool"), "--out", str(tmp_path / "merged"), "--method", "mean", "--intersect"]
    result = CliRunner().invoke(app, [*args, "--json", str(report)], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    notes = json.loads(report.read_text())["notes"]
    printed = [line.removeprefix("note: ") for line in result.output.splitlines() if line.startswith("note: ")]
    assert len(printed) == 2 and all(n in notes for n in printed), (printed, notes)
