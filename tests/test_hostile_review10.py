"""Inputs found misread by a tenth review from outside (safetensors headers that the safetensors library
refuses, MLX-LM scales): each is refused with the file and the problem named, exit 2, never a bug; and
config lists that cost time per module and per entry (minutes for one adapter)."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import torch
from helpers import write_adapter
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from clair_cli.cli import app
from clair_cli.errors import AdapterFormatError
from clair_cli.io.safetensors_file import read_header


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env={"NO_COLOR": "1", "COLUMNS": "200"})


def _header_with(path: Path, change) -> Path:
    """``path`` (a safetensors file) with its header's JSON text rewritten by ``change``."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = change(raw[8 : 8 + n].decode())
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + raw[8 + n :])
    return path


def _library_reads(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is no mapping
                handle.get_tensor(key)
    except Exception:  # noqa: BLE001 - SafetensorError, whatever the version calls it
        return False
    return True


def _in_first_entry(text: str) -> str:
    return '"dtype": "F32", "x": ' + text


def _extra_field(text: str):
    return lambda header: header.replace('"dtype":"F32"', _in_first_entry(text), 1)


# Python's json reads each of these; the safetensors library (serde_json), and so PEFT and diffusers, does not.
REFUSED = {
    "NaN": (_extra_field("NaN"), "NaN (not JSON)"),
    "Infinity": (_extra_field("Infinity"), "Infinity (not JSON)"),
    "-Infinity": (_extra_field("-Infinity"), "-Infinity (not JSON)"),
    "1e400": (_extra_field("1e400"), "the number 1e400 (past float64's range)"),
    "an integer of 400 digits": (_extra_field("1" + "0" * 400), "an integer of 401 digits"),
    "126 arrays in a field": (_extra_field("[" * 126 + "]" * 126), "nested more than 127 deep"),
    "an offset of -0": (lambda h: h.replace('"data_offsets":[0,', '"data_offsets":[-0,', 1), "invalid data_offsets"),
}
READ = {
    "125 arrays in a field": _extra_field("[" * 125 + "]" * 125),
    "an integer of 300 digits": _extra_field("1" + "0" * 299),
    "-0 in a field": _extra_field("-0"),
    "1e-400 in a field": _extra_field("1e-400"),
}


def _one_file(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name.replace(' ', '_')}.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file(
        {
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 16, generator=g),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(16, 4, generator=g),
        },
        str(path),
    )
    return path


@pytest.mark.parametrize("what", sorted(REFUSED))
def test_a_header_the_safetensors_library_refuses_is_refused(what: str, tmp_path: Path) -> None:
    """A NaN, an Infinity, a number past float64's range, or nesting past serde_json's recursion limit in a
    field no reader uses, or a -0 where an integer belongs: Python's json read the header and clair audited
    (and gate passed) a file that no loader opens. Now refused, naming the file."""
    change, message = REFUSED[what]
    path = _header_with(_one_file(tmp_path, what), change)
    assert not _library_reads(path), what
    with pytest.raises(AdapterFormatError) as err:
        read_header(path)
    assert str(path) in err.value.message and message in err.value.message, err.value.message
    result = invoke("inspect", str(path))
    assert result.exit_code == 2 and "internal error" not in result.output, result.output


@pytest.mark.parametrize("what", sorted(READ))
def test_a_header_the_safetensors_library_reads_is_still_read(what: str, tmp_path: Path) -> None:
    path = _header_with(_one_file(tmp_path, what), READ[what])
    assert _library_reads(path), what
    tensors, _ = read_header(path)
    assert len(tensors) == 2


# MLX-LM's lora_parameters.scale (and an old config's alpha) as lora_alpha is checked in a PEFT config.
MLX_CASES = {
    "scale of 400 digits": ({"scale": 10**400}, "lora_parameters.scale must be a finite number, got an integer of 401"),
    "scale 0": ({"scale": 0}, "lora_parameters.scale is 0, which makes the update zero"),
    "alpha of 400 digits": (
        {"alpha": 10**400},
        "lora_parameters.alpha must be a finite number, got an integer of 401",
    ),
}


