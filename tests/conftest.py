from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# The tests' tensors are tiny: one thread each, here and in the CLI subprocesses they start.
# With torch's default (a thread per core) a runner busy with other work oversubscribes its
# cores and the same tests take 5-10 times longer.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

sys.path.insert(0, str(Path(__file__).parent))

from helpers import write_adapter  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _reports_follow_their_schemas(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every JSON report and SARIF log a test writes in this process (CliRunner, library calls)
    is checked against its schema (clair_cli/schemas, tests/data); helpers.run_cli checks those
    of the subprocesses it starts."""
    from report_check import text_problems

    from clair_cli.io import writers

    original = writers.write_text
    found: list[str] = []

    def write_text(target: str, text: str, *args: Any, **kwargs: Any) -> None:
        original(target, text, *args, **kwargs)
        found.extend(text_problems(text, f"report written to {target}"))

    monkeypatch.setattr(writers, "write_text", write_text)
    yield
    assert not found, "reports that do not follow their schema:\n" + "\n".join(found)


@pytest.fixture(scope="session")
def pool_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of three adapters: a/, b/, nested/c/."""
    root = tmp_path_factory.mktemp("pool")
    for i, name in enumerate(["b", "a", "nested/c"]):
        write_adapter(root / name, seed=i)
    return root
