"""The JSON report of a baseline merge (``clair merge --method mean|fedavg|median|...``).

A baseline runs no audit, so its report has no verdicts: ``"audit": null`` says so, where the
clair merge's report is the audit's with a ``merge`` section
(:func:`clair_cli.report.audit.audit_report`). What it has: what was merged (every input
adapter, whether it was used and its share of a weighted merge, per module the adapters a
selecting method kept), the method, its options and weights, and the rank written per module
(schema in ``clair_cli/schemas/merge.schema.json``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from clair_cli import __version__
from clair_cli.constants import JSON_SCHEMA_VERSION
from clair_cli.report.audit import generated_at, where_from

if TYPE_CHECKING:
    from clair_cli.params import AuditParams
    from clair_cli.results import MergedAdapter, Pool


def _shares(merged: MergedAdapter) -> dict[int, float]:
    """Each used adapter's share of a weighted merge (``--weights`` normalised over the used)."""
    if merged.weights is None:
        return {}
    total = sum(merged.weights)
    return {k: round(w / total, 6) for k, w in zip(merged.used, merged.weights, strict=True)}


def _selected(pool: Pool, merged: MergedAdapter) -> dict[str, list[str]] | None:
    """Per module, the adapters merged where a method kept a subset (krum, multi-krum); else None."""
    used = set(merged.used)
    if all(set(r.selected) == used for r in merged.modules.values()):
        return None
    return {m: [pool.adapters[k].name for k in sorted(r.selected)] for m, r in merged.modules.items()}


def merge_report(
    pool: Pool,
    merged: MergedAdapter,
    params: AuditParams,
    dropped: list[str],
    notes: list[str],
    timing: dict[str, float],
    digests: bool = True,
) -> dict[str, Any]:
    """The JSON report (schema 1) of a merge without an audit.

    Args:
        pool: the adapters given.
        merged: what :func:`clair_cli.pipeline.merge` returned.
        params: the working precision and device (``dtype``, ``device``; resolved).
        dropped: what ``--drop-extras`` left out, in words.
        notes: the merge's notes (pool notes are added here).
        timing: seconds per stage.
        digests: hash every file read (``sha256``), as the audit's report does.
    """
    shares = _shares(merged)
    used = set(merged.used)
    section = merged.summary() | {"dropped": list(dropped)}
    selected = _selected(pool, merged)
    if selected is not None:
        section["selected"] = selected
    return {
        "schema": JSON_SCHEMA_VERSION,
        "tool": "clair",
        "version": __version__,
        "command": "merge",
        "generated_at": generated_at(),
        "base_model": pool.base_model,
        "params": {"dtype": params.dtype, "device": params.device},
        "n_adapters": len(pool.adapters),
        "adapters": [
            {
                "name": a.name,
                "source": a.ref.source,
                "revision": a.ref.revision,
                **where_from(a, digests),
                "used": k in used,
                "weight": shares.get(k),
                "notes": list(a.notes),
            }
            for k, a in enumerate(pool.adapters)
        ],
        "dropped_modules": pool.dropped,
        "audit": None,
        "merge": section,
        "notes": [*pool.notes, *notes],
        "timing_s": {k: round(v, 3) for k, v in timing.items()},
    }
