"""``clair audit``: CLAIR scores and verdicts for a pool of adapters."""

from __future__ import annotations

import typer

from clair_cli.cli import options as opt
from clair_cli.constants import DEFAULT_MAX_ADAPTERS, DEFAULT_MAX_RANK

EXAMPLES = """
Examples:

  clair audit ./adapters                           # table on the terminal; exit 1 if any is flagged

  clair audit ./adapters --json report.json --markdown report.md --plot report.png

  clair audit ./adapters --json - --exit-zero      # machine-readable, never fails the shell

  clair audit hf://org/client-01 hf://org/client-02 ./more --intersect
"""


def audit_command(
    sources: opt.Sources,
    json_out: opt.JsonOut = None,
    markdown: opt.MarkdownOut = None,
    plot: opt.PlotOut = None,
    rank: opt.Rank = "auto",
    side: opt.Side = "out",
    method: opt.AuditMethod = "noisy",
    threshold: opt.Threshold = None,
    intersect: opt.Intersect = False,
    device: opt.Device = "auto",
    dtype: opt.Dtype = "float32",
    seed: opt.Seed = 0,
    exit_zero: opt.ExitZero = False,
    quiet: opt.Quiet = False,
    subfolder: opt.Subfolder = None,
    config: opt.ConfigFile = None,
    lora_alpha: opt.LoraAlpha = None,
    rslora: opt.Rslora = False,
    base_model: opt.BaseModel = None,
    max_rank: opt.MaxRank = DEFAULT_MAX_RANK,
    max_adapters: opt.MaxAdapters = DEFAULT_MAX_ADAPTERS,
) -> None:
    """Score every adapter with CLAIR and flag the contaminated ones.

    Exit code 0 when nothing is flagged, 1 when an adapter is flagged (0 with --exit-zero), 2 on bad input.
    """
    from clair_cli import pipeline
    from clair_cli.cli.common import (
        adapter_files,
        check_report_targets,
        emit_reports,
        exit_code,
        make_settings,
        open_all,
        progress_bar,
    )
    from clair_cli.io.paths import input_paths
    from clair_cli.io.sources import SourceOptions
    from clair_cli.report.audit import audit_report

    settings = make_settings(method, side, rank, threshold, device, dtype, seed)
    check_report_targets(json_out, markdown, plot, input_paths(sources, [config]))
    with progress_bar(quiet) as progress:
        adapters = open_all(
            sources, SourceOptions(subfolder, config, lora_alpha, rslora, base_model, max_rank, max_adapters), progress
        )
        pool = pipeline.build_pool(adapters, intersect=intersect)
        outcome = pipeline.audit(pool, settings, progress)
    report = audit_report(outcome)
    emit_reports(report, json_out, markdown, plot, quiet, adapter_files(adapters))
    exit_code(report, exit_zero)


def register(app: typer.Typer) -> None:
    app.command("audit", epilog=EXAMPLES)(audit_command)
