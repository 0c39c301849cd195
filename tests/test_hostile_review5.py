"""Hostile inputs found by a fifth review from outside (2026-12-06): a report that replaced the
``@FILE`` list being read, regular expressions that backtracked for minutes, headers that the
safetensors library refuses, a SARIF log that failed on a non-UTF-8 name, LoRA variants switched
on by an empty object, NaN in tensors clair does not analyse, and a base model name of 200,000
characters. Each is now refused (exit 2, the file named) or handled."""

from __future__ import annotations

import json
import re
import struct
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import MODULES, lora_config, random_factors, write_adapter
from test_hostile_review import invoke, refused
from test_hostile_review2 import _pool

from clair_cli.io.patterns import pattern_risk
from clair_cli.io.sources import cache_snapshot

# 1. A report aimed at the @FILE list the run reads.


@pytest.mark.parametrize(
    "command, report",
    [
        (["audit", "@{list}"], "--markdown"),
        (["merge", "@{list}", "--out", "{tmp}/m"], "--json"),
        (["gate", "{pool}/client_05", "--reference", "@{list}"], "--sarif"),
    ],
)
def test_a_report_cannot_replace_the_source_list_being_read(tmp_path: Path, command: list[str], report: str) -> None:
    pool = _pool(tmp_path / "pool")
    listing = tmp_path / "round.txt"
    listing.write_text("".join(f"{pool / f'client_{k:02d}'}\n" for k in range(5)))
    before = listing.read_bytes()
    args = [a.format(list=listing, tmp=tmp_path, pool=pool) for a in command]
    refused(invoke(*args, report, str(listing)), "is one of the inputs", "round.txt")
    assert listing.read_bytes() == before
    assert not (tmp_path / "m").exists()


# 2. Regular expressions that pattern_risk let through and that backtrack exponentially.


@pytest.mark.parametrize(
    "key",
    [
        r"(?:\w\w?)+x",  # an optional element repeated: 2^n ways to split a run of n letters
        r"(?:\w?){40}\w{40}",  # C(80, 40) ways
        r"(?:ab?)*c",
        r"\w*\w*\w*x",  # three adjacent unbounded repetitions: 0.47 s on a 1,024-character name
        r".*a.*a.*x",  # three, none of them final
    ],
)
def test_patterns_that_backtrack_without_bound_are_named(key: str) -> None:
    assert pattern_risk(key)


@pytest.mark.parametrize(
    "key",
    [
        r".*\.(q_proj|v_proj)",
        r"model\.layers\.\d+\.self_attn\.(q|v)_proj",
        r"(layers\.\d+\.)?q_proj",
        r"^(?!.*vision).*(q_proj|k_proj)",
        r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)",
        r"(?:[0-9]\.)+q_proj",
        r".*(text_model|modality_projection|perceiver_resampler).*(down_proj|gate_proj|up_proj|k_proj|q_proj|v_proj|o_proj).*$",
        r".*\.layers\.\d+\.mlp\..*",
    ],
)
def test_patterns_of_real_configs_pass(key: str) -> None:
    assert pattern_risk(key) is None


def test_a_leading_lookaround_of_a_full_matched_pattern_is_tried_once() -> None:
    """A full match tries a leading lookahead at the start only, so its repetition is not counted
    in target_modules; as a rank_pattern key, matched at every dot, it is."""
    pattern = r"^(?!.*visual).*(?:o_proj|up_proj|v_proj|down_proj|k_proj|q_proj|gate_proj)\w*"
    assert pattern_risk(pattern, anchored=True) is None
    assert pattern_risk(pattern)
    assert pattern_risk(r"^(?=(a+)+b).*", anchored=True)  # a lookaround is still checked for nesting


def test_a_rank_pattern_key_that_repeats_an_optional_element_is_refused_at_once(tmp_path: Path) -> None:
    config = lora_config(rank_pattern={r"(?:\w\w?)+x": 2})
    pool = _pool(tmp_path / "pool", n=5, config=config)
    start = time.perf_counter()
    refused(invoke("inspect", str(pool / "client_00")), "rank_pattern key", "repeats an optional element")
    assert time.perf_counter() - start < 60  # a refusal, not minutes of matching (generous: shared CI runners)