@pytest.mark.parametrize("what", sorted(MLX_CASES))
def test_an_mlx_scale_that_is_no_usable_number_is_refused_not_a_bug(what: str, tmp_path: Path) -> None:
    """A scale (or alpha) of 400 digits ended in "internal error (OverflowError)"; a scale of 0 was read
    (an update of zero, where lora_alpha 0 is refused)."""
    change, message = MLX_CASES[what]
    d = tmp_path / "mlx"
    d.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file(
        {
            "model.layers.0.self_attn.q_proj.lora_a": torch.randn(16, 4, generator=g),
            "model.layers.0.self_attn.q_proj.lora_b": torch.randn(4, 16, generator=g),
        },
        str(d / "adapters.safetensors"),
    )
    params = {"rank": 4, "scale": 20.0, **change}
    config = {"model": "m", "lora_layers": 1, "lora_parameters": params}  # alpha is read beside lora_layers alone
    (d / "adapter_config.json").write_text(json.dumps(config))
    result = invoke("inspect", str(d))
    assert result.exit_code == 2, result.output
    assert "internal error" not in result.output and message in result.output, result.output
    assert "adapter_config.json" in result.output


def test_a_peft_adapter_beside_them_is_unchanged(tmp_path: Path) -> None:
    write_adapter(tmp_path / "a")
    assert invoke("inspect", str(tmp_path / "a")).exit_code == 0


# The lists of a PEFT config (target_modules, exclude_modules, modules_to_save, layers_to_transform,
# layers_pattern) were scanned, and modules_to_save's entries parsed and compiled, once per module: a
# 7.5 MB config of 700,000 modules_to_save names took 634 s to inspect one adapter of 4 modules.
MODULES = [f"model.layers.{i}.self_attn.q_proj" for i in range(2000)]


def test_long_config_lists_cost_time_linear_in_the_module_names() -> None:
    import time

    from clair_cli.io.lora_config import peft_selects

    n = 200_000
    configs = {
        "target_modules": {"target_modules": [f"m{i}" for i in range(n)] + ["q_proj"]},
        "exclude_modules": {"target_modules": ["q_proj"], "exclude_modules": [f"m{i}" for i in range(n)]},
        "modules_to_save": {"target_modules": ["q_proj"], "modules_to_save": [f"m{i}" for i in range(n)]},
        "layers_to_transform": {"target_modules": ["q_proj"], "layers_to_transform": list(range(1, n))},
    }
    expected = {"target_modules": True, "exclude_modules": True, "modules_to_save": True}
    for what, raw in configs.items():
        # CPU time of this process, not wall-clock time: a busy CI runner slows the clock, not the work.
        start, got = time.process_time(), set()
        for m in MODULES:  # minutes before (n x 2,000 scans, a regex parsed in each); well under a second now
            got.add(peft_selects(raw, m))
            assert time.process_time() - start < 30, (what, m)
        if what == "layers_to_transform":
            assert got == {True, False}  # layer 0 is not among 1..n-1
        else:
            assert got == {expected[what]}, what


def test_modules_to_save_patterns_are_prepared_once_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from clair_cli.io import lora_config

    calls = []
    real = lora_config.pattern_risk
    monkeypatch.setattr(lora_config, "pattern_risk", lambda *a, **k: calls.append(a) or real(*a, **k))
    raw = {"target_modules": ["q_proj"], "modules_to_save": [f"x{i}.y" for i in range(100)]}
    assert {lora_config.peft_selects(raw, m) for m in MODULES[:50]} == {True}
    assert len(calls) <= 100  # once per entry (5,000 times before: per entry and module)
    calls.clear()
    past = {"target_modules": ["q_proj"], "modules_to_save": [f"x{i}.y" for i in range(300)]}
    assert {lora_config.peft_selects(past, m) for m in MODULES[:50]} == {None}  # past the bound: unverified
    assert calls == []
    # A plain name that takes the module out decides, whatever an unsafe entry before it.
    mixed = {"target_modules": ["q_proj"], "modules_to_save": ["(a+)+b", "self_attn"]}
    assert lora_config.peft_selects(mixed, MODULES[0]) is False
    assert lora_config.peft_selects({"target_modules": ["q_proj"], "modules_to_save": ["(a+)+b"]}, MODULES[0]) is None


