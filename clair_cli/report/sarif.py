"""The audit's or gate's report as a SARIF 2.1.0 log, for code scanning (``--sarif FILE``).

One result per flagged adapter (in ``clair gate``: per refused candidate), at level
``error``, whose ``ruleId`` is the rule that set its score (the reason of largest margin; a
copy flagged only as a duplicate: ``duplicate``) and whose location is the adapter's weights
file. A local path is written relative to the working directory with ``uriBaseId``
``%SRCROOT%``, as GitHub code scanning asks (run clair from the repository root); a path
outside it becomes an absolute ``file://`` URI and a hub source its ``https://`` address.
``tool.driver.rules`` lists every rule of the verdict, in the order it applies them.

Built from the JSON report alone (:func:`clair_cli.report.audit.audit_report`), like the
Markdown: every output shows the same numbers. No time stamps and no absolute paths of
the working directory are written, so the log is byte-identical from run to run. Each result's
``partialFingerprints`` (the weights file's sha256 and the adapter's name) lets code scanning
follow one alert across runs, since a file without line numbers gets no fingerprint of its own.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple
from urllib.parse import quote

from clair_cli import __version__
from clair_cli.constants import SAFETENSORS_WEIGHTS_NAME
from clair_cli.io.paths import printable
from clair_cli.report import json_text

SARIF_VERSION = "2.1.0"
SARIF_SCHEMA_URI = "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"
SRCROOT = "%SRCROOT%"
HUB_URL = "https://huggingface.co/"
# GitHub ranks security alerts by this (7.0-8.9: high): an adapter that leaves the pool's
# shared subspace, or points against it, is what poisoning looks like.
SECURITY_SEVERITY = "7.5"


class RuleText(NamedTuple):
    """What code scanning shows of a rule: its name, one line, and a paragraph."""

    name: str
    short: str
    full: str


# Every rule of the verdict (clair_cli.core.rules.RULES, in its order; a test checks that the
# two agree), keyed by the ``rule`` its reasons name; then ``unanalysed``, which clair gate adds.
RULE_TEXTS: dict[str, RuleText] = {
    "direction": RuleText(
        "Direction",
        "The adapter's update points away from the other adapters'.",
        "The cosine between the adapter's update (every module at unit norm) and the geometric median of the "
        "other adapters' updates is far below the typical cosine: sign flips, label flips and updates for "
        "another task point elsewhere.",
    ),
    "whole_direction": RuleText(
        "WholeDirection",
        "The adapter's whole update carries little along the other adapters' direction.",
        "The cosine between the adapter's whole update (every module at its own norm) and the geometric median "
        "of the other adapters' whole updates, fitted on the two thirds of the pool most aligned with it, is far "
        "below the typical cosine: updates that carry nothing along the pool's direction at a full norm (free "
        "riders made of the honest updates' differences) dilute the merge by their share of the pool.",
    ),
    "off_subspace": RuleText(
        "OffSubspace",
        "Averaged over the modules, much of the update lies outside the shared subspace.",
        "Averaged over the modules with shared structure, the share of the adapter's update outside the "
        "low-rank subspace the pool shares is atypically high: contamination spread across the model.",
    ),
    "joint": RuleText(
        "Joint",
        "Its direction and its share outside the shared subspace are atypical together.",
        "The sum of the direction and off-subspace statistics is atypical against the other adapters' sums, "
        "where neither rule alone would flag the adapter.",
    ),
    "module": RuleText(
        "ModuleOffSubspace",
        "On some modules, much of the update lies outside the shared subspace.",
        "On one or more modules the share of the update outside that module's shared subspace is past its "
        "threshold (Bonferroni over the modules, or the fixed --threshold): contamination confined to a few "
        "modules, which an average would dilute.",
    ),
    "in_subspace": RuleText(
        "InSubspace",
        "Inside the shared subspace, the update lies far from the pool's centre.",
        "On one or more modules, the adapter's component inside the shared subspace lies atypically far from "
        "the geometric median of the others': an update sign-flipped or scaled within the subspace.",
    ),
    "norm": RuleText(
        "Norm",
        "The update's norm is far from the pool's median.",
        "The norm of the adapter's update over all modules is atypically far above the pool's median (a "
        "boosted update, model replacement) or below it (a free rider that learned nothing).",
    ),
    "module_direction": RuleText(
        "ModuleDirection",
        "On some modules, the update points away from the other adapters'.",
        "On one or more modules the cosine between the adapter's update and the geometric median of the other "
        "adapters' updates there is far below the typical cosine (Bonferroni over the modules): an update "
        "sign-flipped or turned in a few modules and honest elsewhere, which an average over modules would dilute.",
    ),
    "module_norm": RuleText(
        "ModuleNorm",
        "On some modules, the update's norm is far above the others'.",
        "On one or more modules the norm of the adapter's update is atypically far above the other adapters' "
        "median there (Bonferroni over the modules): an update boosted in a few modules, which the norm over "
        "all modules would dilute.",
    ),
    "module_projection": RuleText(
        "ModuleProjection",
        "On some modules, the update pulls against the other adapters'.",
        "On one or more modules the component of the adapter's update along the geometric median of the other "
        "adapters' updates there, in units of the module's median norm, is clearly negative where theirs is "
        "positive (Bonferroni over the modules): an update sign-flipped and scaled in a few modules.",
    ),
    "spectral": RuleText(
        "Spectral",
        "It lies far out along the direction in which the other adapters differ most.",
        "Projected on the leading principal direction of the other adapters' centred updates, the adapter lies "
        "atypically far from their mean: several adapters pushing the same way, such as clients sharing a "
        "backdoor trigger.",
    ),
    "isolated": RuleText(
        "Isolated",
        "It shares almost nothing with any other adapter.",
        "The adapter's largest cosine with any other adapter is atypically small: honest adapters of one task "
        "have a neighbour, an adapter for another task has none.",
    ),
    "opposed": RuleText(
        "Opposed",
        "With a minority group, it points against the rest of the pool.",
        "The adapter belongs to a minority group whose mean update has a clearly negative cosine with the mean "
        "update of the rest of the pool: a coordinated attack that keeps each member inside the pool's spread.",
    ),
    "module_opposed": RuleText(
        "ModuleOpposed",
        "With a minority group, it points against the rest of the pool on one module.",
        "On one module, the adapter belongs to a minority group whose members each point against the mean "
        "update of the rest there, past a cut that combines the evidence over the group, and whose mean update "
        "has a clearly negative cosine with the rest's: a coordinated attack that turns one module and keeps "
        "each member inside the pool's spread.",
    ),
    "pull": RuleText(
        "Pull",
        "With a minority group, it pulls the mean one way.",
        "The adapter belongs to a minority group whose deviations from the pool's centre add up: together "
        "they move the mean much farther than as many honest clients' independent deviations would, even "
        "when each member alone stays inside the pool's spread.",
    ),
    "duplicate": RuleText(
        "Duplicate",
        "The update is a copy of another adapter's.",
        "The update equals another adapter's (cosine above 0.999 over all modules): a Sybil copy. One member "
        "of each group of copies is judged on its own signals; the others are flagged.",
    ),
    "coordinated": RuleText(
        "Coordinated",
        "With a group that agrees far more closely than the pool does, it shares a flagged update.",
        "The adapter belongs to a minority group whose members agree with each other far more closely than the "
        "pool's adapters agree with their nearest neighbours (a coordinated group counts as one adapter in "
        "every centre and in the merge), and another member was flagged for where its update points.",
    ),
    "unanalysed": RuleText(
        "Unanalysed",
        "Its file holds what PEFT applies and clair does not analyse.",
        "The candidate's file holds tensors or settings that PEFT applies when it loads the adapter and that "
        "clair's analysis of the low-rank update scale*B@A does not cover (DoRA magnitude vectors, LoRA or base "
        "biases, full weights such as modules_to_save, trainable tokens, an init_lora_weights with which PEFT "
        "rewrites the base weights or leaves a random update, LoRA modules that --intersect leaves out): a gate "
        "cannot vouch for them.",
    ),
}


def _rule(rule_id: str, text: RuleText) -> dict[str, Any]:
    return {
        "id": rule_id,
        "name": text.name,
        "shortDescription": {"text": text.short},
        "fullDescription": {"text": text.full},
        # Shown by code scanning beside the alert (no helpUri: the project has no fixed docs address).
        "help": {"text": text.full},
        "defaultConfiguration": {"level": "error"},
        "properties": {"tags": ["security", "lora"], "security-severity": SECURITY_SEVERITY},
    }


def primary_rule(adapter: dict[str, Any]) -> str:
    """The rule that set a flagged adapter's score: its reason of largest margin, else the
    first reason's (a duplicate has no margin)."""
    reasons = adapter["reasons"]
    with_margin = [r for r in reasons if r.get("margin") is not None]
    if with_margin:
        return str(max(with_margin, key=lambda r: r["margin"])["rule"])
    return str(reasons[0]["rule"]) if reasons else "duplicate"


