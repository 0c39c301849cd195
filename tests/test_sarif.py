"""``--sarif FILE`` on audit and gate: a SARIF 2.1.0 log for code scanning, valid against the
OASIS schema (vendored in tests/data, validated offline), one error result per flagged adapter."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from pools import write_pool
from report_check import SARIF_SCHEMA, assert_valid
from typer.testing import CliRunner

from clair_cli import __version__
from clair_cli.cli import app
from clair_cli.report import sarif

SCHEMA_SHA256 = "c3b4bb2d6093897483348925aaa73af03b3e3f4bd4ca38cef26dcb4212a2682e"


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, list(args), env={"NO_COLOR": "1", "COLUMNS": "120"})


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository-like tree: adapters/pool/client_00..07 (client_02 and client_06 bad)."""
    root = tmp_path_factory.mktemp("sarif-repo")
    write_pool(root / "adapters" / "pool")
    return root


def run(repo: Path, monkeypatch: pytest.MonkeyPatch, *args: str, code: int) -> dict[str, Any]:
    """Run a command from the repository root with ``--sarif -``; the log, checked against the schema."""
    monkeypatch.chdir(repo)
    result = invoke(*args, "--sarif", "-", "-q")
    assert result.exit_code == code, result.output
    log = json.loads(result.stdout)
    assert_valid(log, "sarif", args[0])
    return log


def test_the_vendored_schema_is_the_official_one() -> None:
    assert hashlib.sha256(SARIF_SCHEMA.read_bytes()).hexdigest() == SCHEMA_SHA256
    schema = json.loads(SARIF_SCHEMA.read_text())
    assert schema["id"] == sarif.SARIF_SCHEMA_URI
    assert schema["properties"]["version"]["enum"] == [sarif.SARIF_VERSION]


def test_every_rule_of_the_verdict_is_described_in_its_order() -> None:
    from clair_cli.core.rules import RULES

    assert list(sarif.RULE_TEXTS) == [*(r.name for r in RULES), "unanalysed"]
    for rule_id, text in sarif.RULE_TEXTS.items():
        assert text.short.endswith(".") and len(text.short) < 100, rule_id
        assert len(text.full) > len(text.short), rule_id


