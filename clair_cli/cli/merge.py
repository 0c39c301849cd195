"""``clair merge`` and ``clair refine``: write PEFT adapters."""

from __future__ import annotations

import shlex
import sys
from typing import TYPE_CHECKING, Any

import typer

from clair_cli.cli import options as opt
from clair_cli.constants import DEFAULT_MAX_ADAPTERS, DEFAULT_MAX_RANK

if TYPE_CHECKING:
    from clair_cli.results import AuditOutcome, Pool

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


def _command_line() -> str:
    return "clair " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _sources_table(
    pool: Pool, used: list[int], outcome: AuditOutcome | None, weights: list[float] | None = None
) -> list[dict[str, Any]]:
    """The model card's sources: ``weight`` is each adapter's share of the merge (``weights``:
    one per adapter in ``used``; None: equal), None for those left out or for refinement."""
    given = [1.0] * len(used) if weights is None else weights
    share = {k: w / sum(given) for k, w in zip(used, given, strict=True)}
    rows = []
    for k, a in enumerate(pool.adapters):
        v = outcome.auditor.verdicts_[k] if outcome else None
        rows.append(
            {
                "name": a.name,
                "source": a.ref.source,
                "path": a.ref.path,
                "revision": a.ref.revision,
                "used": k in used,
                "weight": share.get(k) if weights is not None or used else None,
                "score": None if v is None else v.score,
                "flagged": None if v is None else v.flagged,
            }
        )
    return rows


def _prepare(sources, src, intersect, method, progress):
    from clair_cli import pipeline
    from clair_cli.cli.common import open_all

    adapters = open_all(sources, src, progress)
    return pipeline.build_pool(adapters, intersect=intersect, method=method)


def _extras(pool: Pool, drop: bool) -> list[str]:
    """Refuse to merge what a LoRA merge cannot carry, or (``drop``) list it as dropped."""
    from clair_cli.errors import IncompatibleAdapters
    from clair_cli.io.paths import printable

    found = [(a.name, kind, keys) for a in pool.adapters for kind, keys in a.extras.items()]
    if found and not drop:
        name, kind, keys = found[0]
        more = f" (and {len(found) - 1} more such finding(s) in the pool)" if len(found) > 1 else ""
        raise IncompatibleAdapters(
            f"{printable(name)}: holds {kind} ({printable(keys[0])}{', ...' if len(keys) > 1 else ''}) "
            f"that a merge of LoRA factors cannot carry{more}",
            hint="Pass --drop-extras to merge the LoRA updates alone (what is dropped is listed in the "
            "model card and report), or merge adapters without them.",
        )
    return [f"dropped (--drop-extras) from {name}: {len(keys)} {kind}" for name, kind, keys in found]


def merge_command(
    sources: opt.Sources,
    out: opt.Out,
    method: opt.MergeMethod = "clair",
    weights: opt.Weights = None,
    merge_rank: opt.MergeRank = None,
    merge_tol: opt.MergeTol = 1e-3,
    project: opt.Project = False,
    project_rank: opt.ProjectRank = None,
    rescale: opt.Rescale = "none",
    rank: opt.Rank = "auto",
    force: opt.Force = False,
    json_out: opt.JsonOut = None,
    markdown: opt.MarkdownOut = None,
    plot: opt.PlotOut = None,
    side: opt.Side = "out",
    solver: opt.Solver = "noisy",
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
    drop_extras: opt.DropExtras = False,
) -> None:
    """Merge adapters into one PEFT adapter (clair: audit first, then merge the collaborators).

    The clair merge is the exact weighted mean of the adapters the audit did not flag (with nothing
    flagged, the same as --method mean), written at the smallest rank within --merge-tol.
    Exit code 0, or 1 when the clair audit flagged adapters (they are left out of the merge; 0 with --exit-zero).
    """
    from clair_cli import pipeline
    from clair_cli.cli.common import (
        adapter_files,
        check_report_targets,
        emit_reports,
        exit_code,
        make_settings,
        parse_weights,
        progress_bar,
    )
    from clair_cli.errors import UsageError
    from clair_cli.io.paths import input_paths, printable
    from clair_cli.io.peft_writer import AtomicDir, merged_config, merged_tensors, save_adapter
    from clair_cli.io.sources import SourceOptions
    from clair_cli.report.audit import audit_report, summary_line
    from clair_cli.report.card import model_card
    from clair_cli.report.console import make_console

    if method not in pipeline.MERGE_METHODS:
        raise UsageError(f"--method {method}: choose one of: {', '.join(pipeline.MERGE_METHODS)}")
    settings = make_settings(solver, side, rank, threshold, device, dtype, seed)
    w = parse_weights(weights)
    options = pipeline.MergeOptions(merge_rank, merge_tol, project or project_rank is not None, project_rank, rescale)
    if method != "clair" and (options.project or options.rescale != "none"):
        raise UsageError(f"--project, --project-rank and --rescale shape the clair merge, not --method {method}")
    if method != "clair" and any(x is not None for x in (json_out, markdown, plot)):
        raise UsageError(f"--json, --markdown and --plot report the clair audit; --method {method} runs none")
    inputs = input_paths(sources, [config])
    check_report_targets(json_out, markdown, plot, inputs, out)
    target = AtomicDir(out, force, inputs)
    src = SourceOptions(subfolder, config, lora_alpha, rslora, base_model, max_rank, max_adapters)
    with progress_bar(quiet) as progress:
        pool = _prepare(sources, src, intersect, method, progress)
        files = adapter_files(pool.adapters)
        target.guard(files)
        check_report_targets(json_out, markdown, plot, files, out)
        dropped = _extras(pool, drop_extras)
        outcome = pipeline.audit(pool, settings, progress) if method == "clair" else None
        merged = pipeline.merge(pool, method, settings, w, options, outcome, progress)
    report = audit_report(outcome, command="merge") if outcome else None
    if report is not None:
        report["merge"] = merged.summary() | {"dropped": dropped}
    ranks = {m: r.rank for m, r in merged.modules.items()}
    config_dict = merged_config(pool.adapters[0], ranks, pool.base_model, all_modules=not pool.dropped)
    tensors = merged_tensors(pool.adapters[0], {m: (r.A, r.B) for m, r in merged.modules.items()})
    notes = list(merged.notes) + dropped
    if pool.dropped:
        notes.append(f"--intersect left out {len(pool.dropped)} module(s) not targeted by every adapter")
    card = model_card(
        f"Merged LoRA adapter ({method})",
        method,
        pool.base_model,
        _sources_table(pool, merged.used, outcome, merged.weights),
        _command_line(),
        summary_line(report, timing=False) if report else None,
        notes,
        merge=merged.summary(),
        params=settings.as_dict(),
    )
    with target as tmp:
        save_adapter(tmp, config_dict, tensors, card)
    console = make_console(stderr=True, quiet=quiet)
    if report is not None:
        emit_reports(report, json_out, markdown, plot, quiet, files)
    console.print(
        f"wrote {printable(str(out))}: {method} merge of {len(merged.used)} of {len(pool.adapters)} adapters, "
        f"rank {min(ranks.values())}{'' if len(set(ranks.values())) == 1 else '-' + str(max(ranks.values()))}",
        markup=False,
    )
    for n in notes:
        console.print(f"note: {printable(n)}", style="dim", markup=False)
    if report is not None:
        exit_code(report, exit_zero)


