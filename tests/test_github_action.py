"""The GitHub Action (action.yml) and the worked workflow (examples/github/clair-gate.yml).

Both are parsed; every clair option they use must be one of ``clair gate --help``'s; and the
scripts of their steps are run here, as a runner would run them (bash -eo pipefail, inputs
through env, outputs through GITHUB_OUTPUT), on a pull request in a scratch git repository
that adds one adapter to a trusted pool of sample adapters: a clean upload passes, a boosted
one (a sample adapter's B scaled tenfold) fails the job, and the SARIF log and JSON report
are written and valid. Only the steps that need the network (setup-python, pip install, the
code scanning upload) are not run.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from report_check import assert_valid
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from clair_cli.cli import app

ROOT = Path(__file__).parents[1]
ACTION = ROOT / "action.yml"
WORKFLOW = ROOT / "examples" / "github" / "clair-gate.yml"
SAMPLES = ROOT / "sample_adapters"
EXPRESSION = re.compile(r"^\$\{\{\s*(.+?)\s*\}\}$")


def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def step(steps: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (found,) = [s for s in steps if s.get("name") == name or s.get("id") == name]
    return found


@pytest.fixture(scope="module")
def action() -> dict[str, Any]:
    return load(ACTION)


@pytest.fixture(scope="module")
def workflow() -> dict[str, Any]:
    return load(WORKFLOW)


@pytest.fixture(scope="module")
def gate_options() -> set[str]:
    result = CliRunner().invoke(app, ["gate", "--help"], env={"COLUMNS": "250", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", result.output))


def clair_options(script: str) -> list[str]:
    """Every long option in the gate step's script: it runs clair gate and shell builtins only,
    so each is one of clair's (given on the command line or collected in an array for it)."""
    return re.findall(r"(?<![\w-])--[a-z][a-z-]*", script)


def test_the_action_is_a_composite_with_the_inputs_a_gate_needs(action: dict[str, Any]) -> None:
    assert action["runs"]["using"] == "composite"
    inputs = action["inputs"]
    assert {"adapters", "reference", "python-version", "args"} <= set(inputs)
    assert inputs["adapters"]["required"] and inputs["reference"]["required"]
    assert set(action["outputs"]) >= {"exit-code", "passed", "sarif", "json", "markdown"}
    steps = action["runs"]["steps"]
    setup = step(steps, "Set up Python")
    assert setup["uses"] == "actions/setup-python@v5"
    assert setup["with"]["python-version"] == "${{ inputs.python-version }}"
    upload = step(steps, "Upload SARIF to code scanning")
    assert upload["uses"] == "github/codeql-action/upload-sarif@v3"
    assert upload["with"]["sarif_file"] == "${{ steps.gate.outputs.sarif }}"
    assert "always()" in upload["if"] and "inputs.upload-sarif == 'true'" in upload["if"]
    assert "always()" in step(steps, "Job summary")["if"]
    assert step(steps, "Fail when the gate refuses")["if"] == "always() && steps.gate.outputs.exit-code != '0'"
    for s in steps:
        if "run" in s:
            assert s["shell"] == "bash", s["name"]  # a composite's run steps must name their shell
            assert "${{" not in s["run"], f"{s['name']}: an expression spliced into a script (use env)"


def test_the_action_installs_its_own_checkout_not_the_index_clair(action: dict[str, Any]) -> None:
    install = step(action["runs"]["steps"], "Install clair")
    assert install["env"]["CLAIR_ACTION_PATH"] == "${{ github.action_path }}"
    assert 'pip install --quiet "$CLAIR_ACTION_PATH"' in install["run"]
    for line in install["run"].splitlines():
        if "pip install" in line:
            names = [re.split(r"[\[=<>~!]", t)[0] for t in shlex.split(line) if not t.startswith("-")]
            assert not {"clair", "clair-lora"} & set(names), line
    assert (ROOT / "pyproject.toml").is_file()  # what "$CLAIR_ACTION_PATH" installs


def test_every_clair_option_used_is_a_real_one(
    action: dict[str, Any], workflow: dict[str, Any], gate_options: set[str]
) -> None:
    assert {"--sarif", "--json", "--markdown", "--reference", "--exit-zero"} <= gate_options
    gate = step(action["runs"]["steps"], "gate")
    used = clair_options(gate["run"])
    assert {"--sarif", "--json", "--markdown", "--reference"} <= set(used)
    (uses,) = [s for s in workflow["jobs"]["gate"]["steps"] if s.get("name") == "clair gate"]
    used += shlex.split(uses["with"]["args"]) + shlex.split(action["inputs"]["args"]["default"])
    unknown = {t for t in used if t.startswith("--") and t not in gate_options}
    assert not unknown, f"not options of clair gate: {sorted(unknown)}"


