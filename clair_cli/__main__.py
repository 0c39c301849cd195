"""``python -m clair_cli`` and the ``clair`` console script."""

import signal
import sys

from clair_cli.errors import Terminated


def _interrupted(exc: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C (or SIGTERM) that ``exc`` is, or was raised because of.

    A KeyboardInterrupt that lands while a class body is being built (torch's import does
    this a lot) reaches us wrapped, e.g. as ``RuntimeError: Error calling __set_name__``.
    """
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, KeyboardInterrupt):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def _on_sigterm(_signum: int, _frame: object) -> None:
    raise Terminated()


def run() -> None:
    """Run the CLI; Ctrl-C (exit 130) or SIGTERM (exit 143) at any moment, even while importing,
    unwinds through the writers' cleanup, so no temporary directory is left behind."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        from clair_cli.cli import main

        main()
    except SystemExit:
        # The run is over (its output complete or refused): a signal now must not turn a
        # finished run into a killed one while the interpreter shuts down.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise
    except BaseException as exc:
        interrupt = _interrupted(exc)
        if interrupt is None:
            raise
        # Outputs are written atomically: an interrupted run has left nothing in place.
        sys.stderr.write("Interrupted: no output was written.\n")
        sys.exit(getattr(interrupt, "exit_code", 130))


if __name__ == "__main__":
    run()
