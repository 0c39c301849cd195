"""Bad input ends in exit 2 and a one-line message naming the file; never a traceback."""

from __future__ import annotations

import json
import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import MODULES, lora_config, random_factors, run_cli, write_adapter
from typer.testing import CliRunner

from clair_cli.cli import app


def _truncated(d: Path) -> None:
    write_adapter(d)
    f = d / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


def _header_past_end(d: Path) -> None:
    write_adapter(d)
    f = d / "adapter_model.safetensors"
    f.write_bytes(struct.pack("<Q", 10_000) + f.read_bytes()[8:200])


def _raw_safetensors(d: Path, header: dict, data: bytes) -> None:
    write_adapter(d)
    raw = json.dumps(header).encode()
    (d / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _huge_tensor(d: Path) -> None:
    _raw_safetensors(
        d, {"m.lora_A.weight": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 16]}}, b"\0" * 16
    )


def _overlap(d: Path) -> None:
    _raw_safetensors(
        d,
        {
            "m.lora_A.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
            "m.lora_B.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]},
        },
        b"\0" * 24,
    )


def _trailing_bytes(d: Path) -> None:
    write_adapter(d)
    f = d / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes() + b"PK\x03\x04 a payload no tensor claims")


def _gap(d: Path) -> None:
    _raw_safetensors(
        d,
        {
            "m.lora_A.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
            "m.lora_B.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [24, 40]},
        },
        b"\0" * 40,
    )


def _shape_mismatch(d: Path) -> None:
    _raw_safetensors(d, {"m.lora_A.weight": {"dtype": "F32", "shape": [3, 3], "data_offsets": [0, 16]}}, b"\0" * 16)


def _with_tensors(mutate: Callable[[dict[str, torch.Tensor]], None], **cfg: object) -> Callable[[Path], None]:
    def build(d: Path) -> None:
        tensors = random_factors(MODULES)
        mutate(tensors)
        write_adapter(d, tensors, lora_config(**cfg))

    return build


def _with_config(text: bytes | str) -> Callable[[Path], None]:
    return lambda d: write_adapter(d, config=text)


KEY = "base_model.model.model.layers.0.self_attn.q_proj"


def _set(key: str, value: torch.Tensor | None) -> Callable[[dict[str, torch.Tensor]], None]:
    def mutate(t: dict[str, torch.Tensor]) -> None:
        if value is None:
            del t[key]
        else:
            t[key] = value

    return mutate


def _nan(t: dict[str, torch.Tensor]) -> None:
    t[f"{KEY}.lora_B.weight"][3, 1] = float("nan")


def _inf(t: dict[str, torch.Tensor]) -> None:
    t[f"{KEY}.lora_A.weight"][0, 0] = float("inf")


def _pickle_renamed(d: Path) -> None:
    write_adapter(d)
    (d / "adapter_model.safetensors").write_bytes(pickle.dumps({"a": list(range(100))}))


def _weights_is_a_directory(d: Path) -> None:
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps(lora_config()))
    (d / "adapter_model.safetensors").mkdir()


def _empty(d: Path) -> None:
    d.mkdir()


def _bin_only(d: Path) -> None:
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps(lora_config()))
    (d / "adapter_model.bin").write_bytes(pickle.dumps({}))


CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "missing path": (lambda d: None, "no such file or directory"),
    "empty directory": (_empty, "no adapter found"),
    "invalid json config": (_with_config("{not json"), "is not valid JSON"),
    "non-utf8 config": (_with_config(b"\xff\xfe{}"), "is not UTF-8"),
    "config not an object": (_with_config("[1, 2]"), "must hold a JSON object"),
    # PEFT gives a config without r the default r = 8: these factors have rank 4
    "config missing r": (
        _with_config(json.dumps({"peft_type": "LORA", "lora_alpha": 8})),
        "factors have rank 4 but the config gives r=8",
    ),
    "r = 0": (_with_config(json.dumps(lora_config(r=0))), "r must be a positive integer"),
    "not lora": (_with_config(json.dumps(lora_config(peft_type="IA3"))), "LoRA adapters only"),
    # PEFT fails on it (KeyError None), a config it cannot load rather than another adapter type
    "peft_type null": (_with_config(json.dumps(lora_config(peft_type=None))), "peft_type is null, which names no PEFT"),
    "peft_type a number": (_with_config(json.dumps(lora_config(peft_type=3))), "PEFT cannot load this config"),
    "bad rank_pattern regex": (
        _with_config(json.dumps(lora_config(rank_pattern={"(": 2}))),
        "not a valid regular expression",
    ),
    "bad target_modules regex": (
        _with_config(json.dumps(lora_config(target_modules=".*(q_proj"))),
        "target_modules '.*(q_proj' is not a valid regular expression",
    ),
    "bad exclude_modules regex": (
        _with_config(json.dumps(lora_config(exclude_modules="[k_proj"))),
        "exclude_modules '[k_proj' is not a valid regular expression",
    ),
    "truncated safetensors": (_truncated, "truncated"),
    "header past end": (_header_past_end, "runs past the end of the file"),
    "huge tensor claim": (_huge_tensor, "needs"),
    "overlapping offsets": (_overlap, "overlap"),
    "trailing bytes": (_trailing_bytes, "bytes after the last tensor belong to no tensor"),
    "gap between tensors": (_gap, "bytes 16-24 of the data section, before tensor 'm.lora_B.weight', belong to no"),
    "dtype/shape vs data": (_shape_mismatch, "needs 36 bytes but its data spans 16"),
    "pickle renamed to .safetensors": (_pickle_renamed, "not a safetensors file"),
    "pickle .bin only": (_bin_only, "pickle checkpoints are never loaded"),
    "A without B": (_with_tensors(_set(f"{KEY}.lora_B.weight", None)), "has lora_A but no lora_B"),
    "A/B rank mismatch": (_with_tensors(_set(f"{KEY}.lora_B.weight", torch.ones(16, 3))), "rank mismatch"),
    "rank differs from config": (_with_tensors(lambda t: None, r=8), "config gives r=8"),
    "NaN weights": (_with_tensors(_nan), "contains NaN or Inf"),
    "Inf weights": (_with_tensors(_inf), "contains NaN or Inf"),
    "integer factors": (
        _with_tensors(_set(f"{KEY}.lora_A.weight", torch.ones(4, 12, dtype=torch.int32))),
        "floating point",
    ),
    "weights file is a directory": (_weights_is_a_directory, "is a directory, expected a file"),
    "no lora tensors": (lambda d: write_adapter(d, {"w": torch.ones(2)}), "no LoRA tensors found"),
}


@pytest.fixture(scope="module")
def case_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    out = {}
    for i, (name, (build, _)) in enumerate(CASES.items()):
        d = root / f"case{i:02d}"
        build(d)
        out[name] = d
    return out


def _check(code: int, stderr: str, stdout: str, expected: str, where: Path) -> None:
    assert code == 2, (stdout, stderr)
    assert "Traceback" not in stderr + stdout
    first = stderr.strip().splitlines()[0]
    assert first.startswith("Error: ")
    assert expected in first
    assert where.name in first


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_cli_runner(case: str, case_dirs: dict[str, Path]) -> None:
    result = CliRunner().invoke(app, ["inspect", str(case_dirs[case])], env={"NO_COLOR": "1", "COLUMNS": "400"})
    _check(result.exit_code, result.stderr, result.stdout, CASES[case][1], case_dirs[case])


