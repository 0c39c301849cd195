"""The command line: help, version, JSON schema, table snapshot, stdout/stderr split."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_cli
from rich.console import Console
from typer.testing import CliRunner

from clair_cli import __version__
from clair_cli.cli import app
from clair_cli.io import open_adapters
from clair_cli.io.adapter import verify
from clair_cli.report.inspect import adapter_record, render_inspect

SNAPSHOTS = Path(__file__).parent / "snapshots"


def test_help_lists_commands_and_examples() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0 and "inspect" in result.stdout
    result = CliRunner().invoke(app, ["inspect", "--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0 and "Examples" in result.stdout and "--json" in result.stdout


def test_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.stdout.strip() == f"clair {__version__}"


def test_help_imports_no_heavy_library() -> None:
    """``clair --help`` answers at once: neither importing the CLI nor rendering every command's
    help imports torch or the other heavy libraries (checked by what is imported, not by a
    wall-clock limit, which a busy CI runner would break)."""
    heavy = "('torch', 'safetensors', 'peft', 'huggingface_hub', 'matplotlib', 'numpy', 'ray')"
    code = (
        "import sys\n"
        "from clair_cli.cli import main\n"
        "for argv in (['--help'], *[[c, '--help'] for c in ('audit', 'merge', 'refine', 'gate', 'inspect')]):\n"
        "    sys.argv = ['clair', *argv]\n"
        "    try:\n"
        "        main()\n"
        "    except SystemExit as done:\n"
        "        assert done.code in (0, None), (argv, done.code)\n"
        f"print([m for m in {heavy} if m in sys.modules])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout[-500:]


def test_core_is_pure_math() -> None:
    core = Path(__file__).parents[1] / "clair_cli" / "core"
    banned = ("rich", "typer", "safetensors", "huggingface_hub")
    for path in core.rglob("*.py"):
        for line in path.read_text().splitlines():
            stripped = line.strip()
            assert not any(stripped.startswith((f"import {b}", f"from {b}")) for b in banned), (path, line)


def test_json_report_schema(pool_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    result = CliRunner().invoke(app, ["inspect", str(pool_dir), "--json", str(out)])
    assert result.exit_code == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["schema"] == 1 and report["tool"] == "clair" and report["command"] == "inspect"
    assert report["version"] == __version__
    (a, b, c) = report["adapters"]
    assert [a["name"], b["name"], c["name"]] == ["a", "b", "nested/c"]
    expected_keys = {
        "name",
        "source",
        "revision",
        "base_model",
        "peft_type",
        "layout",
        "r",
        "ranks",
        "lora_alpha",
        "use_rslora",
        "scale_rule",
        "rank_pattern",
        "alpha_pattern",
        "fan_in_fan_out",
        "target_modules",
        "n_modules",
        "modules",
        "n_params",
        "dtypes",
        "file_size",
        "notes",
        "path",
        "sha256",
        "hub",
    }
    assert set(a) == expected_keys
    # For CI, as the audit's report: the path as given, each file's digest, no hub for local.
    assert a["path"] == str(pool_dir / "a") and a["hub"] is None
    weights = pool_dir / "a" / "adapter_model.safetensors"
    assert a["sha256"]["adapter_model.safetensors"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert set(a["sha256"]) == {"adapter_model.safetensors", "adapter_config.json"}
    assert a["n_modules"] == 4 and a["ranks"] == [4] and a["dtypes"] == ["float32"]
    assert a["modules"][0] == {
        "name": "model.layers.0.self_attn.q_proj",
        "kind": "linear",
        "rank": 4,
        "d_in": 12,
        "d_out": 16,
        "scale": 2.0,
        "dtype": "F32",
    }


def test_json_to_stdout_is_pure_json(pool_dir: Path) -> None:
    proc = run_cli("inspect", str(pool_dir), "--json", "-")
    assert proc.returncode == 0
    assert len(json.loads(proc.stdout)["adapters"]) == 3


def test_table_goes_to_stdout_plain_when_piped(pool_dir: Path) -> None:
    proc = run_cli("inspect", str(pool_dir))
    assert proc.returncode == 0 and "\x1b[" not in proc.stdout
    assert "nested/c" in proc.stdout and proc.stderr == ""


def test_quiet_prints_nothing(pool_dir: Path) -> None:
    result = CliRunner().invoke(app, ["inspect", str(pool_dir), "--quiet"])
    assert result.exit_code == 0 and result.stdout == ""


def test_table_snapshot(pool_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(pool_dir.parent)
    adapters = open_adapters([pool_dir.name])
    records = [adapter_record(a, verify(a)) for a in adapters]
    with open(os.devnull, "w") as sink:
        console = Console(record=True, width=100, color_system=None, file=sink)
        render_inspect(console, records)
    text = console.export_text()
    snap = SNAPSHOTS / "inspect_pool.txt"
    if os.environ.get("CLAIR_UPDATE_SNAPSHOTS"):
        snap.write_text(text)
    assert text == snap.read_text()


def test_zero_adapter_gets_a_note(tmp_path: Path) -> None:
    import torch
    from helpers import MODULES, random_factors, write_adapter

    tensors = {k: (torch.zeros_like(v) if "lora_B" in k else v) for k, v in random_factors(MODULES).items()}
    write_adapter(tmp_path / "untrained", tensors)
    (adapter,) = open_adapters([str(tmp_path / "untrained")])
    assert verify(adapter) == ["every module's update is zero (untrained adapter?)"]
