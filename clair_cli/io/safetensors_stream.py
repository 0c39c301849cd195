"""A ``.safetensors`` file written one tensor at a time, so a merge holds one module, not the adapter.

safetensors' own ``save_file`` takes every tensor at once: a merged adapter would sit in memory
whole until it is written (6 GiB for a 7B-shaped pool merged at rank 960). Here the header's room
is reserved first, from an upper bound on every number it will hold (each tensor's name and
largest possible shape are known before the merge: a merged rank never exceeds the bound the
caller gives); tensors are then appended as they are computed, and the header is written last,
padded with spaces to the reserved size, which the format allows (safetensors pads its own headers
with spaces to 8 bytes). The result is an ordinary safetensors file: contiguous data, offsets
relative to the data section, little-endian.

:meth:`SafetensorsStream.rewrite` replaces tensors already written, in place (a second pass, one
tensor in memory at a time, with a function the caller gives: this module does no arithmetic):
``clair merge --rescale norm`` knows its factor only once every module is merged.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    import torch

# The dtype written (merged factors have scale 1 and are float32) and its safetensors name.
DTYPE_NAME = "F32"
ITEMSIZE = 4


@dataclass
class _Written:
    shape: tuple[int, ...]
    start: int  # data-section offsets, as the header gives them
    end: int


def _header(entries: Mapping[str, tuple[Sequence[int], int, int]], metadata: Mapping[str, str]) -> bytes:
    """The header JSON (compact) of ``entries``: name -> (shape, start, end)."""
    doc: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    for name, (shape, start, end) in entries.items():
        doc[name] = {"dtype": DTYPE_NAME, "shape": list(shape), "data_offsets": [start, end]}
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=True).encode("ascii")


class SafetensorsStream:
    """Write ``path`` tensor by tensor.

    Args:
        path: the file to create (the caller's staging directory: a failed run leaves it to
            the output transaction to discard).
        largest: per tensor name, the largest shape it may have (its data size is bounded by
            it, and so is every number of the header).
        metadata: the ``__metadata__`` strings.
        optional: like ``largest``, for tensors that may be left out.

    Use as a context manager; leaving without an exception writes the header.
    """

    def __init__(
        self,
        path: Path,
        largest: Mapping[str, Sequence[int]],
        metadata: Mapping[str, str],
        optional: Mapping[str, Sequence[int]] | None = None,
    ) -> None:
        self.path = path
        self.required = set(largest)
        self.largest = {k: tuple(int(d) for d in v) for k, v in {**largest, **(optional or {})}.items()}
        self.metadata = dict(metadata)
        self.written: dict[str, _Written] = {}
        total = sum(math.prod(s) * ITEMSIZE for s in self.largest.values())
        # Every number is at most its bound: the header with the bounds is at least as long as the real one.
        bound = _header({k: (s, total, total) for k, s in self.largest.items()}, self.metadata)
        self.header_room = -(-len(bound) // 8) * 8
        self._end = 0
        self._file: BinaryIO | None = None

    def __enter__(self) -> SafetensorsStream:
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed in __exit__
        self._file.seek(8 + self.header_room)
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        assert self._file is not None
        try:
            if exc_type is None:
                self._finish(self._file)
        finally:
            self._file.close()
            self._file = None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` (written as float32) under ``name``."""
        assert self._file is not None, "add() outside the with block"
        if name in self.written or name not in self.largest:
            raise ValueError(f"{name!r}: not a tensor this file was planned for, or written twice")
        shape = tuple(int(d) for d in tensor.shape)
        if len(shape) != len(self.largest[name]) or any(d > m for d, m in zip(shape, self.largest[name], strict=True)):
            raise ValueError(f"{name!r}: shape {shape} exceeds the planned {self.largest[name]}")
        data = _little_endian_bytes(tensor)
        self._file.write(data)
        self.written[name] = _Written(shape, self._end, self._end + len(data))
        self._end += len(data)

    def rewrite(self, names: Sequence[str], fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace each tensor ``names`` already written by ``fn`` of it (same shape), in place,
        one tensor in memory at a time."""
        import numpy as np
        import torch

        assert self._file is not None, "rewrite() outside the with block"
        self._file.flush()
        with open(self.path, "r+b") as f:
            for name in names:
                w = self.written[name]
                f.seek(8 + self.header_room + w.start)
                raw = np.frombuffer(bytearray(f.read(w.end - w.start)), dtype="<f4")
                new = fn(torch.from_numpy(raw.astype(np.float32, copy=False)).reshape(w.shape))
                if tuple(new.shape) != w.shape:
                    raise ValueError(f"{name!r}: rewritten with shape {tuple(new.shape)}, not {w.shape}")
                f.seek(8 + self.header_room + w.start)
                f.write(_little_endian_bytes(new))

    def _finish(self, f: BinaryIO) -> None:
        missing = sorted(self.required - set(self.written))
        if missing:
            raise ValueError(f"{len(missing)} planned tensor(s) never written, e.g. {missing[0]!r}")
        header = _header({k: (w.shape, w.start, w.end) for k, w in sorted(self.written.items())}, self.metadata)
        if len(header) > self.header_room:  # pragma: no cover - the bound is an upper bound by construction
            raise AssertionError("safetensors header outgrew its reserved room")
        f.seek(0)
        f.write(self.header_room.to_bytes(8, "little"))
        f.write(header.ljust(self.header_room, b" "))
        f.flush()
        os.fsync(f.fileno())


def _little_endian_bytes(tensor: torch.Tensor) -> memoryview:
    import torch

    arr = tensor.detach().to("cpu", torch.float32).reshape(-1).contiguous().numpy().astype("<f4", copy=False)
    return arr.data.cast("B")
