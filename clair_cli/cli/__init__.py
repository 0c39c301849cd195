"""The ``clair`` command line: a Typer app, one module per command, no math.

``ClairGroup.invoke`` is the one place where exceptions become exit codes: a
``ClairError`` becomes ``Error: ...`` on stderr and exit code 2; a closed stdout
pipe ends the run quietly (141, as a shell reports SIGPIPE); Ctrl-C 130, SIGTERM
143; anything else is a bug, said in one line with exit code 2 (an error, never
mistaken for a verdict). ``CLAIR_DEBUG=1`` re-raises with the traceback.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import sys
from typing import Any

import typer
from typer.core import TyperGroup

from clair_cli import __version__
from clair_cli.cli.command import flags_without_type
from clair_cli.cli.interrupts import NO_OUTPUT
from clair_cli.constants import ARGV_KEY, EXIT_ERROR
from clair_cli.errors import ClairError, interrupt_cause


def report_error(message: str, hint: str | None) -> int:
    """Print an error and its hint as the user sees it (control characters escaped); return the exit code.

    Without rich (its import failed: the process out of memory, or of address space) the same lines
    are written plainly: the message of a run that ran out of memory must not need more of it.
    """
    try:
        from rich.text import Text

        from clair_cli.io.paths import printable

        stderr_console = _stderr_console()
    except (ImportError, MemoryError, OSError):
        with contextlib.suppress(OSError, ValueError, MemoryError):
            sys.stderr.write(f"Error: {_plain(message)}\n" + (f"{_plain(hint)}\n" if hint else ""))
            sys.stderr.flush()
        return EXIT_ERROR
    console = stderr_console(stderr=True, highlight=False, soft_wrap=True)
    console.print(Text.assemble(("Error: ", "bold red"), printable(message)))
    if hint:
        console.print(printable(hint), markup=False, emoji=False, style="dim")
    return EXIT_ERROR


def _stderr_console() -> type:
    from rich.console import Console

    class StderrConsole(Console):
        def on_broken_pipe(self) -> None:
            """Rich points stdout at /dev/null here and exits 1; with stderr's reader gone, the run's exit
            code stays the error's (2), and stderr goes to /dev/null so that the interpreter's final flush
            of it does not fail (Python then exits 120)."""
            self.quiet = True
            with contextlib.suppress(OSError, ValueError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stderr.fileno())
                os.close(devnull)

    return StderrConsole


def _plain(text: str) -> str:
    """``text`` with what is not printable escaped, without imports (:func:`report_error`'s fallback)."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode() for c in text)


EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE
OUT_OF_MEMORY_HINT = (
    "Use fewer or smaller adapters, or --max-rank; with --jobs, fewer jobs (each worker holds its own module)."
)


def _quiet_stdout() -> None:
    """After EPIPE: point stdout at /dev/null so the interpreter's final flush is silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


class ClairGroup(TyperGroup):
    """Lists commands in the order they were added and maps ClairError to exit 2."""

    def list_commands(self, ctx: Any) -> list[str]:
        return list(self.commands)

    def get_params(self, ctx: Any) -> list[Any]:
        return flags_without_type(super().get_params(ctx))

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        # The raw command line, for checks that parsing cannot make (``gate --reference a b``).
        ctx.meta[ARGV_KEY] = list(args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            _quiet_stdout()
            raise typer.Exit(EXIT_BROKEN_PIPE) from None
        except KeyboardInterrupt as exc:
            raise _interrupted(exc) from None
        except _TYPER_EXITS:
            raise  # Typer's own usage errors and exits
        except Exception as exc:  # noqa: BLE001 - the one boundary: a bug is reported, never a raw traceback
            # A Ctrl-C wrapped by an import, or an error raised by a cleanup while it unwound,
            # is still an interrupt.
            interrupt = interrupt_cause(exc)
            if interrupt is not None:
                raise _interrupted(interrupt) from None
            if os.environ.get("CLAIR_DEBUG"):
                raise
            raise _failure(exc) from None


# An output the system could not take: no space, over quota, too large, an I/O error.
WRITE_FAILURES = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})


def _failure(exc: Exception) -> typer.Exit:
    """Exit 2 with a message: bad input as its ClairError says, memory, or a bug."""
    if isinstance(exc, ClairError):
        return typer.Exit(report_error(exc.message, exc.hint))
    if isinstance(exc, MemoryError) or _out_of_memory(exc):
        return typer.Exit(report_error("out of memory", OUT_OF_MEMORY_HINT))
    if isinstance(exc, OSError) and exc.errno in WRITE_FAILURES:  # a full disk under stdout or a report
        _quiet_stdout()  # what stdout's buffer still holds goes nowhere, rather than failing again at exit
        return typer.Exit(
            report_error(f"cannot write the output ({exc.strerror or exc})", "Free space, or write it elsewhere.")
        )
    text = str(exc).splitlines()[0][:300] if str(exc) else ""
    return typer.Exit(
        report_error(
            f"internal error ({type(exc).__name__}: {text})",
            "This is a bug in clair; please report it with the output of the same command run "
            "with CLAIR_DEBUG=1 (it shows the traceback).",
        )
    )


def _out_of_memory(exc: BaseException) -> bool:
    """torch's allocators failing: the CPU's RuntimeError (``std::bad_alloc`` from C++ among them),
    CUDA's ``torch.OutOfMemoryError``; and a
    library that cannot be loaded for want of memory (``failed to map segment from shared object``:
    the address space is exhausted, as under ``ulimit -v``)."""
    if type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc)
    if isinstance(exc, ImportError):
        return "failed to map segment" in text or "cannot allocate memory" in text.lower()
    return isinstance(exc, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text.lower() or "std::bad_alloc" in text
    )


def _typer_exits() -> tuple[type[BaseException], ...]:
    """Typer's and Click's own exits and usage errors, which the boundary lets through.

    Typer 0.21+ has its own classes (``typer.TyperException``); earlier Typer (0.20, which
    Flower pins) re-exports Click's, whose usage errors are ``click.ClickException``.
    """
    names = ("Exit", "Abort", "TyperException")
    found = {getattr(typer, n) for n in names if isinstance(getattr(typer, n, None), type)}
    try:
        import click
    except ImportError:  # pragma: no cover - Typer without Click
        return tuple(found)
    return tuple(found | {click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort})


_TYPER_EXITS = _typer_exits()


def _interrupted(exc: KeyboardInterrupt) -> typer.Exit:
    """Ctrl-C or SIGTERM: outputs are written atomically, so nothing is left half-written."""
    writer = sys.modules.get("clair_cli.io.writers")
    done = list(getattr(writer, "COMMITTED", []))
    if done:
        from clair_cli.io.paths import printable

        print(f"Interrupted after writing {printable(str(done[-1]))}.", file=sys.stderr)
    else:
        print(NO_OUTPUT, file=sys.stderr)
    return typer.Exit(getattr(exc, "exit_code", EXIT_INTERRUPTED))


app = typer.Typer(
    name="clair",
    cls=ClairGroup,
    help=(
        "Audit and merge many LoRA adapters of one base model with CLAIR: recover their shared "
        "low-rank subspace, name the contaminated adapters, write robust merged adapters."
    ),
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    # Typer 0.20.1's default, said outright: before it, the default reached the commands' help
    # unresolved and Rich markup was not rendered (help showed ``owner/name\[@rev]``, backslash and all).
    rich_markup_mode="rich",
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


def _printable_streams() -> None:
    """Text the terminal's encoding cannot show (``PYTHONIOENCODING=ascii``, a C locale) is
    written as ``\\xe4`` escapes instead of raising UnicodeEncodeError: names, paths and
    reports keep every character they can, and the run its exit code."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None and (stream.errors or "strict") == "strict":
            with contextlib.suppress(ValueError, OSError):
                reconfigure(errors="backslashreplace")


def _whole_writes() -> None:
    """Make a write to stdout or stderr all or an error, also under ``PYTHONUNBUFFERED`` (``python -u``,
    set by many container images and CI setups).

    There Python writes text straight to the unbuffered file, one ``write()`` call that the text
    layer does not check: when the system takes part of it (a disk filling up under ``--json - >
    report.json``) the rest was lost without an error, and the run ended 0 with a truncated report.
    A buffered writer between them writes the rest, or raises the error (ENOSPC, EFBIG...) that the
    command turns into exit 2; it is flushed at each newline and each explicit flush, as before.
    """
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if not isinstance(stream, io.TextIOWrapper) or not isinstance(getattr(stream, "buffer", None), io.FileIO):
            continue
        try:
            raw = io.FileIO(stream.fileno(), "w", closefd=False)  # the same descriptor, never closed here
        except (OSError, ValueError):
            continue
        stream.flush()
        setattr(
            sys,
            name,
            io.TextIOWrapper(
                io.BufferedWriter(raw),
                encoding=stream.encoding,
                errors=stream.errors,
                line_buffering=True,
                write_through=True,
            ),
        )


def _unwritable(exc: OSError) -> None:
    """End the run on an output that stdout's file could not take (exit 2, or 141 for a closed pipe)."""
    _quiet_stdout()
    if isinstance(exc, BrokenPipeError):
        raise SystemExit(EXIT_BROKEN_PIPE) from None
    report_error(f"cannot write the output ({exc.strerror or exc})", "Free space, or write it elsewhere.")
    raise SystemExit(EXIT_ERROR) from None


def main() -> None:
    """Console-script entry point (the app ends with SystemExit carrying the exit code)."""
    _whole_writes()
    _printable_streams()
    try:
        app(prog_name="clair")
    except OSError as exc:  # outside a command (--help, --version) there is no boundary but this one
        if exc.errno not in WRITE_FAILURES and not isinstance(exc, BrokenPipeError):
            raise
        _unwritable(exc)
    finally:
        try:
            sys.stdout.flush()  # here rather than at interpreter exit, where EPIPE prints a warning
        except BrokenPipeError:
            _quiet_stdout()
        except OSError as exc:  # the end of the output did not reach a full disk
            _unwritable(exc)
