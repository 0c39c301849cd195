"""``python -m clair_cli`` and the ``clair`` console script."""

import os
import signal
import sys

from clair_cli.cli.interrupts import NO_OUTPUT
from clair_cli.cli.interrupts import exit_interrupted as _exit_interrupted
from clair_cli.cli.threads import configure_threads
from clair_cli.constants import EXIT_ERROR, POSIX_ONLY
from clair_cli.errors import Terminated, interrupt_cause


def _on_sigterm(_signum: int, _frame: object) -> None:
    raise Terminated()


def run() -> None:
    """Run the CLI; Ctrl-C (exit 130) or SIGTERM (exit 143) at any moment, even while importing,
    unwinds through the writers' cleanup, so no temporary directory is left behind (while the
    numerical stack is imported, before anything is written, it ends the process at once)."""
    if os.name != "posix":
        sys.stderr.write(f"Error: {POSIX_ONLY}\n")
        raise SystemExit(EXIT_ERROR)
    signal.signal(signal.SIGTERM, _on_sigterm)
    for name in ("COLUMNS", "LINES"):
        # rich reads them with str.isdigit, which takes "²" and other Unicode digits that int() then
        # refuses: a ValueError in every console, the one that reports errors included. A value that
        # is not a count is left unset, as rich leaves "abc".
        value = os.environ.get(name, "").strip()
        if value and not (value.isascii() and value.isdigit()):
            del os.environ[name]
    configure_threads()  # before torch is imported
    try:
        from clair_cli.cli import main

        main()
    except SystemExit as done:
        # The run is over (its output complete or refused): a signal now must not turn a
        # finished run into a killed one while the interpreter shuts down.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if done.code in (130, 143):  # the boundary in clair_cli.cli handled an interrupt
            _exit_interrupted(done.code)
        raise
    except BaseException as exc:
        interrupt = interrupt_cause(exc)
        if interrupt is None:
            raise
        # Outputs are written atomically: an interrupted run has left nothing in place.
        sys.stderr.write(NO_OUTPUT + "\n")
        _exit_interrupted(getattr(interrupt, "exit_code", 130))


if __name__ == "__main__":
    run()
