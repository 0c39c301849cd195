"""The ``clair`` command line: a Typer app, one module per command, no math.

``ClairGroup.invoke`` is the one place where a ``ClairError`` becomes
``Error: ...`` on stderr and exit code 2; ``CLAIR_DEBUG=1`` re-raises it with
its traceback. Bugs are not caught: they keep their traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import typer
from typer.core import TyperGroup

from clair_cli import __version__
from clair_cli.constants import EXIT_ERROR
from clair_cli.errors import ClairError


def report_error(exc: ClairError) -> int:
    """Print a ClairError as the user sees it; return the exit code."""
    from rich.console import Console
    from rich.text import Text

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    console.print(Text.assemble(("Error: ", "bold red"), exc.message))
    hint = f"{exc.hint} " if exc.hint else ""
    console.print(f"{hint}(CLAIR_DEBUG=1 shows the traceback)", markup=False, emoji=False, style="dim")
    return EXIT_ERROR


EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


class ClairGroup(TyperGroup):
    """Lists commands in the order they were added and maps ClairError to exit 2."""

    def list_commands(self, ctx: Any) -> list[str]:
        return list(self.commands)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except ClairError as exc:
            if os.environ.get("CLAIR_DEBUG"):
                raise
            raise typer.Exit(report_error(exc)) from None
        except KeyboardInterrupt:
            # Outputs are written atomically: an interrupted run has left nothing in place.
            print("Interrupted: no output was written.", file=sys.stderr)
            raise typer.Exit(EXIT_INTERRUPTED) from None


app = typer.Typer(
    name="clair",
    cls=ClairGroup,
    help=(
        "Audit and merge many LoRA adapters of one base model with CLAIR: recover their shared "
        "low-rank subspace, name the contaminated adapters, write robust merged adapters."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"clair {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """Audit and merge many LoRA adapters of one base model with CLAIR."""


from clair_cli.cli import audit as _audit  # noqa: E402  (the commands register themselves in order)
from clair_cli.cli import gate as _gate  # noqa: E402
from clair_cli.cli import inspect as _inspect  # noqa: E402
from clair_cli.cli import merge as _merge  # noqa: E402

_inspect.register(app)
_audit.register(app)
_merge.register(app)
_gate.register(app)


def main() -> None:
    """Console-script entry point."""
    sys.exit(app(prog_name="clair"))