def _local_uri(path: str, cwd: Path) -> tuple[str, str | None]:
    """A local file (relative to ``cwd``, or absolute) as (uri, uriBaseId): relative under
    %SRCROOT% where it lies inside ``cwd``, else an absolute ``file://`` URI."""
    root = Path(os.path.abspath(cwd))
    absolute = Path(os.path.normpath(root / path))
    try:
        relative = absolute.relative_to(root)
    except ValueError:
        return absolute.as_uri(), None
    return _quoted(PurePosixPath(*relative.parts).as_posix()), SRCROOT


def _quoted(text: str) -> str:
    """``text`` percent-encoded for a URI; a name that is not UTF-8 (its bytes kept as surrogates,
    as Python reads such file names) by its own bytes."""
    return quote(text.encode("utf-8", "surrogateescape"), safe="/")


def _hub_uri(hub: dict[str, Any]) -> str:
    at = hub.get("commit") or hub.get("revision") or "main"
    folder = f"{hub['subfolder'].strip('/')}/" if hub.get("subfolder") else ""
    return HUB_URL + _quoted(f"{hub['repo_id']}/blob/{at}/{folder}{SAFETENSORS_WEIGHTS_NAME}")


def weights_file(path: str, cwd: Path) -> str:
    """The weights file of an adapter whose own path is ``path`` (a directory or the file)."""
    if path.endswith(".safetensors") and not (cwd / path).is_dir():
        return path
    return os.path.join(path, SAFETENSORS_WEIGHTS_NAME)