def test_the_workflow_gates_pull_requests_with_the_action(workflow: dict[str, Any], action: dict[str, Any]) -> None:
    on = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert "pull_request" in on
    assert workflow["permissions"]["security-events"] == "write"
    steps = workflow["jobs"]["gate"]["steps"]
    assert steps[0]["uses"].startswith("actions/checkout@") and steps[0]["with"]["fetch-depth"] == 0
    gate = step(steps, "clair gate")
    assert re.fullmatch(r"[\w-]+/clair@[\w.-]+|\./?", gate["uses"])
    assert gate["if"] == "steps.added.outputs.count != '0'"
    assert set(gate["with"]) <= set(action["inputs"]), "the workflow passes an input the action does not have"
    required = {k for k, v in action["inputs"].items() if v.get("required")}
    assert required <= set(gate["with"])
    assert gate["with"]["adapters"] == "${{ steps.added.outputs.adapters }}"


# --- running the steps ------------------------------------------------------------------------


def parse_outputs(path: Path) -> dict[str, str]:
    """A GITHUB_OUTPUT file: ``key=value`` lines and ``key<<DELIM`` ... ``DELIM`` blocks."""
    out: dict[str, str] = {}
    lines = path.read_text().splitlines() if path.exists() else []
    i = 0
    while i < len(lines):
        line = lines[i]
        if "<<" in line and ("=" not in line or line.index("<<") < line.index("=")):
            key, delim = line.split("<<", 1)
            end = lines.index(delim, i + 1)
            out[key] = "\n".join(lines[i + 1 : end])
            i = end + 1
            continue
        key, value = line.split("=", 1)
        out[key] = value
        i += 1
    return out


def evaluate(value: Any, context: dict[str, Any]) -> str:
    """A step's env value: a literal, or one ``${{ a.b.c }}`` looked up in ``context``."""
    m = EXPRESSION.match(str(value))
    if not m:
        return str(value)
    found: Any = context
    for part in m.group(1).split("."):
        found = found.get(part, "") if isinstance(found, dict) else ""
    return "" if found is None else str(found)


class Runner:
    """Runs steps' scripts as GitHub's runner does: ``bash --noprofile --norc -eo pipefail``,
    in the workspace, env from the step, outputs and summary through files."""

    def __init__(self, workspace: Path, tools: Path) -> None:
        self.workspace = workspace
        self.tools = tools
        self.summary = workspace.parent / "summary.md"

    def run(self, s: dict[str, Any], context: dict[str, Any], name: str) -> tuple[int, dict[str, str], str]:
        script = self.workspace.parent / f"{name}.sh"
        script.write_text(s["run"])
        outputs = self.workspace.parent / f"{name}.out"
        outputs.unlink(missing_ok=True)
        env = {
            **os.environ,
            "PATH": f"{self.tools}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1",
            "NO_COLOR": "1",
            "GITHUB_OUTPUT": str(outputs),
            "GITHUB_STEP_SUMMARY": str(self.summary),
            "GITHUB_WORKSPACE": str(self.workspace),
            **{k: evaluate(v, context) for k, v in (s.get("env") or {}).items()},
        }
        proc = subprocess.run(
            ["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)],
            cwd=self.workspace,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        return proc.returncode, parse_outputs(outputs), proc.stdout + proc.stderr


def git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "-c", "commit.gpgsign=false", *args],
        cwd=repo,
        check=True,
        capture_output=True,
    )


