"""Merged and refined adapters as directories: PEFT config, tensors and model card.

The commands call these after :mod:`clair_cli.pipeline` has merged or refined; they write
into a staging directory of the run's output transaction (:class:`clair_cli.io.writers.Outputs`),
which renames it into place with the run's reports once everything is written, or not at all.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from clair_cli.io.lora_config import ConfigPlan
    from clair_cli.io.peft_writer import MergedStream
    from clair_cli.params import MergeOptions
    from clair_cli.pipeline import Progress
    from clair_cli.results import AuditOutcome, MergedAdapter, Pool

# Options whose value is a secret: the model card's command line shows them as ***.
SECRET_OPTIONS = ("--token",)

# A diffusion LoRA file's safetensors metadata that describes its tensors' content: sd-scripts'
# hashes of the tensor data (sshs_*, which A1111 and Civitai use to identify a LoRA) and the SAI
# model spec's. Stale once clair rewrites the tensors: never copied to an output.
CONTENT_METADATA_PREFIXES = ("sshs_",)
CONTENT_METADATA = frozenset({"modelspec.hash_sha256"})
# The metadata that describes the base model and the network type (sd-scripts' ss_*, the SAI model
# spec's): a merge keeps each one that every input gives, with one value. Everything else (ranks,
# alphas, diffusers' per-component LoraConfig, training settings) describes one input, not the merge.
BASE_METADATA = (
    "ss_base_model_version",
    "ss_v2",
    "ss_sd_model_name",
    "ss_sd_model_hash",
    "ss_new_sd_model_hash",
    "ss_vae_name",
    "ss_vae_hash",
    "ss_new_vae_hash",
    "ss_network_module",
    "modelspec.sai_model_spec",
    "modelspec.architecture",
    "modelspec.implementation",
    "modelspec.prediction_type",
    "modelspec.timestep_range",
    "modelspec.encoder_layer",
)


def refined_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """A refined diffusion file's metadata: its source's, less what describes the tensors' content
    (:data:`CONTENT_METADATA`); ranks, alphas and diffusers' LoraConfig still hold (refine keeps them)."""
    return {
        k: v
        for k, v in metadata.items()
        if k not in CONTENT_METADATA and not k.startswith(CONTENT_METADATA_PREFIXES) and k != "format"
    }


def merged_metadata(metadata: Sequence[dict[str, str]]) -> dict[str, str]:
    """A merged diffusion file's metadata: the :data:`BASE_METADATA` keys on which every input's
    ``metadata`` agrees (one value, given by all)."""
    out: dict[str, str] = {}
    for key in BASE_METADATA:
        values = {m.get(key) for m in metadata}
        value = values.pop() if len(values) == 1 else None
        if value is not None:
            out[key] = value
    return out


def command_line(argv: Sequence[str]) -> str:
    """The command that made an adapter, for its model card, with secrets (``--token``) masked."""
    shown: list[str] = []
    hide = False
    for arg in argv:
        if hide:
            shown.append("***")
            hide = False
            continue
        name, eq, _value = arg.partition("=")
        if name in SECRET_OPTIONS:
            if eq:
                shown.append(f"{name}=***")
            else:
                shown.append(arg)
                hide = True
            continue
        shown.append(arg)
    return "clair " + " ".join(shlex.quote(a) for a in shown)


def sources_table(
    pool: Pool,
    used: Sequence[int],
    outcome: AuditOutcome | None,
    weights: Sequence[float] | None = None,
    weighted: bool = True,
) -> list[dict[str, Any]]:
    """Per input adapter: name, source, its own path, revision, whether it was used, its weight
    (its share of a merge: ``weights`` one per adapter in ``used``, None: equal; none at all
    where the method is not ``weighted``, an order statistic), score and verdict."""
    from clair_cli.core.merge import check_weights

    shares = check_weights(None if weights is None else list(weights), len(used)) if used else []
    share = dict(zip(used, shares, strict=True))
    rows = []
    for k, a in enumerate(pool.adapters):
        v = outcome.auditor.verdicts_[k] if outcome else None
        rows.append(
            {
                "name": a.name,
                "source": a.ref.source,
                "path": a.ref.path,
                "revision": a.ref.revision,
                "used": k in used,
                "weight": share.get(k) if weighted and (weights is not None or used) else None,
                "score": None if v is None else v.score,
                "flagged": None if v is None else v.flagged,
            }
        )
    return rows


