"""What ``clair inspect`` shows: one record per adapter, as JSON or a rich table."""

from __future__ import annotations

from collections import Counter
from typing import Any

from rich.console import Console
from rich.table import Table

from clair_cli import __version__
from clair_cli.constants import JSON_SCHEMA_VERSION
from clair_cli.io.adapter import Adapter
from clair_cli.report.console import human_bytes, human_count, shown


def _fmt_num(x: float) -> str:
    return f"{x:g}"


def adapter_record(adapter: Adapter, extra_notes: list[str] | None = None, digests: bool = False) -> dict[str, Any]:
    """A JSON-ready description of one adapter; ``path``, ``sha256`` (None unless ``digests``)
    and ``hub`` as in the audit's report (:func:`clair_cli.report.audit.where_from`)."""
    from clair_cli.report.audit import where_from

    cfg = adapter.config
    targets = cfg.target_modules
    return {
        "name": adapter.name,
        "source": adapter.ref.source,
        "revision": adapter.ref.revision,
        **where_from(adapter, digests),
        "base_model": cfg.base_model,
        "peft_type": cfg.peft_type,
        "layout": adapter.layout,
        "r": cfg.r,
        "ranks": adapter.ranks,
        "lora_alpha": cfg.lora_alpha,
        "use_rslora": cfg.use_rslora,
        "scale_rule": cfg.scale_rule,
        "rank_pattern": cfg.rank_pattern,
        "alpha_pattern": cfg.alpha_pattern,
        "fan_in_fan_out": cfg.fan_in_fan_out,
        "target_modules": list(targets) if isinstance(targets, tuple) else targets,
        "n_modules": len(adapter.modules),
        "modules": [
            {
                "name": m.name,
                "kind": m.kind,
                "rank": m.rank,
                "d_in": m.d_in,
                "d_out": m.d_out,
                "scale": m.scale,
                "dtype": m.dtype,
            }
            for m in adapter.modules.values()
        ],
        "n_params": adapter.n_params,
        "dtypes": adapter.dtypes,
        "file_size": adapter.file_size,
        "notes": [*adapter.notes, *(extra_notes or [])],
    }


def error_record(name: str, source: str, error: str, revision: str | None = None) -> dict[str, Any]:
    """The record of an adapter that cannot be read: its name, where it is, and why."""
    return {"name": name, "source": source, "revision": revision, "error": error}


def inspect_report(records: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "schema": JSON_SCHEMA_VERSION,
        "tool": "clair",
        "version": __version__,
        "command": "inspect",
        "adapters": records,
    }


MAX_TARGETS_SHOWN = 12  # names in the Targets cell; the JSON report has them all
MAX_TARGETS_CHARS = 400


def _targets(rec: dict[str, Any]) -> str:
    t = rec["target_modules"]
    if t is None and rec.get("layout") == "kohya":  # lora_unet_<path with _>: one line per part
        parts = Counter("_".join(m["name"].split("_", 2)[:2]) + "_*" for m in rec["modules"])
        return _listed([f"{p} ({n})" for p, n in sorted(parts.items())])
    if t is None:
        return _listed(sorted({_leaf(m["name"]) for m in rec["modules"]}))
    if isinstance(t, str):
        return t if len(t) <= MAX_TARGETS_CHARS else f"{t[:MAX_TARGETS_CHARS]}... ({len(t)} characters)"
    return _listed(sorted(t))


def _leaf(name: str) -> str:
    """What a module name targets, as PEFT's ``target_modules`` would name it: its last part, with
    the one before where the last is an index (``ff.net.2``: ``net.2``, a Sequential's layer)."""
    parts = name.split(".")
    return ".".join(parts[-2:]) if len(parts) > 1 and parts[-1].isdigit() else parts[-1]


def _listed(names: list[str]) -> str:
    """At most ``MAX_TARGETS_SHOWN`` names and ``MAX_TARGETS_CHARS`` characters, then how many in
    all (a config may list hundreds of thousands; laying them out in a table cell took minutes)."""
    text = ", ".join(names[:MAX_TARGETS_SHOWN])
    if len(names) <= MAX_TARGETS_SHOWN and len(text) <= MAX_TARGETS_CHARS:
        return text
    return f"{text[:MAX_TARGETS_CHARS]}, ... ({len(names)} names)"


def render_inspect(console: Console, records: list[dict[str, Any]]) -> None:
    """Print one table row per adapter, then the notes."""
    n_bad = sum("error" in rec for rec in records)
    title = f"{len(records)} adapter{'s' if len(records) != 1 else ''}" + (f", {n_bad} unreadable" if n_bad else "")
    table = Table(title=title, title_justify="left")
    for col, just in (
        ("Adapter", "left"),
        ("Base model", "left"),
        ("r", "right"),
        ("alpha", "right"),
        ("Scale", "left"),
        ("Targets", "left"),
        ("Modules", "right"),
        ("Params", "right"),
        ("Dtype", "left"),
        ("Size", "right"),
    ):
        wrap = col in ("Adapter", "Base model", "Targets")
        table.add_column(col, justify=just, overflow="fold", no_wrap=not wrap)  # type: ignore[arg-type]
    for rec in records:
        if "error" in rec:
            table.add_row(shown(rec["name"]), f"[red]error:[/red] {shown(rec['error'])}", *["-"] * 8)
            continue
        name = shown(rec["name"])
        if rec["revision"]:
            name += f"\n[dim]@ {rec['revision'][:12]}[/dim]"
        ranks = rec["ranks"]
        table.add_row(
            name,
            shown(rec["base_model"] or "-"),
            "/".join(map(str, ranks)),
            _fmt_num(rec["lora_alpha"]) + ("*" if rec["alpha_pattern"] else ""),
            rec["scale_rule"].replace(" (per-module patterns)", "*"),
            shown(_targets(rec)),
            str(rec["n_modules"]),
            human_count(rec["n_params"]),
            ",".join(rec["dtypes"]),
            human_bytes(rec["file_size"]),
        )
    console.print(table)
    if any(rec.get("alpha_pattern") or rec.get("rank_pattern") for rec in records):
        console.print("[dim]* rank_pattern / alpha_pattern set: values differ per module (see --json)[/dim]")
    for rec in records:
        for note in rec.get("notes", []):
            console.print(f"[yellow]note[/yellow] {shown(rec['name'])}: {shown(note)}")
