"""Reports: module names, layer order, narrow terminals, reasons that agree with the scores,
base model names, the CI fields of the JSON and portable model cards."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
from pathlib import Path

import pytest
from helpers import lora_config, random_factors, write_adapter
from rich.console import Console
from typer.testing import CliRunner

from clair_cli import methods, pipeline
from clair_cli.cli import app
from clair_cli.core.rules import Reason
from clair_cli.errors import IncompatibleAdapters
from clair_cli.io.base_model import canonical_base_model
from clair_cli.io.sources import SourceOptions, open_adapters
from clair_cli.params import AuditParams
from clair_cli.report.audit import audit_report, reason_text, render_audit, share_text
from clair_cli.report.card import model_card
from clair_cli.report.modules import ModuleNames, natural_sorted
from clair_cli.report.plot import plot_labels

SAMPLES = Path(__file__).parents[1] / "sample_adapters"
GPT2 = [f"transformer.h.{i}.{p}" for i in range(2) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
LLAMA = [
    f"model.layers.{i}.{p}"
    for i in (0, 1, 2, 10)
    for p in ("self_attn.q_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.down_proj")
]


def invoke(*args: str, **env: str):
    return CliRunner().invoke(app, list(args), env={"NO_COLOR": "1", "COLUMNS": "120", **env})


@pytest.mark.parametrize(
    "names,expected",
    [
        (
            GPT2,
            {
                "transformer.h.0.attn.c_proj": "layer 0 attn.c_proj",
                "transformer.h.0.mlp.c_proj": "layer 0 mlp.c_proj",
                "transformer.h.1.attn.c_attn": "layer 1 c_attn",
                "transformer.h.1.mlp.c_fc": "layer 1 c_fc",
            },
        ),
        (
            LLAMA,
            {
                "model.layers.0.self_attn.q_proj": "layer 0 q_proj",
                "model.layers.10.mlp.down_proj": "layer 10 down_proj",
            },
        ),
        (
            ["model.encoder.layers.0.self_attn.q_proj", "model.decoder.layers.0.self_attn.q_proj", "lm_head"],
            {
                "model.encoder.layers.0.self_attn.q_proj": "model.encoder.layers.0.self_attn.q_proj",
                "lm_head": "lm_head",
            },
        ),
    ],
)
def test_module_labels_are_short_and_unique(names: list[str], expected: dict[str, str]) -> None:
    labels = ModuleNames(names)
    shown = [labels.short(n) for n in names]
    assert len(set(shown)) == len(names)
    for name, label in expected.items():
        assert labels.short(name) == label


def test_summaries_and_reasons_name_modules_unambiguously() -> None:
    labels = ModuleNames(GPT2)
    assert labels.summarise(["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]) == "layers 0-1 attn.c_proj"
    assert labels.summarise(GPT2) == "all 8 modules"
    reason = Reason(
        kind="off_subspace",
        share=0.9,
        modules=("transformer.h.1.mlp.c_proj",),
        across_modules=False,
        rule="module",
        value=0.9,
        threshold=0.8,
        compare=">",
        margin=1.5,
    )
    assert (
        reason_text(reason, [], labels) == "90% of its update lies outside the shared subspace, in layer 1 mlp.c_proj"
    )
    llama = ModuleNames(LLAMA)
    assert llama.summarise(["model.layers.2.self_attn.v_proj", "model.layers.10.self_attn.v_proj"]) == (
        "layers 2, 10 v_proj"
    )


def test_natural_order() -> None:
    assert natural_sorted(["layers.10.q", "layers.2.q", "layers.1.q"]) == ["layers.1.q", "layers.2.q", "layers.10.q"]


def _llama_pool(root: Path, n: int = 6, **cfg: object) -> Path:
    modules = {m: (8, 6) for m in LLAMA}
    targets = ["q_proj", "v_proj", "gate_proj", "down_proj"]
    for k in range(n):
        write_adapter(root / f"client_{k}", random_factors(modules, seed=k), lora_config(target_modules=targets, **cfg))
    return root


@pytest.fixture(scope="module")
def llama_report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = _llama_pool(tmp_path_factory.mktemp("llama"))
    result = invoke("audit", str(root), "--json", "-", "--exit-zero", "--device", "cpu")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_modules_are_listed_in_layer_order(llama_report: dict) -> None:
    names = [m["name"] for m in llama_report["modules"]]
    layers = [int(re.search(r"layers\.(\d+)\.", n)[1]) for n in names]  # type: ignore[index]
    assert layers == sorted(layers) and layers[-1] == 10
    assert list(llama_report["shared_rank"]) == names
    assert list(llama_report["adapters"][0]["per_module"]) == names
    assert plot_labels(llama_report)[:4] == [
        "layer 0 down_proj",
        "layer 0 gate_proj",
        "layer 0 q_proj",
        "layer 0 v_proj",
    ]
    assert plot_labels(llama_report)[-1] == "layer 10 v_proj"
    assert [m["label"] for m in llama_report["modules"]] == plot_labels(llama_report)


@pytest.fixture(scope="module")
def sample_report() -> dict:
    adapters = open_adapters([str(SAMPLES)])
    pool = pipeline.build_pool(adapters)
    return audit_report(pipeline.audit(pool, AuditParams(device="cpu")))


@pytest.mark.parametrize("width", [60, 100])
def test_table_is_readable_at_narrow_widths(sample_report: dict, width: int) -> None:
    console = Console(record=True, width=width, force_terminal=False, color_system=None)
    render_audit(console, sample_report)
    text = console.export_text()
    lines = text.splitlines()
    assert all(len(line) <= width for line in lines)
    for a in sample_report["adapters"]:
        verdict = "FLAGGED" if a["flagged"] else "ok"
        # name, score and verdict whole, on one line
        assert any(re.search(rf"{a['name']}\s+{a['score']:.3f}\s+{verdict}\b", line) for line in lines), a["name"]
    assert ("top modules" in text) == (width >= 100)
    if width >= 100:
        assert "layer 1 attn.c_proj" in text
    # The reason column keeps a readable width: no line of it shorter than a few words.
    flagged_line = next(line for line in lines if "client_14" in line)
    assert len(flagged_line.split("FLAGGED", 1)[1].strip()) >= 20


def test_reasons_agree_with_the_score_and_the_table(sample_report: dict) -> None:
    flagged = [a for a in sample_report["adapters"] if a["flagged"]]
    assert flagged
    for a in flagged:
        margins = [r["margin"] for r in a["reasons"] if r["margin"] is not None]
        if margins:  # (a copy flagged only as a duplicate keeps its own score)
            assert max(margins) == pytest.approx(a["score"], abs=1e-6), a["name"]
        for r in a["reasons"]:
            assert {"rule", "value", "threshold", "compare", "margin"} <= set(r)
            if r["value"] is not None:
                passed = r["value"] > r["threshold"] if r["compare"] == ">" else r["value"] < r["threshold"]
                assert passed or r["margin"] > 1, r
            if r["kind"] == "off_subspace" and r.get("module"):
                # the share quoted is the one the table shows for that module, with the same rounding
                assert share_text(a["per_module"][r["module"]]) in r["text"]
        averages = set(re.findall(r"(\d+%)[^;]*on average", " ".join(r["text"] for r in a["reasons"])))
        assert len(averages) <= 1, a["reasons"]  # one mean share, however many reasons quote it


def _pool_with_bases(root: Path, bases: list[str]) -> list:
    for k, base in enumerate(bases):
        write_adapter(root / f"a{k}", config=lora_config(base_model_name_or_path=base), seed=k)
    return open_adapters([str(root)])


def test_base_models_compared_after_normalisation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "base").mkdir()
    monkeypatch.chdir(tmp_path)
    pool = pipeline.build_pool(
        _pool_with_bases(tmp_path / "p1", ["./base", "base", str(tmp_path / "base"), "base/", "./base"])
    )
    assert pool.base_model == "./base" and pool.notes and "same model" in pool.notes[0]
    pool = pipeline.build_pool(
        _pool_with_bases(tmp_path / "p2", ["roberta-base", "FacebookAI/roberta-base", "roberta-base", "x", "x"][:3] * 2)
    )
    assert "FacebookAI/roberta-base" in pool.notes[0]
    assert pool.base_model == "FacebookAI/roberta-base"  # what the outputs record, in any order
    for order in (["roberta-base", "FacebookAI/roberta-base"] * 3, ["FacebookAI/roberta-base", "roberta-base"] * 3):
        root = tmp_path / "-".join(order[:2]).replace("/", "_")
        assert pipeline.build_pool(_pool_with_bases(root, order)).base_model == "FacebookAI/roberta-base"
    for order in (["base", str(tmp_path / "base")] * 3, [str(tmp_path / "base"), "base/"] * 3):
        root = tmp_path / f"local-{order[0][-4:]}-{len(order[1])}"
        assert pipeline.build_pool(_pool_with_bases(root, order)).base_model == "base"  # relative, not absolute
    assert pipeline.build_pool(_pool_with_bases(tmp_path / "one", ["roberta-base"] * 5)).base_model == "roberta-base"
    assert canonical_base_model("gpt2") == "openai-community/gpt2"
    assert canonical_base_model("/a\x00b") == "/a\x00b"  # from a hostile config: no exception
    assert canonical_base_model("hf://bert-base-uncased/") == "google-bert/bert-base-uncased"
    with pytest.raises(IncompatibleAdapters, match="different base models"):
        pipeline.build_pool(_pool_with_bases(tmp_path / "p3", ["roberta-base", "roberta-large"] * 3))


def test_base_model_option_overrides_every_config(tmp_path: Path) -> None:
    for k, base in enumerate(["org/a", "org/b", "org/a", "org/a", "org/a"]):
        write_adapter(tmp_path / "p" / f"a{k}", config=lora_config(base_model_name_or_path=base), seed=k)
    result = invoke("audit", str(tmp_path / "p"), "--json", "-", "--exit-zero")
    assert result.exit_code == 2 and "different base models" in result.output
    result = invoke("audit", str(tmp_path / "p"), "--json", "-", "--exit-zero", "--base-model", "org/a")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["base_model"] == "org/a"
    notes = {a["name"]: a["notes"] for a in report["adapters"]}
    assert notes["a1"] == ["--base-model 'org/a' replaces the config's base model 'org/b'"] and notes["a0"] == []
    adapters = open_adapters([str(tmp_path / "p")], SourceOptions(base_model="org/c"))
    assert {a.base_model for a in adapters} == {"org/c"}


def test_json_carries_what_ci_needs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _llama_pool(tmp_path / "pool", n=5)
    result = invoke("audit", "pool", str(tmp_path / "pool" / "client_4"), "--json", "-", "--exit-zero")
    assert result.exit_code == 2  # client_4 twice
    result = invoke("audit", "pool/", "--json", "-", "--exit-zero", SOURCE_DATE_EPOCH="1700000000")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["generated_at"] == "2023-11-14T22:13:20Z" and report["version"]
    assert report["summary"] == {"passed": True, "n_adapters": 5, "n_flagged": 0, "flagged": []}
    for a in report["adapters"]:
        assert a["path"] == f"pool/{a['name']}" and a["hub"] is None
        for file, digest in a["sha256"].items():
            assert digest == hashlib.sha256((tmp_path / a["path"] / file).read_bytes()).hexdigest()
        assert set(a["sha256"]) == {"adapter_model.safetensors", "adapter_config.json"}
    absolute = json.loads(invoke("audit", str(tmp_path / "pool"), "--json", "-", "--exit-zero").stdout)
    assert absolute["adapters"][0]["path"] == str(tmp_path / "pool" / "client_0")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", absolute["generated_at"])


def test_gate_json_summary_and_thresholds(tmp_path: Path) -> None:
    root = _llama_pool(tmp_path / "refs", n=6)
    refs = sum((["-r", str(root / f"client_{k}")] for k in range(5)), [])
    result = invoke("gate", str(root / "client_5"), *refs, "--json", "-", "--exit-zero")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["command"] == "gate" and report["summary"]["passed"] == (not report["flagged"])
    assert report["summary"]["n_adapters"] == 6


def test_model_card_has_no_absolute_paths_and_the_merge_parameters(tmp_path: Path) -> None:
    root = _llama_pool(tmp_path / "pool", n=5)
    out = tmp_path / "merged"
    result = invoke(
        "merge", str(root), "--out", str(out), "--method", "mean", "--weights", "1,1,2,2,4", "--seed", "3", "-q"
    )
    assert result.exit_code == 0, result.output
    card = (out / "README.md").read_text()
    assert str(tmp_path) not in card and "/tmp" not in card
    assert "- method: mean" in card and "tolerance (--merge-tol): 0.001" in card
    assert "- audit:" not in card  # --method mean runs no audit: no audit settings to list
    assert "| weight |" in card
    weights = [float(x) for x in re.findall(r"\| yes \| ([0-9.]+) \|", card)]
    assert weights == pytest.approx([0.1, 0.1, 0.2, 0.2, 0.4])
    assert "| `client_3` | `client_3` |" in card  # the source by its name, not its absolute path


def test_report_does_not_import_the_pipeline() -> None:
    report_dir = Path(__file__).parents[1] / "clair_cli" / "report"
    for path in report_dir.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.module != "clair_cli.pipeline", path
            elif isinstance(node, ast.Import):
                assert all(a.name != "clair_cli.pipeline" for a in node.names), path
    assert os.path.exists(report_dir / "modules.py")


def test_clair_merge_json_and_card(tmp_path: Path) -> None:
    root = _llama_pool(tmp_path / "pool", n=5)
    out, js = tmp_path / "merged", tmp_path / "merge.json"
    result = invoke("merge", str(root), "--out", str(out), "--json", str(js), "--seed", "2", "--exit-zero", "-q")
    assert result.exit_code == 0, result.output
    report = json.loads(js.read_text())
    assert report["command"] == "merge" and "merge" in report and report["summary"]["n_adapters"] == 5
    assert all(len(a["sha256"]) == 2 for a in report["adapters"])
    card = (out / "README.md").read_text()
    assert "- method: clair" in card and "decomposition noisy, solver auto" in card and "seed 2" in card
    assert str(tmp_path) not in card


def test_refine_cards_are_portable_and_list_the_parameters(tmp_path: Path) -> None:
    root = _llama_pool(tmp_path / "pool", n=5)
    out = tmp_path / "refined"
    result = invoke("refine", str(root), "--out", str(out), "--seed", "4", "--exit-zero", "-q")
    assert result.exit_code == 0, result.output
    cards = [p.read_text() for p in out.glob("*/README.md")]
    assert cards
    for card in cards:
        assert str(tmp_path) not in card
        assert "## Parameters" in card and "seed 4" in card and "projection rank: auto" in card


def test_the_report_says_when_half_the_pool_or_more_is_flagged() -> None:
    from clair_cli.report.audit import report_notes

    def notes(n_flagged: int, n_adapters: int) -> list[str]:
        adapters = [{"name": f"a{k}", "role": "candidate", "notes": []} for k in range(n_adapters)]
        report = {
            "dropped_modules": [],
            "converged": True,
            "modules": [],
            "adapters": adapters,
            "command": "audit",
            "summary": {"n_flagged": n_flagged},
            "n_adapters": n_adapters,
        }
        return [n for n in report_notes(report) if "adapters flagged" in n]

    # Two cohorts of half a round each: one flagged whole is exactly half (benchmarks/clustered.py).
    assert notes(6, 12) and "cohorts" in notes(6, 12)[0]
    assert notes(7, 12) and not notes(5, 12) and not notes(3, 7)


@pytest.mark.parametrize("name", [*methods.REGISTRY, "refine"])
def test_every_method_card_says_what_it_did(name: str) -> None:
    """Each merge method of the registry carries its own card paragraph, and refine has one:
    none falls back to its bare name."""
    text = model_card("t", name, "gpt2", [], "clair merge x", None, [])
    method = text.split("## Method\n\n", 1)[1].split("\n", 1)[0]
    assert method != name and len(method) > 30
    if name in methods.REGISTRY:
        assert method == methods.REGISTRY[name].card
