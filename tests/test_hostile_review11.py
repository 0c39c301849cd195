"""Inputs found mishandled by an eleventh review from outside: each is refused with the file (or
adapter) and the problem named, exit 2, nothing written, never a bug."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import MODULES, lora_config, random_factors, run_cli, write_adapter
from typer.testing import CliRunner

from clair_cli.cli import app


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args], env={"NO_COLOR": "1", "COLUMNS": "300"})


def test_refine_never_writes_one_adapter_inside_another_s_directory(tmp_path: Path) -> None:
    """A pool's 'a/g0' beside an adapter named 'a' from a second source: refine wrote out/a/ and, inside
    it, out/a/g0/, an adapter directory with another below it, which clair's own reader refuses."""
    for k in range(4):
        write_adapter(tmp_path / "p1" / "a" / f"g{k}", random_factors(MODULES, seed=k))
    write_adapter(tmp_path / "src2" / "a", random_factors(MODULES, seed=7))
    out = tmp_path / "out"
    result = invoke("refine", tmp_path / "p1", tmp_path / "src2" / "a", "--out", out, "--exit-zero")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "adapter a/g0 would be written inside the directory of adapter a" in result.output
    assert not out.exists()


def test_a_base_model_option_longer_than_a_config_may_hold_is_refused_before_the_work(tmp_path: Path) -> None:
    """--base-model of 5,000 characters: merge ran the whole audit and merge, then stopped as it wrote
    its config, blaming 'adapter_config.json' (the file being written) and saying to fix that file."""
    for k in range(5):
        write_adapter(tmp_path / "pool" / f"a{k}", random_factors(MODULES, seed=k))
    out = tmp_path / "out"
    result = invoke("merge", tmp_path / "pool", "--out", out, "--method", "mean", "--base-model", "x" * 5000)
    assert result.exit_code == 2, result.output
    assert "--base-model" in result.output and "5000 characters long" in result.output
    assert "adapter_config.json" not in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_a_gate_candidate_s_module_that_intersect_leaves_out_is_not_vouched_for(tmp_path: Path) -> None:
    """A candidate with a module no reference targets (here k_proj, its update 100 times the others'):
    gate --intersect analysed the common modules alone and passed it (exit 0), though PEFT applies
    the module it left out. It is flagged as unanalysed now; --allow-unanalysed judges the rest."""
    for k in range(6):
        write_adapter(tmp_path / "refs" / f"r{k}", random_factors(MODULES, seed=k))
    extra = {**MODULES, "model.layers.0.self_attn.k_proj": (16, 12)}
    tensors = random_factors(extra, seed=9)
    key = "base_model.model.model.layers.0.self_attn.k_proj"
    tensors[f"{key}.lora_A.weight"] *= 10
    tensors[f"{key}.lora_B.weight"] *= 10
    write_adapter(tmp_path / "cand", tensors, lora_config(target_modules=["q_proj", "k_proj", "v_proj"]))
    args = ["gate", tmp_path / "cand", "--reference", tmp_path / "refs", "--intersect"]
    report = tmp_path / "gate.json"
    result = invoke(*args, "--json", report)
    assert result.exit_code == 1, result.output
    (cand,) = [a for a in json.loads(report.read_text())["adapters"] if a["name"] == "cand"]
    assert cand["flagged"] and [r["kind"] for r in cand["reasons"]] == ["unanalysed"]
    assert "1 LoRA module(s) that --intersect leaves out (model.layers.0.self_attn.k_proj)" in json.dumps(cand)
    assert invoke(*args, "--allow-unanalysed").exit_code == 0
    # A candidate that targets fewer modules than the references carries nothing left unjudged.
    write_adapter(tmp_path / "fewer", random_factors(dict(list(MODULES.items())[:2]), seed=9))
    assert invoke("gate", tmp_path / "fewer", "--reference", tmp_path / "refs", "--intersect").exit_code == 0


