"""``clair merge`` and ``clair refine``: write PEFT adapters."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

import typer

from clair_cli.cli import options as opt
from clair_cli.cli.allocator import release_freed_memory
from clair_cli.cli.choices import Rescale
from clair_cli.cli.command import add_command
from clair_cli.report import json_text

if TYPE_CHECKING:
    from clair_cli.results import Pool

MERGE_EXAMPLES = """
Examples:

  clair merge ./adapters --out merged/                  # audit, then the collaborators' exact mean

  clair merge ./adapters --out merged/ --merge-rank 16  # the same, written as a rank-16 LoRA

  clair merge ./adapters --out merged/ --project        # CLAIR's projection, cross-validated rank

  clair merge ./adapters --out merged/ --method fedavg  # a baseline, no audit

  clair merge ./adapters --out merged/ --method median --json merge.json   # what a baseline merged

  clair merge ./adapters --out merged/ --weights 120,80,200,95 --json report.json
"""

REFINE_EXAMPLES = """
Examples:

  clair refine ./adapters --out refined/    # refined/<name>/ for every collaborator
"""


def merge_command(
    sources: opt.Sources,
    target: opt.Target,
    merging: opt.Merging,
    reports: opt.Reports,
    audit: opt.Audit,
    run: opt.Run,
    read: opt.ReadPool,
    drop_extras: opt.DropExtras = False,
) -> None:
    """Merge adapters into one PEFT adapter (clair: audit first, then merge the collaborators).

    The clair merge is the exact weighted mean of the adapters the audit did not flag, any of them
    above 1.5x their median norm weighted down to count as one at it (--norm-bound; with nothing
    flagged or bounded, the same as --method mean), written at the smallest rank within --merge-tol.
    Exit code 0, or 1 when the clair audit flagged adapters (they are left out of the merge; 0 with --exit-zero).
    """
    from clair_cli import methods, pipeline, publish
    from clair_cli.cli import common
    from clair_cli.io.paths import printable
    from clair_cli.io.writers import Outputs
    from clair_cli.report.audit import audit_report
    from clair_cli.report.console import make_console
    from clair_cli.report.merge import merge_report

    spec = methods.get(merging.method)
    params = audit.params()
    w = common.parse_weights(merging.weights)
    options = merging.options()
    _check_baseline_options(spec, options, merging.norm_bound, reports)
    given, sources = sources, common.sources_arg(sources)
    inputs = common.local_inputs(given, sources, read.config)
    common.check_report_targets(reports, inputs, target.out)
    with Outputs(inputs) as outputs:  # the adapter and the reports: all written, or none
        outputs.directory(target.out, target.force, adapters_only=True)
        with common.progress_bar(run.quiet) as progress:
            pool = pipeline.open_pool(
                sources, read.source_options(), intersect=audit.intersect, method=spec.name, progress=progress
            )
            files = common.adapter_files(pool.adapters)
            outputs.guard(files)
            common.check_report_targets(reports, files, target.out)
            dropped = pipeline.extras(pool, drop_extras)
            plan = publish.merged_plan(pool)
            outcome = pipeline.audit(pool, params, progress) if spec.audits else None
            started = time.perf_counter()
            root = _stage_for_writing(outputs, target)
            with publish.merged_stream(root, pool, options) as sink:  # tensors written as they are merged
                merged = pipeline.merge(pool, spec.name, params, w, options, outcome, progress, sink)
            merge_s = time.perf_counter() - started
        report = audit_report(outcome, command="merge", digests=reports.json_out is not None) if outcome else None
        notes = _merge_notes(list(merged.notes) + dropped + plan.notes, len(pool.dropped), pool)
        if report is not None:
            report["merge"] = merged.summary() | {"dropped": dropped}
            # Every note the console prints after the merge, as a baseline merge's report has them.
            report["notes"] = [*report["notes"], *(n for n in notes if n not in report["notes"])]
        publish.write_merged(root, pool, merged, outcome, report, notes, sys.argv[1:], params.as_dict(), plan)
        if report is not None:
            common.stage_reports(outputs, report, reports)
        elif reports.json_out is not None:  # a baseline: what was merged, without an audit
            baseline = merge_report(
                pool, merged, pipeline.resolved(params), dropped, notes, {"merge": merge_s}, digests=True
            )
            outputs.write_text(reports.json_out, json_text(baseline, indent=2) + "\n")
    console = make_console(stderr=True, quiet=run.quiet)
    if report is not None:
        common.show_report(report, reports, run.quiet)
    ranks = [r.rank for r in merged.modules.values()]
    console.print(
        f"wrote {printable(str(target.out))}: {spec.name} merge of {len(merged.used)} of {len(pool.adapters)} "
        f"adapters, rank {min(ranks)}{'' if len(set(ranks)) == 1 else '-' + str(max(ranks))}",
        markup=False,
    )
    for n in notes:
        console.print(f"note: {printable(n)}", style="dim", markup=False)
    if report is not None:
        common.exit_code(report, run.exit_zero)


def _stage_for_writing(outputs: Any, target: opt.Target) -> Any:
    """The staging directory of ``--out``, once the audit is done: from here on, the written
    modules' temporaries leave memory as they are freed (:mod:`clair_cli.cli.allocator`)."""
    root = outputs.stage_directory(target.out)
    release_freed_memory()
    return root


