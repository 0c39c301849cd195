"""Validated, lazy access to a ``.safetensors`` file.

The header is parsed and checked here before safetensors maps the file, so a
truncated, hostile or mislabelled file is refused with a message that names the
problem (header past the end of the file, overlapping tensors, a pickle renamed
to ``.safetensors``...) instead of a library error. Tensors are then read one at
a time at the offsets the checked header gives (:class:`SafetensorsReader`).
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from clair_cli.constants import SAFETENSORS_DTYPE_SIZES, SAFETENSORS_MAX_HEADER
from clair_cli.errors import AdapterFormatError
from clair_cli.io.files import reading

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as the header describes it (no data read)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    start: int = 0  # file offset of the first data byte

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _bad(path: Path, problem: str) -> AdapterFormatError:
    return AdapterFormatError(
        f"{path}: {problem}",
        hint="The file is corrupt or not a safetensors file; re-download or re-save the adapter.",
    )


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header without reading tensor data.

    Args:
        path: the ``.safetensors`` file.

    Returns:
        ``(tensors, metadata)``: tensor infos by name, and the ``__metadata__`` strings.

    Raises:
        AdapterNotFound: the file does not exist or cannot be opened.
        AdapterFormatError: the header is not a valid safetensors header for this file.
    """
    with reading(path):
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise _bad(path, f"file is {size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > SAFETENSORS_MAX_HEADER:
                raise _bad(path, f"header length {n} exceeds the 100 MB safetensors limit (not a safetensors file?)")
            if n > size - 8:
                raise _bad(path, f"header length {n} runs past the end of the file ({size} bytes): truncated")
            raw = fh.read(n)

    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(path, "header is not valid UTF-8 JSON (not a safetensors file?)") from exc
    if not isinstance(header, dict):
        raise _bad(path, "header is not a JSON object")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _bad(path, "__metadata__ must map strings to strings")

    data_len = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise _bad(path, f"tensor {name!r}: header entry is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPE_SIZES:
            raise _bad(path, f"tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise _bad(path, f"tensor {name!r}: invalid shape {shape!r}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets):
            raise _bad(path, f"tensor {name!r}: invalid data_offsets {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise _bad(
                path,
                f"tensor {name!r}: data_offsets [{begin}, {end}] outside the {data_len}-byte data section (truncated?)",
            )
        nbytes = math.prod(shape) * SAFETENSORS_DTYPE_SIZES[dtype]
        if end - begin != nbytes:
            raise _bad(
                path,
                f"tensor {name!r}: {dtype} {tuple(shape)} needs {nbytes} bytes but its data spans {end - begin}",
            )
        tensors[name] = TensorInfo(name, dtype, tuple(shape), nbytes, 8 + n + begin)
        spans.append((begin, end, name))

    spans.sort()
    for (_b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:], strict=False):
        if b1 < e0:
            raise _bad(path, f"tensors {n0!r} and {n1!r} overlap in the data section")
    return tensors, metadata


# Dtypes read straight from the file; others (unsigned wide ints, float8) go through safetensors.
_TORCH_DTYPES = {
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "I32": "int32",
    "I64": "int64",
}


class SafetensorsReader:
    """Reads validated tensors one at a time; open it as a context manager.

    Tensors are read with positioned reads into memory owned by the tensor (no
    memory map), at the offsets the validated header gives, so resident memory holds
    only the tensors in use and no file descriptor stays open between reads: a pass
    over a large pool keeps neither the pool's pages nor K open files.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tensors, self.metadata = read_header(path)
        self._size = path.stat().st_size
        self._open = False

    def __enter__(self) -> SafetensorsReader:
        self._open = True
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._open = False

    def get(self, name: str) -> torch.Tensor:
        """One tensor, as stored (dtype unchanged)."""
        import torch

        if not self._open:
            raise RuntimeError("SafetensorsReader.get() outside its `with` block")
        info = self.tensors[name]
        if info.dtype not in _TORCH_DTYPES or sys.byteorder != "little":
            return self._get_with_safetensors(name)
        buf = bytearray(info.nbytes)
        try:
            with self.path.open("rb") as fh:
                if os.fstat(fh.fileno()).st_size != self._size:
                    raise _bad(self.path, "changed size while being read")
                got = os.preadv(fh.fileno(), [buf], info.start) if info.nbytes else 0
        except OSError as exc:
            raise _bad(self.path, f"tensor {name!r} cannot be read ({exc.strerror or exc})") from exc
        if got != info.nbytes:
            raise _bad(self.path, f"tensor {name!r}: read {got} of {info.nbytes} bytes (truncated while reading?)")
        dtype = getattr(torch, _TORCH_DTYPES[info.dtype])
        if not info.nbytes:
            return torch.empty(info.shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(info.shape)

    def _get_with_safetensors(self, name: str) -> torch.Tensor:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as handle:
                return handle.get_tensor(name)
        except (SafetensorError, OSError, TypeError) as exc:
            raise _bad(self.path, f"tensor {name!r} cannot be read ({exc})") from exc