def test_audit_writes_one_error_result_per_flagged_adapter(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = run(repo, monkeypatch, "audit", "adapters/pool", code=1)
    assert log["version"] == "2.1.0" and log["$schema"] == sarif.SARIF_SCHEMA_URI
    (only,) = log["runs"]
    driver = only["tool"]["driver"]
    assert driver["name"] == "clair" and driver["version"] == __version__
    rule_ids = [r["id"] for r in driver["rules"]]
    assert rule_ids == list(sarif.RULE_TEXTS)
    for rule in driver["rules"]:
        assert rule["shortDescription"]["text"] and rule["fullDescription"]["text"]
        assert rule["help"]["text"] == rule["fullDescription"]["text"]
        assert rule["defaultConfiguration"]["level"] == "error"
    results = only["results"]
    assert [r["properties"]["adapter"] for r in results] == ["client_02", "client_06"]
    for r in results:
        name = r["properties"]["adapter"]
        assert r["level"] == "error"
        assert r["ruleId"] in rule_ids and rule_ids[r["ruleIndex"]] == r["ruleId"]
        assert r["ruleId"] in r["properties"]["rules"]
        (loc,) = r["locations"]
        artifact = loc["physicalLocation"]["artifactLocation"]
        assert artifact == {"uri": f"adapters/pool/{name}/adapter_model.safetensors", "uriBaseId": "%SRCROOT%"}
        assert (repo / artifact["uri"]).is_file()
        text = r["message"]["text"]
        assert text.startswith(f"Adapter {name} flagged by clair audit (score {r['properties']['score']:.3f}, rule ")
        assert r["properties"]["score"] > 1
        digest = r["properties"]["sha256"]["adapter_model.safetensors"]  # hashed for --sarif alone too
        assert r["partialFingerprints"] == {"adapterSha256/v1": f"{digest}:{name}"}
    assert only["properties"]["flagged"] == ["client_02", "client_06"] and not only["properties"]["passed"]


def test_the_rule_is_the_one_that_set_the_score(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(repo)
    report = json.loads(invoke("audit", "adapters/pool", "--json", "-", "-q").stdout)
    log = sarif.sarif_log(report)
    for result in log["runs"][0]["results"]:
        adapter = next(a for a in report["adapters"] if a["name"] == result["properties"]["adapter"])
        best = max(adapter["reasons"], key=lambda r: -1 if r["margin"] is None else r["margin"])
        assert result["ruleId"] == best["rule"] and best["margin"] == pytest.approx(adapter["score"])


def test_gate_reports_the_refused_candidate_and_passes_a_clean_one(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    refs = [a for k in (0, 1, 3, 4, 5, 7) for a in ("--reference", f"adapters/pool/client_{k:02d}")]
    refused = run(repo, monkeypatch, "gate", "adapters/pool/client_06", *refs, code=1)
    (result,) = refused["runs"][0]["results"]
    assert result["properties"]["role"] == "candidate" and result["level"] == "error"
    assert result["message"]["text"].startswith("Candidate adapter client_06 refused by clair gate (score ")
    assert refused["runs"][0]["properties"]["command"] == "gate"
    passed = run(repo, monkeypatch, "gate", "adapters/pool/client_07", *refs[:-2], code=0)
    assert passed["runs"][0]["results"] == [] and passed["runs"][0]["properties"]["passed"]


def test_sarif_to_a_file_beside_json_and_markdown_is_deterministic(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(repo)
    texts = []
    for i in range(2):
        args = ["audit", "adapters/pool", "--sarif", f"out{i}.sarif", "--json", f"out{i}.json", "--markdown", "-"]
        result = invoke(*args)
        assert result.exit_code == 1, result.output
        assert result.stdout.startswith("### clair audit: 2 flagged")  # stdout carries the Markdown alone
        texts.append((repo / f"out{i}.sarif").read_text())
    assert texts[0] == texts[1]
    assert str(repo) not in texts[0]  # no absolute path of the checkout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sarif", "-", "--json", "-"], "--sarif - cannot share stdout"),
        (["--sarif", "-", "--markdown", "-"], "--sarif - cannot share stdout"),
        (["--sarif", "same.out", "--json", "same.out"], "--json, --markdown, --sarif and --plot name the same file"),
    ],
)
def test_impossible_sarif_targets_are_refused_before_any_work(
    repo: Path, monkeypatch: pytest.MonkeyPatch, extra: list[str], message: str
) -> None:
    monkeypatch.chdir(repo)
    result = invoke("audit", "adapters/pool", *extra)
    assert result.exit_code == 2 and message in result.output
    assert not (repo / "same.out").exists()


def test_sarif_next_to_an_input_is_refused(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(repo)
    target = "adapters/pool/client_00/adapter_config.json"
    before = (repo / target).read_bytes()
    result = invoke("audit", "adapters/pool", "--sarif", target)
    assert result.exit_code == 2 and "Error:" in result.output
    assert (repo / target).read_bytes() == before


def _report(adapter: dict[str, Any]) -> dict[str, Any]:
    """A minimal audit report holding one flagged adapter (the fields the SARIF log reads)."""
    base = {
        "name": "x",
        "role": "member",
        "score": 2.5,
        "norm": 12.0,
        "signals": {"norm": 2.5},
        "flagged": True,
        "reasons": [{"rule": "norm", "margin": 2.5, "text": "update norm 12x the pool median"}],
        "sha256": None,
        "hub": None,
        "path": None,
    }
    return {
        "command": "audit",
        "base_model": "b",
        "summary": {"passed": False, "n_adapters": 1, "n_flagged": 1, "flagged": [adapter.get("name", "x")]},
        "adapters": [base | adapter],
    }


@pytest.mark.parametrize(
    ("adapter", "location"),
    [
        (
            {"path": "up loads/new#1"},
            {"uri": "up%20loads/new%231/adapter_model.safetensors", "uriBaseId": "%SRCROOT%"},
        ),
        ({"path": "loras/one.safetensors"}, {"uri": "loras/one.safetensors", "uriBaseId": "%SRCROOT%"}),
        ({"path": "./a/../b"}, {"uri": "b/adapter_model.safetensors", "uriBaseId": "%SRCROOT%"}),
        (
            {"hub": {"repo_id": "org/lora", "revision": "v2", "subfolder": "round_3", "commit": "abc123"}},
            {"uri": "https://huggingface.co/org/lora/blob/abc123/round_3/adapter_model.safetensors"},
        ),
        (
            {"hub": {"repo_id": "org/lora", "revision": None, "subfolder": None, "commit": None}},
            {"uri": "https://huggingface.co/org/lora/blob/main/adapter_model.safetensors"},
        ),
    ],
)
def test_locations(tmp_path: Path, adapter: dict[str, Any], location: dict[str, str]) -> None:
    log = sarif.sarif_log(_report(adapter), cwd=tmp_path)
    assert_valid(log, "sarif")
    (result,) = log["runs"][0]["results"]
    assert result["locations"][0]["physicalLocation"]["artifactLocation"] == location
    assert result["ruleId"] == "norm"


def test_a_path_outside_the_working_directory_is_an_absolute_file_uri(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere" / "lora"
    (tmp_path / "repo").mkdir()
    for given in (str(outside), "../elsewhere/lora"):
        log = sarif.sarif_log(_report({"path": given}), cwd=tmp_path / "repo")
        assert_valid(log, "sarif")
        artifact = log["runs"][0]["results"][0]["locations"][0]["physicalLocation"]["artifactLocation"]
        assert artifact == {"uri": (outside / "adapter_model.safetensors").as_uri()}


def test_an_adapter_without_files_gets_a_logical_location_and_a_copy_its_rule() -> None:
    copy = {"reasons": [{"rule": "duplicate", "margin": None, "text": "identical to y"}], "score": 0.2}
    log = sarif.sarif_log(_report(copy))
    assert_valid(log, "sarif")
    (result,) = log["runs"][0]["results"]
    assert result["ruleId"] == "duplicate"
    assert result["locations"] == [{"logicalLocations": [{"name": "x", "kind": "module"}]}]