def test_force_replaces_a_merged_mlx_lm_adapter_clair_wrote(tmp_path: Path) -> None:
    """An MLX-LM merge writes adapters.safetensors, which --force did not count among the files clair
    writes: rerunning the merge with --force was refused ('holds adapters.safetensors, which clair
    does not write'). A file of someone else's beside it is still kept."""
    from test_mlx import mlx_adapter

    for k in range(5):
        mlx_adapter(tmp_path / "pool" / f"m{k}", seed=k)
    out = tmp_path / "out"
    args = ["merge", tmp_path / "pool", "--method", "mean", "--out", out]
    assert invoke(*args).exit_code == 0
    result = invoke(*args, "--force")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapters.safetensors"]
    (out / "notes.txt").write_text("mine")
    result = invoke(*args, "--force")
    assert result.exit_code == 2 and "notes.txt, which clair does not write" in result.output
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("keys", "self_attn.q_proj", "lora_parameters.keys must be a list of module names, got 'self_attn.q_proj'"),
        ("keys", True, "lora_parameters.keys must be a list of module names, got True"),
        ("num_layers", "2", "num_layers must be a whole number of layers, got '2'"),
        ("num_layers", None, "num_layers must be a whole number of layers, got None"),
        ("num_layers", True, "num_layers must be a whole number of layers, got True"),
        ("num_layers", 2.5, "num_layers must be a whole number of layers, got 2.5"),
    ],
)
def test_an_mlx_lm_config_whose_layer_selection_mlx_lm_cannot_read_is_refused(
    tmp_path: Path, field: str, value: object, expected: str
) -> None:
    """mlx_lm selects the modules it loads by num_layers and lora_parameters.keys: a keys string is read
    as set(keys), the set of its characters, and loads no module; a num_layers that is no whole number
    fails there (true reads as the last layer alone). clair read such a file's every module, audited,
    merged and wrote it (exit 0): it is refused now, naming the field."""
    from test_mlx import mlx_adapter

    mlx_adapter(tmp_path / "m", seed=0)
    config_file = tmp_path / "m" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    if field == "keys":
        config["lora_parameters"]["keys"] = value
    else:
        config[field] = value
    config_file.write_text(json.dumps(config))
    result = invoke("inspect", tmp_path / "m")
    assert result.exit_code == 2, result.output
    assert expected in result.output and "adapter_config.json" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("columns", ["abc", "-5", "1e400", "\u00b2"])
def test_a_columns_value_that_is_no_width_is_the_default_width(tmp_path: Path, columns: str) -> None:
    """COLUMNS=abc ended in 'internal error (ValueError ...)', COLUMNS=-5 printed nothing at all (exit 0),
    and COLUMNS=² (a digit to str.isdigit, not to int) a traceback from rich: each is now read as no
    width, as rich reads 'abc'."""
    for k in range(5):
        write_adapter(tmp_path / "pool" / f"a{k}", random_factors(MODULES, seed=k))
    proc = run_cli("audit", str(tmp_path / "pool"), env={"COLUMNS": columns})
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    assert "a0" in proc.stdout and "5 adapters, 4 modules" in proc.stdout


@pytest.mark.parametrize("epoch", ["99999999999999999999", "253402300800"])
def test_a_source_date_epoch_past_what_a_date_holds_is_refused_by_name(tmp_path: Path, epoch: str) -> None:
    """SOURCE_DATE_EPOCH past the platform's time_t or the year 9999 ended in 'internal error
    (OverflowError ...)' (or ValueError): it is a one-line error naming the variable now."""
    for k in range(5):
        write_adapter(tmp_path / "pool" / f"a{k}", random_factors(MODULES, seed=k))
    report = tmp_path / "r.json"
    result = CliRunner().invoke(
        app, ["audit", str(tmp_path / "pool"), "--json", str(report)], env={"SOURCE_DATE_EPOCH": epoch}
    )
    assert result.exit_code == 2, result.output
    assert f"SOURCE_DATE_EPOCH={epoch}" in result.output and "internal error" not in result.output
    assert not report.exists()


def test_a_candidate_module_peft_does_not_load_is_not_called_unanalysed(tmp_path: Path) -> None:
    """A module of the candidate's file that its config does not target (PEFT does not load it) and
    --intersect leaves out is noted as ignored, not flagged as what PEFT applies."""
    for k in range(6):
        write_adapter(tmp_path / "refs" / f"r{k}", random_factors(MODULES, seed=k))
    write_adapter(tmp_path / "cand", random_factors({**MODULES, "model.layers.0.self_attn.k_proj": (16, 12)}, seed=9))
    result = invoke("gate", tmp_path / "cand", "--reference", tmp_path / "refs", "--intersect")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("given", ["", "  "])
def test_an_empty_revision_is_refused_as_an_empty_at_is(tmp_path: Path, given: str) -> None:
    """`--revision ''` read as no revision (the default branch), while `hf://owner/name@` is refused."""
    result = CliRunner().invoke(app, ["inspect", "hf://owner/name", "--revision", given])
    assert result.exit_code == 2, result.output
    assert "--revision is empty" in result.output and "Traceback" not in result.output
