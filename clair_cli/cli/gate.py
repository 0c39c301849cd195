"""``clair gate``: judge candidate adapters against a trusted reference pool (a CI step)."""

from __future__ import annotations

import typer

from clair_cli.cli import options as opt
from clair_cli.cli.command import add_command

EXAMPLES = """
Examples:

  clair gate uploads/new-lora --reference trusted/          # exit 1 if the upload is flagged

  clair gate pr/*/ --reference hf://org/approved-loras --markdown comment.md

  clair gate uploads/new-lora --reference trusted/ --sarif clair.sarif --json clair.json   # CI: code scanning

  clair gate new/ --reference ref-1/ --reference ref-2/ --reference @more-refs.txt
"""

CANDIDATE_HELP = (
    "CANDIDATE takes the same forms as a SOURCE: an adapter directory, a directory of adapters or of "
    ".safetensors files, a .safetensors file, a hub id (owner/name\\[@rev], hf://...), @FILE (sources listed "
    "one a line) or - (listed on stdin). --reference takes one SOURCE each time it is given."
)


def gate_command(
    ctx: typer.Context,
    candidates: opt.Candidates,
    reference: opt.Reference = None,
    reports: opt.ScanReports = opt.ScanReports(),
    audit: opt.Audit = opt.Audit(),
    run: opt.Run = opt.Run(),
    read: opt.ReadPool = opt.ReadPool(),
    allow_unanalysed: opt.AllowUnanalysed = False,
) -> None:
    """Judge CANDIDATE adapters against trusted --reference adapters.

    The shared subspace, thresholds and norm centre come from the reference pool alone; only
    candidates can be flagged, and a candidate whose file holds what PEFT applies and clair does not
    analyse is flagged for it (unless --allow-unanalysed). Exit code 0 when every candidate passes,
    1 when one is flagged, 2 on bad input.
    """
    from clair_cli import pipeline
    from clair_cli.cli import common
    from clair_cli.constants import ARGV_KEY
    from clair_cli.errors import UsageError
    from clair_cli.report.audit import audit_report
    from clair_cli.report.console import make_console

    spelling_notes = common.check_reference_spelling(ctx.meta.get(ARGV_KEY, ()))
    for note in spelling_notes:
        make_console(stderr=True, quiet=run.quiet).print(f"note: {note}", markup=False)
    params = audit.params()
    if "-" in candidates and "-" in (reference or []):
        raise UsageError("- (sources from stdin) is given both as candidate and as --reference; give it once")
    given = [*candidates, *(reference or [])]
    candidates = common.sources_arg(candidates)
    references = common.sources_arg(reference or [])
    src = read.source_options()
    common.check_report_targets(reports, common.local_inputs(given, [*candidates, *references], read.config))
    with common.progress_bar(run.quiet) as progress:
        pool, trusted = pipeline.open_gate_pool(
            candidates, references, src, intersect=audit.intersect, progress=progress
        )
        common.check_report_targets(reports, common.adapter_files(pool.adapters))  # before the work, not after
        outcome = pipeline.audit(pool, params, progress, reference=trusted)
    if not allow_unanalysed:
        pipeline.flag_unanalysed(outcome)
    report = audit_report(outcome, command="gate", digests=reports.json_out is not None or reports.sarif is not None)
    report["notes"] = [*report.get("notes", []), *spelling_notes]
    common.emit_reports(report, reports, run.quiet, common.adapter_files(pool.adapters))
    common.exit_code(report, run.exit_zero)


def register(app: typer.Typer) -> None:
    add_command(app, "gate", gate_command, opt.command_help(gate_command, CANDIDATE_HELP), EXAMPLES)
