"""The one bounded reader of input files.

Every file clair reads from a source goes through here: it is opened without
blocking and refused unless it is a regular file (a FIFO or a device in an
adapter's place would otherwise hang the run or stream forever), small files are
read whole up to a size cap, large ranges in chunks (a single ``read()`` stops at
2 GiB), and JSON is parsed with its nesting and number sizes bounded. Operating-system
errors become ClairErrors that name the file.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from clair_cli.errors import AdapterFormatError, AdapterNotFound, ClairError
from clair_cli.io.paths import printable, shown_path

# Linux caps one read() at 2 GiB - 4 KiB; read in pieces well below it.
READ_CHUNK = 1 << 30


def os_problem(exc: OSError | ValueError, path: Path | str) -> ClairError:
    """The ClairError for an operating-system error met while reading ``path``: a missing
    file, a dangling symlink, a symlink loop, a path too long for the OS, a NUL byte..."""
    shown = shown_path(path)
    if isinstance(exc, ValueError):  # os functions refuse a path with a NUL byte
        return AdapterNotFound(f"{shown}: the path contains a NUL byte")
    code = exc.errno
    if code == errno.ENOENT:
        if os.path.islink(path):
            try:
                target = f" (to {shown_path(os.readlink(path))})"
            except OSError:  # unreadable (a /proc link) or gone since
                target = ""
            return AdapterNotFound(f"{shown}: is a dangling symlink{target}")
        return AdapterNotFound(f"{shown}: no such file or directory")
    if code == errno.ELOOP:
        return AdapterNotFound(f"{shown}: is a symlink loop (too many levels of symbolic links)")
    if code == errno.ENAMETOOLONG:
        return AdapterNotFound(f"{shown}: path too long for the operating system ({len(str(path))} characters)")
    if code == errno.ENOTDIR:
        return AdapterNotFound(f"{shown}: a component of the path is not a directory")
    if code == errno.EISDIR:
        return AdapterFormatError(f"{shown}: is a directory, expected a file")
    if code in (errno.EACCES, errno.EPERM):
        return AdapterNotFound(f"{shown}: permission denied")
    return AdapterNotFound(f"{shown}: cannot be read ({printable(exc.strerror or str(exc))})")


def probe(path: Path | str) -> os.stat_result | None:
    """``os.stat`` of ``path`` (links followed), or None when nothing is there.

    Raises:
        ClairError: a dangling symlink, a symlink loop, a path too long for the OS, a NUL
            byte in it, or a permission problem (never an OSError).
    """
    try:
        return os.stat(path)
    except (OSError, ValueError) as exc:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOENT, errno.ENOTDIR) and not os.path.islink(path):
            return None
        raise os_problem(exc, path) from None


@contextmanager
def reading(path: Path) -> Iterator[None]:
    """Turn OSErrors raised in the block (missing file, dangling link, loop, permissions...)
    into AdapterNotFound / AdapterFormatError for ``path``."""
    try:
        yield
    except (OSError, ValueError) as exc:
        if isinstance(exc, ValueError) and "null" not in str(exc):
            raise
        raise os_problem(exc, path) from exc


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device"


def open_regular(path: Path) -> int:
    """Open ``path`` for reading and return the descriptor, refusing anything but a regular file.

    The open does not block (a FIFO without a writer would), and the check is made on
    the opened descriptor, so the file cannot be swapped between check and read.

    Raises:
        AdapterNotFound: the file does not exist or cannot be opened.
        AdapterFormatError: it is a directory, FIFO, socket or device.
    """
    with reading(path):
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise AdapterFormatError(f"{printable(str(path))}: is a directory, expected a file")
        if not stat.S_ISREG(mode):
            raise AdapterFormatError(
                f"{printable(str(path))}: is {_kind(mode)}, not a regular file; refused without reading it"
            )
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_range(fd: int, start: int, size: int, path: Path) -> bytearray:
    """``size`` bytes at offset ``start``, read in chunks; short reads are reported as truncation."""
    buf = bytearray(size)
    view = memoryview(buf)
    done = 0
    with reading(path):
        while done < size:
            got = os.preadv(fd, [view[done : done + READ_CHUNK]], start + done)
            if got == 0:
                break
            done += got
    if done != size:
        raise AdapterFormatError(
            f"{printable(str(path))}: read {done} of {size} bytes at offset {start} (file truncated while reading?)"
        )
    return buf


def read_small(path: Path, limit: int, what: str) -> bytes:
    """The whole of a small regular file, refused above ``limit`` bytes."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise AdapterFormatError(
                f"{shown_path(path)}: is {size} bytes, more than the {limit >> 10} KiB accepted for {what}"
            )
        return bytes(read_range(fd, 0, size, path))
    finally:
        os.close(fd)


