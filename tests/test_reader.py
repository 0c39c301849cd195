"""SafetensorsReader: positioned reads equal safetensors' own, and files that change are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from clair_cli.errors import AdapterFormatError
from clair_cli.io.safetensors_file import SafetensorsReader

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.int8, torch.uint8, torch.bool]


def test_reads_equal_safetensors_for_every_dtype(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": (torch.randn(3, 5, generator=g) * 50).to(dt) for i, dt in enumerate(DTYPES)}
    tensors["empty"] = torch.zeros(0, 4)
    tensors["scalar"] = torch.tensor(3.5)
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path))
    with SafetensorsReader(path) as reader, safe_open(str(path), framework="pt") as ref:
        for key in tensors:
            got = reader.get(key)
            assert got.dtype == ref.get_tensor(key).dtype and got.shape == ref.get_tensor(key).shape
            assert torch.equal(got, ref.get_tensor(key)), key


def test_tensors_own_their_memory_and_no_file_stays_open(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.arange(6.0)}, str(path))
    with SafetensorsReader(path) as reader:
        t = reader.get("a")
    path.unlink()  # nothing maps the file any more
    t += 1
    assert t.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


def test_a_file_that_changes_size_after_its_header_was_checked_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.arange(6.0), "b": torch.arange(4.0)}, str(path))
    reader = SafetensorsReader(path)
    path.write_bytes(path.read_bytes()[:-8])
    with reader, pytest.raises(AdapterFormatError, match="changed size"):
        reader.get("b")


def test_get_outside_with_is_a_programming_error(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.ones(1)}, str(path))
    with pytest.raises(RuntimeError, match="outside its `with` block"):
        SafetensorsReader(path).get("a")
