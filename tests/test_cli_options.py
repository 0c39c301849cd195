"""The command line's options: typed choices, --solver, --help under both Typer versions, source
lists, hub options, and gate's --reference spelling. Runs in .venv and .venv-flower (make test)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
from helpers import MODULES, random_factors, write_adapter
from safetensors.torch import save_file
from typer.testing import CliRunner

from clair_cli import methods, params
from clair_cli.cli import app
from clair_cli.cli.choices import DeviceChoice, Precision, Rescale, Side, SolverForm
from clair_cli.errors import UsageError
from clair_cli.params import AuditParams

COMMANDS = ["inspect", "audit", "merge", "refine", "gate"]
# What Typer prints when an option names no value: Python types in newer Typer, lower-case
# parameter names in braces on the usage line.
PLACEHOLDERS = re.compile(r"<(list\[|bool>|float>|int>|int range>|str>|path>)|\{\w+\}")


def invoke(*args: str, input: str | None = None):
    return CliRunner().invoke(app, list(args), input=input, env={"NO_COLOR": "1", "COLUMNS": "120"})


def _help(*command: str) -> str:
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "100", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize("command", [[], *([c] for c in COMMANDS)], ids=["clair", *COMMANDS])
def test_help_has_no_type_placeholders(command: list[str]) -> None:
    text = _help(*command)
    assert not PLACEHOLDERS.search(text), PLACEHOLDERS.search(text)
    assert "[default: None]" not in text  # Typer before 0.17.2 printed it for every option without a default
    if command:
        assert re.search(r"Usage: clair \w+ \[OPTIONS\] (SOURCE|CANDIDATE)\.\.\.", text), text[:300]
    if command and command[0] != "inspect":
        assert "(needs clair-lora[plot])" in text  # not eaten as Rich markup
        assert "owner/name[@rev]" in text


def test_help_lists_the_choices() -> None:
    text = _help("audit")
    for values in ("out|in|both", "noisy|exact", "auto|cpu|cuda", "float32|float64"):
        assert values in text
    assert "--method" not in text  # merge methods only
    merge = _help("merge")
    assert "none|norm" in merge and "--solver" in merge
    for name in methods.NAMES:
        assert name in merge


def test_completion_options_and_version() -> None:
    text = _help()
    assert "--install-completion" in text and "--show-completion" in text and "--version" in text


def test_shell_completion_offers_the_choices() -> None:
    env = {"_CLAIR_COMPLETE": "complete_bash", "COMP_WORDS": "clair audit x --side ", "COMP_CWORD": "4"}
    result = CliRunner().invoke(app, [], env=env, prog_name="clair")
    assert result.stdout.split() == ["out", "in", "both"], result.output


def test_choices_are_str_enums() -> None:
    assert Side("in") == "in" and SolverForm.EXACT == "exact" and str(Precision.FLOAT64) == "float64"
    assert [m.value for m in methods.MergeMethodName] == list(methods.NAMES)
    assert {d.value for d in DeviceChoice} == {"auto", "cpu", "cuda"} and Rescale("norm") == "norm"
    # The command line's choices are the values the parameters accept (clair_cli.params).
    for choices, values in [
        (Side, params.SIDES),
        (SolverForm, params.SOLVER_FORMS),
        (DeviceChoice, params.DEVICES),
        (Precision, params.PRECISIONS),
        (Rescale, params.RESCALES),
    ]:
        assert tuple(c.value for c in choices) == values


# --- one parameters object -------------------------------------------------------------------


def test_audit_params_is_frozen_checked_once_and_reports_as_before() -> None:
    params = AuditParams(solver=SolverForm.EXACT, side=Side.BOTH, rank="3", device="cpu")
    assert params.solver == "exact" and type(params.solver) is str and params.rank == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.side = "in"  # type: ignore[misc]
    with pytest.raises(TypeError):
        AuditParams("noisy")  # type: ignore[misc]  # keyword-only
    # The JSON report's params keep their keys: "method" is the decomposition form.
    assert list(params.as_dict()) == ["method", "side", "rank", "threshold", "dtype", "device", "seed", "solver"]
    assert params.as_dict()["method"] == "exact" and params.as_dict()["solver"] == "auto"


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"side": "left"}, "--side left"),
        ({"solver": "dense"}, "--solver dense"),
        ({"dtype": "float16"}, "--dtype float16"),
        ({"device": "tpu"}, "--device tpu"),
        ({"rank": 0}, "--rank 0"),
        ({"rank": "x"}, "--rank x"),
        ({"threshold": 1.5}, "--threshold"),
        ({"seed": -1}, "--seed"),
        ({"executor": "dask"}, "--executor dask"),
        ({"executor": "ray://host"}, "--executor ray://host"),
        ({"jobs": 0}, "--jobs 0"),
        ({"jobs": "many"}, "--jobs many"),
        ({"jobs": 100000}, "--jobs 100000: expected a number of worker processes (1 to 9999)"),
        ({"jobs": 2, "executor": "ray"}, "--jobs 2 with --executor ray"),
    ],
)
def test_audit_params_refuse_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        AuditParams(**kwargs)


# --- one registry of merge methods ------------------------------------------------------------


def test_merge_registry_drives_help_pool_size_and_dispatch() -> None:
    assert methods.NAMES[0] == "clair" and methods.get("clair").audits
    assert [n for n in methods.NAMES if not methods.get(n).exact_mean] == [
        "fedavg",
        "median",
        "trimmed-mean",
        "krum",
        "multi-krum",
        "ties",
    ]
    assert [n for n in methods.NAMES if isinstance(methods.get(n), methods.Baseline)] == list(methods.NAMES[1:])
    with pytest.raises(UsageError, match="choose one of: clair, mean"):
        methods.get("avg")
    for name in methods.NAMES:
        assert name in methods.help_text()


# --- --solver, and --method (merge methods only) ------------------------------------------------------


@pytest.fixture(scope="module")
def six(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("six")
    for k in range(6):
        write_adapter(root / f"client_{k}", seed=k)
    return root


def _params(result) -> dict:
    return json.loads(result.stdout)["params"]


def test_solver_names_the_decomposition_form(six: Path) -> None:
    result = invoke("audit", str(six), "--solver", "exact", "--json", "-", "--exit-zero", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert _params(result)["method"] == "exact"


def test_old_method_option_is_gone(six: Path) -> None:
    # --solver names the decomposition form; --method is merge's alone (no release had it).
    result = invoke("audit", str(six), "--method", "exact", "--exit-zero", "--device", "cpu")
    assert result.exit_code == 2 and "No such option" in result.output


def test_merge_method_is_the_merge_method(six: Path, tmp_path: Path) -> None:
    result = invoke("merge", str(six), "--out", str(tmp_path / "m"), "--method", "median", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "median merge of 6 of 6" in result.stderr
    refused = invoke("merge", str(six), "--out", str(tmp_path / "n"), "--method", "exact")
    assert refused.exit_code == 2 and "'exact' is not one of" in refused.output


# --- sources from lists, stdin and folders of bare files --------------------------------------


def test_sources_from_a_list_file(six: Path, tmp_path: Path) -> None:
    listed = tmp_path / "pool.txt"
    listed.write_text("# round 3\n\n" + "".join(f"  {six}/client_{k}  \n" for k in range(4)))
    result = invoke("inspect", f"@{listed}", f"{six}/client_5", "--json", "-")
    assert result.exit_code == 0, result.output
    assert [a["name"] for a in json.loads(result.stdout)["adapters"]] == [f"client_{k}" for k in (0, 1, 2, 3, 5)]


def test_relative_paths_in_a_list_are_read_from_its_directory(tmp_path: Path, monkeypatch) -> None:
    write_adapter(tmp_path / "here" / "a", seed=1)
    write_adapter(tmp_path / "here" / "b", seed=2)
    (tmp_path / "here" / "list.txt").write_text("a\n# b is left out\nb\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = invoke("inspect", "@../here/list.txt", "--json", "-")
    assert result.exit_code == 0, result.output
    assert [a["name"] for a in json.loads(result.stdout)["adapters"]] == ["a", "b"]


def test_list_entries_expand_home_and_are_normalised(tmp_path: Path, monkeypatch) -> None:
    from clair_cli.io.sources import expand_sources

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    listed = tmp_path / "lists" / "list.txt"
    listed.parent.mkdir()
    listed.write_text("~/runs/a\n../runs/b\n")
    assert expand_sources([f"@{listed}"]) == [str(tmp_path / "home" / "runs" / "a"), str(tmp_path / "runs" / "b")]


def test_stdin_that_is_not_text_exits_2() -> None:
    result = CliRunner().invoke(app, ["inspect", "-"], input=b"\xff\xfe\x00runs/a\n", env={"NO_COLOR": "1"})
    assert result.exit_code == 2 and "not UTF-8" in result.output and "internal error" not in result.output


def test_sources_from_stdin(six: Path) -> None:
    result = invoke("inspect", "-", "--json", "-", input=f"{six}/client_0\n\n# skip\n{six}/client_5\n")
    assert result.exit_code == 0, result.output
    assert [a["name"] for a in json.loads(result.stdout)["adapters"]] == ["client_0", "client_5"]


@pytest.mark.parametrize(
    "lines,message",
    [(None, "no such list file"), ("@other.txt\n", "cannot name another list"), ("# nothing\n", "no source given")],
)
def test_bad_source_lists_exit_2(tmp_path: Path, lines: str | None, message: str) -> None:
    listed = tmp_path / "list.txt"
    if lines is not None:
        listed.write_text(lines)
    result = invoke("audit", f"@{listed}")
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_folder_of_bare_safetensors_files_is_a_pool(tmp_path: Path) -> None:
    folder = tmp_path / "bare"
    folder.mkdir()
    for k in range(5):
        save_file(random_factors(MODULES, seed=k), folder / f"client_{k}.safetensors")
    refused = invoke("audit", str(folder))
    assert refused.exit_code == 2 and "client_0.safetensors" in refused.output and "--lora-alpha" in refused.output
    result = invoke("audit", str(folder), "--lora-alpha", "8", "--json", "-", "--exit-zero", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert [a["name"] for a in json.loads(result.stdout)["adapters"]] == [f"client_{k}" for k in range(5)]


# --- gate: --reference takes one source --------------------------------------------------------


@pytest.mark.parametrize(
    "spelling",
    [
        ["--reference", "{r}/client_1", "{r}/client_2", "{r}/client_3"],
        ["-r", "{r}/client_1", "{r}/client_2", "{r}/client_3"],
        ["--reference={r}/client_1", "{r}/client_2", "{r}/client_3"],
        ["-r{r}/client_1", "{r}/client_2", "{r}/client_3"],
        ["--reference", "{r}/client_1", "-"],
    ],
)
def test_gate_refuses_words_after_a_reference(six: Path, spelling: list[str]) -> None:
    args = [a.format(r=six) for a in spelling]
    result = invoke("gate", f"{six}/client_0", *args)
    assert result.exit_code == 2, result.output
    assert "--reference takes one source" in result.output
    assert "--reference" in result.output and args[-1] in result.output


def test_gate_reads_one_word_after_a_reference_as_a_candidate_and_says_so(six: Path, tmp_path: Path) -> None:
    import shutil

    trusted = tmp_path / "trusted"
    for k in range(1, 6):
        shutil.copytree(six / f"client_{k}", trusted / f"client_{k}")
    result = invoke("gate", "--reference", str(trusted), f"{six}/client_0", "--json", "-", "--exit-zero")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [a["name"] for a in report["adapters"] if a["role"] == "candidate"] == ["client_0"]
    assert any("is a candidate" in n for n in report["notes"]) and "note:" in result.output


def test_gate_takes_repeated_references_a_directory_or_a_list(six: Path, tmp_path: Path) -> None:
    refs = [f"{six}/client_{k}" for k in range(1, 6)]
    repeated = [x for r in refs for x in ("--reference", r)]
    by_repeat = invoke("gate", f"{six}/client_0", *repeated, "--json", "-", "--exit-zero", "--device", "cpu")
    assert by_repeat.exit_code == 0, by_repeat.output
    listed = tmp_path / "refs.txt"
    listed.write_text("\n".join(refs) + "\n")
    by_list = invoke("gate", f"{six}/client_0", "-r", f"@{listed}", "--json", "-", "--exit-zero", "--device", "cpu")
    assert by_list.exit_code == 0, by_list.output
    for result in (by_repeat, by_list):
        report = json.loads(result.stdout)
        assert len(report["adapters"]) == 6
    # Candidates after the options are fine once -- ends them.
    after = invoke("gate", "-r", f"@{listed}", "--json", "-", "--exit-zero", "--device", "cpu", "--", f"{six}/client_0")
    assert after.exit_code == 0, after.output


# --- dependencies -----------------------------------------------------------------------------


def test_runtime_dependencies_are_what_the_package_imports() -> None:
    import ast
    import sys
    import tomllib

    root = Path(__file__).parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[<>=!~ \[]", d)[0].replace("-", "_") for d in project["dependencies"]}
    extras = {
        re.split(r"[<>=!~ \[]", d)[0].replace("-", "_") for ds in project["optional-dependencies"].values() for d in ds
    }
    imported = set()
    for path in (root / "clair_cli").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m not in ("clair_cli", "__future__")}
    assert declared <= third_party, f"declared but never imported: {declared - third_party}"
    # Installed with what imports them: httpx2 with huggingface_hub (clair hooks its client),
    # click with Typer 0.20 (cli/__init__.py asks for it only when present).
    assert third_party - {"httpx2", "click"} <= declared | extras, third_party - declared - extras


def test_null_device_and_dev_stdout_as_report_targets(tmp_path: Path) -> None:
    import os
    import stat

    samples = Path(__file__).resolve().parent.parent / "sample_adapters"
    runner = CliRunner()
    env = {"NO_COLOR": "1", "COLUMNS": "200"}
    args = ["audit", str(samples), "-q", "--exit-zero"]
    result = runner.invoke(app, [*args, "--json", os.devnull, "--markdown", os.devnull], env=env)
    assert result.exit_code == 0, result.output
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)  # written to, never replaced
    result = runner.invoke(app, [*args, "--json", "/dev/stdout"], env=env)
    assert result.exit_code == 0 and json.loads(result.stdout)["command"] == "audit"
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "elsewhere.json")
    result = runner.invoke(app, [*args, "--json", str(link)], env=env)  # other symlinks: still refused
    assert result.exit_code == 2 and "symlink" in result.output and not (tmp_path / "elsewhere.json").exists()


def test_bad_input_errors_carry_no_debugging_advice(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["audit", str(tmp_path / "missing")], env={"NO_COLOR": "1"})
    assert result.exit_code == 2 and "Error:" in result.output and "CLAIR_DEBUG" not in result.output


@pytest.mark.parametrize(
    "args",
    [
        ["audit", "--threshold", "1e-320"],
        ["merge", "--out", "{tmp}/out", "--clip", "1e-320"],
        ["merge", "--out", "{tmp}/out", "--merge-tol", "4e-310"],
        ["audit", "--lora-alpha", "1e-320"],
        ["merge", "--out", "{tmp}/out", "--weights", "1e-320,1,1,1,1,1"],
    ],
    ids=["threshold", "clip", "merge-tol", "lora-alpha", "weights"],
)
def test_a_subnormal_number_is_refused_by_name(six: Path, tmp_path: Path, args: list[str]) -> None:
    # The commands flush subnormal numbers to zero: 1e-320 passed --threshold's check as given
    # and was then refused as "--threshold 0.0" once the flush was on; a weight of 1e-320 made the
    # weights "not all zero" where checked and all zero where used.
    command, *rest = args
    result = invoke(command, str(six), *(a.format(tmp=tmp_path) for a in rest))
    assert result.exit_code == 2, result.output
    option = rest[-2]
    assert result.stderr.startswith(f"Error: {option} ") and "below the smallest normal number" in result.stderr
    assert "0.0" not in result.stderr
    assert not (tmp_path / "out").exists()
    assert invoke("audit", str(six), "--threshold", "1e-300", "--exit-zero", "-q").exit_code == 0


@pytest.mark.parametrize("option", ["--config", "--token"])
@pytest.mark.parametrize("value", ["", " "])
def test_an_empty_config_or_token_is_refused_by_name(six: Path, option: str, value: str) -> None:
    # "$HF_TOKEN" or "$CONFIG" unset: --token "" read as no token, and --config "" as the current
    # directory ("Error: .: is a directory", naming no option).
    result = invoke("audit", str(six), option, value)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"Error: {option} is empty"), result.stderr
