"""Consoles for data (stdout) and messages (stderr).

Rich drops colour under NO_COLOR and when the stream is not a terminal, so piped
output is plain text. ``COLUMNS`` sets the width when there is no terminal.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import IO

from rich.console import Console
from rich.markup import escape

from clair_cli.io.paths import printable


class _Console(Console):
    def on_broken_pipe(self) -> None:
        """Rich ends the process here with exit 1, which reads as "an adapter was flagged" (a table piped
        into ``head``); the error goes to the command's boundary instead, which ends with 141, as a report
        on stdout (``--json -``) does."""
        self.quiet = True
        raise BrokenPipeError(errno.EPIPE, "the output's reader closed it")


def make_console(*, stderr: bool = False, quiet: bool = False, file: IO[str] | None = None) -> Console:
    """A console on stdout (data) or stderr (messages); ``quiet`` silences it."""
    stream = file or (sys.stderr if stderr else sys.stdout)
    width = None
    if not stream.isatty():
        # As rich reads it: a positive count of ASCII digits, else the default (int("abc") failed, and a
        # negative width printed nothing at all).
        columns = os.environ.get("COLUMNS", "").strip()
        width = int(columns) if columns.isascii() and columns.isdigit() and int(columns) > 0 else 120
    return _Console(file=stream, quiet=quiet, highlight=False, width=width, soft_wrap=False)


def shown(text: str) -> str:
    """An input-derived string ready for rich markup: control characters escaped, ``[`` not markup."""
    return escape(printable(text))


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)
