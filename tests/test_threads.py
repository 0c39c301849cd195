"""The command line's thread policy (clair_cli/threads.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from clair_cli import threads


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    threads._chosen = None
    torch.set_num_threads(before)


def test_the_count_is_the_usable_cpus_whatever_the_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "usable_cpus", lambda: 8)
    for load in (0.0, 7.5, 40.0):  # the same report on an idle and on a busy machine
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        env: dict[str, str] = {}
        assert threads.configure_threads(env) == 8
        assert env == {"OMP_NUM_THREADS": "8", "MKL_NUM_THREADS": "8", "OMP_WAIT_POLICY": "PASSIVE"}


@pytest.mark.parametrize(
    ("env", "expected", "after"),
    [
        ({"OMP_NUM_THREADS": "3"}, None, {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "PASSIVE"}),
        ({"OMP_WAIT_POLICY": "ACTIVE", "CLAIR_NUM_THREADS": "4"}, 4, {"OMP_NUM_THREADS": "4"}),
        ({"CLAIR_NUM_THREADS": "0"}, None, {}),
    ],
    ids=["OMP_NUM_THREADS kept", "CLAIR_NUM_THREADS wins, wait policy kept", "0 leaves torch alone"],
)
def test_the_users_settings_are_kept(env: dict[str, str], expected: int | None, after: dict[str, str]) -> None:
    given = dict(env)
    assert threads.configure_threads(env) == expected
    for key, value in after.items():
        assert env[key] == value
    if expected is None and "CLAIR_NUM_THREADS" in given:
        assert env == given
    if "OMP_WAIT_POLICY" in given:
        assert env["OMP_WAIT_POLICY"] == given["OMP_WAIT_POLICY"]


def test_cgroup_quota_caps_the_cpus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(16)))
    quota = tmp_path / "cpu.max"
    monkeypatch.setattr(threads, "CGROUP_CPU_MAX", quota)
    quota.write_text("250000 100000\n")
    assert threads.usable_cpus() == 3
    quota.write_text("max 100000\n")
    assert threads.usable_cpus() == 16
    quota.write_text("garbage")
    assert threads.usable_cpus() == 16


def test_small_pools_run_single_threaded_large_ones_on_the_chosen_count(monkeypatch: pytest.MonkeyPatch) -> None:
    assert threads.fit_to_pool(4096, 1024) is None  # the user's settings: untouched
    monkeypatch.setattr(threads, "usable_cpus", lambda: 2)
    threads.configure_threads({})
    assert threads.fit_to_pool(256, 64) == 1 and torch.get_num_threads() == 1
    assert threads.fit_to_pool(4096, 1024) == 2 and torch.get_num_threads() == 2
