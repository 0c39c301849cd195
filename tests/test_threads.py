"""The command line's thread policy (clair_cli/cli/threads.py)."""

from __future__ import annotations

import pytest

from clair_cli.cli import threads


@pytest.mark.parametrize(
    ("env", "expected", "after"),
    [
        ({}, 1, {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}),
        ({"OMP_NUM_THREADS": "3"}, None, {"OMP_NUM_THREADS": "3"}),
        ({"OMP_NUM_THREADS": "3", "CLAIR_NUM_THREADS": "4"}, 4, {"OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "4"}),
        ({"CLAIR_NUM_THREADS": "0"}, None, {"CLAIR_NUM_THREADS": "0"}),
        ({"CLAIR_NUM_THREADS": "lots"}, 1, {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}),
    ],
    ids=["one thread by default", "OMP_NUM_THREADS kept", "CLAIR_NUM_THREADS wins", "0: torch's own", "not a number"],
)
def test_thread_settings(env: dict[str, str], expected: int | None, after: dict[str, str]) -> None:
    given = dict(env)
    assert threads.configure_threads(env) == expected
    assert env == given | after  # nothing else is touched (no wait policy, no other variable)
