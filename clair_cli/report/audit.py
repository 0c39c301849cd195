"""What ``clair audit`` / ``gate`` report: a JSON document, a rich table, Markdown.

:func:`audit_report` builds the JSON-ready dict (schema in README.md); the
terminal and Markdown renderings are made from that dict alone, so every output
mode shows the same numbers.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.table import Table

from clair_cli import __version__
from clair_cli.constants import JSON_SCHEMA_VERSION
from clair_cli.report.console import shown
from clair_cli.report.markdown import md_code, md_text

# Below this many references, `clair gate` says its thresholds are wide (README, "clair gate":
# measured honest false flags 1.6 % with 6 references, 0.8 % with 8, none with 10).
RECOMMENDED_REFERENCES = 8

if TYPE_CHECKING:
    from clair_cli.pipeline import AuditOutcome

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers?|h|blocks?)\.(\d+)\.(?:.*\.)?([^.]+)$")


def _ranges(nums: list[int]) -> str:
    nums = sorted(set(nums))
    parts, start, prev = [], nums[0], nums[0]
    for n in nums[1:] + [None]:  # type: ignore[list-item]
        if n is not None and n == prev + 1:
            prev = n
            continue
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(parts)


def summarise_modules(names: list[str], n_total: int) -> str:
    """Module names in words: ``layers 11-12 v_proj``, ``every module``, or the first few names."""
    if n_total > 1 and len(names) == n_total:
        return f"all {n_total} modules"
    by_leaf: dict[str, list[int]] = defaultdict(list)
    other = []
    for name in names:
        m = _LAYER_RE.search(name)
        if m:
            by_leaf[m[2]].append(int(m[1]))
        else:
            other.append(name)
    parts = [f"layer{'s' if len(set(v)) > 1 else ''} {_ranges(v)} {leaf}" for leaf, v in sorted(by_leaf.items())]
    parts += other
    if len(parts) > 3:
        return ", ".join(parts[:3]) + f" and {len(parts) - 3} more"
    return ", ".join(parts)


def reason_text(reason: dict[str, Any], names: list[str], n_modules: int) -> str:
    """One reason of a verdict in words."""
    kind = reason["kind"]
    if kind == "off_subspace":
        if reason.get("across_modules"):
            return (
                f"{reason['share']:.0%} of its update lies outside the shared subspace on average over "
                f"{len(reason['modules'])} modules, more than is typical of the pool"
            )
        where = summarise_modules(reason["modules"], n_modules)
        return f"{reason['share']:.0%} of its update lies outside the shared subspace, in {where}"
    if kind == "direction":
        return (
            f"its update points away from the others' (cosine {reason['cosine']:+.2f} with their centre, "
            f"typically {reason['typical']:+.2f})"
        )
    if kind == "joint":
        share = 1 / (1 + math.exp(-reason["log_odds"]))
        return (
            f"both its direction (cosine {reason['cosine']:+.2f} with the others' centre) and its share "
            f"outside the shared subspace ({share:.0%} on average) are atypical together"
        )
    if kind == "norm":
        ratio = reason["ratio"]
        if ratio < 1:
            return f"update norm {1 / ratio:.0f}x below the pool median (a free rider?)"
        return (
            f"update norm {ratio:.0f}x the pool median" if ratio >= 10 else f"update norm {ratio:.1f}x the pool median"
        )
    if kind == "duplicate":
        return "identical to " + ", ".join(sorted(names[j] for j in reason["of"]))
    if kind == "in_subspace":
        where = summarise_modules(reason["modules"], n_modules)
        return (
            f"inside the shared subspace, its update lies {reason['ratio']:.1f}x farther than is typical "
            f"from the pool's centre (sign-flipped or scaled?), in {where}"
        )
    return kind


def audit_report(outcome: AuditOutcome, command: str = "audit") -> dict[str, Any]:
    """The JSON report (schema 1)."""
    pool, aud = outcome.pool, outcome.auditor
    names = pool.names
    n_mod = len(pool.modules)
    reference = set(outcome.reference or ())
    adapters = []
    for a, v in zip(pool.adapters, aud.verdicts_, strict=True):
        reasons: list[dict[str, Any]] = [
            {key: round(val, 6) if isinstance(val, float) else val for key, val in why.items()}
            | {"text": reason_text(why, names, n_mod)}
            for why in v.reasons
        ]
        for why in reasons:
            if why["kind"] == "duplicate":
                why["of"] = sorted(names[j] for j in why["of"])
        adapters.append(
            {
                "name": a.name,
                "source": a.ref.source,
                "revision": a.ref.revision,
                "role": ("reference" if v.index in reference else "candidate") if outcome.reference else "member",
                "score": round(v.score, 6),
                "signals": {rule: round(m, 6) for rule, m in sorted(v.signals.items())},
                "flagged": v.flagged,
                "reasons": reasons,
                "norm": round(v.norm_ratio, 6),
                "per_module": {m: round(s, 6) for m, s in v.per_module.items()},
                "notes": list(a.notes),
            }
        )
    modules = []
    for r in aud.module_results_:
        modules.append(
            {
                "name": r.name,
                "rank": r.rank,
                "shared_structure": r.shared_structure,
                "solver": r.solver,
                "n_iter": r.n_iter,
                "converged": r.converged,
                "spectrum": [round(float(x), 6) for x in r.spectrum[:32]],
                "null_bound": None if r.null_bound is None else [round(float(x), 6) for x in r.null_bound[:32]],
            }
        )
    return {
        "schema": JSON_SCHEMA_VERSION,
        "tool": "clair",
        "version": __version__,
        "command": command,
        "base_model": pool.base_model,
        "params": outcome.settings.as_dict(),
        "n_adapters": len(names),
        "modules": modules,
        "dropped_modules": pool.dropped,
        "shared_rank": dict(aud.shared_rank_),
        "shared_structure": aud.shared_structure_,
        "adapters": adapters,
        "collaborative_set": [names[k] for k in aud.collaborative_set_],
        "flagged": [names[k] for k, f in enumerate(aud.flagged_) if f],
        # Sorted by name, so that the order of the sources does not show.
        "duplicate_groups": sorted(sorted(names[k] for k in g) for g in aud.duplicate_groups_),
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
        "converged": aud.converged_,
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


def _top_modules(a: dict[str, Any], n: int = 2) -> str:
    top = sorted(a["per_module"].items(), key=lambda kv: (-kv[1], kv[0]))[:n]
    return ", ".join(f"{summarise_modules([m], 0)} {s:.2f}" for m, s in top)


def render_audit(console: Console, report: dict[str, Any]) -> None:
    """The terminal report: summary, one row per adapter (flagged first, by score), notes."""
    console.print(summary_line(report), style="bold")
    if not report["shared_structure"]:
        console.print(
            "No shared structure found: the adapters share no low-rank subspace beyond chance, "
            "so none is flagged for leaving it."
        )
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
    table.add_column("adapter", overflow="fold")
    table.add_column("score", justify="right")
    table.add_column("verdict")
    table.add_column("reason", overflow="fold", ratio=3)
    table.add_column("top modules (off-subspace share)", overflow="fold", ratio=2)
    for a in _ordered(report):
        verdict = _verdict(a)
        style = "bold red" if verdict == "FLAGGED" else ("dim" if verdict == "reference" else "green")
        table.add_row(
            shown(a["name"]),
            f"{a['score']:.3f}",
            f"[{style}]{verdict}[/]",
            shown("; ".join(r["text"] for r in a["reasons"]) or "-"),
            shown(_top_modules(a)),
        )
    console.print(table)
    for line in report_notes(report):
        console.print(f"note: {shown(line)}", style="dim")


def report_notes(report: dict[str, Any]) -> list[str]:
    notes = []
    if report["dropped_modules"]:
        d = report["dropped_modules"]
        notes.append(f"--intersect left out {len(d)} module(s) not targeted by every adapter: {', '.join(d[:4])}")
    if not report["converged"]:
        bad = [m["name"] for m in report["modules"] if not m["converged"]]
        notes.append(f"the solver stopped at its iteration limit on {len(bad)} module(s): {', '.join(bad[:4])}")
    n_refs = sum(a["role"] == "reference" for a in report["adapters"])
    if report["command"] == "gate" and n_refs < RECOMMENDED_REFERENCES:
        notes.append(
            f"only {n_refs} references: the thresholds are calibrated for so few, which makes them wide "
            f"(subtle contamination passes) and less reliable; use {RECOMMENDED_REFERENCES} or more"
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