# 3. A safetensors header that escapes a lone surrogate: Python's json reads it, safetensors does not.


def _with_raw_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = edit(raw[8 : 8 + n].decode())
    data = header.encode()
    path.write_bytes(struct.pack("<Q", len(data)) + data + raw[8 + n :])


@pytest.mark.parametrize("where", ["tensor name", "metadata"])
def test_a_lone_surrogate_escape_in_the_header_is_refused(tmp_path: Path, where: str) -> None:
    pool = _pool(tmp_path / "pool", n=5)
    weights = pool / "client_00" / "adapter_model.safetensors"
    if where == "tensor name":
        _with_raw_header(weights, lambda h: h.replace("q_proj.lora_A", "q_proj\\ud800.lora_A", 1))
    else:
        _with_raw_header(weights, lambda h: '{"__metadata__": {"note": "x\\udc00"}, ' + h[1:])
    for args in (
        ("inspect", str(pool / "client_00")),
        ("merge", str(pool), "--out", str(tmp_path / "m")),
    ):
        refused(invoke(*args), "client_00", "lone UTF-16 surrogate")
    assert not (tmp_path / "m").exists()


def test_a_tensor_name_with_a_control_character_is_refused(tmp_path: Path) -> None:
    """No model's module path holds one, and a final ".*" of a module pattern takes the rest of a
    name in one step only where the name holds no newline."""
    pool = _pool(tmp_path / "pool", n=5)
    weights = pool / "client_00" / "adapter_model.safetensors"
    _with_raw_header(weights, lambda h: h.replace("q_proj.lora_A", "q_proj\\n.lora_A", 1))
    refused(invoke("inspect", str(pool / "client_00")), "client_00", "control character")


def test_a_surrogate_pair_in_the_header_is_text() -> None:
    from clair_cli.io.safetensors_file import _lone_surrogate

    raw = b'{"a\\ud83d\\ude00": 1}'
    assert not _lone_surrogate(raw, json.loads(raw))
    raw = b'{"a\\ud83d": 1}'
    assert _lone_surrogate(raw, json.loads(raw))


# 4. SARIF of an adapter whose directory name is not UTF-8.


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS refuses file names that are not UTF-8")
def test_sarif_points_at_a_directory_whose_name_is_not_utf8(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pool = _pool(tmp_path / "pool", n=6)
    bad = pool / "c\udcff"  # os.fsencode: b"c\xff"
    tensors = random_factors(MODULES, seed=50)
    write_adapter(bad, {k: v * (40.0 if "lora_B" in k else 1.0) for k, v in tensors.items()})
    monkeypatch.chdir(tmp_path)  # a path under the working directory: a relative URI, percent-encoded
    result = invoke("audit", "pool", "--sarif", "r.sarif")
    assert result.exit_code == 1, result.output
    log = json.loads((tmp_path / "r.sarif").read_text())
    uris = [
        loc["physicalLocation"]["artifactLocation"]["uri"] for r in log["runs"][0]["results"] for loc in r["locations"]
    ]
    assert any("c%FF/adapter_model.safetensors" in u for u in uris), uris


# 5. A local folder shaped like the Hugging Face cache whose name is no repo id.


@pytest.mark.parametrize("folder", ["models--..--evil", "models--o\udcff--n", "models--a--b..c"])
def test_a_cache_shaped_folder_that_names_no_repo_is_not_a_hub_source(tmp_path: Path, folder: str) -> None:
    path = tmp_path / folder / "snapshots" / ("0123456789abcdef" * 3)[:40]
    assert cache_snapshot(path) is None
    assert cache_snapshot(tmp_path / "models--owner--name" / "snapshots" / ("ab" * 20)) == (
        "owner/name",
        "ab" * 20,
        None,
    )


# 6. LoRA variants that PEFT switches on with an empty object (or list).


@pytest.mark.parametrize(
    "field, value",
    [
        ("kasa_config", {}),
        ("arrow_config", {}),
        ("monteclora_config", {}),
        ("use_bdlora", {}),
        ("alora_invocation_tokens", []),
    ],
)
def test_a_variant_switched_on_by_an_empty_value_is_refused(tmp_path: Path, field: str, value: object) -> None:
    pool = _pool(tmp_path / "pool", n=5, config=lora_config(**{field: value}))
    refused(invoke("merge", str(pool), "--out", str(tmp_path / "m")), field, "adapter_config.json")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    "field, value",
    [("kasa_config", None), ("use_qalora", False), ("target_parameters", []), ("alora_invocation_tokens", None)],
)
def test_variants_left_off_as_peft_saves_them_merge(tmp_path: Path, field: str, value: object) -> None:
    pool = _pool(tmp_path / "pool", n=5, config=lora_config(**{field: value}))
    assert invoke("merge", str(pool), "--out", str(tmp_path / "m"), "--method", "mean").exit_code == 0


