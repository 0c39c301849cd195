"""What ``clair audit`` / ``gate`` report: a JSON document, a rich table, Markdown.

:func:`audit_report` builds the JSON-ready dict (schema in README.md); the
terminal and Markdown renderings are made from that dict alone, so every output
mode shows the same numbers.
"""

from __future__ import annotations

import math
import os
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.padding import Padding
from rich.table import Table

from clair_cli import __version__
from clair_cli.constants import JSON_SCHEMA_VERSION
from clair_cli.report.console import shown
from clair_cli.report.markdown import md_code, md_text
from clair_cli.report.modules import ModuleNames, natural_key, natural_sorted

# Below this many references, `clair gate` says its thresholds are wide (README, "clair gate":
# measured honest false flags 1.6 % with 6 references, 0.8 % with 8, none with 10).
RECOMMENDED_REFERENCES = 8

if TYPE_CHECKING:
    from clair_cli.core.rules import Reason
    from clair_cli.results import AuditOutcome


def share_text(share: float) -> str:
    """An off-subspace share as every report shows it (reasons and the table alike)."""
    return f"{share:.0%}"


def reason_text(reason: Reason, names: list[str], modules: ModuleNames) -> str:  # noqa: C901 - one branch per kind of reason
    """One reason of a verdict in words (``names``: the adapters', for duplicates)."""
    kind = reason.kind
    if kind == "off_subspace":
        where = list(reason.modules or ())
        if reason.across_modules:
            return (
                f"{share_text(_given(reason.share))} of its update lies outside the shared subspace on average over "
                f"{len(where)} modules, more than is typical of the pool"
            )
        top = reason.module
        if top is not None and len(where) > 1:
            return (
                f"{share_text(_given(reason.share))} of its update lies outside the shared subspace in "
                f"{modules.short(top)} (past its threshold in {modules.summarise(where)})"
            )
        return (
            f"{share_text(_given(reason.share))} of its update lies outside the shared subspace, "
            f"in {modules.summarise(where)}"
        )
    if kind == "direction":
        return (
            f"its update points away from the others' (cosine {_given(reason.cosine):+.2f} with their centre, "
            f"typically {_given(reason.typical):+.2f})"
        )
    if kind == "whole_direction":
        return (
            f"its whole update, every module at its own size, carries little along the others' direction "
            f"(cosine {_given(reason.cosine):+.2f} with their centre, typically {_given(reason.typical):+.2f}: "
            "a free rider at full norm, or another task?)"
        )
    if kind == "joint":
        share = reason.share if reason.share is not None else 1 / (1 + math.exp(-_given(reason.log_odds)))
        return (
            f"both its direction (cosine {_given(reason.cosine):+.2f} with the others' centre) and its share "
            f"outside the shared subspace ({share_text(share)} on average) are atypical together"
        )
    if kind == "norm":
        ratio = _given(reason.ratio)
        if ratio == 0:
            return (
                "its update is zero, or below what float64 holds (an untrained adapter? lora_B starts at "
                "zero; or a scale such as lora_alpha 1e-300): a free rider, flagged whatever its score"
            )
        if ratio < 1:
            return f"update norm {1 / ratio:.0f}x below the pool median (a free rider?)"
        return (
            f"update norm {ratio:.0f}x the pool median" if ratio >= 10 else f"update norm {ratio:.1f}x the pool median"
        )
    if kind == "duplicate":
        # Here, not at the top: the rules import torch, which a command that ends before its
        # work never needs (clair_cli.numerics).
        from clair_cli.core.rules.duplicate import IDENTICAL_COSINE, SAME_NORM

        of = list(reason.of or ())
        copy_of = ", ".join(sorted(names[j] for j in of))
        c, scale = reason.value, reason.ratio
        identical = c is None or c >= IDENTICAL_COSINE
        if scale is None or 1 / SAME_NORM <= scale <= SAME_NORM:
            if identical:
                return f"identical to {copy_of} (a copy: flagged whatever its score)"
            return f"near-identical to {copy_of} (cosine {c:.4f}; a copy: flagged whatever its score)"
        # An update sent again scaled (x 3 of another's): the same direction, not the same update. The ratio is
        # to the member the group keeps, the first of ``of``.
        kept, others = names[of[0]], sorted(names[j] for j in of[1:])
        also = f"; also of {', '.join(others)}" if others else ""
        scaled = f"{scale:.3g}x its norm{also}; a copy: flagged whatever its score"
        if identical:
            return f"a scaled copy of {kept} (the same direction, {scaled})"
        return f"near-identical to {kept} (cosine {c:.4f}, {scaled})"
    if kind == "coordinated":
        flagged_with = ", ".join(sorted(names[j] for j in reason.of or ()))
        return (
            f"it agrees with {flagged_with}, flagged for where its update points, far more closely than adapters "
            f"of this pool agree (cosine at least {_given(reason.cosine):.2f} within the group, against "
            f"{_given(reason.threshold):.2f} for a tie): a coordinated group sends one update between them"
        )
    if kind == "in_subspace":
        return (
            f"inside the shared subspace, its update lies {_given(reason.ratio):.1f}x farther than is typical "
            f"from the pool's centre (sign-flipped or scaled?), in {modules.summarise(list(reason.modules or ()))}"
        )
    if kind in ("module_direction", "module_norm", "module_projection"):
        return _module_text(reason, modules)
    if kind == "isolated":
        return (
            f"it shares almost nothing with any other adapter (cosine {_given(reason.cosine):+.2f} with its "
            f"nearest, typically {_given(reason.typical):.2f}: another task?)"
        )
    if kind == "spectral":
        return (
            f"along the direction in which the other adapters differ most, it lies {_given(reason.ratio):.1f}x "
            "farther from their mean than is typical (a coordinated group, such as clients sharing a backdoor?)"
        )
    if kind == "opposed":
        others = sorted(names[j] for j in reason.of or ())
        group = f"with {', '.join(others[:3])}{', ...' if len(others) > 3 else ''}, " if others else ""
        return (
            f"{group}it points against the rest of the pool (cosine {_given(reason.cosine):+.2f} between the "
            f"group's mean update and the rest's, whose members agree at {_given(reason.typical):+.2f}: "
            "a coordinated attack?)"
        )
    if kind == "module_opposed":
        others = sorted(names[j] for j in reason.of or ())
        where = list(reason.modules or ())
        also = f" (also in {modules.summarise(where[1:])})" if len(where) > 1 else ""
        on = modules.short(reason.module or where[0])
        return (
            f"with {', '.join(others[:3])}{', ...' if len(others) > 3 else ''}, it points against the rest of the "
            f"pool in {on}{also} (cosine {_given(reason.cosine):+.2f} between the group's mean update there and "
            f"the rest's, whose members agree at {_given(reason.typical):+.2f}: "
            "a module turned by a coordinated group?)"
        )
    if kind == "unanalysed":
        return (
            f"its file holds what PEFT applies and clair does not analyse: {'; '.join(reason.parts or ())} "
            "(a gate cannot vouch for it; --allow-unanalysed judges its LoRA update alone)"
        )
    if kind == "pull":
        others = sorted(names[j] for j in reason.of or ())
        return (
            f"with {', '.join(others[:3])}{', ...' if len(others) > 3 else ''}, it pulls the mean one way: the "
            f"members' deviations from the pool's centre agree by {_given(reason.value):.1f} typical squared "
            f"deviations on average, where honest clients' are nearly independent (flagged past "
            f"{reason.threshold:g}: a coordinated attack?)"
        )
    return kind


