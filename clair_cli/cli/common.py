"""What the audit-based commands share: option parsing, progress bars, reports, exit codes."""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from clair_cli.constants import EXIT_FLAGGED, EXIT_OK
from clair_cli.errors import UsageError

if TYPE_CHECKING:
    from clair_cli.cli.options import Reports
    from clair_cli.io.adapter import Adapter
    from clair_cli.io.writers import Outputs
    from clair_cli.pipeline import Progress


# Plain decimal notation: float() would also take "1_5" (15), "nan", "infinity" or full-width digits.
DECIMAL = re.compile(r"[+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)


def decimal_number(text: str) -> float:
    """``text`` (surrounding blanks aside) read as a plain non-negative decimal number; NaN for anything else."""
    return float(text) if DECIMAL.fullmatch(text.strip()) else math.nan


def check_normal(option: str, value: float) -> None:
    """Refuse a nonzero number smaller in size than the smallest normal float (a subnormal, such as
    ``1e-320``): the commands' arithmetic flushes those to zero (:func:`clair_cli.cli.threads.flush_denormals`),
    so it would be read as 0 where it is used, and another value where it is checked."""
    if value != 0 and abs(value) < sys.float_info.min:
        raise UsageError(
            f"{option} {value!r}: below the smallest normal number ({sys.float_info.min:.1e}), which clair reads as 0",
            hint="Give 0 where it is allowed, or a larger value.",
        )


def parse_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    if not text.strip():
        raise UsageError("--weights is empty")
    entries = text.split(",")
    if len(entries) > 1 and not entries[-1].strip():
        entries.pop()  # one trailing comma
    if any(not x.strip() for x in entries):
        raise UsageError(f"--weights {text}: an empty value (two commas in a row?)")
    # A minus sign is read so that a negative weight gets the message below.
    values = [-decimal_number(x.strip()[1:]) if x.strip().startswith("-") else decimal_number(x) for x in entries]
    if any(math.isnan(v) for v in values):
        raise UsageError(f"--weights {text}: expected comma-separated numbers")
    for v in values:
        check_normal("--weights", v)
    if not values or any(not (v >= 0) or v == float("inf") for v in values) or sum(values) <= 0:
        raise UsageError(f"--weights {text}: weights must be finite, non-negative and not all zero")
    return values


def sources_arg(sources: Sequence[str]) -> list[str]:
    """The SOURCE arguments with ``@FILE`` lists and ``-`` (stdin) expanded."""
    from clair_cli.io.sources import expand_sources

    return expand_sources(sources)


def local_inputs(given: Sequence[str], sources: Sequence[str], *files: Path | None) -> list[Path]:
    """The local paths a command reads before opening the adapters: its ``sources`` (expanded
    from the arguments ``given``), the ``@FILE`` lists among ``given`` and ``files`` (``--config``)."""
    from clair_cli.io.paths import input_paths
    from clair_cli.io.sources import list_files

    return input_paths(sources, [*files, *list_files(given)])


def check_reference_spelling(argv: Sequence[str]) -> list[str]:
    """Refuse ``--reference a b c``: ``b c`` would silently become candidates.

    ``--reference`` takes exactly one value. Two or more bare words (or ``-``) right after it
    are refused; one is the common ``clair gate --reference trusted/ upload/`` and is read
    as a candidate, with a note (returned) that says so.
    """
    from clair_cli.io.paths import printable

    notes: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            break
        value_at = None
        if arg in ("--reference", "-r"):
            value_at = i + 1
        elif arg.startswith("--reference=") or (arg.startswith("-r") and not arg.startswith("--") and len(arg) > 2):
            value_at = i
        if value_at is not None and value_at < len(argv):
            value = argv[value_at].removeprefix("--reference=") if value_at == i else argv[value_at]
            value = value.removeprefix("-r") if value_at == i and not arg.startswith("--") else value
            words = []
            for after in argv[value_at + 1 :]:
                if after == "--" or (after.startswith("-") and after != "-"):
                    break
                words.append(after)
            if len(words) > 1 or words == ["-"]:
                raise UsageError(
                    f"{', '.join(printable(w) for w in words)} follow --reference {printable(value)}: --reference "
                    "takes one source, so they would be read as candidates",
                    hint=f"For several references repeat the option (--reference {printable(value)} --reference "
                    f"{printable(words[0])}), or give a directory or @FILE of them; put candidates before the "
                    "options, or after --.",
                )
            if words:
                notes.append(
                    f"{printable(words[0])} (after --reference {printable(value)}) is a candidate; "
                    "repeat --reference for each reference"
                )
        i = value_at + 1 if value_at is not None and value_at > i else i + 1
    return notes


@contextmanager
def progress_bar(quiet: bool) -> Iterator[Progress]:
    """A rich progress bar on stderr, driven by ``(stage, done, total)`` callbacks; silent when quiet."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from clair_cli.report.console import make_console

    console = make_console(stderr=True, quiet=quiet)
    if quiet or not console.is_terminal:
        yield lambda _stage, _done, _total: None
        return
    bars = Progress(
        TextColumn("{task.description:<16}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    tasks: dict[str, Any] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bars.add_task(stage, total=total)
        bars.update(tasks[stage], completed=done, total=total)

    with bars:
        yield update


def adapter_files(adapters: Sequence[Adapter]) -> list[Path]:
    """Every file read for ``adapters``: outputs may not replace any of them."""
    files = [a.ref.weights_file for a in adapters]
    return files + [a.ref.config_file for a in adapters if a.ref.config_file is not None]


def unique_out_names(names: Sequence[str]) -> None:
    """Refuse adapter names that would be written to the same output directory."""
    from collections import Counter

    from clair_cli.io.paths import printable, safe_relpath

    clash = [n for n, c in Counter(safe_relpath(n) for n in names).items() if c > 1]
    if clash:
        same = [printable(n) for n in names if safe_relpath(n) == clash[0]]
        raise UsageError(f"adapters {', '.join(same)} would be written to the same directory {clash[0]!r}")
    # One name's directory inside another's ('a' and 'a/b', from two sources): the first adapter's
    # directory would hold the second, which no reader takes as one adapter (clair refuses it).
    paths = {safe_relpath(n): n for n in names}
    for path, name in paths.items():
        parts = path.split("/")
        outer = next((paths["/".join(parts[:i])] for i in range(1, len(parts)) if "/".join(parts[:i]) in paths), None)
        if outer is not None:
            raise UsageError(
                f"adapter {printable(name)} would be written inside the directory of adapter {printable(outer)} "
                f"({path!r} inside {safe_relpath(outer)!r}), which would then read as an adapter with another "
                "below it",
                hint="Refine them in two runs, or move one so that the names do not nest.",
            )


def check_report_targets(reports: Reports, inputs: Sequence[Path] = (), out: Path | None = None) -> None:
    """Refuse impossible report targets before any work is done."""
    from clair_cli.io.paths import check_report_file, discarded, printable

    json_out, markdown, plot = reports.json_out, reports.markdown, reports.plot
    sarif = getattr(reports, "sarif", None)  # audit and gate only (ScanReports)
    if json_out == "-" and markdown == "-":
        raise UsageError("--json - and --markdown - cannot both go to stdout")
    if sarif == "-" and "-" in (json_out, markdown):
        raise UsageError("--sarif - cannot share stdout with --json - or --markdown -; give it a file")
    options = (("--json", json_out), ("--markdown", markdown), ("--plot", plot), ("--sarif", sarif))
    empty = next((o for o, t in options if t is not None and not t.strip()), None)
    if empty is not None:  # ('' read as the current directory: "exists and is a directory", naming nothing)
        raise UsageError(f"{empty} is empty", hint="Give a file name, or '-' for stdout.")
    named = [(o, t) for o, t in options if t is not None]
    files = [t for _o, t in named if t != "-" and not discarded(t)]
    real = {t: _resolved(t, o) for o, t in named if t in files}
    if len(set(real.values())) < len(files):
        given = "--json, --markdown, --sarif and --plot" if sarif is not None else "--json, --markdown and --plot"
        raise UsageError(f"{given} name the same file; give each its own")
    for t in files:
        if out is not None and real[t].is_relative_to(_resolved(out, "--out")):
            raise UsageError(f"{printable(t)}: a report file cannot go inside --out, which is replaced whole")
    if plot is not None:
        if plot == "-" or not plot.lower().endswith(".png"):
            raise UsageError(f"--plot {plot}: give a file name ending in .png")
        # Found, not imported: matplotlib imports numpy, which is first imported under the
        # Ctrl-C guard of the numerical set-up (clair_cli.numerics).
        if importlib.util.find_spec("matplotlib") is None:
            raise UsageError(
                "--plot needs matplotlib, which is not installed",
                hint="Install it with: pip install 'clair-lora[plot]'",
            ) from None
    for target in files:
        try:
            check_report_file(target, inputs)
        except RuntimeError:  # pathlib's resolve() on a symlink loop (Python < 3.13)
            raise UsageError(f"{printable(target)}: cannot be resolved (too many levels of symbolic links)") from None


def _resolved(path: str | Path, option: str) -> Path:
    """``path`` resolved; a symlink loop is a usage error naming ``option``."""
    from clair_cli.io.paths import printable

    try:
        return Path(path).resolve()
    except (RuntimeError, OSError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
        raise UsageError(
            f"{option} {printable(str(path))}: cannot be resolved (too many levels of symbolic links)"
        ) from exc


def emit_reports(report: dict[str, Any], reports: Reports, quiet: bool, inputs: Sequence[Path] = ()) -> None:
    """Write the requested report files (all of them or none), then the terminal table."""
    from clair_cli.io.writers import Outputs

    with Outputs(inputs) as outputs:
        stage_reports(outputs, report, reports)
    show_report(report, reports, quiet)


def stage_reports(outputs: Outputs, report: dict[str, Any], reports: Reports) -> None:
    """Write the requested report files into the run's output transaction (renamed into place
    with its other outputs, or not at all)."""
    from clair_cli.report import json_text
    from clair_cli.report.audit import audit_markdown

    json_out, markdown, plot = reports.json_out, reports.markdown, reports.plot
    sarif = getattr(reports, "sarif", None)  # audit and gate only (ScanReports)

    if plot is not None:
        from clair_cli.report.plot import plot_png

        outputs.write(plot, plot_png(report))
    if json_out is not None:
        outputs.write_text(json_out, json_text(report, indent=2) + "\n")
    if markdown is not None:
        outputs.write_text(markdown, audit_markdown(report))
    if sarif is not None:
        from clair_cli.report.sarif import sarif_text

        outputs.write_text(sarif, sarif_text(report))


def show_report(report: dict[str, Any], reports: Reports, quiet: bool) -> None:
    """The terminal table, unless stdout carries JSON, Markdown or SARIF."""
    from clair_cli.report.audit import render_audit
    from clair_cli.report.console import make_console

    json_out, markdown, sarif = reports.json_out, reports.markdown, getattr(reports, "sarif", None)
    if "-" not in (json_out, markdown, sarif):
        render_audit(make_console(quiet=quiet), report)


def exit_code(report: dict[str, Any], exit_zero: bool) -> None:
    """Exit 1 when anything is flagged (unless ``--exit-zero``)."""
    if report["flagged"] and not exit_zero:
        raise typer.Exit(EXIT_FLAGGED)
    raise typer.Exit(EXIT_OK)
