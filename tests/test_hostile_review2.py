"""Hostile inputs found by a second review from outside: each one an internal error, a silently
skipped adapter, a merge PEFT would not reproduce or a raw control character in an output before;
now exit 2 with a message naming the file and the problem, a note, or the right result."""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import pytest
import torch
from helpers import MODULES, lora_config, random_factors, write_adapter
from safetensors.torch import load_file
from test_hostile_review import invoke, refused
from typer.testing import CliRunner

from clair_cli.cli import app


def _pool(root: Path, n: int = 6, config: dict | None = None) -> Path:
    for k in range(n):
        write_adapter(root / f"client_{k:02d}", random_factors(MODULES, seed=k), config)
    return root


# 1. Pattern keys that compile alone but not inside the expression PEFT (and clair) match them in.


@pytest.mark.parametrize(
    "extra, expected",
    [
        ({"rank_pattern": {"(?i)q_proj": 2}}, "rank_pattern key '(?i)q_proj' is not a valid regular expression"),
        ({"alpha_pattern": {"(?i)v_proj": 4}}, "alpha_pattern key '(?i)v_proj' is not a valid regular expression"),
        (
            {"layers_to_transform": [0, 1], "layers_pattern": "(?P<idx>layers)"},
            "layers_pattern '(?P<idx>layers)' is not a valid regular expression",
        ),
        (
            {"layers_to_transform": [0], "layers_pattern": ["layers", "(?i)layers"]},
            "layers_pattern '(?i)layers' is not a valid regular expression",
        ),
    ],
)
def test_a_pattern_that_does_not_compile_where_peft_uses_it_is_refused(
    tmp_path: Path, extra: dict, expected: str
) -> None:
    pool = _pool(tmp_path / "pool", n=5, config=lora_config(**extra))
    for args in (
        ("inspect", str(pool / "client_00")),
        ("audit", str(pool), "--exit-zero"),
        ("merge", str(pool), "--out", str(tmp_path / "m"), "--method", "mean"),
    ):
        refused(invoke(*args), "client_00", "adapter_config.json", expected, "as PEFT matches it")
    assert not (tmp_path / "m").exists()


def test_peft_itself_cannot_match_such_keys() -> None:
    """Refusing them loses nothing: PEFT's own matcher fails on them (Python 3.11: a global flag
    not at the start is an error), so PEFT could not load such an adapter either."""
    from peft.utils.other import get_pattern_key

    with pytest.raises(re.error):
        get_pattern_key(["(?i)q_proj"], "model.layers.0.self_attn.q_proj")
    assert get_pattern_key(["(?:q|k)_proj"], "model.layers.0.self_attn.q_proj") == "(?:q|k)_proj"


# 2. A float8 tensor beside the factors: refine checks every float dtype torch has for NaN / Inf.


def test_all_finite_takes_every_float_dtype() -> None:
    from clair_cli.io.peft_writer import all_finite

    floats = [d for d in vars(torch).values() if isinstance(d, torch.dtype) and d.is_floating_point]
    for dtype in set(floats):
        if dtype == getattr(torch, "float4_e2m1fn_x2", None):  # packed: no NaN or Inf to encode
            assert all_finite(torch.zeros(4, dtype=torch.uint8).view(dtype))
            continue
        assert all_finite(torch.zeros(3, 5).to(dtype)), dtype
        assert not all_finite(torch.tensor([1.0, float("nan")]).to(dtype)), dtype
    assert all_finite(torch.zeros(3, dtype=torch.int64))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_refine_keeps_a_float8_tensor_and_refuses_a_nan_in_one(tmp_path: Path, dtype: torch.dtype) -> None:
    pool = _pool(tmp_path / "pool")
    extra = "base_model.model.score.weight"
    tensors = random_factors(MODULES, seed=3)
    tensors[extra] = torch.linspace(-2, 2, 32).reshape(2, 16).to(dtype)
    write_adapter(pool / "client_03", tensors)
    result = invoke("refine", str(pool), "--out", str(tmp_path / "r"), "--exit-zero")
    assert result.exit_code == 0, result.output
    written = load_file(tmp_path / "r" / "client_03" / "adapter_model.safetensors")
    assert written[extra].dtype == dtype and torch.equal(
        written[extra].view(torch.uint8), tensors[extra].view(torch.uint8)
    )

    tensors[extra] = torch.tensor([[0.0, float("nan")]]).to(dtype)
    write_adapter(pool / "client_03", tensors)
    refused(
        invoke("refine", str(pool), "--out", str(tmp_path / "r2"), "--exit-zero"), "NaN or Inf", "nothing was written"
    )
    assert not (tmp_path / "r2").exists()