def _module_text(reason: Reason, modules: ModuleNames) -> str:
    """The reason of rule 12, 13 or 14: what it found on the module farthest out, and where else."""
    where = list(reason.modules or ())
    also = f"; past its threshold in {modules.summarise(where)}" if len(where) > 1 else ""
    on = f"in {modules.short(reason.module or where[0])}"
    if reason.kind == "module_norm":
        ratio = _given(reason.ratio)
        size = f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.1f}x"
        return f"{on}, its update's norm is {size} the others' median there{f' ({also[2:]})' if also else ''}: " + (
            "boosted in a few modules?"
        )
    if reason.kind == "module_projection":
        return (
            f"{on}, its update pulls against the others' there (its component along their centre is "
            f"{_given(reason.value):+.2f} of the module's median norm, typically {_given(reason.typical):+.2f}"
            f"{also}): sign-flipped and scaled in a few modules?"
        )
    return (
        f"{on}, its update points away from the others' there (cosine {_given(reason.cosine):+.2f} with their "
        f"centre, typically {_given(reason.typical):+.2f}{also}): sign-flipped or turned in a few modules?"
    )


def _given(value: float | None) -> float:
    """A field the reason's rule always writes (NaN, shown as such, if it ever did not)."""
    return math.nan if value is None else value