def merged_plan(pool: Pool) -> ConfigPlan:
    """The config plan of the pool's merged adapter (:func:`clair_cli.io.lora_config.plan_merged`);
    its notes belong in the report and the card. Call it before the work: it refuses what a
    merged adapter cannot reproduce.

    Raises:
        IncompatibleAdapters: a LoRA variant, or inputs that replicate layers differently.
    """
    from clair_cli.io.lora_config import plan_merged

    return plan_merged(pool.adapters, pool.modules, pool.base_model)


def merged_stream(root: Path, pool: Pool, options: MergeOptions | None = None) -> MergedStream:
    """The sink :func:`clair_cli.pipeline.merge` writes the merged tensors into, module by module
    (``root``: the staging directory of ``--out``); :func:`write_merged` then adds the config and card.
    MLX-LM adapters, whose every module takes one rank, known once all are merged, are staged at their
    own ranks and padded to one as the sink closes (:class:`~clair_cli.io.peft_writer.MergedStream`)."""
    from clair_cli.io.peft_writer import MergedStream
    from clair_cli.pipeline import merged_rank_bound

    first = pool.adapters[0]
    diffusion = first.layout not in ("peft", "mlx")
    metadata = merged_metadata([a.file_metadata for a in pool.adapters]) if diffusion else None
    return MergedStream(root, first.modules, merged_rank_bound(pool, options), first.layout, metadata)


def write_merged(  # noqa: PLR0913 - every part of the card, as the merge command has them
    root: Path,
    pool: Pool,
    merged: MergedAdapter,
    outcome: AuditOutcome | None,
    report: dict[str, Any] | None,
    notes: Sequence[str],
    argv: Sequence[str],
    params: dict[str, Any] | None = None,
    plan: ConfigPlan | None = None,
) -> None:
    """Write the merged adapter (config, tensors unless ``merged`` was streamed there already, model card)
    into the staging directory ``root``; ``params``: the
    audit's settings, listed in the card where an audit ran; ``plan``: :func:`merged_plan`'s
    (made here when not given; its notes are then added to the card's)."""
    from clair_cli import methods
    from clair_cli.io.lora_config import lora_config
    from clair_cli.io.mlx import merged_config as merged_mlx_config
    from clair_cli.io.peft_writer import merged_tensors, save_adapter
    from clair_cli.report.audit import summary_line
    from clair_cli.report.card import model_card

    if plan is None:
        plan = merged_plan(pool)
        notes = [*notes, *plan.notes]
    layout = pool.adapters[0].layout
    # Scale 1 everywhere: alpha = r in every module (a diffusion file carries no config: kohya's
    # alpha tensors say it, and diffusers reads a file without alphas so; an MLX-LM config, scale 1
    # at the largest rank, to which every module is padded).
    config = None
    if layout == "peft":
        config = lora_config(plan, {m: (r.rank, r.rank) for m, r in merged.modules.items()})
    elif layout == "mlx":
        rank = max(r.rank for r in merged.modules.values())
        config = merged_mlx_config([a.config.raw for a in pool.adapters], rank, merged.modules)
    tensors = (
        None
        if merged.streamed
        else merged_tensors(pool.adapters[0].modules, {m: (r.A, r.B) for m, r in merged.modules.items()}, layout)
    )
    card = model_card(
        f"Merged LoRA adapter ({merged.method})",
        merged.method,
        pool.base_model,
        sources_table(pool, merged.used, outcome, merged.weights, methods.get(merged.method).weighted),
        command_line(argv),
        summary_line(report, timing=False) if report else None,
        [*pool.notes, *notes, *_layout_notes(layout)],
        merge=merged.summary(),
        params=params,
        library=_LIBRARY.get(layout, "diffusers"),
    )
    save_adapter(
        root, config, tensors, card, **_layout_files(layout, merged_metadata([a.file_metadata for a in pool.adapters]))
    )


# The Hub's library_name of a written adapter, by layout (diffusers for the diffusion layouts).
_LIBRARY = {"peft": "peft", "mlx": "mlx"}