def boosted(src: Path, dst: Path, factor: float = 10.0) -> None:
    """A copy of the adapter ``src`` whose every lora_B is ``factor`` times larger."""
    dst.mkdir(parents=True)
    shutil.copy(src / "adapter_config.json", dst / "adapter_config.json")
    tensors = load_file(src / "adapter_model.safetensors")
    save_file({k: v * factor if ".lora_B." in k else v for k, v in tensors.items()}, dst / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Runner, Path]:
    """A repository whose main branch holds the trusted pool (sample clients 01-10, all honest),
    and a runner with ``clair`` on its PATH (this checkout's, as the action installs it)."""
    if shutil.which("git") is None:
        pytest.fail("git is needed to run the workflow's steps")
    base = tmp_path_factory.mktemp("action")
    tools = base / "bin"
    tools.mkdir()
    shim = tools / "clair"
    shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m clair_cli "$@"\n')
    shim.chmod(0o755)
    work = base / "repo"
    for k in range(1, 11):
        shutil.copytree(SAMPLES / f"client_{k:02d}", work / "adapters" / "trusted" / f"client_{k:02d}")
    git(work.parent, "init", "-q", "-b", "main", str(work))
    git(work, "add", "-A")
    git(work, "commit", "-q", "-m", "trusted pool")
    git(work, "update-ref", "refs/remotes/origin/main", "HEAD")  # what actions/checkout fetches
    return Runner(work, tools), work


def pull_request(work: Path, branch: str, upload: str, make: Any) -> None:
    """A branch off main that adds ``adapters/uploads/<upload>`` built by ``make(path)``."""
    git(work, "checkout", "-q", "-B", branch, "main")
    make(work / "adapters" / "uploads" / upload)
    git(work, "add", "-A")
    git(work, "commit", "-q", "-m", f"upload {upload}")


def run_workflow(
    runner: Runner, action: dict[str, Any], workflow: dict[str, Any]
) -> tuple[dict[str, str], dict[str, str], int | None, str]:
    """The workflow's steps after checkout, and inside the clair gate step the action's own
    steps after its installation: (added outputs, gate outputs, fail step's code or None, log)."""
    steps = workflow["jobs"]["gate"]["steps"]
    code, added, log = runner.run(step(steps, "added"), {"github": {"base_ref": "main"}}, "added")
    assert code == 0, log
    uses = step(steps, "clair gate")
    assert added["count"] != "0"  # the step's `if`
    defaults = {k: v.get("default", "") for k, v in action["inputs"].items()}
    with_ = {k: evaluate(v, {"steps": {"added": {"outputs": added}}}) for k, v in uses["with"].items()}
    context: dict[str, Any] = {"inputs": defaults | with_, "github": {"action_path": str(ROOT)}}
    a_steps = action["runs"]["steps"]
    code, gate, gate_log = runner.run(step(a_steps, "gate"), context, "gate")
    assert code == 0, gate_log  # the step records clair's exit code; it does not fail itself
    context["steps"] = {"gate": {"outputs": gate}}
    code, _, log = runner.run(step(a_steps, "Job summary"), context, "summary")
    assert code == 0, log
    fail = None
    if gate.get("exit-code") != "0":  # the fail step's `if`
        fail, _, log = runner.run(step(a_steps, "Fail when the gate refuses"), context, "fail")
        gate_log += log
    return added, gate, fail, gate_log


@pytest.mark.slow
def test_a_clean_upload_passes_and_a_boosted_one_fails_the_job(
    repo: tuple[Runner, Path], action: dict[str, Any], workflow: dict[str, Any]
) -> None:
    import json

    runner, work = repo
    pull_request(work, "clean-upload", "new-lora", lambda p: shutil.copytree(SAMPLES / "client_11", p))
    added, gate, fail, log = run_workflow(runner, action, workflow)
    assert added["adapters"] == "adapters/uploads/new-lora"
    assert gate["exit-code"] == "0" and gate["passed"] == "true", log
    assert fail is None
    assert (gate["sarif"], gate["json"], gate["markdown"]) == ("clair.sarif", "clair.json", "clair.md")
    log_ok = json.loads((work / "clair.sarif").read_text())
    assert_valid(log_ok, "sarif")
    assert log_ok["runs"][0]["results"] == []
    report = json.loads((work / "clair.json").read_text())
    assert_valid(report, "gate")
    assert report["summary"]["passed"] and report["n_adapters"] == 11
    assert runner.summary.read_text().startswith("### clair gate: passed")

    for f in ("clair.sarif", "clair.json", "clair.md"):  # the runner's workspace is not the repository
        (work / f).unlink()
    runner.summary.unlink()
    pull_request(work, "boosted-upload", "boosted", lambda p: boosted(SAMPLES / "client_12", p))
    added, gate, fail, log = run_workflow(runner, action, workflow)
    assert added["adapters"] == "adapters/uploads/boosted"
    assert gate["exit-code"] == "1" and gate["passed"] == "false", log
    assert fail == 1 and "::error title=clair gate::a candidate adapter was refused" in log
    sarif_log = json.loads((work / "clair.sarif").read_text())
    assert_valid(sarif_log, "sarif")
    (result,) = sarif_log["runs"][0]["results"]
    uri = result["locations"][0]["physicalLocation"]["artifactLocation"]
    assert uri == {"uri": "adapters/uploads/boosted/adapter_model.safetensors", "uriBaseId": "%SRCROOT%"}
    assert result["ruleId"] == "norm" and "x the pool median" in result["message"]["text"]
    report = json.loads((work / "clair.json").read_text())
    assert_valid(report, "gate")
    assert report["flagged"] == ["boosted"]
    assert runner.summary.read_text().startswith("### clair gate: 1 flagged")


