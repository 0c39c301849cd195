"""``clair inspect``: what each adapter is."""

from __future__ import annotations

import typer

from clair_cli.cli import options as opt
from clair_cli.cli.command import add_command

EXAMPLES = """
Examples:

  clair inspect ./adapters                      # every adapter below ./adapters

  clair inspect client_01/ client_02/ --json -  # machine-readable

  clair inspect hf://owner/lora@main --subfolder round_3

  clair inspect lora.safetensors --lora-alpha 16 --base-model meta-llama/Llama-2-7b-hf

  find runs -name adapter_config.json -printf '%h\\n' | clair inspect -   # sources from stdin
"""


def inspect_command(
    sources: opt.Sources, json_out: opt.JsonOut = None, read: opt.Read = opt.Read(), quiet: opt.Quiet = False
) -> None:
    """Show each adapter's base model, rank, alpha, scale rule, modules, size and what clair does not cover.

    Every tensor is read once, in bounded chunks, and checked for NaN/Inf. An adapter that cannot be
    read gets an error row (the others are still shown, and --json still writes every row) and the
    exit code is 2.
    """
    from clair_cli.cli.common import check_report_targets, local_inputs, sources_arg
    from clair_cli.errors import AdapterFormatError, ClairError
    from clair_cli.io.adapter import verify
    from clair_cli.io.paths import printable
    from clair_cli.io.sources import open_adapter, resolve_sources
    from clair_cli.io.writers import write_text
    from clair_cli.report import json_text
    from clair_cli.report.console import make_console
    from clair_cli.report.inspect import adapter_record, error_record, inspect_report, render_inspect

    given, sources = sources, sources_arg(sources)
    inputs = local_inputs(given, sources, read.config)
    check_report_targets(opt.Reports(json_out=json_out), inputs)
    src = read.source_options()
    errors: list[tuple[str, str, ClairError]] = []
    refs = resolve_sources(sources, src, errors)
    records = [error_record(name, source, exc.message) for name, source, exc in errors]
    failures = [exc for _name, _source, exc in errors]
    for ref in refs:
        try:
            adapter = open_adapter(ref, src)
            records.append(adapter_record(adapter, verify(adapter), digests=json_out is not None))
        except ClairError as exc:
            records.append(error_record(ref.name, ref.source, exc.message, ref.revision))
            failures.append(exc)
        inputs += [ref.weights_file, *([ref.config_file] if ref.config_file else [])]
    if errors:
        records.sort(key=lambda r: r["name"])
    bad = [r for r in records if "error" in r]
    if len(failures) == len(records) == 1:
        raise failures[0]
    if json_out is not None:  # complete: every adapter has its row, the unreadable ones their error
        write_text(json_out, json_text(inspect_report(records), indent=2, sort_keys=False) + "\n", inputs)
    if (json_out != "-" and not quiet) or bad:  # (a table laid out only to be thrown away costs time)
        render_inspect(make_console(stderr=json_out == "-", quiet=quiet), records)
    if bad:
        raise AdapterFormatError(
            f"{len(bad)} of {len(records)} adapters cannot be read; first: {printable(bad[0]['error'])}",
            hint="The rows above show every adapter; fix or remove the ones marked error.",
        )


def register(app: typer.Typer) -> None:
    add_command(app, "inspect", inspect_command, opt.command_help(inspect_command), EXAMPLES)