def _layout_notes(layout: str, merged: bool = True) -> list[str]:
    """How to load an adapter written in a diffusion ``layout`` (none for PEFT's); ``merged``: a merge
    (scale 1 in every module) or a refined source (its own alphas)."""
    if layout == "peft":
        return []
    if layout == "mlx":
        scales = (
            "scale 1 and every module at the largest merged rank (zeros beyond its own)"
            if merged
            else ("its source's rank and scale")
        )
        return [
            f"an MLX-LM adapter (adapters.safetensors and its sources' adapter_config.json, {scales}): "
            "mlx_lm.load(BASE, adapter_path=DIR) or mlx_lm.generate --adapter-path DIR loads it"
        ]
    if layout == "comfyui":
        scales = "no alphas: scale 1 in every module" if merged else "the source's alphas"
        return [
            f"a ComfyUI LoRA file (the sources' keys, {scales}): ComfyUI takes the file as it is; diffusers' "
            "pipe.load_lora_weights(DIR) reads this layout in its Wan and Qwen-Image pipelines, and in Flux's "
            "for lora_down / lora_up files"
        ]
    return [
        f"a {layout} LoRA file, as its sources: pipe.load_lora_weights(DIR) loads it in diffusers"
        + ("; A1111 and ComfyUI take the file as it is" if layout == "kohya" else "")
    ]


def _layout_files(layout: str, metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """:func:`clair_cli.io.peft_writer.save_adapter`'s file options for an adapter of ``layout``."""
    from clair_cli.constants import DIFFUSERS_WEIGHTS_NAME, MLX_WEIGHTS_NAME

    if layout == "peft":
        return {}
    if layout == "mlx":
        return {"weights_name": MLX_WEIGHTS_NAME}
    return {"weights_name": DIFFUSERS_WEIGHTS_NAME, "metadata": metadata}


def write_refined(
    root: Path,
    pool: Pool,
    outcome: AuditOutcome,
    bases: dict[str, torch.Tensor | None],
    report: dict[str, Any],
    argv: Sequence[str],
    progress: Progress,
    params: dict[str, Any] | None = None,
) -> list[int]:
    """Write each collaborator's refined adapter to ``root/<name>/`` (``root``: the staging
    directory of ``--out``); returns their indices."""
    from clair_cli.io.lora_config import ignored_note
    from clair_cli.io.peft_writer import refined_tensors, save_adapter, source_config
    from clair_cli.pipeline import refined_factors
    from clair_cli.report.audit import summary_line
    from clair_cli.report.card import model_card

    used = list(outcome.auditor.collaborative_set_)
    side = "in" if outcome.settings.side == "in" else "out"
    for i, k in enumerate(used):
        adapter = pool.adapters[k]
        factors, unchanged = refined_factors(adapter, bases, side)
        tensors = refined_tensors(adapter, factors)
        # A diffusion file keeps its own alphas (kohya's tensors, diffusers' metadata) and has no config;
        # an MLX-LM adapter keeps its config (its rank and scale) as it is.
        config = source_config(adapter) if adapter.layout in ("peft", "mlx") else None
        notes = list(pool.notes)
        ignored = ignored_note(adapter.config, adapter.modules)
        if ignored:
            notes.append(f"as in its source, {ignored}")
        if unchanged:
            notes.append(
                f"{len(unchanged)} module(s) kept unchanged (no shared structure, or projection did not predict "
                "held-out adapters better there)"
            )
        if pool.dropped:
            notes.append(f"{len(pool.dropped)} module(s) outside the analysed intersection kept unchanged")
        card = model_card(
            f"{adapter.name}, refined by CLAIR",
            "refine",
            pool.base_model,
            sources_table(pool, used, outcome),
            command_line(argv),
            summary_line(report, timing=False),
            [*notes, *_layout_notes(adapter.layout, merged=False)],
            params=params,
            library=_LIBRARY.get(adapter.layout, "diffusers"),
        )
        save_adapter(
            root,
            config,
            tensors,
            card,
            name=adapter.name,
            **_layout_files(adapter.layout, refined_metadata(adapter.file_metadata)),
        )
        progress("writing adapters", i + 1, len(used))
    return used
