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
import re
import struct
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from clair_cli import numerics
from clair_cli.constants import (
    MAX_DIM,
    MAX_KEY_LENGTH,
    MAX_NDIM,
    SAFETENSORS_DTYPE_SIZES,
    SAFETENSORS_MAX_HEADER,
    SAFETENSORS_MAX_TENSORS,
)
from clair_cli.errors import AdapterFormatError
from clair_cli.io.files import (
    STRICT_MAX_DEPTH,
    STRICT_REFUSAL,
    DuplicateKeyError,
    NotStrictJSON,
    open_regular,
    parse_json,
    read_range,
    strict_problem,
)
from clair_cli.io.paths import printable

if TYPE_CHECKING:
    import torch

# What one read of a tensor's data holds at most when a pass only scans values (inspect's check).
CHUNK_BYTES = 64 * 1024 * 1024


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


@dataclass(frozen=True)
class FileStamp:
    """One version of a file on one machine: its device, inode, size, modification and change
    times. A file rewritten in place or replaced (a rename over it) after clair read its header
    has another stamp: the change time (``st_ctime``) moves with any write and cannot be set back,
    as the modification time can. On another machine (a Ray worker) the file is another copy,
    whose stamp says nothing; the tensor table is compared there (:meth:`Adapter.reader`)."""

    host: str
    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileStamp:
        return cls(_host(), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def here(self) -> bool:
        """Whether the stamp was taken on this machine (only there can it be compared)."""
        return self.host == _host()

    def same(self, st: os.stat_result) -> bool:
        """Whether ``st`` is this version of the file (always true on another machine)."""
        return not self.here() or FileStamp.of(st) == self


def _host() -> str:
    return os.uname().nodename if hasattr(os, "uname") else ""


def file_stamp(path: Path) -> FileStamp:
    """The :class:`FileStamp` of ``path`` as it is now.

    Raises:
        AdapterNotFound: the file cannot be found or read.
    """
    fd = open_regular(path)  # fstat, as every later check: stat and fstat can differ (old overlayfs)
    try:
        return FileStamp.of(os.fstat(fd))
    finally:
        os.close(fd)


def changed(path: Path) -> AdapterFormatError:
    """The error for an input that changed while the run was reading it. Its change time moves with a
    chmod, chown, utime (``touch``, ``tar --atime-preserve``) or extended attribute as with a write, and
    cannot be told from one (a write with its modification time put back differs in nothing else): the
    message says so, rather than that the file was rewritten."""
    return AdapterFormatError(
        f"{printable(str(path))}: changed while clair was reading it (rewritten or replaced, or its "
        "permissions, times or extended attributes changed, after its header was read); nothing was written",
        hint="Run again once nothing writes to the adapters or changes their metadata.",
    )


def _bad(path: Path, problem: str) -> AdapterFormatError:
    return AdapterFormatError(
        f"{printable(str(path))}: {problem}",
        hint="The file is corrupt or not a safetensors file; re-download or re-save the adapter.",
    )


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ENTRY_FIELDS = frozenset({"dtype", "shape", "data_offsets"})
_SURROGATE_ESCAPE = re.compile(rb"\\[uU][dD][89a-fA-F]")


def _lone_surrogate(raw: bytes, parsed: object) -> bool:
    """Whether the JSON text ``raw`` (``parsed``) escapes a UTF-16 surrogate that no pair completes."""
    if not _SURROGATE_ESCAPE.search(raw):
        return False
    try:
        json.dumps(parsed, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


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
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size < 8:
            raise _bad(path, f"file is {size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", read_range(fd, 0, 8, path))
        if n > SAFETENSORS_MAX_HEADER:
            raise _bad(
                path,
                f"header length {n} exceeds clair's limit of {SAFETENSORS_MAX_HEADER >> 20} MiB "
                f"(at most {SAFETENSORS_MAX_TENSORS} tensors are accepted; not a safetensors file?)",
            )
        if n > size - 8:
            raise _bad(path, f"header length {n} runs past the end of the file ({size} bytes): truncated")
        raw = bytes(read_range(fd, 8, n, path))
    finally:
        os.close(fd)

    try:
        header = parse_json(raw, path, "the safetensors header", unique_keys=True, strict=True)
    except AdapterFormatError as exc:
        if isinstance(exc.__cause__, DuplicateKeyError):
            # Python's json keeps the last entry, other readers the first: one file, two contents.
            raise _bad(
                path,
                f"the header names {printable(exc.__cause__.key)!r} twice; readers differ on which entry they use",
            ) from exc
        if isinstance(exc.__cause__, NotStrictJSON):  # Python's json reads it; no loader opens the file
            raise _bad(path, f"the header holds {exc.__cause__}, {STRICT_REFUSAL}") from exc
        raise _bad(path, exc.message.split(": ", 1)[-1] + " (not a safetensors file?)") from exc
    if not isinstance(header, dict):
        raise _bad(path, "header is not a JSON object")
    if _lone_surrogate(raw, header):
        # JSON's "\ud800" escape decodes to a string no UTF-8 writer can encode: Python's json
        # reads it, the safetensors library (and so PEFT and diffusers) refuses the file.
        raise _bad(path, "the header escapes a lone UTF-16 surrogate (U+D800-U+DFFF), which is not text")
    n_tensors = len(header) - ("__metadata__" in header)
    if n_tensors > SAFETENSORS_MAX_TENSORS:
        raise _bad(path, f"header lists {n_tensors} tensors; clair accepts at most {SAFETENSORS_MAX_TENSORS}")

    metadata = header.pop("__metadata__", None)
    if metadata is None:  # absent or null, as the safetensors library accepts; 0, [] or "" are refused there too
        metadata = {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _bad(path, "__metadata__ must map strings to strings")

    data_len = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if len(name) > MAX_KEY_LENGTH:
            raise _bad(path, f"tensor name {printable(name[:60])!r}... is longer than {MAX_KEY_LENGTH} characters")
        if _CONTROL.search(name):
            # No model's module path holds one, and module-name patterns rely on it: "." matches any
            # character but a newline, so a trailing ".*" always reaches the end of a name in one step.
            raise _bad(path, f"tensor name {printable(name[:200])!r} holds a control character")
        if not isinstance(entry, dict):
            raise _bad(path, f"tensor {name!r}: header entry is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if len(entry) > len(_ENTRY_FIELDS):  # fields every reader ignores, but the library's parser reads
            for field in entry.keys() - _ENTRY_FIELDS:
                why = strict_problem(entry[field], STRICT_MAX_DEPTH - 2)  # in the header, in its entry
                if why:
                    raise _bad(
                        path,
                        f"tensor {name!r}: its field {printable(field[:80])!r} holds {why}, {STRICT_REFUSAL}",
                    )
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPE_SIZES:
            raise _bad(path, f"tensor {name!r}: unknown dtype {str(dtype)[:40]!r}")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_NDIM
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM for d in shape)
        ):
            raise _bad(
                path, f"tensor {name!r}: invalid shape {str(shape)[:80]} (at most {MAX_NDIM} dims, each 0-2**31)"
            )
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise _bad(path, f"tensor {name!r}: invalid data_offsets {str(offsets)[:80]}")
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
    # The tensors cover the data section exactly, as safetensors itself requires ("file not fully
    # covered"): bytes that belong to no tensor would be audited by no one but shipped with the file.
    covered = 0
    for begin, end, name in spans:
        if begin > covered:
            problem = f"bytes {covered}-{begin} of the data section, before tensor {name!r}, belong to no tensor"
            raise _bad(path, problem)
        covered = max(covered, end)
    if covered != data_len:
        raise _bad(
            path,
            f"{data_len - covered} bytes after the last tensor belong to no tensor "
            "(a safetensors data section is covered exactly by its tensors)",
        )
    return tensors, metadata


# Dtypes read straight from the file, in slices where asked (:meth:`SafetensorsReader.chunks`);
# one the installed torch lacks (uint16-64 before torch 2.3) goes through safetensors, whole.
_TORCH_DTYPES = {
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "I32": "int32",
    "U32": "uint32",
    "I64": "int64",
    "U64": "uint64",
}


def _torch_dtype(name: str) -> torch.dtype | None:
    """The torch dtype a safetensors dtype is read as directly, or None (through safetensors)."""
    import torch

    if name not in _TORCH_DTYPES or sys.byteorder != "little":
        return None
    return getattr(torch, _TORCH_DTYPES[name], None)


class SafetensorsReader:
    """Reads validated tensors one at a time; open it as a context manager.

    Tensors are read with positioned reads into memory owned by the tensor (no
    memory map), at the offsets the validated header gives, so resident memory holds
    only the tensors in use and no file descriptor stays open between reads: a pass
    over a large pool keeps neither the pool's pages nor K open files.
    """

    def __init__(self, path: Path, stamp: FileStamp | None = None) -> None:
        self.path = path
        self.stamp = stamp  # the version read before (an adapter's, when it was opened): no other is read
        self.tensors, self.metadata = read_header(path)
        fd = open_regular(path)
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        self._size = st.st_size
        if stamp is not None and not stamp.same(st):
            raise changed(path)
        self._open = False

    def _check(self, fd: int) -> None:
        """Refuse the open file ``fd`` unless it is the version this reader's header came from (called
        before and after each read: a write in place between the two is in the bytes read)."""
        st = os.fstat(fd)
        if self.stamp is not None and not self.stamp.same(st):
            raise changed(self.path)
        if st.st_size != self._size:
            raise _bad(self.path, "changed size while being read")

    def __enter__(self) -> SafetensorsReader:
        self._open = True
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._open = False

    def get(self, name: str) -> torch.Tensor:
        """One tensor, as stored (dtype unchanged)."""
        return self.get_many([name])[0]

    def get_many(self, names: Sequence[str]) -> list[torch.Tensor]:
        """Several tensors, as stored, through one open of the file (a module's two factors)."""
        numerics.require()
        import torch

        if not self._open:
            raise RuntimeError("SafetensorsReader.get() outside its `with` block")
        infos = [self.tensors[name] for name in names]
        found = [_torch_dtype(info.dtype) for info in infos]
        dtypes = [dtype for dtype in found if dtype is not None]
        if len(dtypes) < len(found):
            return [self._get_with_safetensors(name) for name in names]
        fd = open_regular(self.path)
        try:
            self._check(fd)
            bufs = [read_range(fd, info.start, info.nbytes, self.path) for info in infos]
            self._check(fd)  # and after: a write in place while the bytes were read changes the stamp
        finally:
            os.close(fd)
        out = []
        for info, buf, dtype in zip(infos, bufs, dtypes, strict=True):
            out.append(
                torch.frombuffer(buf, dtype=dtype).reshape(info.shape)
                if info.nbytes
                else torch.empty(info.shape, dtype=dtype)
            )
        return out

    def chunks(self, name: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[torch.Tensor]:
        """One tensor's values as flat pieces of at most ``chunk_bytes`` each, read one at a time."""
        numerics.require()
        import torch

        if not self._open:
            raise RuntimeError("SafetensorsReader.chunks() outside its `with` block")
        info = self.tensors[name]
        dtype = _torch_dtype(info.dtype)
        if dtype is None:
            yield self._get_with_safetensors(name).reshape(-1)
            return
        item = SAFETENSORS_DTYPE_SIZES[info.dtype]
        step = max(item, chunk_bytes // item * item)
        for offset in range(0, info.nbytes, step):
            fd = open_regular(self.path)
            try:
                self._check(fd)
                buf = read_range(fd, info.start + offset, min(step, info.nbytes - offset), self.path)
                self._check(fd)
            finally:
                os.close(fd)
            yield torch.frombuffer(buf, dtype=dtype)

    def _get_with_safetensors(self, name: str) -> torch.Tensor:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as handle:
                tensor = handle.get_tensor(name)
        except (SafetensorError, OSError, TypeError) as exc:
            raise _bad(self.path, f"tensor {name!r} cannot be read ({exc})") from exc
        fd = open_regular(self.path)  # the library opens the path itself: what it read must be this version still
        try:
            self._check(fd)
        finally:
            os.close(fd)
        return tensor