def test_a_long_layers_pattern_list_is_left_unverified() -> None:
    from clair_cli.io.lora_config import MAX_LISTED_PATTERNS, peft_selects

    raw = {"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": ["layers"]}
    assert peft_selects(raw, MODULES[0]) is True and peft_selects(raw, MODULES[1]) is False
    long = {**raw, "layers_pattern": [f"l{i}" for i in range(MAX_LISTED_PATTERNS)] + ["layers"]}
    assert peft_selects(long, MODULES[0]) is None


def test_a_layers_pattern_list_past_4096_entries_is_refused_before_it_is_compiled(tmp_path: Path) -> None:
    """Each entry is compiled (twice) to check it as PEFT matches it: 300,000 took 35 s per adapter."""
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    config |= {"layers_to_transform": [0], "layers_pattern": [f"l{i}" for i in range(300_000)]}
    write_adapter(tmp_path / "a", config=config)
    result = invoke("inspect", str(tmp_path / "a"))
    assert result.exit_code == 2 and "layers_pattern has 300000 entries; clair accepts at most 4096" in result.output


@pytest.mark.parametrize("command", ["audit", "inspect"])
def test_a_table_into_a_closed_pipe_ends_with_141_not_1(command: str, tmp_path: Path) -> None:
    """rich ends a process whose stdout's reader went away with exit 1 (Console.on_broken_pipe), which reads
    as "an adapter was flagged" (``clair audit POOL | head`` in CI; inspect never returns 1); a report on
    stdout (``--json -``) ended with 141, as documented, and so does the table now."""
    import os
    import subprocess
    import sys

    for k in range(5):
        write_adapter(tmp_path / "pool" / f"a{k}", seed=k)
    read, write = os.pipe()
    os.close(read)  # the reader went away before clair wrote
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "clair_cli", command, str(tmp_path / "pool")],
            stdout=write,
            stderr=subprocess.PIPE,
            env={**os.environ, "NO_COLOR": "1"},
            timeout=300,
        )
    finally:
        os.close(write)
    assert proc.returncode == 141, (proc.returncode, proc.stderr)
    assert b"Traceback" not in proc.stderr and b"Exception ignored" not in proc.stderr


def test_an_error_into_a_closed_stderr_keeps_its_exit_code(tmp_path: Path) -> None:
    """With stderr's reader gone, rich pointed stdout (not stderr) at /dev/null and the interpreter's final
    flush of stderr failed: a bad input's run ended with Python's exit code 120 instead of 2."""
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # the reader went away before clair wrote
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "clair_cli", "audit", str(tmp_path / "missing")],
            stdout=subprocess.PIPE,
            stderr=write,
            env={**os.environ, "NO_COLOR": "1"},
            timeout=300,
        )
    finally:
        os.close(write)
    assert proc.returncode == 2, proc.returncode


# Pieces of random patterns before a long alternation of names, and names to match them against.
_PIECES = ["a", "b", ".", "|", "\\.", "*", "x", "(", ")", "[a]", "\\d", "^", "$", "{2}", "\\", "-", "\\-", "1", "?"]
_NAMES = [
    "a",
    "b",
    "ab",
    "a.b",
    "x",
    "name3.q-x",
    "NAME3.Q-X",
    "name3xq-x",
    "",
    "aa",
    "-",
    "1",
    "a-b",
    ".",
    "\\",
    "a\n",
]


