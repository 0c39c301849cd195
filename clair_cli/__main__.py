"""``python -m clair_cli`` and the ``clair`` console script."""

import sys


def run() -> None:
    """Run the CLI; Ctrl-C at any moment, even while importing, ends with exit code 130."""
    try:
        from clair_cli.cli import main

        main()
    except KeyboardInterrupt:
        # Outputs are written atomically: an interrupted run has left nothing in place.
        sys.stderr.write("Interrupted: no output was written.\n")
        sys.exit(130)


if __name__ == "__main__":
    run()
