"""Model cards (README.md) of merged and refined adapters.

A card travels with the adapter (to the Hub, to other machines), so it names no absolute
local path: sources appear as the user gave them, and an absolute path (a source, an
argument of the command line, a local base model) by its last component.
"""

from __future__ import annotations

import os
import shlex
from typing import Any

from clair_cli import __version__, methods
from clair_cli.report.markdown import md_code, md_fence, md_text, yaml_string

# Cards of what is not a merge method of the registry (each method carries its own, ``card``).
CARD_TEXT = {
    "clair-project": "CLAIR projected merge: the collaborators' weighted mean projected onto their shared "
    "subspace (Theta_bar = U U^T sum_k w_k Theta_k), with the projection's rank chosen per module by "
    "cross-validation across the collaborators (or fixed by --project-rank); scale 1.",
    "refine": "CLAIR refinement: this adapter's update projected onto the shared subspace of the "
    "collaborative adapters (B~ = U U^T B); rank, alpha and config unchanged.",
}


def portable(path: str | None) -> str | None:
    """``path`` as a card may show it: unchanged when relative or a hub id, its last component
    when absolute (``/home/me/runs/client_01`` becomes ``client_01``)."""
    if path is None:
        return None
    if os.path.isabs(path) or path.startswith("~"):
        return os.path.basename(os.path.normpath(os.path.expanduser(path))) or path
    return path


def portable_command(command: str) -> str:
    """The command line with every absolute path argument (also ``--opt=/abs``) shortened by :func:`portable`."""
    try:
        args = shlex.split(command)
    except ValueError:
        return command
    out = []
    for arg in args:
        opt, eq, value = arg.partition("=")
        if eq and opt.startswith("--"):
            out.append(f"{opt}={portable(value)}")
        else:
            out.append(portable(arg) or arg)
    return " ".join(shlex.quote(a) for a in out)


def _params_lines(params: dict[str, Any] | None) -> list[str]:
    if not params:
        return []
    lines = [
        f"- audit: decomposition {params.get('method')}, solver {params.get('solver')}, "
        f"side {params.get('side')}, detection rank {params.get('rank')}, "
        f"threshold {'automatic' if params.get('threshold') is None else params['threshold']}, "
        f"dtype {params.get('dtype')}, seed {params.get('seed')}",
    ]
    if "project_rank" in params:
        lines.append(f"- projection rank: {params['project_rank']} (--project-rank)")
    return lines


def _within_tol(merge: dict[str, Any]) -> bool:
    """Whether the merge chose its rank by --merge-tol (the exact mean at no fixed rank)."""
    spec = methods.REGISTRY.get(merge["method"])
    opts = merge["options"]
    return spec is not None and spec.exact_mean and opts["rank"] is None and not opts["project"]


def _influence_lines(merge: dict[str, Any]) -> list[str]:
    """The clair merge's bounded influence: the norm bound and centred clipping, and how many
    updates each weighted down."""
    opts, lines = merge["options"], []
    if opts.get("norm_bound") is not None and merge.get("norm_bound_relative") is None:
        lines.append(f"- norm bound (--norm-bound {opts['norm_bound']:g}): not applied, fewer than three collaborators")
    elif opts.get("norm_bound") is not None:
        whole = len(merge.get("norm_bounded") or {})
        modules = merge.get("module_norm_bounded") or {}
        per_module = len({k for m in modules.values() for k in m})
        what = (
            f"{whole} update(s) weighted down to it over all modules, {per_module} on {len(modules)} module(s) alone"
            if whole or modules
            else "no update above it"
        )
        relative = merge["norm_bound_relative"]
        used = "" if relative == opts["norm_bound"] else f", here {relative:.3g}x"
        lines.append(
            f"- norm bound (--norm-bound): {opts['norm_bound']:g}x the collaborators' median norm (widened where "
            f"their norms spread, to at most twice that{used}); {what}"
        )
    elif merge["method"] == "clair":
        lines.append("- norm bound: off (--norm-bound off)")
    if opts.get("clip") is not None:
        lines.append(
            f"- centred clipping (--clip): {opts['clip']:g}x the collaborators' median distance from their centre; "
            f"{len(merge.get('clipped') or {})} update(s) clipped"
        )
    return lines


# How a method that does not choose its rank by --merge-tol sets the rank it writes.
_RANK_CHOICE = {
    "project": "the projection's rank; smallest within --merge-tol where the mean was kept",
    "median": "the largest input rank: the dense merge truncated by SVD",
    "trimmed-mean": "the largest input rank: the dense merge truncated by SVD",
    "ties": "the largest input rank: the dense merge truncated by SVD",
    "fedavg": "the largest input rank: the averaged factors",
    "krum": "the selected adapter's own",
    "multi-krum": "the selected adapters' summed rank",
}


def _weights_text(merge: dict[str, Any]) -> str:
    spec = methods.REGISTRY.get(merge["method"])
    if spec is not None and not spec.weighted:
        return "none (an order statistic of the adapters)"
    return "equal" if merge["weights"] is None else ", ".join(f"{w:g}" for w in merge["weights"])


