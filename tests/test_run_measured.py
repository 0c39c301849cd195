"""The hostile-input tests' memory measure is the command's own, not the test process's."""

from __future__ import annotations

import subprocess

import numpy as np
from helpers import run_measured


def test_a_command_s_peak_memory_excludes_the_test_process_s() -> None:
    """wait4 on a child of this process would report at least this process's high-water mark
    (Linux carries it over fork and exec): 512 MiB held here must not show in the command's."""
    held = np.ones(2**26)  # 512 MiB, written
    code, peak = run_measured(["--version"], 120, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert code == 0 and 0 < peak < 400 * 2**20, peak >> 20
    assert float(held[-1]) == 1.0


def test_a_command_killed_at_its_time_limit_reports_the_kill() -> None:
    code, _ = run_measured(["audit", "/nonexistent"], 0.01, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert code in (-9, 2)  # killed, or (on a fast machine) done before the limit