def location(adapter: dict[str, Any], cwd: Path) -> dict[str, Any]:
    """Where code scanning shows an adapter's result: its weights file (the name shown escaped, as
    :func:`clair_cli.io.paths.printable` writes it for the terminal and Markdown)."""
    logical = [{"name": printable(adapter["name"]), "kind": "module"}]
    if adapter.get("hub"):
        artifact: dict[str, Any] = {"uri": _hub_uri(adapter["hub"])}
    elif adapter.get("path") is not None:
        uri, base = _local_uri(weights_file(adapter["path"], cwd), cwd)
        artifact = {"uri": uri} | ({"uriBaseId": base} if base else {})
    else:  # an adapter built in memory (library use): no file to point at
        return {"logicalLocations": logical}
    return {"physicalLocation": {"artifactLocation": artifact}, "logicalLocations": logical}


def _message(adapter: dict[str, Any], command: str, rule_id: str) -> str:
    who = "Candidate adapter" if adapter["role"] == "candidate" else "Adapter"
    verdict = "refused by clair gate" if command == "gate" else f"flagged by clair {command}"
    why = "; ".join(r["text"] for r in adapter["reasons"]) or "flagged"
    # Shown to people (code scanning's alert): control and bidi characters of names escaped.
    return printable(f"{who} {adapter['name']} {verdict} (score {adapter['score']:.3f}, rule {rule_id}): {why}.")


def sarif_log(report: dict[str, Any], cwd: Path | None = None) -> dict[str, Any]:
    """The SARIF 2.1.0 log of an audit or gate report (``cwd``: what local paths are relative to)."""
    cwd = Path.cwd() if cwd is None else cwd
    rule_ids = list(RULE_TEXTS)
    results = []
    for a in sorted(report["adapters"], key=lambda a: a["name"]):
        if not a["flagged"]:
            continue
        rule_id = primary_rule(a)
        result: dict[str, Any] = {
            "ruleId": rule_id,
            "ruleIndex": rule_ids.index(rule_id),
            "level": "error",
            "message": {"text": _message(a, report["command"], rule_id)},
            "locations": [location(a, cwd)],
            "properties": {
                "adapter": a["name"],
                "role": a["role"],
                "score": a["score"],
                "norm": a["norm"],
                "signals": a["signals"],
                "rules": [r["rule"] for r in a["reasons"]],
                "sha256": a.get("sha256"),
            },
        }
        digests = a.get("sha256") or {}
        weights = next((d for f, d in digests.items() if f.endswith(".safetensors")), None)
        if weights is not None:  # code scanning keeps one alert for the same file under the same name
            result["partialFingerprints"] = {"adapterSha256/v1": f"{weights}:{a['name']}"}
        results.append(result)
    summary = report["summary"]
    return {
        "$schema": SARIF_SCHEMA_URI,
        "version": SARIF_VERSION,
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "clair",
                        "semanticVersion": __version__,
                        "version": __version__,
                        "rules": [_rule(rule_id, text) for rule_id, text in RULE_TEXTS.items()],
                    }
                },
                "results": results,
                "columnKind": "unicodeCodePoints",
                "properties": {
                    "command": report["command"],
                    "passed": summary["passed"],
                    "n_adapters": summary["n_adapters"],
                    "n_flagged": summary["n_flagged"],
                    "flagged": summary["flagged"],
                    "base_model": report["base_model"],
                    "scores": {a["name"]: a["score"] for a in sorted(report["adapters"], key=lambda a: a["name"])},
                },
            }
        ],
    }


def sarif_text(report: dict[str, Any], cwd: Path | None = None) -> str:
    """:func:`sarif_log` as the text of a ``.sarif`` file."""
    return json_text(sarif_log(report, cwd), indent=2) + "\n"