@pytest.mark.parametrize(
    "case", ["missing path", "truncated safetensors", "pickle renamed to .safetensors", "NaN weights"]
)
def test_bad_input_real_subprocess(case: str, case_dirs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    proc = run_cli("inspect", str(case_dirs[case]), "--json", str(out))
    _check(proc.returncode, proc.stderr, proc.stdout, CASES[case][1], case_dirs[case])
    assert not out.exists(), "no output may be written on bad input"


def test_debug_env_shows_the_traceback(case_dirs: dict[str, Path]) -> None:
    proc = run_cli("inspect", str(case_dirs["truncated safetensors"]), env={"CLAIR_DEBUG": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("hf://owner/name/../../etc", "must be a relative path"),
        ("hf://owner/name/a\\b", "must be a relative path"),
        ("hf://owner", "not a valid Hugging Face repo id"),
        ("hf://owner/name@", "empty revision"),
    ],
)
def test_hub_ids_with_traversal_are_refused_before_any_request(spec: str, expected: str) -> None:
    result = CliRunner().invoke(app, ["inspect", spec], env={"HF_HUB_OFFLINE": "1", "NO_COLOR": "1"})
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert expected in result.stderr


def test_subfolder_option_traversal_is_refused() -> None:
    result = CliRunner().invoke(app, ["inspect", "owner/name", "--subfolder", "/etc"], env={"HF_HUB_OFFLINE": "1"})
    assert result.exit_code == 2 and "must be a relative path" in result.stderr


def test_usage_error_exits_2() -> None:
    result = CliRunner().invoke(app, ["inspect"])
    assert result.exit_code == 2


SAMPLE_ADAPTERS = Path(__file__).resolve().parent.parent / "sample_adapters"


def test_a_pool_whose_audit_cannot_fit_in_memory_is_refused_before_any_factor_is_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from clair_cli import pipeline

    need, _module = pipeline.audit_memory(pipeline.build_pool(open_sample_adapters()))
    monkeypatch.setattr(pipeline, "available_memory", lambda: need)  # 80 % of it is allowed
    monkeypatch.setattr(pipeline, "iter_modules", _must_not_read)
    result = CliRunner().invoke(app, ["audit", str(SAMPLE_ADAPTERS)], env={"NO_COLOR": "1", "COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert "the audit needs about" in result.output and "summed rank" in result.output
    assert "Traceback" not in result.output


def test_a_pool_whose_verdict_matrices_cannot_fit_is_refused_before_any_factor_is_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The verdict keeps a few ``K x K`` matrices per module (measured 1.2-2.2 GiB for 1,000 modules
    of 128 tiny adapters, against a largest module's work of a few MiB): a pool of many modules whose
    matrices cannot fit was not refused and would be killed by the kernel after the whole audit. It is
    now checked with the module's work, before any factor is read, and the message says which part."""
    from clair_cli import pipeline

    pool = pipeline.build_pool(open_sample_adapters())
    need, _module = pipeline.audit_memory(pool)
    kept = pipeline.pool_memory(pool)
    assert kept == pipeline.POOL_BYTES_PER_PAIR * len(pool.modules) * len(pool.adapters) ** 2
    monkeypatch.setattr(pipeline, "POOL_BYTES_PER_PAIR", 100 * need)  # the module's work alone fits
    monkeypatch.setattr(pipeline, "available_memory", lambda: 2 * need)
    monkeypatch.setattr(pipeline, "iter_modules", _must_not_read)
    result = CliRunner().invoke(app, ["audit", str(SAMPLE_ADAPTERS)], env={"NO_COLOR": "1", "COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    assert "the audit needs about" in result.output and "matrices of" in result.output
    assert "the modules times the square of the adapters" in result.output and "--max-rank" not in result.output
    assert "Traceback" not in result.output


def test_a_merge_that_cannot_fit_in_memory_is_refused_before_it_merges(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The merge's memory was not checked (an outside review: 1.9 GiB for 16 adapters of an lm_head
    of 128,256 rows, about 6.5 GiB for 60, killed by the kernel after the whole audit); its work,
    about 8 float64 copies of the merged adapters' stacked factors, is checked as the audit's is."""
    from clair_cli import pipeline
    from clair_cli.core.fastpath import merge_memory_bytes

    pool = pipeline.build_pool(open_sample_adapters())
    need = max(
        merge_memory_bytes(
            sum(a.modules[m].rank for a in pool.adapters),
            pool.adapters[0].modules[m].d_out + pool.adapters[0].modules[m].d_in,
        )
        for m in pool.modules
    )
    audit_need, _module = pipeline.audit_memory(pool)
    assert need > audit_need
    monkeypatch.setattr(pipeline, "available_memory", lambda: need)  # the audit fits, the merge does not
    result = CliRunner().invoke(
        app,
        ["merge", str(SAMPLE_ADAPTERS), "--method", "mean", "--out", str(tmp_path / "m")],
        env={"NO_COLOR": "1", "COLUMNS": "200"},
    )
    assert result.exit_code == 2, result.output
    assert "the merge needs about" in result.output and "summed rank" in result.output
    assert not (tmp_path / "m").exists() and list(tmp_path.iterdir()) == []


class OutOfMemoryError(RuntimeError):  # what torch.OutOfMemoryError is called (CUDA)
    pass


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried"),
        OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    ],
    ids=["cpu", "cuda"],
)
def test_torch_failing_to_allocate_is_out_of_memory_not_an_internal_error(
    monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    from clair_cli import pipeline

    def fail(*_args: object, **_kwargs: object) -> None:
        raise error

    monkeypatch.setattr(pipeline, "audit", fail)
    result = CliRunner().invoke(app, ["audit", str(SAMPLE_ADAPTERS)], env={"NO_COLOR": "1", "COLUMNS": "200"})
    assert result.exit_code == 2 and "out of memory" in result.output and "internal error" not in result.output
    assert "--max-rank" in result.output and "fewer jobs" in result.output  # what to change, --jobs among it


def open_sample_adapters() -> list:
    from clair_cli.io.sources import open_adapters

    return open_adapters([str(SAMPLE_ADAPTERS)])


def _must_not_read(*_args: object, **_kwargs: object) -> None:
    raise AssertionError("factors were read")


def test_a_config_without_lora_alpha_is_read_with_peft_s_default(tmp_path: Path) -> None:
    """PEFT loads a config that leaves lora_alpha (or r) out with its LoraConfig's default, 8; clair
    refused it as 'missing required field' (a review of real PEFT checkpoints), and now reads it
    as PEFT does, saying so."""
    from clair_cli.io import SourceOptions, open_adapters

    cfg = {k: v for k, v in lora_config().items() if k != "lora_alpha"}
    (adapter,) = open_adapters([str(write_adapter(tmp_path / "a", config=cfg))], SourceOptions())
    assert {spec.scale for spec in adapter.modules.values()} == {8 / 4}
    assert any("does not give lora_alpha: PEFT loads it with its default lora_alpha=8" in n for n in adapter.notes)


@pytest.mark.parametrize(("zero", "trained", "noted"), [(5, 3, True), (1, 5, False)])
def test_a_pool_of_mostly_untrained_adapters_says_how_few_carry_an_update(
    tmp_path: Path, zero: int, trained: int, noted: bool
) -> None:
    """Untrained adapters (lora_B zero) are flagged, and the few trained ones are judged against
    each other with little power: the report says so (a review's pool of five untrained and three
    trained adapters, one of them sign-flipped, passed it silently)."""
    for k in range(zero + trained):
        tensors = random_factors(MODULES, seed=k)
        if k < zero:
            tensors = {n: torch.zeros_like(t) if ".lora_B." in n else t for n, t in tensors.items()}
        write_adapter(tmp_path / "pool" / f"a{k}", tensors)
    result = CliRunner().invoke(
        app, ["audit", str(tmp_path / "pool"), "--exit-zero", "--markdown", str(tmp_path / "r.md")]
    )
    assert result.exit_code == 0, result.output
    text = (tmp_path / "r.md").read_text()
    verb = "is" if zero == 1 else "are"
    assert (f"only {trained} of {zero + trained} adapters carry an update ({zero} {verb} zero" in text) == noted
