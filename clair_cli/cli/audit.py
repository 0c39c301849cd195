"""``clair audit``: CLAIR scores and verdicts for a pool of adapters."""

from __future__ import annotations

import typer

from clair_cli.cli import options as opt
from clair_cli.cli.command import add_command
from clair_cli.constants import DEFAULT_MAX_ADAPTERS, DEFAULT_MAX_MODULES, DEFAULT_MAX_RANK
from clair_cli.types import DeviceChoice, Precision, Side, SolverForm

EXAMPLES = """
Examples:

  clair audit ./adapters                           # table on the terminal; exit 1 if any is flagged

  clair audit ./adapters --json report.json --markdown report.md --plot report.png

  clair audit ./adapters --json - --exit-zero      # machine-readable, never fails the shell

  clair audit hf://org/client-01 hf://org/client-02 ./more --intersect

  clair audit @round-3.txt --solver exact          # the sources listed in round-3.txt
"""


def audit_command(
    sources: opt.Sources,
    json_out: opt.JsonOut = None,
    markdown: opt.MarkdownOut = None,
    plot: opt.PlotOut = None,
    rank: opt.Rank = "auto",
    side: opt.SideOpt = Side.OUT,
    solver: opt.SolverOpt = SolverForm.NOISY,
    threshold: opt.Threshold = None,
    intersect: opt.Intersect = False,
    device: opt.DeviceOpt = DeviceChoice.AUTO,
    dtype: opt.DtypeOpt = Precision.FLOAT32,
    seed: opt.Seed = 0,
    exit_zero: opt.ExitZero = False,
    quiet: opt.Quiet = False,
    subfolder: opt.Subfolder = None,
    revision: opt.Revision = None,
    token: opt.Token = None,
    config: opt.ConfigFile = None,
    lora_alpha: opt.LoraAlpha = None,
    rslora: opt.Rslora = False,
    base_model: opt.BaseModel = None,
    max_rank: opt.MaxRank = DEFAULT_MAX_RANK,
    max_adapters: opt.MaxAdapters = DEFAULT_MAX_ADAPTERS,
    max_modules: opt.MaxModules = DEFAULT_MAX_MODULES,
    deprecated_method: opt.DeprecatedMethod = None,
) -> None:
    """Score every adapter (SOURCE...) with CLAIR and flag the contaminated ones.

    Exit code 0 when nothing is flagged, 1 when an adapter is flagged (0 with --exit-zero), 2 on bad input.
    """
    from clair_cli import pipeline
    from clair_cli.cli import common
    from clair_cli.io.paths import input_paths
    from clair_cli.report.audit import audit_report

    params = common.audit_params(locals())
    sources = common.sources_arg(sources)
    src = common.source_options(locals())
    common.check_report_targets(json_out, markdown, plot, input_paths(sources, [config]))
    with common.progress_bar(quiet) as progress:
        pool = pipeline.open_pool(sources, src, intersect=intersect, progress=progress)
        outcome = pipeline.audit(pool, params, progress)
    report = audit_report(outcome, digests=json_out is not None)
    common.emit_reports(report, json_out, markdown, plot, quiet, common.adapter_files(pool.adapters))
    common.exit_code(report, exit_zero)


def register(app: typer.Typer) -> None:
    add_command(app, "audit", audit_command, opt.command_help(audit_command), EXAMPLES)
