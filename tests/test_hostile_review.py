"""Hostile inputs found by a review from outside (2026-12-05), each one an internal error, a hang,
a lost file or a misleading message before: exit 2 with a clear message, or the right result."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
from helpers import MODULES, lora_config, random_factors, write_adapter
from typer.testing import CliRunner

from clair_cli.cli import app


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env={"NO_COLOR": "1", "COLUMNS": "120"})


def refused(result, *words: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "internal error" not in result.output, result.output
    for word in words:
        assert word in result.stderr, (word, result.stderr)


def _pool(root: Path, n: int = 6, names: list[str] | None = None, config: dict | None = None) -> Path:
    for k, name in enumerate(names or [f"client_{k:02d}" for k in range(n)]):
        write_adapter(root / name, random_factors(MODULES, seed=k), config)
    return root


def test_a_directory_name_that_is_not_utf8_reaches_every_output(tmp_path: Path) -> None:
    """A pool member whose directory name holds the byte 0xff (Python reads it as a lone
    surrogate): reports, merge, refine and gate write it escaped instead of failing on it."""
    bad = "c\udcff00"  # os.fsencode: b"c\xff00"
    pool = _pool(tmp_path / "pool", names=[bad, *[f"c{k:02d}" for k in range(1, 6)]])
    assert (pool / bad).is_dir()
    result = invoke(
        "audit", str(pool), "--exit-zero", "--markdown", str(tmp_path / "r.md"), "--json", str(tmp_path / "r.json")
    )
    assert result.exit_code == 0, result.output
    assert "c\\udcff00" in (tmp_path / "r.md").read_text()
    json.loads((tmp_path / "r.json").read_text())
    assert invoke("merge", str(pool), "--out", str(tmp_path / "m")).exit_code in (0, 1)
    assert "c\\udcff00" in (tmp_path / "m" / "README.md").read_text()
    assert invoke("refine", str(pool), "--out", str(tmp_path / "f")).exit_code in (0, 1)
    assert "c_00" in {p.name for p in (tmp_path / "f").iterdir()}
    gate = invoke(
        "gate",
        str(pool / bad),
        "-r",
        str(pool / "c01"),
        "-r",
        str(pool / "c02"),
        "-r",
        str(pool / "c03"),
        "-r",
        str(pool / "c04"),
        "-r",
        str(pool / "c05"),
        "--markdown",
        str(tmp_path / "g.md"),
    )
    assert gate.exit_code in (0, 1), gate.output
    assert "internal error" not in gate.output


def test_a_config_string_with_a_lone_surrogate_is_shown_escaped(tmp_path: Path) -> None:
    """``"base_model_name_or_path": "base\\ud800model"`` (a JSON escape json.loads reads back as a
    lone surrogate, which no UTF-8 output can hold): inspect's table and JSON, and the audit's
    Markdown, show it escaped."""
    pool = _pool(tmp_path / "pool", n=5, config=lora_config(base_model_name_or_path="base\ud800model"))
    assert "\\ud800" in (pool / "client_00" / "adapter_config.json").read_text()
    result = invoke("inspect", str(pool), "--json", str(tmp_path / "i.json"))
    assert result.exit_code == 0, result.output
    assert "base\\ud800model" in result.output
    result = invoke("audit", str(pool), "--exit-zero", "--markdown", str(tmp_path / "r.md"))
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("lora_alpha", 10**400, "lora_alpha must be a finite number, got an integer of 401 digits"),
        ("alpha_pattern", {"q_proj": 10**400}, "must be a finite number, got an integer of 401 digits"),
        ("layers_pattern", 5, "layers_pattern must be a string or a list of strings"),
        ("layers_pattern", [3, "h"], "layers_pattern must be a string or a list of strings"),
        ("layers_pattern", "(", "layers_pattern '(' is not a valid regular expression"),
        ("layers_to_transform", "0", "layers_to_transform must be a layer index or a list of layer indices"),
    ],
)
def test_config_values_of_the_wrong_kind_are_refused(tmp_path: Path, field: str, value: object, expected: str) -> None:
    extra = {"layers_to_transform": [0, 1]} if field == "layers_pattern" else {}
    write_adapter(tmp_path / "a", config=lora_config(**extra, **{field: value}))
    refused(invoke("inspect", str(tmp_path / "a")), "adapter_config.json", expected)


def test_a_config_of_a_million_target_names_is_inspected_quickly_and_merged_readably(tmp_path: Path) -> None:
    """600,000 target names (9 MB, under the 10 MiB config limit): inspect shows a dozen and the
    count instead of laying them all out (minutes), and the merged config lists only the names
    that select a module, so that clair reads it back."""
    names = [f"proj_{k}" for k in range(600_000)] + ["q_proj", "v_proj"]
    pool = _pool(tmp_path / "pool", n=5)
    write_adapter(pool / "client_05", random_factors(MODULES, seed=5), lora_config(target_modules=names))
    start = time.perf_counter()
    result = invoke("inspect", str(pool / "client_05"))
    assert result.exit_code == 0, result.output
    assert "(600002 names)" in result.output
    assert time.perf_counter() - start < 120  # minutes before; seconds now (no tight bound: shared runners)
    assert invoke("merge", str(pool), "--out", str(tmp_path / "m"), "--method", "mean").exit_code == 0
    config = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert invoke("inspect", str(tmp_path / "m")).exit_code == 0


def test_a_report_never_lands_in_an_adapter_directory(tmp_path: Path) -> None:
    """``--markdown pool/client_01/README.md`` replaced the adapter's own model card."""
    pool = _pool(tmp_path / "pool", n=5)
    card = pool / "client_01" / "README.md"
    card.write_text("precious\n")
    for option, target in (("--markdown", card), ("--json", pool / "client_01" / "new.json")):
        refused(invoke("audit", str(pool), "--exit-zero", option, str(target)), "client_01", "adapter being read")
    assert card.read_text() == "precious\n" and not (pool / "client_01" / "new.json").exists()
    # Beside the adapters (the pool's own directory) is fine, and so is a folder of single files.
    assert invoke("audit", str(pool), "--exit-zero", "--json", str(pool / "audit.json")).exit_code == 0
    assert invoke("audit", str(pool), "--exit-zero", "--json", str(pool / "audit.json")).exit_code == 0