def _merge_notes(notes: list[str], n_dropped: int, pool: Pool) -> list[str]:
    """The merge's notes, what ``--intersect`` left out, and what of a merged diffusion file diffusers
    refuses or does not apply (:func:`clair_cli.io.diffusion.merged_diffusers_notes`: ``--intersect`` can
    leave a text encoder so of files that diffusers loads)."""
    from clair_cli.io.diffusion import merged_diffusers_notes

    if n_dropped:
        notes.append(f"--intersect left out {n_dropped} module(s) not targeted by every adapter")
    notes.extend(merged_diffusers_notes(pool.adapters[0].layout, pool.modules))
    return notes


def _check_baseline_options(spec: Any, options: Any, norm_bound: str | None, reports: opt.Reports) -> None:
    """A baseline (no audit) refuses what shapes or reports the clair merge (``--norm-bound``
    given as a number: its default and ``off`` leave a baseline as it is)."""
    from clair_cli.errors import UsageError

    if spec.audits:
        return
    bound = norm_bound is not None and options.norm_bound is not None
    if options.project or options.rescale != Rescale.NONE or options.clip is not None or bound:
        raise UsageError(
            f"--project, --project-rank, --rescale, --clip and --norm-bound shape the clair merge, "
            f"not --method {spec.name}"
        )
    if reports.markdown is not None or reports.plot is not None:
        raise UsageError(
            f"--markdown and --plot report the clair audit; --method {spec.name} runs none",
            hint="--json writes its merge report.",
        )


def refine_command(
    sources: opt.Sources,
    target: opt.Target,
    project_rank: opt.RefineRank = "auto",
    reports: opt.Reports = opt.Reports(),
    audit: opt.Audit = opt.Audit(),
    run: opt.Run = opt.Run(),
    read: opt.ReadPool = opt.ReadPool(),
) -> None:
    """Audit, then write each collaborator's refined adapter to DIR/<name>/ (projected onto the shared subspace).

    The projection's rank is chosen per module by cross-validation across the collaborators, never
    below the detected shared rank (or --project-rank); a module without shared structure or where
    projection does not help is kept unchanged.

    Exit code 0, or 1 when adapters were flagged (no refined adapter is written for them; 0 with --exit-zero).
    """
    from clair_cli import pipeline, publish
    from clair_cli.cli import common
    from clair_cli.io.lora_config import refuse_base_rewriting, refuse_dora
    from clair_cli.io.paths import printable
    from clair_cli.io.writers import Outputs
    from clair_cli.params import parse_rank
    from clair_cli.report.audit import audit_report
    from clair_cli.report.console import make_console

    params = audit.params()
    fixed = parse_rank(project_rank, "--project-rank")
    given, sources = sources, common.sources_arg(sources)
    inputs = common.local_inputs(given, sources, read.config)
    common.check_report_targets(reports, inputs, target.out)
    with Outputs(inputs) as outputs:  # the adapters and the reports: all written, or none
        outputs.directory(target.out, target.force, adapters_only=True)
        with common.progress_bar(run.quiet) as progress:
            pool = pipeline.open_pool(sources, read.source_options(), intersect=audit.intersect, progress=progress)
            files = common.adapter_files(pool.adapters)
            outputs.guard(files)
            common.check_report_targets(reports, files, target.out)
            refuse_base_rewriting(pool.adapters, "refined adapter")  # before the work
            refuse_dora(pool.adapters, "refined adapter")
            outcome = pipeline.audit(pool, params, progress)
            bases = pipeline.refined_bases(pool, outcome, fixed if isinstance(fixed, int) else None, progress)
            report = audit_report(outcome, command="refine", digests=reports.json_out is not None)
            report["refine"] = {
                "project_rank": project_rank,
                "projection_rank": {m: None if b is None else int(b.shape[1]) for m, b in bases.items()},
            }
            common.unique_out_names([pool.adapters[k].name for k in outcome.auditor.collaborative_set_])
            card_params = params.as_dict() | {"project_rank": project_rank}
            root = _stage_for_writing(outputs, target)
            used = publish.write_refined(root, pool, outcome, bases, report, sys.argv[1:], progress, card_params)
        common.stage_reports(outputs, report, reports)
    common.show_report(report, reports, run.quiet)
    make_console(stderr=True, quiet=run.quiet).print(
        f"wrote {printable(str(target.out))}: {len(used)} refined adapters "
        f"({len(pool.adapters) - len(used)} flagged, not written)",
        markup=False,
    )
    common.exit_code(report, run.exit_zero)


def register(app: typer.Typer) -> None:
    add_command(app, "merge", merge_command, opt.command_help(merge_command), MERGE_EXAMPLES)
    add_command(app, "refine", refine_command, opt.command_help(refine_command), REFINE_EXAMPLES)
