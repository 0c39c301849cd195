"""``clair audit``: CLAIR scores and verdicts for a pool of adapters."""

from __future__ import annotations

import typer

from clair_cli.cli import options as opt
from clair_cli.cli.command import add_command

EXAMPLES = """
Examples:

  clair audit ./adapters                           # table on the terminal; exit 1 if any is flagged

  clair audit ./adapters --json report.json --markdown report.md --plot report.png

  clair audit ./adapters --json - --exit-zero      # machine-readable, never fails the shell

  clair audit ./adapters --sarif clair.sarif       # SARIF 2.1.0 for code scanning

  clair audit hf://org/client-01 hf://org/client-02 ./more --intersect

  clair audit @round-3.txt --solver exact          # the sources listed in round-3.txt
"""


def audit_command(
    sources: opt.Sources, reports: opt.ScanReports, audit: opt.Audit, run: opt.Run, read: opt.ReadPool
) -> None:
    """Score every adapter (SOURCE...) with CLAIR and flag the contaminated ones.

    Exit code 0 when nothing is flagged, 1 when an adapter is flagged (0 with --exit-zero), 2 on bad input.
    """
    from clair_cli import pipeline
    from clair_cli.cli import common
    from clair_cli.report.audit import audit_report

    params = audit.params()
    given, sources = sources, common.sources_arg(sources)
    common.check_report_targets(reports, common.local_inputs(given, sources, read.config))
    with common.progress_bar(run.quiet) as progress:
        pool = pipeline.open_pool(sources, read.source_options(), intersect=audit.intersect, progress=progress)
        common.check_report_targets(reports, common.adapter_files(pool.adapters))  # before the work, not after
        outcome = pipeline.audit(pool, params, progress)
    report = audit_report(outcome, digests=reports.json_out is not None or reports.sarif is not None)
    common.emit_reports(report, reports, run.quiet, common.adapter_files(pool.adapters))
    common.exit_code(report, run.exit_zero)


def register(app: typer.Typer) -> None:
    add_command(app, "audit", audit_command, opt.command_help(audit_command), EXAMPLES)
