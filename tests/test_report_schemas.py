"""The JSON reports' schemas (clair_cli/schemas): shipped, up to date, strict, and followed by
every kind of report the commands write.

Every report any test writes is also checked (tests/conftest.py, helpers.run_cli); here each
command runs on the sample adapters and on a small synthetic pool, flagged and clean, with
a refused gate candidate, every merge method and the clair merge's options.
"""

from __future__ import annotations

import copy
import json
import shutil
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pools import MODULES, write_pool
from report_check import assert_valid, problems, validator
from report_schemas import KINDS, SCHEMA_DIR, schemas, text
from typer.testing import CliRunner

from clair_cli import methods
from clair_cli import schemas as shipped
from clair_cli.cli import app

ROOT = Path(__file__).parents[1]
SAMPLES = ROOT / "sample_adapters"
# Every option that adds to the clair merge's section of the report.
MERGE_OPTIONS = ("--project", "--clip", "2", "--norm-bound", "1.5", "--rescale", "norm",
                 "--weights", "1,2,3,4,5,6,7,8", "--merge-rank", "3", "--exit-zero")  # fmt: skip


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, list(args), env={"NO_COLOR": "1", "COLUMNS": "120"})


def run_json(*args: str, code: int) -> dict[str, Any]:
    """Run a command with ``--json -``: its exit code, and its report (checked against the schema)."""
    result = invoke(*args, "--json", "-", "-q")
    assert result.exit_code == code, result.output
    report = json.loads(result.stdout)
    assert_valid(report, report["command"], " ".join(args[:1]))
    return report


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pool(tmp_path_factory.mktemp("schema-pool"))


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pool(tmp_path_factory.mktemp("schema-clean"), bad=())


