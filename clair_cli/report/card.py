"""Model cards (README.md) of merged and refined adapters."""

from __future__ import annotations

from typing import Any

from clair_cli import __version__

METHOD_TEXT = {
    "clair": "CLAIR merge: the collaborators' updates projected onto their shared low-rank subspace "
    "and averaged (Theta_bar = sum_k w_k U U^T Theta_k), written at the shared rank with scale 1.",
    "mean": "Exact weighted mean of the updates, sum_k w_k s_k B_k A_k, as a concatenated LoRA.",
    "fedavg": "Federated averaging of the factors, (sum_k w_k s_k B_k)(sum_k w_k A_k).",
    "median": "Coordinate-wise median of the updates, truncated back to LoRA rank by SVD.",
    "trimmed-mean": "Coordinate-wise trimmed mean of the updates, truncated back to LoRA rank by SVD.",
    "krum": "Krum: the single adapter closest to its neighbours.",
    "multi-krum": "Multi-Krum: the mean of the adapters closest to their neighbours.",
    "ties": "TIES merging (trim, elect sign, disjoint mean), truncated back to LoRA rank by SVD.",
    "refine": "CLAIR refinement: this adapter's update projected onto the shared subspace of the "
    "collaborative adapters (B~ = U U^T B); rank, alpha and config unchanged.",
}


def _front_matter(base_model: str | None, tags: list[str]) -> list[str]:
    lines = ["---", "library_name: peft"]
    if base_model:
        lines.append(f"base_model: {base_model}")
    lines += ["tags:", *(f"- {t}" for t in tags), "---", ""]
    return lines


def model_card(
    title: str,
    method: str,
    base_model: str | None,
    sources: list[dict[str, Any]],
    command: str,
    summary: str | None,
    notes: list[str],
) -> str:
    """A model card.

    Args:
        title: heading.
        method: key of METHOD_TEXT.
        base_model: base model id.
        sources: per input adapter: name, source, revision, used (bool), score, flagged.
        command: the command line that made it.
        summary: the audit's summary line, if an audit ran.
        notes: extra lines.
    """
    lines = _front_matter(base_model, ["lora", "clair", "merge" if method != "refine" else "refined"])
    lines += [f"# {title}", "", f"Made by clair {__version__}.", "", "```", command, "```", ""]
    lines += ["## Method", "", METHOD_TEXT.get(method, method), ""]
    if summary:
        lines += ["## Audit", "", summary + ".", ""]
    lines += [
        "## Sources",
        "",
        "| adapter | source | revision | used | score | verdict |",
        "|---|---|---|---|---:|---|",
    ]
    for s in sources:
        score = "-" if s.get("score") is None else f"{s['score']:.3f}"
        verdict = "-" if s.get("flagged") is None else ("flagged" if s["flagged"] else "ok")
        lines.append(
            f"| `{s['name']}` | `{s['source']}` | {s.get('revision') or '-'} | "
            f"{'yes' if s['used'] else 'no'} | {score} | {verdict} |"
        )
    if notes:
        lines += ["", "## Notes", "", *(f"- {n}" for n in notes)]
    lines.append("")
    return "\n".join(lines)