def refine_command(
    sources: opt.Sources,
    out: opt.Out,
    project_rank: opt.RefineRank = "auto",
    rank: opt.Rank = "auto",
    force: opt.Force = False,
    json_out: opt.JsonOut = None,
    markdown: opt.MarkdownOut = None,
    plot: opt.PlotOut = None,
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
    """Audit, then write each collaborator's refined adapter to DIR/<name>/ (projected onto the shared subspace).

    The projection's rank is chosen per module by cross-validation across the collaborators (or
    --project-rank), never the detection rank; a module where projection does not help is kept unchanged.

    Exit code 0, or 1 when adapters were flagged (no refined adapter is written for them; 0 with --exit-zero).
    """
    from clair_cli import pipeline
    from clair_cli.cli.common import (
        adapter_files,
        check_report_targets,
        emit_reports,
        exit_code,
        make_settings,
        parse_rank,
        progress_bar,
        unique_out_names,
    )
    from clair_cli.io.paths import input_paths, printable
    from clair_cli.io.peft_writer import AtomicDir, refined_tensors, save_adapter, source_config
    from clair_cli.io.sources import SourceOptions
    from clair_cli.report.audit import audit_report, summary_line
    from clair_cli.report.card import model_card
    from clair_cli.report.console import make_console

    settings = make_settings(method, side, rank, threshold, device, dtype, seed)
    fixed = parse_rank(project_rank, "--project-rank")
    inputs = input_paths(sources, [config])
    check_report_targets(json_out, markdown, plot, inputs, out)
    target = AtomicDir(out, force, inputs)
    src = SourceOptions(subfolder, config, lora_alpha, rslora, base_model, max_rank, max_adapters)
    with progress_bar(quiet) as progress:
        pool = _prepare(sources, src, intersect, "clair", progress)
        files = adapter_files(pool.adapters)
        target.guard(files)
        check_report_targets(json_out, markdown, plot, files, out)
        outcome = pipeline.audit(pool, settings, progress)
        bases = pipeline.refined_bases(pool, outcome, fixed if isinstance(fixed, int) else None, progress)
        report = audit_report(outcome, command="refine")
        report["refine"] = {
            "project_rank": project_rank,
            "projection_rank": {m: None if b is None else int(b.shape[1]) for m, b in bases.items()},
        }
        used = outcome.auditor.collaborative_set_
        unique_out_names([pool.adapters[k].name for k in used])
        side_used = "in" if settings.side == "in" else "out"
        with target as tmp:
            for i, k in enumerate(used):
                adapter = pool.adapters[k]
                tensors, unchanged = refined_tensors(adapter, bases, side_used)
                notes = []
                if unchanged:
                    notes.append(
                        f"{len(unchanged)} module(s) kept unchanged (projection did not predict held-out "
                        "adapters better there)"
                    )
                if pool.dropped:
                    notes.append(f"{len(pool.dropped)} module(s) outside the analysed intersection kept unchanged")
                card = model_card(
                    f"{adapter.name}, refined by CLAIR",
                    "refine",
                    pool.base_model,
                    _sources_table(pool, used, outcome),
                    _command_line(),
                    summary_line(report, timing=False),
                    notes,
                    params=settings.as_dict() | {"project_rank": project_rank},
                )
                save_adapter(tmp, source_config(adapter), tensors, card, name=adapter.name)
                progress("writing adapters", i + 1, len(used))
    emit_reports(report, json_out, markdown, plot, quiet, files)
    make_console(stderr=True, quiet=quiet).print(
        f"wrote {printable(str(out))}: {len(used)} refined adapters "
        f"({len(pool.adapters) - len(used)} flagged, not written)",
        markup=False,
    )
    exit_code(report, exit_zero)


def register(app: typer.Typer) -> None:
    app.command("merge", epilog=MERGE_EXAMPLES)(merge_command)
    app.command("refine", epilog=REFINE_EXAMPLES)(refine_command)