# 3. init_lora_weights with which PEFT rewrites the base weights when it loads the adapter.


@pytest.mark.parametrize(
    "init, method",
    [
        ("pissa", "PiSSA"),
        ("pissa_niter_4", "PiSSA"),
        ("corda", "CorDA"),
        ("astra", "Astra"),  # PEFT 0.22
        ("olora", "OLoRA"),
        ("loftq", "LoftQ"),
    ],
)
def test_an_adapter_that_rewrites_the_base_weights_is_not_merged_or_refined(
    tmp_path: Path, init: str, method: str
) -> None:
    pool = _pool(tmp_path / "pool", config=lora_config(init_lora_weights=init))
    for command in ("merge", "refine"):
        result = invoke(command, str(pool), "--out", str(tmp_path / command), "--exit-zero")
        refused(result, "adapter_config.json", f"init_lora_weights '{init}' ({method})", "rewrite the base model")
        assert "path_initial_model_for_weight_conversion" in result.stderr
        assert not (tmp_path / command).exists()
    result = invoke("audit", str(pool), "--exit-zero", "--json", str(tmp_path / "a.json"))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "a.json").read_text())
    assert all(any(f"({method}): PEFT rewrites" in n for n in a["notes"]) for a in report["adapters"])
    result = invoke("inspect", str(pool / "client_00"), "--json", "-")
    assert result.exit_code == 0, result.output
    assert any(method in n for n in json.loads(result.stdout)["adapters"][0]["notes"])


@pytest.mark.parametrize("init", ["gaussian", "eva", "orthogonal", "lora_ga", "nora", False])
def test_an_init_that_leaves_the_base_alone_merges_as_a_plain_lora(tmp_path: Path, init: object) -> None:
    """Their factors, loaded from the file, are the whole update; the merged config says
    init_lora_weights true (a plain LoRA), whatever the inputs said."""
    pool = _pool(tmp_path / "pool", n=5, config=lora_config(init_lora_weights=init))
    result = invoke("merge", str(pool), "--out", str(tmp_path / "m"), "--method", "mean")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "m" / "adapter_config.json").read_text())["init_lora_weights"] is True


# 4. LoRA keys without PEFT's "base_model.model." prefix, which PeftModel.from_pretrained does not load.


def test_peft_does_not_load_keys_without_its_prefix(tmp_path: Path) -> None:
    """What the note and the refusal rest on: the factors stay at their initial values."""
    from peft import PeftModel

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = torch.nn.Linear(12, 16)

    tensors = {
        "q_proj.lora_A.weight": torch.randn(4, 12),
        "q_proj.lora_B.weight": torch.randn(16, 4),
    }
    write_adapter(tmp_path / "a", tensors, lora_config(target_modules=["q_proj"]))
    with pytest.warns(UserWarning, match="missing adapter keys"):
        model = PeftModel.from_pretrained(Tiny(), str(tmp_path / "a"))
    assert not model.base_model.model.q_proj.lora_B["default"].weight.any()  # still PEFT's zero init


