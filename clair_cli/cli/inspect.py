"""``clair inspect``: what each adapter is."""

from __future__ import annotations

import json

import typer

from clair_cli.cli import options as opt

EXAMPLES = """
Examples:

  clair inspect ./adapters                      # every adapter below ./adapters

  clair inspect client_01/ client_02/ --json -  # machine-readable

  clair inspect hf://owner/lora@main --subfolder round_3

  clair inspect lora.safetensors --lora-alpha 16 --base-model meta-llama/Llama-2-7b-hf
"""


def inspect_command(
    sources: opt.Sources,
    json_out: opt.JsonOut = None,
    subfolder: opt.Subfolder = None,
    config: opt.ConfigFile = None,
    lora_alpha: opt.LoraAlpha = None,
    rslora: opt.Rslora = False,
    base_model: opt.BaseModel = None,
    quiet: opt.Quiet = False,
) -> None:
    """Show each adapter's base model, rank, alpha, scale rule, modules, size and what clair does not cover.

    Every tensor is read once and checked for NaN/Inf.
    """
    from clair_cli.io.adapter import verify
    from clair_cli.io.sources import SourceOptions, open_adapters
    from clair_cli.io.writers import write_text
    from clair_cli.report.console import make_console
    from clair_cli.report.inspect import adapter_record, inspect_report, render_inspect

    src = SourceOptions(subfolder, config, lora_alpha, rslora, base_model)
    adapters = open_adapters(sources, src)
    records = [adapter_record(a, verify(a)) for a in adapters]
    if json_out is not None:
        write_text(json_out, json.dumps(inspect_report(records), indent=2, sort_keys=False) + "\n")
    if json_out != "-":
        render_inspect(make_console(quiet=quiet), records)


def register(app: typer.Typer) -> None:
    app.command("inspect", epilog=EXAMPLES)(inspect_command)
