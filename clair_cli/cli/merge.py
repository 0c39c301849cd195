"""``clair merge`` and ``clair refine``: write PEFT adapters."""

from __future__ import annotations

import sys

import typer

from clair_cli.cli import options as opt
from clair_cli.cli.command import add_command
from clair_cli.constants import DEFAULT_MAX_ADAPTERS, DEFAULT_MAX_RANK
from clair_cli.methods import MergeMethodName
from clair_cli.types import DeviceChoice, Precision, Rescale, Side, SolverForm

MERGE_EXAMPLES = """
Examples:

  clair merge ./adapters --out merged/                  # audit, then the collaborators' exact mean

  clair merge ./adapters --out merged/ --merge-rank 16  # the same, written as a rank-16 LoRA

  clair merge ./adapters --out merged/ --project        # CLAIR's projection, cross-validated rank

  clair merge ./adapters --out merged/ --method fedavg  # a baseline, no audit

  clair merge ./adapters --out merged/ --weights 120,80,200,95 --json report.json
"""

REFINE_EXAMPLES = """
Examples:

  clair refine ./adapters --out refined/    # refined/<name>/ for every collaborator
"""


def merge_command(
    sources: opt.Sources,
    out: opt.Out,
    method: opt.MergeMethodOpt = MergeMethodName("clair"),
    weights: opt.Weights = None,
    merge_rank: opt.MergeRank = None,
    merge_tol: opt.MergeTol = 1e-3,
    project: opt.Project = False,
    project_rank: opt.ProjectRank = None,
    rescale: opt.RescaleOpt = Rescale.NONE,
    clip: opt.Clip = None,
    rank: opt.Rank = "auto",
    force: opt.Force = False,
    json_out: opt.JsonOut = None,
    markdown: opt.MarkdownOut = None,
    plot: opt.PlotOut = None,
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
    drop_extras: opt.DropExtras = False,
) -> None:
    """Merge adapters into one PEFT adapter (clair: audit first, then merge the collaborators).

    The clair merge is the exact weighted mean of the adapters the audit did not flag (with nothing
    flagged, the same as --method mean), written at the smallest rank within --merge-tol.
    Exit code 0, or 1 when the clair audit flagged adapters (they are left out of the merge; 0 with --exit-zero).
    """
    from clair_cli import methods, pipeline, publish
    from clair_cli.cli import common
    from clair_cli.errors import UsageError
    from clair_cli.io.paths import input_paths, printable
    from clair_cli.io.writers import Outputs
    from clair_cli.report.audit import audit_report
    from clair_cli.report.console import make_console

    spec = methods.get(method)
    params = common.audit_params(locals())
    w = common.parse_weights(weights)
    options = pipeline.MergeOptions(
        merge_rank, merge_tol, project or project_rank is not None, project_rank, rescale, clip
    )
    if not spec.audits and (options.project or options.rescale != Rescale.NONE or clip is not None):
        raise UsageError(
            f"--project, --project-rank, --rescale and --clip shape the clair merge, not --method {spec.name}"
        )
    if not spec.audits and any(x is not None for x in (json_out, markdown, plot)):
        raise UsageError(f"--json, --markdown and --plot report the clair audit; --method {spec.name} runs none")
    sources = common.sources_arg(sources)
    src = common.source_options(locals())
    inputs = input_paths(sources, [config])
    common.check_report_targets(json_out, markdown, plot, inputs, out)
    with Outputs(inputs) as outputs:  # the adapter and the reports: all written, or none
        outputs.directory(out, force)
        with common.progress_bar(quiet) as progress:
            pool = pipeline.open_pool(sources, src, intersect=intersect, method=spec.name, progress=progress)
            files = common.adapter_files(pool.adapters)
            outputs.guard(files)
            common.check_report_targets(json_out, markdown, plot, files, out)
            dropped = pipeline.extras(pool, drop_extras)
            outcome = pipeline.audit(pool, params, progress) if spec.audits else None
            merged = pipeline.merge(pool, spec.name, params, w, options, outcome, progress)
        report = audit_report(outcome, command="merge", digests=json_out is not None) if outcome else None
        if report is not None:
            report["merge"] = merged.summary() | {"dropped": dropped}
        notes = list(merged.notes) + dropped
        if pool.dropped:
            notes.append(f"--intersect left out {len(pool.dropped)} module(s) not targeted by every adapter")
        root = outputs.stage_directory(out)
        publish.write_merged(root, pool, merged, outcome, report, notes, sys.argv[1:], params.as_dict())
        if report is not None:
            common.stage_reports(outputs, report, json_out, markdown, plot)
    console = make_console(stderr=True, quiet=quiet)
    if report is not None:
        common.show_report(report, json_out, markdown, quiet)
    ranks = [r.rank for r in merged.modules.values()]
    console.print(
        f"wrote {printable(str(out))}: {spec.name} merge of {len(merged.used)} of {len(pool.adapters)} adapters, "
        f"rank {min(ranks)}{'' if len(set(ranks)) == 1 else '-' + str(max(ranks))}",
        markup=False,
    )
    for n in notes:
        console.print(f"note: {printable(n)}", style="dim", markup=False)
    if report is not None:
        common.exit_code(report, exit_zero)