def test_a_mistyped_local_path_is_not_sent_to_the_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``runs/client_99`` where ``runs/`` is a local directory: a missing path, not a hub id."""
    from clair_cli.io import hub

    monkeypatch.chdir(tmp_path)
    _pool(tmp_path / "runs", n=5)
    monkeypatch.setattr(hub, "fetch", lambda *a, **k: pytest.fail("went to the hub"))
    result = invoke("inspect", "runs/client_99")
    refused(result, "runs/client_99: no such file or directory", "hf://runs/client_99")
    (tmp_path / "list.txt").write_text("runs/client_00\nruns/client_99\n")
    refused(invoke("audit", "@list.txt"), "client_99", "no such file or directory")


def _set_metadata(path: Path, metadata: object) -> None:
    """Rewrite a safetensors file's header with ``__metadata__`` set to ``metadata``."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


@pytest.mark.parametrize("metadata", [0, [], "", None])
def test_a_metadata_that_is_not_a_map_is_refused_as_safetensors_does(tmp_path: Path, metadata: object) -> None:
    """``0``, ``[]`` and ``""`` were read as no metadata; the safetensors library refuses them
    (PEFT could not load what clair passed). ``null`` reads as none, there and here."""
    write_adapter(tmp_path / "a")
    _set_metadata(tmp_path / "a" / "adapter_model.safetensors", metadata)
    result = invoke("inspect", str(tmp_path / "a"))
    if metadata is None:
        assert result.exit_code == 0, result.output
    else:
        refused(result, "adapter_model.safetensors", "__metadata__ must map strings")


def test_a_report_in_an_adapter_directory_is_refused_before_the_audit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refusal comes before the audit's work (found by review: a long audit ran, then exit 2),
    also for an adapter whose files are links into a store (git-annex, DVC)."""
    import os

    from clair_cli import pipeline

    pool = _pool(tmp_path / "pool", n=5)
    write_adapter(tmp_path / "new" / "upload", random_factors(MODULES, seed=7))
    store = tmp_path / "store"
    store.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (pool / "client_02" / name).rename(store / name)
        os.symlink(store / name, pool / "client_02" / name)
    monkeypatch.setattr(pipeline, "audit", lambda *a, **k: pytest.fail("audited before refusing"))
    for target in (pool / "client_01" / "r.json", pool / "client_02" / "README.md"):
        refused(invoke("audit", str(pool), "--json", str(target)), "adapter being read")
        refused(
            invoke("gate", str(tmp_path / "new" / "upload"), "-r", str(pool), "--json", str(target)),
            "adapter being read",
        )
    assert not (pool / "client_02" / "README.md").exists()