class DuplicateKeyError(ValueError):
    """A JSON object that names one key twice (:func:`parse_json` with ``unique_keys``)."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKeyError(key)
            seen.add(key)
    return out


class NotStrictJSON(ValueError):
    """A number that Python's json reads but strict JSON parsers refuse (:func:`parse_json` with ``strict``)."""


# What serde_json (the safetensors library's parser: PEFT and diffusers load through it) refuses that
# Python's json reads: NaN, Infinity and -Infinity (no JSON), a number past float64's range ("number
# out of range": 1e400, an integer of 310 digits), and more than 127 arrays and objects nested (its
# recursion limit, 128). It also reads "-0" as a float, -0.0: no shape or offset.
STRICT_MAX_DEPTH = 127
STRICT_REFUSAL = "which the safetensors library (and so PEFT and diffusers) refuses"


def _strict_constant(token: str) -> Any:
    raise NotStrictJSON(f"{token} (not JSON)")


def _strict_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise NotStrictJSON(f"the number {text[:40]} (past float64's range)")
    return value


def _strict_int(text: str) -> int | float:
    return -0.0 if text == "-0" else int(text)


def strict_problem(value: Any, max_depth: int) -> str | None:
    """What in ``value`` (parsed with ``strict``) the safetensors library's parser refuses that
    :func:`parse_json` lets through: more than ``max_depth`` arrays and objects nested (the outermost
    counted), or an integer past float64's range. None if nothing. Iterative."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > max_depth:
                return f"arrays and objects nested more than {STRICT_MAX_DEPTH} deep in the header"
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
        elif isinstance(node, int) and node.bit_length() > 1000:
            try:
                float(node)
            except OverflowError:
                return f"an integer of {len(str(abs(node)))} digits (past float64's range)"
    return None


def parse_json(raw: bytes, path: Path | str, what: str, *, unique_keys: bool = False, strict: bool = False) -> Any:
    """Parse JSON from an input; any problem (encoding, syntax, nesting too deep, an integer of
    thousands of digits) is an AdapterFormatError naming the file. ``unique_keys``: an object that
    names a key twice is refused too (Python keeps the last entry, other readers the first or none;
    the error's ``__cause__`` is then a :class:`DuplicateKeyError`). ``strict``: what the safetensors
    library's parser refuses is refused too (NaN, Infinity, floats past float64's range; ``-0`` is read as
    the float -0.0, as it reads it), so that a file that no loader opens is not read here (the caller
    checks nesting and large integers where they may be, :func:`strict_problem`).
    """
    shown = printable(str(path))
    hooks: dict[str, Any] = {"parse_constant": _strict_constant, "parse_float": _strict_float} if strict else {}
    if strict and b"-0" in raw:  # a hook per integer costs half again a large header's parse
        hooks["parse_int"] = _strict_int
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_object if unique_keys else None, **hooks)
    except DuplicateKeyError as exc:
        raise AdapterFormatError(f"{shown}: {what} names {printable(exc.key)!r} twice") from exc
    except NotStrictJSON as exc:
        raise AdapterFormatError(f"{shown}: {what} holds {exc}, {STRICT_REFUSAL}") from exc
    except UnicodeDecodeError as exc:
        raise AdapterFormatError(f"{shown}: {what} is not UTF-8 text") from exc
    except json.JSONDecodeError as exc:
        raise AdapterFormatError(f"{shown}: {what} is not valid JSON (line {exc.lineno}: {exc.msg})") from exc
    except RecursionError as exc:
        raise AdapterFormatError(f"{shown}: {what} is JSON nested too deeply") from exc
    except ValueError as exc:  # e.g. an integer longer than Python's int_max_str_digits
        raise AdapterFormatError(f"{shown}: {what} holds a value that cannot be parsed ({exc})") from exc
