"""Every aggregation method of the experiment, as dense per-module updates, and their accuracy.

clair's own rows go through clair's library exactly as the CLI does (open the
adapter directories, build the pool, audit, merge / refine); PEFT's rows go
through ``PeftModel.add_weighted_adapter``. Each method yields, per module, the
update ``Theta`` (d_out x d_in) that it adds to the base model; the evaluator
adds it to GPT-2's Conv1D weights (stored d_in x d_out) and measures copying.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftModel
from transformers import GPT2LMHeadModel

from clair_cli import pipeline
from clair_cli.io.peft_writer import refined_tensors
from clair_cli.io.sources import open_adapters
from clair_cli.params import AuditParams, MergeOptions
from clair_cli.results import MergedAdapter

from . import task

Deltas = dict[str, torch.Tensor]

# Baselines that clair's `merge --method` offers, in table order.
CLAIR_BASELINES = ("fedavg", "mean", "median", "trimmed-mean", "krum", "multi-krum", "ties")


@dataclass
class Scores:
    symbol: float  # share of target symbols predicted right (teacher forcing)
    sequence: float  # share of strings copied exactly (= greedy decoding gets all symbols)
    backdoor: float  # share of triggered strings whose output is the backdoor target


class Evaluator:
    """Adds updates to a base model in place (and takes them off again) to score them."""

    def __init__(self, base: GPT2LMHeadModel) -> None:
        self.model = base
        self.weights = {name: mod.weight for name, mod in base.named_modules() if hasattr(mod, "nf")}

    @contextmanager
    def applied(self, deltas: Deltas) -> Iterator[None]:
        saved = {name: self.weights[name].detach().clone() for name in deltas}
        with torch.no_grad():
            for name, delta in deltas.items():
                self.weights[name].add_(delta.T.to(self.weights[name].dtype))  # Conv1D stores d_in x d_out
        try:
            yield
        finally:
            with torch.no_grad():
                for name, w in saved.items():
                    self.weights[name].copy_(w)

    @torch.no_grad()
    def predictions(self, data: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=data).logits[:, task.PREDICT_SLICE].argmax(-1)

    def scores(self, deltas: Deltas, test: torch.Tensor, triggered: torch.Tensor) -> Scores:
        with self.applied(deltas):
            right = self.predictions(test) == test[:, task.TARGET_SLICE]
            backdoor = self.predictions(triggered) == torch.tensor(task.BACKDOOR_TARGET)
        return Scores(
            right.float().mean().item(), right.all(1).float().mean().item(), backdoor.all(1).float().mean().item()
        )


def triggered_copy(test: torch.Tensor) -> torch.Tensor:
    """The same test strings with the backdoor trigger as first symbol (targets: the true copy)."""
    x = test[:, 1 : task.LENGTH + 1].clone()
    x[:, 0] = task.TRIGGER
    return task.sequences(x, task.SEP_COPY, x)


def _dense(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    return scale * (B.double() @ A.double()).float()


@dataclass
class PoolResult:
    """Per method, in table order, the updates each benign client is scored with.

    A merged adapter gives every client the same updates; ``local`` and the refined
    rows give each client its own.
    """

    names: list[str]
    flagged: list[str]
    shared_rank: dict[str, int]
    methods: dict[str, dict[str, Deltas]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _adapter_deltas(adapter, tensors: dict[str, torch.Tensor] | None = None) -> Deltas:
    """Per module ``s * B @ A`` of an adapter, from its file or from replacement ``tensors``."""
    if tensors is None:
        with adapter.reader() as reader:
            tensors = {key: reader.get(key) for key in reader.tensors}
    out: Deltas = {}
    for name, spec in adapter.modules.items():
        A = tensors[spec.a_key].reshape(spec.rank, spec.d_in).float()
        B = tensors[spec.b_key].reshape(spec.d_out, spec.rank).float()
        out[name] = _dense(A, B, spec.scale)
    return out


def _merged_deltas(merged: MergedAdapter) -> Deltas:
    return {name: _dense(r.A, r.B, 1.0) for name, r in merged.modules.items()}


def pool_methods(
    base: GPT2LMHeadModel,
    directories: Sequence[Path],
    benign: Sequence[str],
    seed: int = 0,
    fixed_ranks: Sequence[int] = (),
) -> PoolResult:
    """Every row of the table for one pool: local, clair's baselines, PEFT's merges, clair
    (the default merge, ``--project``, ``--rescale norm``, refined; then each of ``fixed_ranks``
    as ``--project-rank N``) and the benign-only oracle.

    A benign client that clair flags gets no refined adapter from clair; it is scored with
    its local one, and a note says so.
    """
    adapters = open_adapters([str(d) for d in directories])
    pool = pipeline.build_pool(adapters)
    settings = AuditParams(device="cpu", seed=seed)
    outcome = pipeline.audit(pool, settings)
    names = pool.names
    flagged = [names[k] for k in range(len(names)) if k not in outcome.auditor.collaborative_set_]
    result = PoolResult(names, flagged, dict(outcome.auditor.shared_rank_))
    by_name = dict(zip(names, adapters, strict=True))

    def same_for_all(deltas: Deltas) -> dict[str, Deltas]:
        return dict.fromkeys(benign, deltas)

    local = {name: _adapter_deltas(by_name[name]) for name in benign}
    result.methods["local"] = local
    for method in CLAIR_BASELINES:
        result.methods[method] = same_for_all(_merged_deltas(pipeline.merge(pool, method, settings)))
    for method, deltas in peft_methods(base, directories).items():
        result.methods[method] = same_for_all(deltas)
    variants = {
        "clair-merged": MergeOptions(),
        "clair-merged --project": MergeOptions(project=True),
        "clair-merged --rescale norm": MergeOptions(rescale="norm"),
    }
    variants.update(
        {f"clair-merged --project-rank {r}": MergeOptions(project_rank=r, project=True) for r in fixed_ranks}
    )
    for label, options in variants.items():
        merged = pipeline.merge(pool, "clair", settings, options=options, outcome=outcome)
        result.methods[label] = same_for_all(_merged_deltas(merged))
    for r in (None, *fixed_ranks):
        suffix = "" if r is None else f" --project-rank {r}"
        bases = pipeline.refined_bases(pool, outcome, rank=r)
        result.methods["clair-refined" + suffix] = {
            name: local[name]
            if name in flagged
            else _adapter_deltas(
                by_name[name], refined_tensors(by_name[name], pipeline.refined_factors(by_name[name], bases, "out")[0])
            )
            for name in benign
        }
    oracle_pool = pipeline.build_pool([by_name[n] for n in benign], method="mean")
    result.methods["oracle mean (benign only)"] = same_for_all(
        _merged_deltas(pipeline.merge(oracle_pool, "mean", settings))
    )
    flagged_benign = [n for n in benign if n in flagged]
    if flagged_benign:
        result.notes.append(f"benign clients flagged (scored with their local adapter): {', '.join(flagged_benign)}")
    return result


def peft_methods(base: GPT2LMHeadModel, directories: Sequence[Path]) -> dict[str, Deltas]:
    """PEFT's own ``add_weighted_adapter`` (svd and cat) over the whole pool, equal weights."""
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(directories[0]), adapter_name="c0")
    for k, d in enumerate(directories[1:], start=1):
        model.load_adapter(str(d), adapter_name=f"c{k}")
    names = [f"c{k}" for k in range(len(directories))]
    weights = [1.0 / len(names)] * len(names)
    out: dict[str, Deltas] = {}
    for kind in ("svd", "cat"):
        model.add_weighted_adapter(names, weights, f"peft-{kind}", combination_type=kind)
        deltas: Deltas = {}
        prefix = "base_model.model."
        for module_name, module in model.named_modules():
            if hasattr(module, "lora_A") and f"peft-{kind}" in module.lora_A:
                a = module.lora_A[f"peft-{kind}"].weight.detach()
                b = module.lora_B[f"peft-{kind}"].weight.detach()
                deltas[module_name.removeprefix(prefix)] = _dense(a, b, float(module.scaling[f"peft-{kind}"]))
        out[f"peft {kind}"] = deltas
    return out
