"""The command line's set-up of the numerical stack, run where a command first needs it.

Importing torch is most of a command's start-up (about 1.7 s of 2.3 s on the project's
machine), and a command that ends on its options, a path, a config or a safetensors header
never needs it. So a command does not set the stack up when it starts: it registers the
set-up (:class:`clair_cli.cli.command.ClairCommand`: import numpy, torch and safetensors
where a Ctrl-C cannot leave them half-imported, then flush subnormal numbers to zero) and
the code that first needs tensors runs it through :func:`require`: the safetensors reader
before its first tensor, and the pipeline's entry points before their work (and so before
any output is opened: a Ctrl-C during the import ends the process at once, which loses
nothing only while nothing has been written).

A program that imports ``clair_cli`` registers nothing: :func:`require` does nothing and the
program keeps its own settings.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

_pending: list[Callable[[], Callable[[], None]]] = []  # the set-up of the command running, until run
_undo: list[Callable[[], None]] = []  # what puts back the settings the set-up changed


def require() -> None:
    """Run the command line's numerical set-up if a command registered it and it has not run yet.

    Called in the command's main thread (the set-up's signal handlers and its per-thread
    subnormal setting are the main thread's); elsewhere, or outside a command, it does nothing.
    """
    if _pending and threading.current_thread() is threading.main_thread():
        setup = _pending.pop()
        _undo.append(setup())


@contextlib.contextmanager
def deferred(setup: Callable[[], Callable[[], None]]) -> Iterator[None]:
    """Within the block, the first :func:`require` runs ``setup``; what ``setup`` returns (the
    undoing of its settings) runs when the block ends, for a program that runs commands in its
    own process (a test's ``CliRunner``)."""
    _pending[:] = [setup]
    _undo.clear()
    try:
        yield
    finally:
        _pending.clear()
        while _undo:
            _undo.pop()()
