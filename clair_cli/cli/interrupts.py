"""Ending a run on Ctrl-C or SIGTERM: the exit, and the numerical stack imported where a signal
cannot leave it half-imported."""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys
import threading
from types import FrameType

NO_OUTPUT = "Interrupted: no output was written."

# Imported before a command runs, in this order: numpy before torch, whose start-up imports it.
NUMERICS = ("numpy", "torch", "safetensors.torch")


def exit_interrupted(code: int) -> None:
    """Exit with 130 (Ctrl-C) or 143 (SIGTERM) once the interrupt has been handled.

    CPython remembers a KeyboardInterrupt that once passed out of code run through
    ``PyRun_String`` (some extension modules' imports do this) and then kills the process
    with SIGINT at exit, even after clair caught the interrupt and cleaned up: the exit code
    would read -2 instead of 130. Leaving through ``os._exit`` after flushing keeps the code.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def _exit_now(signum: int, _frame: FrameType | None) -> None:
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(NO_OUTPUT + "\n")
    exit_interrupted(128 + signum)


def import_numerics() -> None:
    """Import numpy, torch and safetensors with Ctrl-C and SIGTERM ending the process at once.

    A KeyboardInterrupt raised inside an import cannot be relied on to unwind: torch's start-up
    imports numpy from C and, if that fails for any reason, clears the error and carries on, so
    a Ctrl-C landing there left numpy half-imported and the command then failed with "internal
    error (module 'numpy' has no attribute 'matrix')" (exit 2) instead of exit 130 (CI saw
    this). Before a command runs nothing has been written, so ending at once loses nothing.
    Most of a command's start-up time is these imports; later ones are small.
    """
    missing = [name for name in NUMERICS if name not in sys.modules]
    if not missing:
        return
    if threading.current_thread() is not threading.main_thread():  # signal handlers are the main thread's
        for name in missing:
            importlib.import_module(name)
        return
    # A signal ignored (a background job's Ctrl-C) stays ignored; None: a handler installed
    # outside Python, which could not be put back.
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous = {sig: handler for sig, handler in previous.items() if handler not in (signal.SIG_IGN, None)}
    for sig in previous:
        signal.signal(sig, _exit_now)
    try:
        for name in missing:
            importlib.import_module(name)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
