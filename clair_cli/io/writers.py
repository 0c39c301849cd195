"""Write report files atomically: to a temporary file beside the target, then rename.

An interrupted run leaves the old file (or nothing), never half a file. Only a
missing path or a regular file is replaced: a symlink, FIFO or device in the
target's place is refused, never followed (:func:`clair_cli.io.paths.check_report_file`).
The file gets the mode a plain create would give it (umask honoured).
"""

from __future__ import annotations

import errno
import os
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

from clair_cli.errors import OutputError
from clair_cli.io.paths import apply_umask, check_report_file, discarded, printable


def os_error_text(exc: OSError) -> str:
    """An OSError in words, with the usual fix where there is one."""
    if exc.errno == errno.ENOSPC:
        return "no space left on the device"
    if exc.errno == errno.EDQUOT:
        return "disk quota exceeded"
    return exc.strerror or str(exc)


def write_bytes(target: str, data: bytes, inputs: Iterable[Path] = ()) -> None:
    """Write ``data`` to the file ``target`` atomically (``-`` is stdout).

    Raises:
        OutputError: the target is not a regular file, is an input, or cannot be written.
    """
    if target == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    path = check_report_file(target, inputs)
    if discarded(target):
        return
    shown = printable(target)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:100]}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"{shown}: cannot write here ({os_error_text(exc)})") from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        apply_umask(Path(tmp))
        check_report_file(target, inputs)  # nothing swapped in meanwhile
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"{shown}: cannot write ({os_error_text(exc)})") from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(target: str, text: str, inputs: Iterable[Path] = ()) -> None:
    """Write ``text`` (UTF-8) to a file atomically, or to stdout when ``target`` is ``-``."""
    if target == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    write_bytes(target, text.encode("utf-8"), inputs)
