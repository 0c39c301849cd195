"""Inputs found mishandled by a twelfth review from outside: each is refused with the file (or
option) and the problem named, exit 2, nothing written, never a bug."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import MODULES, random_factors, write_adapter
from typer.testing import CliRunner

from clair_cli.cli import app, threads


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args], env={"NO_COLOR": "1", "COLUMNS": "300"})


@pytest.mark.parametrize("value", ["\u00b2", "\u0663", "\uff14"])
def test_a_thread_count_of_digits_that_are_not_ascii_is_not_a_number(value: str) -> None:
    """CLAIR_NUM_THREADS=² (a superscript two; str.isdigit() holds for it, int() refuses it): every
    command ended in a ValueError traceback before it started. Such a value is not a number of
    threads, as 'lots' is not: the default of one thread."""
    env = {"CLAIR_NUM_THREADS": value}
    assert threads.configure_threads(env) == 1
    assert env["OMP_NUM_THREADS"] == "1"


@pytest.mark.parametrize("option", ["--json", "--markdown"])
@pytest.mark.parametrize("suffix", ["/", "/."])
def test_a_report_path_that_names_a_directory_is_refused(tmp_path: Path, option: str, suffix: str) -> None:
    """--json reports/ (a directory that does not exist yet): the report was written to a file named
    'reports', where the user looked for a directory, and the run exited 0."""
    for k in range(5):
        write_adapter(tmp_path / "pool" / f"a{k}", random_factors(MODULES, seed=k))
    target = tmp_path / "reports"
    out = tmp_path / "out"
    result = invoke("merge", tmp_path / "pool", "--out", out, option, f"{target}{suffix}")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "names a directory" in result.output and "reports" in result.output
    assert not target.exists() and not out.exists()


def test_weights_left_only_to_flagged_adapters_are_refused_not_a_bug(tmp_path: Path) -> None:
    """--weights 0,0,0,0,1 where the audit flags the fifth adapter (an update of zero, a free rider):
    the merge ended in 'internal error (ValueError: weights must not all be zero)'."""
    for k in range(4):
        write_adapter(tmp_path / "pool" / f"a{k}", random_factors(MODULES, seed=k))
    tensors = random_factors(MODULES, seed=9)
    for key in tensors:
        if "lora_B" in key:
            tensors[key].zero_()
    write_adapter(tmp_path / "pool" / "a4", tensors)
    out = tmp_path / "out"
    result = invoke("merge", tmp_path / "pool", "--out", out, "--weights", "0,0,0,0,1")
    assert result.exit_code == 2, result.output
    assert "internal error" not in result.output and "Traceback" not in result.output
    assert "--weights gives weight 0 to every adapter merged (4 of 5" in result.output
    assert not out.exists()


@pytest.mark.parametrize("option", ["--base-model", "--subfolder"])
@pytest.mark.parametrize("value", ["", " "])
def test_an_empty_base_model_or_subfolder_is_refused_as_an_empty_revision_is(
    tmp_path: Path, option: str, value: str
) -> None:
    """--base-model "$BASE" with BASE unset: read as no --base-model, without a word (and ' ' was written
    into the merged config as the base model); --subfolder '' passed beside local sources, which refuse
    any other subfolder. An empty --revision is refused (the eleventh review): so are these."""
    for k in range(5):
        write_adapter(tmp_path / "pool" / f"a{k}", random_factors(MODULES, seed=k))
    out = tmp_path / "out"
    result = invoke("merge", tmp_path / "pool", "--out", out, "--method", "mean", option, value)
    assert result.exit_code == 2, result.output
    assert f"{option} is empty" in result.output and "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.parametrize("option", ["--json", "--markdown", "--sarif"])
def test_an_empty_report_path_is_refused_by_its_option(tmp_path: Path, option: str) -> None:
    """--json "$REPORT" with REPORT unset: refused as ': exists and is a directory', naming no file
    and no option."""
    for k in range(5):
        write_adapter(tmp_path / "pool" / f"a{k}", random_factors(MODULES, seed=k))
    result = invoke("audit", tmp_path / "pool", option, "")
    assert result.exit_code == 2, result.output
    assert f"{option} is empty" in result.output and "Traceback" not in result.output
