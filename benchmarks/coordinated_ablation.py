"""Does rule 10 (``coordinated``) change any verdict on honest or naturally contaminated pools?

    python -m benchmarks.coordinated_ablation [--seeds 3] [--tasks revsucc,majority]
                                              [--scenarios clean,heavy] [--cache DIR]

Every trained pool of benchmarks/trained_pools.py (generated into --cache on first use) is
audited twice at clair's defaults, with and without rule 10's groups, and the table lists
per pool the coordinated groups found, the flagged adapters with their kind, and whether the
two verdicts agree adapter for adapter. A rule meant for attackers who coordinate must find
no group among honest clients and leave the verdict on these pools as it was.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks import tasks, trained_pools


def audit_flags(pool_dir: Path, names: list[str], with_rule: bool) -> tuple[set[str], list[list[str]]]:
    """The adapters flagged and the coordinated groups found, with or without rule 10."""
    import clair_cli.core.audit as audit
    from clair_cli import pipeline
    from clair_cli.params import AuditParams

    found = audit.coordinated_groups
    if not with_rule:
        audit.coordinated_groups = lambda cosine, copies=None: []
    try:
        pool = pipeline.open_pool([str(pool_dir / n) for n in names])
        out = pipeline.audit(pool, AuditParams())
    finally:
        audit.coordinated_groups = found
    flagged = {pool.names[k] for k, f in enumerate(out.auditor.flagged_) if f}
    groups = [[pool.names[k] for k in g.members] for g in out.auditor.coordinated_groups_]
    return flagged, groups


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.coordinated_ablation", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--seeds", type=int, default=len(trained_pools.DEFAULT_SEEDS), help="seeds 0..N-1")
    parser.add_argument("--tasks", default=",".join(tasks.TASKS), help="comma-separated task names")
    parser.add_argument("--scenarios", default="clean,heavy", help="comma-separated scenarios")
    parser.add_argument("--cache", type=Path, default=trained_pools.default_cache())
    args = parser.parse_args(argv)
    trained_pools.configure_torch()
    pools = trained_pools.generate(
        args.cache, list(range(args.seeds)), args.tasks.split(","), args.scenarios.split(","), trained_pools.log_err
    )
    print("| pool | groups found | flagged (kind) | same verdict without rule 10 |")
    print("|---|---|---|---|")
    same = 0
    for pool_dir in pools:
        kinds = {n: a["kind"] for n, a in json.loads((pool_dir / "MANIFEST.json").read_text())["adapters"].items()}
        names = sorted(kinds)
        with_rule, groups = audit_flags(pool_dir, names, True)
        without, _ = audit_flags(pool_dir, names, False)
        same += with_rule == without
        flagged = ", ".join(f"{n} ({kinds[n]})" for n in sorted(with_rule)) or "none"
        print(f"| {pool_dir.name} | {groups or 'none'} | {flagged} | {'yes' if with_rule == without else 'NO'} |")
    print(f"\n{same} of {len(pools)} pools: the same verdict with and without rule 10.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