def _told_as_fullmatch(wrap: str, patterns: int, seed: int) -> int:
    """``patterns`` random patterns, each ending in an alternation of 150 names and wrapped in ``wrap``:
    where :func:`_fullmatches` tells a name's answer it is ``re.fullmatch``'s; how many it told."""
    import random

    from clair_cli.io.lora_config import _fullmatches

    tail = "|".join(re.escape(f"name{i}.q-x") for i in range(150))
    rng = random.Random(seed)
    told = 0
    for _ in range(patterns):
        pattern = wrap.format("".join(rng.choice(_PIECES) for _ in range(rng.randint(1, 10))) + "|" + tail)
        for name in _NAMES:
            try:
                want = re.fullmatch(pattern, name) is not None
            except re.error:
                want = None
            got = _fullmatches(pattern, name)
            if got is not None:
                told += 1
                assert got == want, (pattern[:40], name)
    return told


def test_a_long_alternation_of_names_is_matched_as_the_regex_would_match_it() -> None:
    """A target_modules / exclude_modules string of many names (what clair writes for a merged adapter:
    an alternation of 10,000 names for a MoE adapter) was matched as one regular expression per module,
    7 ms each; its literal branches are now a set, the other branches a regex: the same answers."""
    assert _told_as_fullmatch("{}", 3000, seed=0) > 10_000  # patterns without groups or classes are told


@pytest.mark.parametrize(
    ("wrap", "split"),
    [("({})", True), ("(?:{})", True), ("^({})$", True), ("^(?:{})", True), ("(?i:{})", False), ("(?P<g>{})", False)],
)
def test_a_long_alternation_in_one_group_is_matched_as_the_regex_would_match_it(wrap: str, split: bool) -> None:
    """The same in one outer group, ``(a|b|...)``: a 4.2 MB string of names so written took 6.5 s to compile as
    one expression. A flags group (``(?i:...)``) or a named one is left to the regex, with the same answers."""
    from clair_cli.io.patterns import split_alternation

    told = _told_as_fullmatch(wrap, 200, seed=1)
    assert told > 500 or not split  # a long pattern left to the regex is not matched where it could backtrack
    assert (split_alternation(wrap.format("a|b")) is not None) is split


def test_a_merged_moe_adapters_target_string_is_prepared_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from clair_cli.io import lora_config

    modules = [f"model.layers.{i // 192}.mlp.experts.{i % 64}.w{i % 3}" for i in range(10_000)]
    raw = {"target_modules": lora_config.exact_targets(modules)}
    monkeypatch.setattr(lora_config, "_safe_match", lambda *a: pytest.fail("matched as one regex"))
    lora_config._PREPARED.clear()
    assert all(lora_config.peft_selects(raw, m) for m in modules[:2000])
    assert lora_config.peft_selects(raw, "model.layers.0.mlp.experts.0.w9") is False
    # One entry for the string (and one for modules_to_save, absent): none made per module, which emptied
    # the cache every 256 modules and prepared the 300 KB string again (an empty list per call had been one).
    assert len(lora_config._PREPARED) <= 2


def test_a_long_target_string_of_names_is_checked_without_compiling_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checking that a config's target_modules string compiles (PEFT fails to load one that does not)
    compiled the whole alternation a merged MoE adapter's config holds: 3 s for 10,000 names. Names
    always compile; the other branches are compiled, and an invalid one is still refused."""
    from clair_cli.errors import AdapterFormatError
    from clair_cli.io import peft_config
    from clair_cli.io.lora_config import exact_targets

    names = exact_targets(f"model.layers.{i}.mlp.experts.{j}.w1" for i in range(40) for j in range(64))
    compiled: list[int] = []
    real = re.compile
    monkeypatch.setattr(peft_config.re, "compile", lambda p, *a: compiled.append(len(p)) or real(p, *a))
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4}
    assert peft_config.parse_config({**config, "target_modules": names}, "c.json").target_modules == names
    assert not compiled or max(compiled) < 1000
    peft_config.parse_config({**config, "target_modules": names + "|.*q_proj"}, "c.json")
    with pytest.raises(AdapterFormatError, match="not a valid regular expression"):
        peft_config.parse_config({**config, "target_modules": names + "|*q_proj"}, "c.json")
