from __future__ import annotations

import os
import sys
from pathlib import Path

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


@pytest.fixture(scope="session")
def pool_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of three adapters: a/, b/, nested/c/."""
    root = tmp_path_factory.mktemp("pool")
    for i, name in enumerate(["b", "a", "nested/c"]):
        write_adapter(root / name, seed=i)
    return root
