"""Inputs found mishandled by an eleventh review from outside: each is refused with the file (or
adapter) and the problem named, exit 2, nothing written, never a bug."""

from __future__ import annotations

from pathlib import Path

from helpers import MODULES, random_factors, write_adapter
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