def refine_command(
    sources: opt.Sources,
    out: opt.Out,
    project_rank: opt.RefineRank = "auto",
    rank: opt.Rank = "auto",
    force: opt.Force = False,
    json_out: opt.JsonOut = None,
    markdown: opt.MarkdownOut = None,
    plot: opt.PlotOut = None,
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
    deprecated_method: opt.DeprecatedMethod = None,
) -> None:
    """Audit, then write each collaborator's refined adapter to DIR/<name>/ (projected onto the shared subspace).

    The projection's rank is chosen per module by cross-validation across the collaborators (or
    --project-rank), never the detection rank; a module where projection does not help is kept unchanged.

    Exit code 0, or 1 when adapters were flagged (no refined adapter is written for them; 0 with --exit-zero).
    """
    from clair_cli import pipeline, publish
    from clair_cli.cli import common
    from clair_cli.io.paths import input_paths, printable
    from clair_cli.io.writers import Outputs
    from clair_cli.report.audit import audit_report
    from clair_cli.report.console import make_console
    from clair_cli.types import parse_rank

    params = common.audit_params(locals())
    fixed = parse_rank(project_rank, "--project-rank")
    sources = common.sources_arg(sources)
    src = common.source_options(locals())
    inputs = input_paths(sources, [config])
    common.check_report_targets(json_out, markdown, plot, inputs, out)
    with Outputs(inputs) as outputs:  # the adapters and the reports: all written, or none
        outputs.directory(out, force)
        with common.progress_bar(quiet) as progress:
            pool = pipeline.open_pool(sources, src, intersect=intersect, progress=progress)
            files = common.adapter_files(pool.adapters)
            outputs.guard(files)
            common.check_report_targets(json_out, markdown, plot, files, out)
            outcome = pipeline.audit(pool, params, progress)
            bases = pipeline.refined_bases(pool, outcome, fixed if isinstance(fixed, int) else None, progress)
            report = audit_report(outcome, command="refine", digests=json_out is not None)
            report["refine"] = {
                "project_rank": project_rank,
                "projection_rank": {m: None if b is None else int(b.shape[1]) for m, b in bases.items()},
            }
            common.unique_out_names([pool.adapters[k].name for k in outcome.auditor.collaborative_set_])
            card_params = params.as_dict() | {"project_rank": project_rank}
            root = outputs.stage_directory(out)
            used = publish.write_refined(root, pool, outcome, bases, report, sys.argv[1:], progress, card_params)
        common.stage_reports(outputs, report, json_out, markdown, plot)
    common.show_report(report, json_out, markdown, quiet)
    make_console(stderr=True, quiet=quiet).print(
        f"wrote {printable(str(out))}: {len(used)} refined adapters "
        f"({len(pool.adapters) - len(used)} flagged, not written)",
        markup=False,
    )
    common.exit_code(report, exit_zero)


def register(app: typer.Typer) -> None:
    add_command(app, "merge", merge_command, opt.command_help(merge_command), MERGE_EXAMPLES)
    add_command(app, "refine", refine_command, opt.command_help(refine_command), REFINE_EXAMPLES)
