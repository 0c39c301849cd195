"""Hostile and broken inputs through the real CLI, each in its own process.

Every case is a pool that ``clair merge`` is asked to merge into a fresh output
directory. Each must end with exit code 2, an ``Error:`` line that names the file
(or source) and the problem, no traceback, nothing written (no output, no
temporary directory left beside it), within bounded time and memory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import MODULES, lora_config, random_factors, write_adapter
from test_bad_inputs import CASES as ADAPTER_CASES

TIME_LIMIT_S = 60
MEMORY_LIMIT = 1536 * 2**20  # peak resident memory of one run


@dataclass
class Case:
    build: Callable[[Path], list[str]]  # writes the case under a directory, returns the CLI arguments
    expected: str  # in the error line
    names: str  # in the error line: the file or source at fault
    env: dict[str, str] | None = None


def _good_pool(root: Path, n: int = 5) -> None:
    for k in range(n):
        write_adapter(root / f"good_{k}", random_factors(MODULES, seed=k))


def _pool_with(build_bad: Callable[[Path], None]) -> Callable[[Path], list[str]]:
    def build(d: Path) -> list[str]:
        _good_pool(d)
        build_bad(d / "bad")
        return [str(d)]

    return build


def _alone(build_bad: Callable[[Path], None]) -> Callable[[Path], list[str]]:
    def build(d: Path) -> list[str]:
        build_bad(d / "bad")
        return [str(d / "bad")]

    return build


def _symlink_outside(d: Path) -> list[str]:
    _good_pool(d / "pool")
    write_adapter(d / "elsewhere")
    evil = d / "pool" / "evil"
    evil.mkdir()
    shutil.copy(d / "elsewhere" / "adapter_config.json", evil / "adapter_config.json")
    (evil / "adapter_model.safetensors").symlink_to(d / "elsewhere" / "adapter_model.safetensors")
    return [str(d / "pool")]


def _two_base_models(d: Path) -> list[str]:
    _good_pool(d)
    write_adapter(d / "other_base", config=lora_config(base_model_name_or_path="other/model"))
    return [str(d)]


def _duplicate_names(d: Path) -> list[str]:
    _good_pool(d / "a")
    write_adapter(d / "b" / "good_0", random_factors(MODULES, seed=9))
    return [str(d / "a" / f"good_{k}") for k in range(5)] + [str(d / "b" / "good_0")]


def _too_few(d: Path) -> list[str]:
    _good_pool(d, 3)
    return [str(d)]


def _untrained(d: Path) -> None:
    t = random_factors(MODULES, seed=7)
    write_adapter(d, {k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in t.items()})


def _hub(spec: str, *extra: str) -> Callable[[Path], list[str]]:
    return lambda d: [spec, *extra]


OFFLINE = {"HF_HUB_OFFLINE": "1"}
CASES: dict[str, Case] = {
    **{
        name: Case(_alone(build) if name in ("missing path", "empty directory") else _pool_with(build), expected, "bad")
        for name, (build, expected) in ADAPTER_CASES.items()
    },
    "symlink outside the source directory": Case(_symlink_outside, "symlink leads outside", "evil"),
    "adapters of two base models": Case(_two_base_models, "different base models", "other_base"),
    "duplicate adapter names": Case(_duplicate_names, "both named 'good_0'", "good_0"),
    "fewer adapters than clair needs": Case(_too_few, "clair needs at least 5 adapters, got 3", "adapters"),
    "all-zero (untrained) adapter": Case(_pool_with(_untrained), "every analysed LoRA update is zero", "bad"),
    "hub id with ../ in the path": Case(_hub("hf://owner/name/../../etc"), "must be a relative path", "etc", OFFLINE),
    "hub id with a backslash": Case(_hub("hf://owner/name/a\\b"), "must be a relative path", "a\\b", OFFLINE),
    "hub --subfolder absolute": Case(
        _hub("owner/name", "--subfolder", "/etc"), "must be a relative path", "/etc", OFFLINE
    ),
    "hub --subfolder ../": Case(_hub("owner/name", "--subfolder", "../x"), "must be a relative path", "../x", OFFLINE),
}


def _run(args: list[str], out: Path, env: dict[str, str] | None) -> tuple[int, str, str, float, int]:
    full_env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "300", **(env or {})}
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "clair_cli", "merge", *args, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
    )
    try:
        stdout, stderr = proc.communicate(timeout=TIME_LIMIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    wall = time.perf_counter() - start
    # The child has been reaped; its peak RSS is the largest of all reaped children, which
    # bounds this one's from above.
    import resource

    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return proc.returncode, stdout, stderr, wall, peak


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    root = tmp_path_factory.mktemp("hostile")
    jobs = {}
    for i, (name, case) in enumerate(CASES.items()):
        d = root / f"case{i:02d}"
        d.mkdir()
        args = case.build(d)
        out_parent = root / f"out{i:02d}"
        out_parent.mkdir()
        jobs[name] = (args, out_parent, case.env)
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(_run, args, parent / "merged", env) for name, (args, parent, env) in jobs.items()}
        return {name: (*f.result(), jobs[name][1]) for name, f in futures.items()}


def test_the_table_covers_at_least_twenty_cases() -> None:
    assert len(CASES) >= 20


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input_exits_2_with_one_clear_line_and_writes_nothing(case: str, outcomes: dict) -> None:
    code, stdout, stderr, wall, peak, out_parent = outcomes[case]
    assert code == 2, (stdout, stderr)
    assert "Traceback" not in stdout + stderr
    lines = stderr.strip().splitlines()
    assert lines[0].startswith("Error: ")
    assert CASES[case].expected in lines[0], lines[0]
    assert CASES[case].names in lines[0], lines[0]
    assert len(lines) <= 2  # the message, and at most one line of hint
    assert list(out_parent.iterdir()) == [], "nothing may be written on bad input"
    assert wall < TIME_LIMIT_S and peak < MEMORY_LIMIT


def test_json_report_is_not_written_either(tmp_path: Path) -> None:
    _good_pool(tmp_path / "pool")
    _untrained(tmp_path / "pool" / "bad")
    report = tmp_path / "audit.json"
    proc = subprocess.run(
        [sys.executable, "-m", "clair_cli", "audit", str(tmp_path / "pool"), "--json", str(report)],
        capture_output=True,
        text=True,
        timeout=TIME_LIMIT_S,
    )
    assert proc.returncode == 2 and not report.exists()
