"""``python -m clair_cli`` and the ``clair`` console script."""

import sys


def _interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` is, or was raised because of, a Ctrl-C.

    A KeyboardInterrupt that lands while a class body is being built (torch's import does
    this a lot) reaches us wrapped, e.g. as ``RuntimeError: Error calling __set_name__``.
    """
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, KeyboardInterrupt):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


def run() -> None:
    """Run the CLI; Ctrl-C at any moment, even while importing, ends with exit code 130."""
    try:
        from clair_cli.cli import main

        main()
    except SystemExit:
        raise
    except BaseException as exc:
        if not _interrupted(exc):
            raise
        # Outputs are written atomically: an interrupted run has left nothing in place.
        sys.stderr.write("Interrupted: no output was written.\n")
        sys.exit(130)


if __name__ == "__main__":
    run()