def _merge_lines(merge: dict[str, Any], params: dict[str, Any] | None = None) -> list[str]:
    opts = merge["options"]
    ranks = sorted(set(merge["rank"].values()))
    rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]} (per module)"
    by_tol = _within_tol(merge)
    if opts["rank"] is not None:
        how = "fixed by --merge-rank"
    elif by_tol:
        how = f"smallest within --merge-tol {opts['tol']:g}"
    else:  # --merge-tol shapes only the exact mean (methods.MergeMethod.exact_mean)
        how = _RANK_CHOICE.get("project" if opts["project"] else merge["method"], "as the method forms it")
    tol_text = (
        f"{opts['tol']:g}"
        if by_tol or opts["rank"] is not None or opts["project"]
        else f"{opts['tol']:g} (not used by this method)"
    )
    lines = [
        "## Merge parameters",
        "",
        f"- method: {merge['method']}" + (" (projected)" if opts["project"] else ""),
        f"- rank of the written LoRA: {rank_text} ({how})",
        f"- tolerance (--merge-tol): {tol_text}"
        + ("" if opts["rank"] is None else f"; rank fixed by --merge-rank {opts['rank']}"),
        f"- largest relative Frobenius error of the written factors (measured): {merge['max_relative_error']:.2e}"
        + (
            " (above --merge-tol: float32 factors cannot store the update more exactly)"
            if _within_tol(merge) and merge["max_relative_error"] > opts["tol"]
            else ""
        ),
        "- weights: " + _weights_text(merge),
    ]
    if opts["project"]:
        q = [r for r in merge.get("projection_rank", {}).values() if r is not None]
        fixed = opts["project_rank"]
        how = f"fixed at {fixed}" if fixed is not None else "cross-validated per module"
        span = f"{min(q)}-{max(q)}" if q else "none (the mean was kept everywhere)"
        lines.append(f"- projection rank: {span}, {how}")
    lines += _influence_lines(merge)
    if opts["rescale"] != "none":
        lines.append(f"- rescaled by {merge['scale']:g} ({opts['rescale']})")
    lines += _params_lines(params)
    return [*lines, ""]


def _front_matter(base_model: str | None, tags: list[str], library: str = "peft") -> list[str]:
    lines = ["---", f"library_name: {library}"]
    if base_model:
        lines.append(f"base_model: {yaml_string(portable(base_model) or base_model)}")
    lines += ["tags:", *(f"- {t}" for t in tags), "---", ""]
    return lines


def model_card(  # noqa: PLR0913 - to group into a card dataclass next
    title: str,
    method: str,
    base_model: str | None,
    sources: list[dict[str, Any]],
    command: str,
    summary: str | None,
    notes: list[str],
    merge: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
    library: str = "peft",
) -> str:
    """A model card.

    Args:
        title: heading.
        method: a merge method's name (:data:`clair_cli.methods.REGISTRY`) or ``refine``.
        base_model: base model id.
        sources: per input adapter: name, source, path (its own, as given), revision,
            used (bool), weight (its share of a merge), score, flagged.
        command: the command line that made it (absolute paths are shortened).
        summary: the audit's summary line, if an audit ran.
        notes: extra lines.
        merge: the merge parameters (``MergedAdapter.summary()``), for a merged adapter.
        params: the audit's settings (``AuditParams.as_dict()``), listed with the parameters
            when an audit ran (``summary``).
        library: the Hub's ``library_name`` (``diffusers`` for a kohya, ComfyUI or diffusers LoRA file).
    """
    lines = _front_matter(base_model, ["lora", "clair", "merge" if method != "refine" else "refined"], library)
    lines += [f"# {md_text(title)}", "", f"Made by clair {__version__}.", "", md_fence(portable_command(command)), ""]
    key = "clair-project" if method == "clair" and merge and merge["options"]["project"] else method
    spec = methods.REGISTRY.get(key)
    text = spec.card if spec is not None else CARD_TEXT.get(key, md_text(method))
    lines += ["## Method", "", text, ""]
    if merge:
        lines += _merge_lines(merge, params if summary else None)  # audit settings only where one ran
    elif params and summary:
        lines += ["## Parameters", "", *_params_lines(params), ""]
    if summary:
        lines += ["## Audit", "", md_text(summary) + ".", ""]
    weighted = merge is not None
    lines += [
        "## Sources",
        "",
        "| adapter | source | revision | used |" + (" weight |" if weighted else "") + " score | verdict |",
        "|---|---|---|---|" + ("---:|" if weighted else "") + "---:|---|",
    ]
    for s in sources:
        score = "-" if s.get("score") is None else f"{s['score']:.3f}"
        verdict = "-" if s.get("flagged") is None else ("flagged" if s["flagged"] else "ok")
        where = portable(s.get("path") or s["source"]) or s["name"]
        weight = ""
        if weighted:
            weight = " - |" if s.get("weight") is None or not s["used"] else f" {s['weight']:.4g} |"
        lines.append(
            f"| {md_code(s['name'])} | {md_code(where)} | {md_text(s.get('revision') or '-')} | "
            f"{'yes' if s['used'] else 'no'} |{weight} {score} | {verdict} |"
        )
    if notes:
        lines += ["", "## Notes", "", *(f"- {md_text(n)}" for n in notes)]
    lines.append("")
    return "\n".join(lines)