def test_keys_without_peft_prefix_are_noted_and_not_merged(tmp_path: Path) -> None:
    pool = _pool(tmp_path / "pool", n=5)
    bare = {k.removeprefix("base_model.model."): v for k, v in random_factors(MODULES, seed=9).items()}
    write_adapter(pool / "client_05", bare)
    result = invoke("inspect", str(pool / "client_05"), "--json", "-")
    assert result.exit_code == 0, result.output
    notes = json.loads(result.stdout)["adapters"][0]["notes"]
    assert any("4 modules stored without PEFT's key prefix" in n and "does not load them" in n for n in notes), notes
    result = invoke("audit", str(pool), "--exit-zero", "--json", str(tmp_path / "a.json"))
    assert result.exit_code == 0, result.output
    by_name = {a["name"]: a["notes"] for a in json.loads((tmp_path / "a.json").read_text())["adapters"]}
    assert any("without PEFT's key prefix" in n for n in by_name["client_05"])
    assert not any("without PEFT's key prefix" in n for n in by_name["client_00"])
    refused(
        invoke("merge", str(pool), "--out", str(tmp_path / "m"), "--method", "mean"),
        "client_05/adapter_model.safetensors",
        "'base_model.model.'",
        "PeftModel.from_pretrained does not load",
    )
    assert not (tmp_path / "m").exists()


# 5. A member directory that cannot be searched (no x permission: lstat fails with EACCES).


def test_a_member_that_cannot_be_looked_into_is_refused_not_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = _pool(tmp_path / "pool")
    locked = pool / "client_03"
    real_lstat = os.lstat

    def lstat(path, *args, **kwargs):  # what a non-root user meets in a directory of mode 0444
        if os.fspath(path).startswith(os.fspath(locked) + os.sep):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_lstat(path, *args, **kwargs)

    monkeypatch.setattr(os, "lstat", lstat)
    refused(invoke("audit", str(pool), "--exit-zero"), "client_03", "permission denied")
    refused(invoke("inspect", str(locked)), "client_03", "permission denied")
    result = invoke("inspect", str(pool))
    refused(result, "1 of 6 adapters cannot be read", "client_03")


# 6. SARIF: names with control and bidi characters are shown escaped.


def test_sarif_escapes_control_and_bidi_characters_of_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pools import write_pool
    from report_check import assert_valid

    pool = write_pool(tmp_path / "pool")
    evil = "ok_\u202e20_tneilc\x1b[2K"
    (pool / "client_02").rename(pool / evil)
    monkeypatch.chdir(tmp_path)
    result = invoke("audit", "pool", "--exit-zero", "-q", "--sarif", "-")
    assert result.exit_code == 0, result.output
    log = json.loads(result.stdout)
    assert_valid(log, "sarif", "audit")
    results = {r["properties"]["adapter"]: r for r in log["runs"][0]["results"]}
    assert evil in results, list(results)
    for r in results.values():
        shown = [r["message"]["text"], *(loc["name"] for loc in r["locations"][0]["logicalLocations"])]
        assert not any(c in text for text in shown for c in ("\u202e", "\x1b")), shown
    hit = results[evil]
    assert "ok_\\u202e20_tneilc\\x1b[2K" in hit["message"]["text"]
    assert hit["locations"][0]["logicalLocations"][0]["name"] == "ok_\\u202e20_tneilc\\x1b[2K"
    assert hit["partialFingerprints"]["adapterSha256/v1"].endswith(":" + evil)  # the raw name, as before


# 7. A list file with a byte-order mark.


def test_a_list_file_with_a_byte_order_mark_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _pool(tmp_path / "pool", n=5)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "list.txt").write_bytes(
        "\ufeffpool/client_00\r\npool/client_01\r\npool/client_02\r\npool/client_03\r\npool/client_04\r\n".encode()
    )
    result = invoke("inspect", "@list.txt", "--json", "-")
    assert result.exit_code == 0, result.output
    assert [a["name"] for a in json.loads(result.stdout)["adapters"]][0] == "client_00"
    result = CliRunner().invoke(
        app, ["inspect", "-", "--json", "-"], input="\ufeffpool/client_00\n", env={"NO_COLOR": "1"}
    )
    assert result.exit_code == 0, result.output