# 7. NaN or Inf in a tensor that is no module's factor.


@pytest.mark.parametrize(
    "key, shape",
    [
        ("base_model.model.lm_head.modules_to_save.default.weight", (8, 12)),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias", (16,)),
    ],
)
def test_inspect_finds_nan_in_tensors_clair_does_not_analyse(tmp_path: Path, key: str, shape: tuple) -> None:
    tensors = random_factors(MODULES)
    tensors[key] = torch.full(shape, float("nan"))
    adapter = write_adapter(tmp_path / "a", tensors)
    refused(invoke("inspect", str(adapter)), "adapter_model.safetensors", key, "NaN or Inf")
    tensors[key] = torch.zeros(shape)
    write_adapter(tmp_path / "b", tensors)
    assert invoke("inspect", str(tmp_path / "b")).exit_code == 0


# 8. A base model name longer than any path.


def test_a_base_model_name_longer_than_a_path_is_refused_briefly(tmp_path: Path) -> None:
    pool = _pool(tmp_path / "pool", n=5)
    write_adapter(pool / "client_00", config=lora_config(base_model_name_or_path="x" * 200_000))
    result = invoke("merge", str(pool), "--out", str(tmp_path / "m"))
    refused(result, "client_00", "base_model_name_or_path is 200000 characters long")
    assert len(result.stderr) < 1000


# 9. The library's pool of factors held in memory (pipeline.pool_from_factors).


def _factors(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"m.q": (torch.randn(4, 12, generator=g), torch.randn(16, 4, generator=g), 2.0)}


@pytest.mark.parametrize(
    "extra, words",
    [
        ({"x": {"m.q": (torch.randn(4, 12, device="meta"), torch.randn(16, 4, device="meta"), 2.0)}}, "meta"),
        ({"x": {"m.q": (torch.randn(4, 12).to_sparse(), torch.randn(16, 4), 2.0)}}, "sparse"),
        ({1: _factors(9)}, "adapter names must be strings"),
        ({"x": {("m", "q"): _factors(9)["m.q"]}}, "module names must be strings"),
    ],
)
def test_pool_from_factors_names_what_is_not_a_lora_factor(extra: dict, words: str) -> None:
    from clair_cli import pipeline
    from clair_cli.errors import AdapterFormatError

    with pytest.raises(AdapterFormatError, match=words):
        pipeline.pool_from_factors({f"a{k}": _factors(k) for k in range(5)} | extra)


# 10. JSON reports of a name that is not UTF-8.


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS refuses file names that are not UTF-8")
def test_json_reports_hold_no_lone_surrogate_escape(tmp_path: Path) -> None:
    """Python reads ``"\\udcff"`` back, strict JSON parsers (serde_json, Go) refuse it: a byte of a
    file name that is not UTF-8 is written as the text ``\\udcff``, as the terminal shows it."""
    pool = _pool(tmp_path / "pool", n=6)
    write_adapter(pool / "c\udcff", random_factors(MODULES, seed=60))
    assert invoke("audit", str(pool), "--exit-zero", "--json", str(tmp_path / "r.json")).exit_code == 0
    assert invoke("inspect", str(pool), "--json", str(tmp_path / "i.json")).exit_code == 0
    for report in ("r.json", "i.json"):
        text = (tmp_path / report).read_text(encoding="utf-8")
        assert not re.search(r"(?<!\\)\\u[dD][89a-fA-F]", text), report
        assert "c\\\\udcff" in text  # the escaped text, one backslash in the JSON string
        json.loads(text)
