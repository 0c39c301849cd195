"""The JSON Schemas (draft 2020-12) of clair's JSON reports, built here and shipped as files.

``clair_cli/schemas/<kind>.schema.json`` is what users validate against; each file stands
alone (no ``$ref`` to another file, so no validator has to fetch anything). The reports of
audit, gate, merge and refine share one body, so the files are generated from the parts
below rather than kept in sync by hand:

    python tests/report_schemas.py     # rewrite the files after changing a report

``tests/test_report_schemas.py`` checks that the files are what this module builds, and every
report the test suite's commands write is validated against them (``tests/conftest.py``).

Closed objects (every key known) say ``additionalProperties: false`` and require every key,
so a field renamed or dropped in the code fails the tests; maps keyed by module or adapter
name (``per_module``, ``shared_rank``, ``merge.rank``) constrain their values only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

SCHEMA_DIR = Path(__file__).parents[1] / "clair_cli" / "schemas"
DIALECT = "https://json-schema.org/draft/2020-12/schema"
KINDS = ("audit", "gate", "merge", "refine", "inspect")

# The rules of the verdict (clair_cli.core.rules.RULES) and the kinds of reason they write.
RULES = ["direction", "whole_direction", "off_subspace", "joint", "module", "in_subspace", "norm", "module_direction",
         "module_norm", "module_projection", "spectral", "isolated", "opposed", "module_opposed", "pull", "duplicate",
         "coordinated"]  # fmt: skip
REASON_KINDS = ["direction", "whole_direction", "off_subspace", "joint", "in_subspace", "norm", "module_direction",
                "module_norm", "module_projection", "spectral", "isolated", "opposed", "module_opposed", "pull",
                "duplicate", "coordinated", "unanalysed"]  # fmt: skip
# A gate's candidate whose file holds what PEFT applies and clair does not analyse (no rule of the verdict).
REASON_RULES = [*RULES, "unanalysed"]
WATCHED_RULES = ["direction", "off_subspace", "norm", "spectral", "pull"]
BASELINES = ["mean", "fedavg", "median", "trimmed-mean", "krum", "multi-krum", "ties"]

STRING: dict[str, Any] = {"type": "string"}
NUMBER: dict[str, Any] = {"type": "number"}
INTEGER: dict[str, Any] = {"type": "integer"}
COUNT: dict[str, Any] = {"type": "integer", "minimum": 0}
BOOLEAN: dict[str, Any] = {"type": "boolean"}
NAMES: dict[str, Any] = {"type": "array", "items": STRING}


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` or null (a ``type`` list where it has one, else ``anyOf``)."""
    if "type" in schema and "enum" not in schema and "const" not in schema:
        kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        return schema | {"type": [*kinds, "null"]}
    return {"anyOf": [schema, {"type": "null"}]}


def closed(properties: dict[str, Any], optional: tuple[str, ...] = (), **extra: Any) -> dict[str, Any]:
    """An object with exactly these keys, all required but ``optional``."""
    return {
        "type": "object",
        "properties": properties,
        "required": [k for k in properties if k not in optional],
        "additionalProperties": False,
        **extra,
    }


def map_of(values: dict[str, Any], description: str | None = None) -> dict[str, Any]:
    """An object keyed by names (modules, adapters, stages) whose values all match ``values``."""
    out: dict[str, Any] = {"type": "object", "additionalProperties": values}
    return out | ({"description": description} if description else {})


def header(command: str) -> dict[str, Any]:
    return {
        "schema": {"const": 1, "description": "Version of the report format."},
        "tool": {"const": "clair"},
        "version": {"type": "string", "description": "clair's version."},
        "command": {"const": command},
    }