@pytest.mark.slow
def test_bad_input_fails_the_job_with_exit_2_and_no_stale_report(
    repo: tuple[Runner, Path], action: dict[str, Any]
) -> None:
    runner, work = repo
    (work / "clair.sarif").write_text("{}")  # left over: must not be uploaded as this run's
    context = {
        "inputs": {k: v.get("default", "") for k, v in action["inputs"].items()}
        | {"adapters": "adapters/uploads/missing\n", "reference": "adapters/trusted"},
    }
    code, gate, log = runner.run(step(action["runs"]["steps"], "gate"), context, "gate-bad")
    assert code == 0, log
    assert gate == {"exit-code": "2", "passed": "false"}, log
    assert "Error:" in log and not (work / "clair.sarif").exists()
    context["steps"] = {"gate": {"outputs": gate}}
    fail, _, log = runner.run(step(action["runs"]["steps"], "Fail when the gate refuses"), context, "fail-bad")
    assert fail == 2 and "could not judge the adapters (exit 2)" in log
    code, _, log = runner.run(step(action["runs"]["steps"], "Job summary"), context, "summary-bad")
    assert code == 0 and "### clair gate: error (exit 2)" in runner.summary.read_text()


def test_no_candidate_passes_without_running_clair(repo: tuple[Runner, Path], action: dict[str, Any]) -> None:
    runner, _work = repo
    context = {"inputs": {k: v.get("default", "") for k, v in action["inputs"].items()} | {"adapters": "\n  \n"}}
    code, gate, log = runner.run(step(action["runs"]["steps"], "gate"), context, "gate-none")
    assert code == 0 and gate == {"exit-code": "0", "passed": "true"}, log
    assert "no candidate adapters to judge" in log


def test_the_workflow_lists_every_upload_as_it_is_named(repo: tuple[Runner, Path], workflow: dict[str, Any]) -> None:
    """A review (2026-12-06) passed the job with a directory named "x --exit-zero" (split by the
    shell into an option) and with one named with a non-ASCII letter (quoted by git diff, so the
    path matched nothing and nothing was gated): both are listed as they are, each its own line."""
    runner, work = repo
    git(work, "clean", "-fdq")  # what earlier tests left in the workspace
    git(work, "checkout", "-qf", "main")
    names = ["évil", "x --exit-zero", "it's"]

    def make(path: Path) -> None:
        for name in names:
            shutil.copytree(SAMPLES / "client_11", path.parent / name)

    pull_request(work, "odd-names", names[0], make)
    code, added, log = runner.run(
        step(workflow["jobs"]["gate"]["steps"], "added"), {"github": {"base_ref": "main"}}, "odd"
    )
    assert code == 0, log
    assert added["adapters"].splitlines() == sorted(f"adapters/uploads/{n}" for n in names)


def test_the_workflow_fails_a_pull_request_that_changes_the_trusted_pool(
    repo: tuple[Runner, Path], workflow: dict[str, Any]
) -> None:
    runner, work = repo
    git(work, "clean", "-fdq")
    git(work, "checkout", "-qf", "-B", "poison", "main")
    shutil.copytree(SAMPLES / "client_13", work / "adapters" / "trusted" / "extra")
    git(work, "add", "-A")
    git(work, "commit", "-q", "-m", "a reference that vouches for the upload")
    check = step(workflow["jobs"]["gate"]["steps"], "Trusted pool unchanged")
    code, _, log = runner.run(check, {"github": {"base_ref": "main"}}, "trusted")
    assert code == 1 and "changes adapters/trusted" in log
    git(work, "checkout", "-q", "-B", "clean", "main")
    code, _, log = runner.run(check, {"github": {"base_ref": "main"}}, "trusted-ok")
    assert code == 0, log