def generated_at() -> str:
    """UTC time of the report, ISO 8601; ``SOURCE_DATE_EPOCH`` fixes it for reproducible builds."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not (epoch.isascii() and epoch.isdigit()):  # unset, or not a count of seconds ("²" is a digit to isdigit)
        return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    try:
        when = datetime.fromtimestamp(int(epoch), UTC)
    except (OverflowError, ValueError, OSError):  # past the platform's time_t, or past the year 9999
        from clair_cli.errors import UsageError
        from clair_cli.io.paths import printable

        raise UsageError(
            f"SOURCE_DATE_EPOCH={printable(epoch[:40])}{'...' if len(epoch) > 40 else ''}: a time past what a "
            "report's date can hold (the year 9999)",
            hint="Set it to the seconds since 1970-01-01 UTC of the build (git log -1 --format=%ct), or unset it.",
        ) from None
    return when.replace(microsecond=0).isoformat().replace("+00:00", "Z")


def where_from(adapter: Any, digests: bool) -> dict[str, Any]:
    """Where an adapter came from, for CI: its own path as given, its files' digests (None
    unless ``digests``: hashing re-reads every weights file), the hub coordinates."""
    ref = adapter.ref
    hub = None
    if ref.repo_id is not None:
        hub = {
            "repo_id": ref.repo_id,
            "revision": ref.requested_revision,
            "subfolder": ref.subfolder,
            "commit": ref.revision,
        }
    return {"path": ref.path, "sha256": adapter.file_digests() if digests else None, "hub": hub}


def _rounded(why: dict[str, Any]) -> dict[str, Any]:
    return {key: round(val, 6) if isinstance(val, float) else val for key, val in why.items()}


def audit_report(outcome: AuditOutcome, command: str = "audit", digests: bool = True) -> dict[str, Any]:
    """The JSON report (schema 1). Modules are listed in layer order (``layers.2`` before ``layers.10``)."""
    pool, aud = outcome.pool, outcome.auditor
    names = pool.names
    labels = ModuleNames(pool.modules)
    reference = set(outcome.reference or ())
    adapters = []
    for a, v in zip(pool.adapters, aud.verdicts_, strict=True):
        reasons: list[dict[str, Any]] = []
        for why in v.reasons:
            entry = _rounded(why.to_dict()) | {"text": reason_text(why, names, labels)}
            if why.of is not None:
                entry["of"] = sorted(names[j] for j in why.of)
            if why.modules is not None:
                entry["modules"] = natural_sorted(why.modules)
            reasons.append(entry)
        adapters.append(
            {
                "name": a.name,
                "source": a.ref.source,
                "revision": a.ref.revision,
                **where_from(a, digests),
                "role": ("reference" if v.index in reference else "candidate") if outcome.reference else "member",
                "score": round(v.score, 6),
                "signals": {rule: round(m, 6) for rule, m in sorted(v.signals.items())},
                "flagged": v.flagged,
                "reasons": reasons,
                "norm": round(v.norm_ratio, 6),
                "per_module": {
                    m: round(s, 6) for m, s in sorted(v.per_module.items(), key=lambda kv: natural_key(kv[0]))
                },
                "notes": list(a.notes),
            }
        )
    modules = []
    for r in sorted(aud.module_results_, key=lambda r: natural_key(r.name)):
        modules.append(
            {
                "name": r.name,
                "label": labels.short(r.name),
                "rank": r.rank,
                "shared_structure": r.shared_structure,
                "solver": r.solver,
                "n_iter": r.n_iter,
                "converged": r.converged,
                "spectrum": [round(float(x), 6) for x in r.spectrum[:32]],
                "null_bound": None if r.null_bound is None else [round(float(x), 6) for x in r.null_bound[:32]],
            }
        )
    flagged = [names[k] for k, f in enumerate(aud.flagged_) if f]
    return {
        "schema": JSON_SCHEMA_VERSION,
        "tool": "clair",
        "version": __version__,
        "command": command,
        "generated_at": generated_at(),
        "summary": {
            "passed": not flagged,
            "n_adapters": len(names),
            "n_flagged": len(flagged),
            "flagged": flagged,
        },
        "base_model": pool.base_model,
        "params": outcome.settings.as_dict(),
        "n_adapters": len(names),
        "modules": modules,
        "dropped_modules": pool.dropped,
        "shared_rank": {m: aud.shared_rank_[m] for m in natural_sorted(aud.shared_rank_)},
        "shared_structure": aud.shared_structure_,
        "adapters": adapters,
        "collaborative_set": [names[k] for k in aud.collaborative_set_],
        "flagged": flagged,
        # Sorted by name, so that the order of the sources does not show.
        "duplicate_groups": sorted(sorted(names[k] for k in g) for g in aud.duplicate_groups_),
        "coordinated_groups": sorted(
            (
                {
                    "members": sorted(names[k] for k in g.members),
                    "cosine_within": round(g.within, 6),
                    "tie_cosine": round(g.tie, 6),
                }
                for g in aud.coordinated_groups_
            ),
            key=lambda g: g["members"],
        ),
        "groups": sorted(
            (
                {
                    "members": sorted(names[k] for k in g.members),
                    "flagged": sorted(names[k] for k in g.flagged),
                    "cosine_within": round(g.cosine_within, 6),
                    "cosine_to_rest": None if g.cosine_to_rest != g.cosine_to_rest else round(g.cosine_to_rest, 6),
                }
                for g in aud.groups_
            ),
            key=lambda g: g["members"],
        ),
        "silent_rules": list(aud.silent_rules_),
        "refit": {"modules": len(aud.refitted_), "without": sorted(names[k] for k in aud.refit_without_)},
        "converged": aud.converged_,
        "notes": list(pool.notes),
        "timing_s": {k: round(v, 3) for k, v in outcome.timing.items()},
    }


def _rank_summary(report: dict[str, Any]) -> str:
    ranks = sorted(set(report["shared_rank"].values()))
    if not report["shared_structure"]:
        return "no shared structure found"
    if len(ranks) == 1:
        return f"shared rank {ranks[0]}"
    return f"shared rank {ranks[0]}-{ranks[-1]}"


def summary_line(report: dict[str, Any], timing: bool = True) -> str:
    """One line: pool size, ranks, flags, and (``timing``) the time taken; model cards omit
    the time so that written adapters are byte-identical from run to run."""
    n_flag = len(report["flagged"])
    what = "candidate" if report["command"] == "gate" else "adapter"
    seconds = sum(report["timing_s"].values())
    line = (
        f"{report['n_adapters']} adapters, {len(report['modules'])} modules, {_rank_summary(report)}, "
        f"{n_flag} {what}{'' if n_flag == 1 else 's'} flagged"
    )
    return f"{line} ({seconds:.1f} s)" if timing else line


def _ordered(report: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted(report["adapters"], key=lambda a: (not a["flagged"], -a["score"], a["name"]))


def _verdict(a: dict[str, Any]) -> str:
    if a["role"] == "reference":
        return "reference"
    return "FLAGGED" if a["flagged"] else "ok"


def _top_modules(a: dict[str, Any], labels: ModuleNames, n: int = 2) -> str:
    top = sorted(a["per_module"].items(), key=lambda kv: (-kv[1], natural_key(kv[0])))[:n]
    return ", ".join(f"{labels.short(m)} {share_text(s)}" for m, s in top)


# Below this width the table drops its least important column (the top modules: a flagged
# adapter's reason names its modules); below the narrow one, each adapter is a short block.
FULL_TABLE_WIDTH = 100
NARROW_WIDTH = 56


def render_audit(console: Console, report: dict[str, Any]) -> None:
    """The terminal report: summary, one row per adapter (flagged first, by score), notes.

    At 100 columns or more: adapter, score, verdict, reason, top modules. Narrower, the top
    modules column is dropped so that the reason keeps a readable width; below 56 columns
    each adapter is a line of name, score and verdict with its reason beneath.
    """
    console.print(summary_line(report), style="bold")
    if not report["shared_structure"]:
        console.print(
            "No shared structure found: the adapters share no low-rank subspace beyond chance, "
            "so none is flagged for leaving it."
        )
    labels = ModuleNames(m["name"] for m in report["modules"])
    width = console.width
    rows = []
    for a in _ordered(report):
        verdict = _verdict(a)
        style = "bold red" if verdict == "FLAGGED" else ("dim" if verdict == "reference" else "green")
        reason = "; ".join(r["text"] for r in a["reasons"]) or "-"
        rows.append((shown(a["name"]), f"{a['score']:.3f}", f"[{style}]{verdict}[/]", shown(reason), a))
    if width < NARROW_WIDTH:
        for name, score, verdict, reason, _a in rows:
            console.print(f"{name}  {score}  {verdict}")
            if reason != "-":
                console.print(Padding(reason, (0, 0, 0, 2)))
    else:
        longest = max((len(r[0]) for r in rows), default=7)
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
        table.add_column("adapter", overflow="fold", min_width=min(longest, 16))
        table.add_column("score", justify="right", no_wrap=True)
        table.add_column("verdict", no_wrap=True)
        table.add_column("reason", overflow="fold", ratio=3, min_width=20)
        full = width >= FULL_TABLE_WIDTH
        if full:
            table.add_column("top modules (off-subspace share)", overflow="fold", ratio=2, min_width=16)
        for name, score, verdict, reason, a in rows:
            extra = [shown(_top_modules(a, labels))] if full else []
            table.add_row(name, score, verdict, reason, *extra)
        console.print(table)
    for line in report_notes(report):
        console.print(f"note: {shown(line)}", style="dim")


# What a pool cannot be checked for when a rule measured none of its adapters.
SILENT = {
    "direction": "the adapters agree on no common direction (typical cosine below 0.1): the direction rule "
    "and the rules that need it (joint, isolated) are off, so sign flips and another task's adapters "
    "are not checked here",
    "off_subspace": "no module has shared low-rank structure: the off-subspace and in-subspace rules are off",
    "norm": "too few adapters to compare norms: the norm rule is off",
    "spectral": "too few adapters for the spectral rule: coordinated groups are not checked",
    "pull": "groups that pull the mean together are not checked (the pull rule needs 5 adapters that agree "
    "on a direction and whose norms spread by a robust sd of at most 0.3 in log, about 1.35x; it is off "
    "in gate)",
}


MIN_CARRYING = 5  # adapters with a non-zero update the verdict is calibrated for (as clair audit needs)


def report_notes(report: dict[str, Any]) -> list[str]:
    notes = list(report.get("notes", []))
    if report["dropped_modules"]:
        d = report["dropped_modules"]
        notes.append(f"--intersect left out {len(d)} module(s) not targeted by every adapter: {', '.join(d[:4])}")
    if not report["converged"]:
        bad = [m.get("label", m["name"]) for m in report["modules"] if not m["converged"]]
        notes.append(f"the solver stopped at its iteration limit on {len(bad)} module(s): {', '.join(bad[:4])}")
    n_refs = sum(a["role"] == "reference" for a in report["adapters"])
    if report["command"] == "gate" and n_refs < RECOMMENDED_REFERENCES:
        notes.append(
            f"only {n_refs} references: the thresholds are calibrated for so few, which makes them wide "
            f"(subtle contamination passes) and less reliable; use {RECOMMENDED_REFERENCES} or more"
        )
    copies = sum(any(r["kind"] == "duplicate" for r in a.get("reasons", ())) for a in report["adapters"])
    distinct = report["n_adapters"] - copies
    silent = [r for r in report.get("silent_rules", []) if r in SILENT]
    if silent and copies and distinct < MIN_CARRYING:
        # Not what the notes of each rule say (no common direction, no shared structure): nothing to compare.
        notes.append(
            f"only {distinct} distinct update(s) among {report['n_adapters']} adapters, the others copies of them "
            f"(scaled or not): the rules that compare adapters with each other are off ({', '.join(silent)})"
        )
    else:
        notes.extend(SILENT[r] for r in silent)
    n_zero = sum(a.get("norm") == 0 for a in report["adapters"])
    carrying = report["n_adapters"] - n_zero
    if n_zero and carrying < MIN_CARRYING and report["command"] != "gate":
        verb = "is" if n_zero == 1 else "are"
        notes.append(
            f"only {carrying} of {report['n_adapters']} adapters carry an update ({n_zero} {verb} zero: untrained?): "
            f"the rules compare adapters with each other and are calibrated for {MIN_CARRYING} or more, so among "
            f"{carrying} they have little power to tell a contaminated one"
        )
    n_flagged = report["summary"]["n_flagged"]
    if n_flagged * 2 >= report["n_adapters"]:
        notes.append(
            f"{n_flagged} of {report['n_adapters']} adapters flagged: the verdict assumes honest adapters are "
            "the majority; check that the pool holds adapters of one task and base model, and whether its "
            "clients come in two cohorts of about half the pool each (data sources, label mixes), which "
            "clair cannot tell from a coordinated half"
        )
    for g in report.get("groups", []):
        unflagged = [m for m in g["members"] if m not in g["flagged"]]
        rest = "" if g["cosine_to_rest"] is None else f", {g['cosine_to_rest']:+.2f} with the rest"
        notes.append(
            f"{len(g['members'])} adapters agree with each other but not with the rest of the pool "
            f"(mean cosine {g['cosine_within']:+.2f} among them{rest}): {', '.join(g['members'])}; "
            "another task's adapters, or a coordinated attack"
            + (f" ({', '.join(unflagged)} not flagged, but closer to them than to the pool)" if unflagged else "")
        )
    for a in report["adapters"]:
        notes.extend(f"{a['name']}: {n}" for n in a["notes"])
    return notes


def audit_markdown(report: dict[str, Any]) -> str:
    """A compact Markdown report for a pull-request comment."""
    n_flag = len(report["flagged"])
    head = "passed" if n_flag == 0 else f"{n_flag} flagged"
    lines = [
        f"### clair {report['command']}: {head}",
        "",
        f"{md_text(summary_line(report))}. Base model: {md_code(report['base_model'] or 'unknown')}.",
        "",
        "| adapter | score | verdict | reason |",
        "|---|---:|---|---|",
    ]
    for a in _ordered(report):
        reason = "; ".join(r["text"] for r in a["reasons"]) or "-"
        verdict = _verdict(a)
        verdict = f"**{verdict}**" if verdict == "FLAGGED" else verdict
        lines.append(f"| {md_code(a['name'])} | {a['score']:.3f} | {verdict} | {md_text(reason)} |")
    notes = report_notes(report)
    if notes:
        lines += ["", *(f"- {md_text(n)}" for n in notes)]
    lines += ["", f"<sub>clair {report['version']}, schema {report['schema']}</sub>", ""]
    return "\n".join(lines)
