"""``clair gate``: judge candidate adapters against a trusted reference pool (a CI step)."""

from __future__ import annotations

import typer

from clair_cli.cli import options as opt
from clair_cli.cli.command import add_command
from clair_cli.constants import DEFAULT_MAX_ADAPTERS, DEFAULT_MAX_MODULES, DEFAULT_MAX_RANK
from clair_cli.types import DeviceChoice, Precision, Side, SolverForm

EXAMPLES = """
Examples:

  clair gate uploads/new-lora --reference trusted/          # exit 1 if the upload is flagged

  clair gate pr/*/ --reference hf://org/approved-loras --markdown comment.md

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
    """Judge CANDIDATE adapters against trusted --reference adapters.

    The shared subspace, thresholds and norm centre come from the reference pool alone; only
    candidates can be flagged. Exit code 0 when every candidate passes, 1 when one is flagged, 2 on bad input.
    """
    from clair_cli import pipeline
    from clair_cli.cli import common
    from clair_cli.constants import ARGV_KEY
    from clair_cli.errors import UsageError
    from clair_cli.io.paths import input_paths
    from clair_cli.report.audit import audit_report
    from clair_cli.report.console import make_console

    spelling_notes = common.check_reference_spelling(ctx.meta.get(ARGV_KEY, ()))
    for note in spelling_notes:
        make_console(stderr=True, quiet=quiet).print(f"note: {note}", markup=False)
    params = common.audit_params(locals())
    if "-" in candidates and "-" in (reference or []):
        raise UsageError("- (sources from stdin) is given both as candidate and as --reference; give it once")
    candidates = common.sources_arg(candidates)
    references = common.sources_arg(reference or [])
    src = common.source_options(locals())
    common.check_report_targets(json_out, markdown, plot, input_paths([*candidates, *references], [config]))
    with common.progress_bar(quiet) as progress:
        pool, trusted = pipeline.open_gate_pool(candidates, references, src, intersect=intersect, progress=progress)
        outcome = pipeline.audit(pool, params, progress, reference=trusted)
    report = audit_report(outcome, command="gate", digests=json_out is not None)
    report["notes"] = [*report.get("notes", []), *spelling_notes]
    common.emit_reports(report, json_out, markdown, plot, quiet, common.adapter_files(pool.adapters))
    common.exit_code(report, exit_zero)


def register(app: typer.Typer) -> None:
    add_command(app, "gate", gate_command, opt.command_help(gate_command, CANDIDATE_HELP), EXAMPLES)