@pytest.fixture(scope="module")
def reports(pool: Path, clean: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """One report of each kind and case, by case name."""
    out = tmp_path_factory.mktemp("schema-out")
    refs = [a for k in (0, 1, 3, 4, 5, 7) for a in ("-r", str(pool / f"client_{k:02d}"))]
    return {
        "inspect": run_json("inspect", str(SAMPLES), code=0),
        "audit flagged": run_json("audit", str(pool), code=1),
        "audit clean": run_json("audit", str(clean), code=0),
        "gate refused": run_json("gate", str(pool / "client_02"), str(pool / "client_06"), *refs, code=1),
        "gate passed": run_json("gate", str(clean / "client_02"), *refs, code=0),
        "merge clair": run_json("merge", str(pool), "--out", str(out / "m1"), code=1),
        "merge clair options": run_json("merge", str(pool), "--out", str(out / "m2"), *MERGE_OPTIONS, code=0),
        "refine": run_json("refine", str(pool), "--out", str(out / "r1"), code=1),
    }


def test_the_shipped_files_are_what_report_schemas_builds() -> None:
    built = schemas()
    assert tuple(built) == KINDS == shipped.KINDS
    for kind, schema in built.items():
        assert (SCHEMA_DIR / f"{kind}.schema.json").read_text(encoding="utf-8") == text(schema), (
            f"{kind}.schema.json is out of date: run python tests/report_schemas.py"
        )
    assert sorted(p.name for p in SCHEMA_DIR.glob("*.json")) == sorted(f"{k}.schema.json" for k in KINDS)


def test_schemas_are_valid_draft_2020_12_and_ship_as_package_data() -> None:
    from jsonschema import Draft202012Validator

    for kind in KINDS:
        schema = shipped.load(kind)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        Draft202012Validator.check_schema(schema)
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "schemas/*.schema.json" in package_data["clair_cli"]
    with pytest.raises(ValueError, match="the report kinds are"):
        shipped.load("plot")


def test_the_schemas_know_every_rule_and_merge_method() -> None:
    import report_schemas

    from clair_cli.core.audit import WATCHED_RULES
    from clair_cli.core.rules import RULES

    assert [r.name for r in RULES] == report_schemas.RULES
    assert list(WATCHED_RULES) == report_schemas.WATCHED_RULES
    assert [m for m in methods.NAMES if not methods.get(m).audits] == report_schemas.BASELINES


def test_every_kind_of_report_follows_its_schema(reports: dict[str, dict[str, Any]]) -> None:
    assert reports["audit flagged"]["flagged"] == ["client_02", "client_06"]
    assert reports["audit clean"]["summary"]["passed"]
    assert reports["gate refused"]["flagged"] == ["client_02", "client_06"]
    assert reports["gate passed"]["summary"]["passed"]
    assert set(reports["merge clair options"]["merge"]) >= {"clipped", "projection_rank"}
    for case, report in reports.items():
        assert problems(report, case) == []


@pytest.mark.parametrize("method", [m for m in methods.NAMES if not methods.get(m).audits])
def test_a_baseline_merge_writes_a_report(pool: Path, tmp_path: Path, method: str) -> None:
    weighted = [] if method in ("median", "trimmed-mean", "krum", "multi-krum") else ["--weights", "1,1,1,1,2,2,2,2"]
    report = run_json("merge", str(pool), "--out", str(tmp_path / "m"), "--method", method, *weighted, code=0)
    assert report["audit"] is None and report["command"] == "merge"
    merge = report["merge"]
    assert merge["method"] == method and set(merge["rank"]) == set(MODULES)
    written = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    for module, rank in merge["rank"].items():  # the rank written is the adapter's
        assert written["rank_pattern"].get(module, written["r"]) == rank
    assert [a["name"] for a in report["adapters"]] == [f"client_{k:02d}" for k in range(8)]
    assert all(a["used"] for a in report["adapters"])
    assert all(len(a["sha256"]["adapter_model.safetensors"]) == 64 for a in report["adapters"])
    if weighted:
        assert merge["weights"] == [1, 1, 1, 1, 2, 2, 2, 2]
        assert [a["weight"] for a in report["adapters"]] == [0.083333] * 4 + [0.166667] * 4
    else:
        assert merge["weights"] is None and {a["weight"] for a in report["adapters"]} == {None}
    if method in ("krum", "multi-krum"):
        assert set(merge["selected"]) == set(MODULES)
        assert all(len(names) == 1 for names in merge["selected"].values()) == (method == "krum")
    else:
        assert "selected" not in merge


def test_a_baseline_still_refuses_markdown_and_plot(pool: Path, tmp_path: Path) -> None:
    result = invoke("merge", str(pool), "--out", str(tmp_path / "m"), "--method", "mean", "--markdown", "-")
    assert result.exit_code == 2
    assert "--method mean runs none" in result.output and not (tmp_path / "m").exists()


def test_an_inspect_report_with_an_error_row_follows_its_schema(tmp_path: Path) -> None:
    """inspect writes every row with --json, an unreadable adapter's too, although it exits 2."""
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(SAMPLES / "client_01" / "adapter_config.json", broken)
    weights = (SAMPLES / "client_01" / "adapter_model.safetensors").read_bytes()
    (broken / "adapter_model.safetensors").write_bytes(weights[:100])  # truncated
    report = run_json("inspect", str(SAMPLES / "client_02"), str(broken), code=2)
    good, bad = report["adapters"]
    assert "error" not in good and set(bad) == {"name", "source", "revision", "error"}
    assert "truncated" in bad["error"]
    assert problems(_renamed(report, ["adapters", 1, "error"], "message")), "an error row's fields are checked"


def _renamed(report: dict[str, Any], path: list[Any], new: str | None) -> dict[str, Any]:
    """``report`` with the key at ``path`` renamed to ``new`` (None: removed)."""
    out = copy.deepcopy(report)
    parent = out
    for key in path[:-1]:
        parent = parent[key]
    value = parent.pop(path[-1])
    if new is not None:
        parent[new] = value
    return out


@pytest.mark.parametrize(
    ("case", "path", "new"),
    [
        ("audit flagged", ["summary"], None),
        ("audit flagged", ["flagged"], "flagged_adapters"),
        ("audit flagged", ["adapters", 0, "score"], "scores"),
        ("audit flagged", ["adapters", 2, "reasons", 0, "margin"], None),
        ("audit flagged", ["modules", 0, "rank"], "r"),
        ("audit flagged", ["params", "seed"], None),
        ("gate refused", ["adapters", 0, "role"], None),
        ("merge clair", ["merge", "rank"], "ranks"),
        ("merge clair options", ["merge", "clipped"], None),
        ("merge clair options", ["merge", "projection_rank"], None),
        ("refine", ["refine", "projection_rank"], "rank"),
        ("inspect", ["adapters", 0, "lora_alpha"], "alpha"),
        ("inspect", ["adapters", 0, "modules", 0, "d_in"], None),
    ],
)
def test_a_missing_or_renamed_field_fails(reports: dict[str, dict[str, Any]], case: str, path: list, new: str) -> None:
    report = reports[case]
    assert problems(report) == []
    assert problems(_renamed(report, path, new)), f"{case}: {path} -> {new} passed the schema"


def test_a_renamed_field_of_a_baseline_report_fails(pool: Path, tmp_path: Path) -> None:
    report = run_json("merge", str(pool), "--out", str(tmp_path / "m"), "--method", "ties", code=0)
    for path, new in (
        (["audit"], None),
        (["merge", "method"], "name"),
        (["adapters", 0, "used"], "merged"),
        (["params", "dtype"], None),
    ):
        assert problems(_renamed(report, path, new)), path
    assert problems(report | {"audit": {}}), "a baseline's audit is null"


def test_roles_belong_to_their_command(reports: dict[str, dict[str, Any]]) -> None:
    audit = copy.deepcopy(reports["audit flagged"])
    audit["adapters"][0]["role"] = "candidate"  # an audit's adapters are members
    gate = copy.deepcopy(reports["gate refused"])
    gate["adapters"][0]["role"] = "member"
    assert problems(audit) and problems(gate)


def test_the_conftest_hook_sees_reports_written_in_process(pool: Path, tmp_path: Path) -> None:
    """The autouse fixture checks what write_text writes; a document that breaks its schema is
    reported with where it went and what is wrong."""
    from clair_cli.io import writers

    report = run_json("audit", str(pool), code=1)
    broken = _renamed(report, ["summary"], None)
    found = problems(broken, "x.json")
    assert found and found[0].startswith("x.json (audit): at /: 'summary' is a required property")
    assert writers.write_text.__module__ == "conftest"
    assert validator("sarif") is validator("sarif")