GENERATED_AT = {
    "type": "string",
    "format": "date-time",
    "pattern": r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$",
    "description": "UTC time of the report (SOURCE_DATE_EPOCH fixes it).",
}
SHA256 = nullable(
    map_of(
        {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "sha256 of each file read, by file name; null where no JSON file was asked for.",
    )
)
HUB = nullable(
    closed(
        {
            "repo_id": STRING,
            "revision": nullable(STRING),
            "subfolder": nullable(STRING),
            "commit": nullable(STRING),
        }
    )
)
# Where an adapter came from (clair_cli.report.audit.where_from), in every report.
WHERE = {
    "name": STRING,
    "source": {"type": "string", "description": "The source as given."},
    "revision": nullable(STRING),
    "path": nullable({"type": "string", "description": "The adapter's own path as given; null for hub sources."}),
    "sha256": SHA256,
    "hub": HUB,
}

REASON = closed(
    {
        "kind": {"enum": REASON_KINDS},
        "cosine": NUMBER,
        "typical": NUMBER,
        "log_odds": NUMBER,
        "ratio": NUMBER,
        "share": NUMBER,
        "modules": NAMES,
        "across_modules": BOOLEAN,
        "module": STRING,
        "of": NAMES,
        "parts": NAMES,
        "rule": {"enum": REASON_RULES},
        "value": nullable(NUMBER),
        "threshold": NUMBER,
        "compare": {"enum": [">", "<"]},
        "margin": nullable(NUMBER),
        "text": STRING,
    },
    optional=("cosine", "typical", "log_odds", "ratio", "share", "modules", "across_modules", "module", "of", "parts"),
)


def audited_adapter(roles: list[str]) -> dict[str, Any]:
    return closed(
        WHERE
        | {
            "role": {"enum": roles},
            "score": NUMBER,
            "signals": {"type": "object", "propertyNames": {"enum": RULES}, "additionalProperties": NUMBER},
            "flagged": BOOLEAN,
            "reasons": {"type": "array", "items": REASON},
            "norm": NUMBER,
            "per_module": map_of(NUMBER, "Share of the update outside the shared subspace, per module."),
            "notes": NAMES,
        }
    )


MODULE = closed(
    {
        "name": STRING,
        "label": STRING,
        "rank": COUNT,
        "shared_structure": BOOLEAN,
        "solver": STRING,
        "n_iter": COUNT,
        "converged": BOOLEAN,
        "spectrum": {"type": "array", "items": NUMBER, "maxItems": 32},
        "null_bound": nullable({"type": "array", "items": NUMBER, "maxItems": 32}),
    }
)
PARAMS = closed(
    {
        "method": {"enum": ["noisy", "exact"], "description": "The decomposition form (--solver)."},
        "side": {"enum": ["out", "in", "both"]},
        "rank": {"anyOf": [{"const": "auto"}, {"type": "integer", "minimum": 1}]},
        "threshold": nullable(NUMBER),
        "dtype": {"enum": ["float32", "float64"]},
        "device": STRING,
        "seed": COUNT,
        "solver": {"enum": ["auto", "convex", "fast"], "description": "The per-module path."},
    }
)
SUMMARY = closed({"passed": BOOLEAN, "n_adapters": COUNT, "n_flagged": COUNT, "flagged": NAMES})
GROUP = closed({"members": NAMES, "flagged": NAMES, "cosine_within": NUMBER, "cosine_to_rest": nullable(NUMBER)})
TIMING = map_of(NUMBER, "Seconds per stage (differs from run to run).")


def audit_body(command: str, roles: list[str]) -> dict[str, Any]:
    """The properties of an audit's report (clair_cli.report.audit.audit_report)."""
    return header(command) | {
        "generated_at": GENERATED_AT,
        "summary": SUMMARY,
        "base_model": nullable(STRING),
        "params": PARAMS,
        "n_adapters": COUNT,
        "modules": {"type": "array", "items": MODULE},
        "dropped_modules": NAMES,
        "shared_rank": map_of(COUNT, "Detection rank per module."),
        "shared_structure": BOOLEAN,
        "adapters": {"type": "array", "items": audited_adapter(roles)},
        "collaborative_set": NAMES,
        "flagged": NAMES,
        "duplicate_groups": {"type": "array", "items": NAMES},
        "coordinated_groups": {
            "type": "array",
            "items": closed({"members": NAMES, "cosine_within": NUMBER, "tie_cosine": NUMBER}),
        },
        "groups": {"type": "array", "items": GROUP},
        "silent_rules": {"type": "array", "items": {"enum": WATCHED_RULES}},
        "refit": closed(
            {"modules": COUNT, "without": NAMES},
            description="The shared subspaces fitted again without the adapters the first verdict flagged for "
            "where they point, where those had helped fit them (modules: how many; without: those "
            "adapters), and the verdict decided again.",
        ),
        "converged": BOOLEAN,
        "notes": NAMES,
        "timing_s": TIMING,
    }


MERGE_OPTIONS = closed(
    {
        "rank": nullable({"type": "integer", "minimum": 1}),
        "tol": NUMBER,
        "project": BOOLEAN,
        "project_rank": nullable({"type": "integer", "minimum": 1}),
        "rescale": {"enum": ["none", "norm"]},
        "clip": nullable(NUMBER),
        "norm_bound": nullable(NUMBER),
    }
)


def merge_section(methods: list[str], baseline: bool) -> dict[str, Any]:
    """The ``merge`` section (MergedAdapter.summary, with what --drop-extras dropped)."""
    props = {
        "method": {"enum": methods},
        "options": MERGE_OPTIONS,
        "weights": nullable({"type": "array", "items": NUMBER}),
        "rank": map_of(COUNT, "Rank of the written LoRA per module."),
        "max_relative_error": NUMBER,
        "relative_error": map_of(NUMBER),
        "scale": NUMBER,
        "clipped": map_of(NUMBER),
        "norm_bounded": map_of(NUMBER),
        "norm_bound_relative": nullable(NUMBER),
        "module_norm_bounded": map_of(map_of(NUMBER), "Per module, the adapters its own norm bound weighted down."),
        "projection_rank": map_of(nullable(COUNT)),
        "dropped": NAMES,
    }
    optional = ("clipped", "norm_bounded", "norm_bound_relative", "module_norm_bounded", "projection_rank")
    extra: dict[str, Any] = {}
    if baseline:
        props["selected"] = map_of(NAMES, "Per module, the adapters a selecting method (krum) merged.")
        optional += ("selected",)
    else:
        extra["allOf"] = [
            {
                "if": {"properties": {"options": {"properties": {"clip": {"type": "number"}}}}},
                "then": {"required": ["clipped"]},
            },
            {
                "if": {"properties": {"options": {"properties": {"norm_bound": {"type": "number"}}}}},
                "then": {"required": ["norm_bounded", "norm_bound_relative", "module_norm_bounded"]},
            },
            {
                "if": {"properties": {"options": {"properties": {"project": {"const": True}}}}},
                "then": {"required": ["projection_rank"]},
            },
        ]
    return closed(props, optional=optional, **extra)


BASELINE_ADAPTER = closed(
    WHERE
    | {
        "used": BOOLEAN,
        "weight": nullable({**NUMBER, "description": "Share of the merge under --weights; null: equal weights."}),
        "notes": NAMES,
    }
)


def baseline_merge() -> dict[str, Any]:
    """A merge without an audit (clair_cli.report.merge.merge_report)."""
    return closed(
        header("merge")
        | {
            "generated_at": GENERATED_AT,
            "base_model": nullable(STRING),
            "params": closed({"dtype": {"enum": ["float32", "float64"]}, "device": STRING}),
            "n_adapters": COUNT,
            "adapters": {"type": "array", "items": BASELINE_ADAPTER},
            "dropped_modules": NAMES,
            "audit": {"type": "null", "description": "A baseline runs no audit."},
            "merge": merge_section(BASELINES, baseline=True),
            "notes": NAMES,
            "timing_s": TIMING,
        },
        title="clair merge report (a baseline --method, no audit)",
    )


INSPECT_MODULE = closed(
    {
        "name": STRING,
        "kind": {"enum": ["linear", "conv", "embedding"]},
        "rank": COUNT,
        "d_in": COUNT,
        "d_out": COUNT,
        "scale": NUMBER,
        "dtype": {"enum": ["F16", "BF16", "F32", "F64"]},
    }
)
INSPECT_ADAPTER = closed(
    WHERE
    | {
        "base_model": nullable(STRING),
        "peft_type": STRING,
        "layout": {"enum": ["peft", "kohya", "comfyui", "diffusers", "mlx"]},
        "r": COUNT,
        "ranks": {"type": "array", "items": COUNT},
        "lora_alpha": NUMBER,
        "use_rslora": BOOLEAN,
        "scale_rule": STRING,
        "rank_pattern": map_of(COUNT),
        "alpha_pattern": map_of(NUMBER),
        "fan_in_fan_out": BOOLEAN,
        "target_modules": {"anyOf": [NAMES, STRING, {"type": "null"}]},
        "n_modules": COUNT,
        "modules": {"type": "array", "items": INSPECT_MODULE},
        "n_params": COUNT,
        "dtypes": {"type": "array", "items": {"enum": ["float16", "bfloat16", "float32", "float64"]}},
        "file_size": COUNT,
        "notes": NAMES,
    }
)
# An adapter that cannot be read still gets its row (clair_cli.report.inspect.error_record), and
# --json writes every row although the run exits 2.
INSPECT_ERROR = closed(
    {
        "name": STRING,
        "source": {"type": "string", "description": "The source as given."},
        "revision": nullable(STRING),
        "error": {"type": "string", "description": "Why the adapter cannot be read (the Error: line's text)."},
    }
)


def document(kind: str, title: str, body: dict[str, Any]) -> dict[str, Any]:
    return {
        "$schema": DIALECT,
        "$id": f"urn:clair-lora:report:{kind}:1",
        "title": title,
        **body,
    }


def schemas() -> dict[str, dict[str, Any]]:
    """Every report kind's schema, by kind."""
    audit = closed(audit_body("audit", ["member"]))
    gate = closed(audit_body("gate", ["reference", "candidate"]))
    clair_merge = closed(
        audit_body("merge", ["member"]) | {"merge": merge_section(["clair"], baseline=False)},
        title="clair merge report (--method clair: the audit, then the merge)",
    )
    refine = closed(
        audit_body("refine", ["member"])
        | {"refine": closed({"project_rank": STRING, "projection_rank": map_of(nullable(COUNT))})}
    )
    inspect = closed(
        header("inspect") | {"adapters": {"type": "array", "items": {"anyOf": [INSPECT_ADAPTER, INSPECT_ERROR]}}}
    )
    return {
        "audit": document("audit", "clair audit report", audit),
        "gate": document("gate", "clair gate report", gate),
        # A baseline's report says "audit": null; the clair merge's is the audit's with a merge section.
        "merge": document(
            "merge",
            "clair merge report",
            {"if": {"required": ["audit"]}, "then": baseline_merge(), "else": clair_merge},
        ),
        "refine": document("refine", "clair refine report", refine),
        "inspect": document("inspect", "clair inspect report", inspect),
    }


def text(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2) + "\n"


def main() -> int:
    for kind, schema in schemas().items():
        (SCHEMA_DIR / f"{kind}.schema.json").write_text(text(schema), encoding="utf-8")
        print(f"wrote {SCHEMA_DIR / f'{kind}.schema.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
