"""``clair gate``: judge candidate adapters against a trusted reference pool (a CI step)."""

from __future__ import annotations

import typer

from clair_cli.cli import options as opt
from clair_cli.constants import DEFAULT_MAX_ADAPTERS, DEFAULT_MAX_RANK

EXAMPLES = """
Examples:

  clair gate uploads/new-lora --reference trusted/          # exit 1 if the upload is flagged

  clair gate pr/*/ --reference hf://org/approved-loras --markdown comment.md
"""


def gate_command(
    candidates: opt.Sources,
    reference: opt.Reference = None,
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
    """Judge CANDIDATE adapters against trusted --reference adapters.

    The shared subspace, thresholds and norm centre come from the reference pool alone; only
    candidates can be flagged. Exit code 0 when every candidate passes, 1 when one is flagged, 2 on bad input.
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
    from clair_cli.errors import UsageError
    from clair_cli.io.paths import input_paths, printable
    from clair_cli.io.sources import SourceOptions
    from clair_cli.report.audit import audit_report

    if not reference:
        raise UsageError("no --reference given", hint="Name the trusted adapters with --reference SOURCE (repeatable).")
    settings = make_settings(method, side, rank, threshold, device, dtype, seed)
    check_report_targets(json_out, markdown, plot, input_paths([*candidates, *reference], [config]))
    src = SourceOptions(subfolder, config, lora_alpha, rslora, base_model, max_rank, max_adapters)
    with progress_bar(quiet) as progress:
        refs = open_all(reference, src, progress)
        cands = open_all(candidates, src, progress)
        names = {a.name for a in refs}
        clash = [a.name for a in cands if a.name in names]
        if clash:
            raise UsageError(
                f"{printable(clash[0])!r} is both a candidate and a reference adapter",
                hint="A candidate cannot vouch for itself; give it once.",
            )
        if len(refs) < pipeline.MIN_ADAPTERS["clair"]:
            raise UsageError(
                f"gate needs at least {pipeline.MIN_ADAPTERS['clair']} reference adapters, got {len(refs)}"
            )
        pool = pipeline.build_pool(refs + cands, intersect=intersect)
        outcome = pipeline.audit(pool, settings, progress, reference=list(range(len(refs))))
    report = audit_report(outcome, command="gate")
    emit_reports(report, json_out, markdown, plot, quiet, adapter_files(refs + cands))
    exit_code(report, exit_zero)


def register(app: typer.Typer) -> None:
    app.command("gate", epilog=EXAMPLES)(gate_command)
