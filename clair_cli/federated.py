"""One federated round with CLAIR: clients' LoRA factors in, the next global LoRA out.

This is the math of :class:`clair_cli.flower.ClairStrategy` without Flower (and so
testable without it). Each round:

1. every client ``k`` starts from the round's global LoRA ``(A_g, B_g)`` and returns
   ``(A_k, B_k)``; what it contributes is its update
   ``Delta_k = s B_k A_k - s B_g A_g``, written exactly as LoRA factors of rank ``2 r``:
   ``B = [B_k | -B_g]``, ``A = [A_k; A_g]`` (rank ``r`` while the global is zero);
2. the updates go through the same engine as ``clair audit``
   (:func:`clair_cli.pipeline.pool_from_factors`, :func:`~clair_cli.pipeline.audit`), and the
   flagged clients are left out;
3. the collaborators' updates are merged by ``clair merge``'s default, their exact weighted
   mean (:func:`clair_cli.pipeline.merge`);
4. the next global update ``s B_g A_g + mean_k Delta_k`` has rank up to ``r (|C| + 1)``,
   but the clients' ``LoraConfig`` fixes rank ``r``: it is written back at rank ``r`` by
   truncated SVD of the factored product (no dense matrix), and the relative Frobenius
   error of that truncation is reported per module.

A client whose factors equal the global ones (an exact zero update: a free rider who
sent the model back) cannot enter the decomposition (its update has no direction); it is
flagged before the audit with that reason. With fewer clients left than the engine's
minimum (``clair_cli.methods.get("clair").min_adapters``), nothing can be audited: the round keeps the global
adapter (``on_too_few="skip"``, the default) or takes the plain mean of every update
(``"mean"``), and says so.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from clair_cli import methods
from clair_cli.errors import IncompatibleAdapters
from clair_cli.types import AuditParams

if TYPE_CHECKING:
    import torch

    from clair_cli.pipeline import MergeOptions

Factors = tuple["torch.Tensor", "torch.Tensor"]  # (A: r x d_in, B: d_out x r)
TooFew = Literal["skip", "mean"]
TOO_FEW_CHOICES = ("skip", "mean")


@dataclass
class RoundResult:
    """What one round decided.

    Attributes:
        global_factors: the next global LoRA, per module ``(A, B)`` at the configured rank
            (its update is ``scale * B @ A``).
        names: the clients, in the order given.
        flagged: per client, whether it was left out of the aggregate.
        scores: per client, the engine's score (None for a client left out before the audit).
        reasons: per client, the reasons in words.
        report: the ``clair audit`` JSON report of the round (None when no audit ran).
        truncation_error: per module, relative Frobenius error of writing the global update
            at the configured rank.
        fallback: None, or what was done instead of an audit (``"skip"``, ``"mean"``).
        timing: seconds per stage.
    """

    global_factors: dict[str, Factors]
    names: list[str]
    flagged: list[bool]
    scores: list[float | None]
    reasons: list[list[str]]
    report: dict[str, Any] | None
    truncation_error: dict[str, float]
    fallback: str | None = None
    notes: list[str] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)

    @property
    def collaborators(self) -> list[str]:
        return [n for n, f in zip(self.names, self.flagged, strict=True) if not f]


def client_update(
    client: Mapping[str, Factors], global_factors: Mapping[str, Factors], scales: Mapping[str, float]
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """A client's update ``s B_k A_k - s B_g A_g`` per module, as exact LoRA factors."""
    import torch

    out = {}
    for module, (A, B) in client.items():
        Ag, Bg = global_factors[module]
        if not bool(Bg.any()) or not bool(Ag.any()):
            out[module] = (A, B, scales[module])
        else:
            out[module] = (torch.cat([A, Ag.to(A.dtype)], 0), torch.cat([B, -Bg.to(B.dtype)], 1), scales[module])
    return out


def _unchanged(client: Mapping[str, Factors], global_factors: Mapping[str, Factors]) -> bool:
    import torch

    for module, (A, B) in client.items():
        Ag, Bg = global_factors[module]
        if not bool(B.any()) and not bool(Bg.any()):
            continue
        if not (torch.equal(A, Ag.to(A.dtype)) and torch.equal(B, Bg.to(B.dtype))):
            return False
    return True


def check_factors(
    name: str, client: Mapping[str, Factors], global_factors: Mapping[str, Factors], ranks: Mapping[str, int]
) -> None:
    """Refuse a client whose modules or ranks differ from the global adapter's.

    Raises:
        IncompatibleAdapters: other modules than the global adapter, or another rank than
            the configured one (the global adapter could not be loaded back).
    """
    if set(client) != set(global_factors):
        diff = sorted(set(client) ^ set(global_factors))
        raise IncompatibleAdapters(
            f"{name} sent LoRA modules other than the global adapter's ({len(diff)} differ, e.g. {diff[0]})",
            hint="Every client must train the LoraConfig the strategy was given.",
        )
    for module, (A, B) in client.items():
        Ag, Bg = global_factors[module]
        if A.shape != Ag.shape or B.shape != Bg.shape:
            raise IncompatibleAdapters(
                f"{name}: module {module}: factors of shapes A {tuple(A.shape)}, B {tuple(B.shape)}; the "
                f"global adapter has A {tuple(Ag.shape)}, B {tuple(Bg.shape)} (rank {ranks[module]} in the LoraConfig)",
                hint="Clients of one run must use the strategy's LoraConfig: clair merges updates, but the "
                "global adapter it sends back has one rank per module.",
            )


def _refactor(
    global_factors: Mapping[str, Factors],
    merged: Mapping[str, Factors],
    scales: Mapping[str, float],
    ranks: Mapping[str, int],
) -> tuple[dict[str, Factors], dict[str, float]]:
    """``s B_g A_g + B_m A_m`` per module, at the configured rank, as factors with scale ``s``."""
    import torch

    from clair_cli.core.lowrank import truncate_factored

    out: dict[str, Factors] = {}
    errors: dict[str, float] = {}
    for module, (Ag, Bg) in global_factors.items():
        s = scales[module]
        Am, Bm = merged[module]
        A = torch.cat([Ag.double(), Am.double()], 0)
        B = torch.cat([s * Bg.double(), Bm.double()], 1)
        a, b, err = truncate_factored(A, B, ranks[module])
        r = ranks[module]
        if a.shape[0] < r:  # the product has lower rank: pad with zero directions
            a = torch.cat([a, a.new_zeros(r - a.shape[0], a.shape[1])], 0)
            b = torch.cat([b, b.new_zeros(b.shape[0], r - b.shape[1])], 1)
        root = math.sqrt(abs(s)) if s else 1.0
        sign = -1.0 if s < 0 else 1.0
        out[module] = ((a / root).to(Ag.dtype), (sign * b / root).to(Bg.dtype))
        errors[module] = float(err)
    return out, errors


def aggregate_round(
    global_factors: Mapping[str, Factors],
    clients: Mapping[str, Mapping[str, Factors]],
    scales: Mapping[str, float],
    ranks: Mapping[str, int],
    *,
    weights: Sequence[float] | None = None,
    settings: AuditParams | None = None,
    merge_options: MergeOptions | None = None,
    base_model: str | None = None,
    on_too_few: TooFew = "skip",
) -> RoundResult:
    """Audit the clients' updates, merge the collaborators', and write the next global LoRA.

    Args:
        global_factors: the round's global LoRA, per module ``(A, B)``.
        clients: per client name, per module ``(A, B)`` as trained from the global LoRA.
        scales: per module, the LoRA scale (alpha / r, or alpha / sqrt(r) with rsLoRA).
        ranks: per module, the configured rank of the global LoRA.
        weights: per client merge weight (e.g. its number of examples); equal when None.
        settings: the audit settings (``clair audit``'s defaults when None).
        merge_options: how the collaborators' mean is formed (``clair merge``'s defaults).
        base_model: named in the report.
        on_too_few: with fewer auditable clients than the engine's minimum, ``"skip"``
            keeps the global LoRA, ``"mean"`` merges every update unaudited.

    Raises:
        IncompatibleAdapters: a client's modules or ranks differ from the global LoRA's.
        ValueError: ``on_too_few`` is not one of ``TOO_FEW_CHOICES``.
    """
    from clair_cli import pipeline
    from clair_cli.report.audit import audit_report

    if on_too_few not in TOO_FEW_CHOICES:
        raise ValueError(f"on_too_few must be one of {', '.join(TOO_FEW_CHOICES)}, got {on_too_few!r}")
    start = time.perf_counter()
    settings = settings or AuditParams()
    names = list(clients)
    for name in names:
        check_factors(name, clients[name], global_factors, ranks)
    if weights is not None and len(weights) != len(names):
        raise ValueError(f"expected {len(names)} weights, got {len(weights)}")
    flagged = [False] * len(names)
    scores: list[float | None] = [None] * len(names)
    reasons: list[list[str]] = [[] for _ in names]
    for i, name in enumerate(names):
        if _unchanged(clients[name], global_factors):
            flagged[i] = True
            reasons[i].append("sent the global adapter back unchanged (a zero update: free rider?)")
    live = [i for i in range(len(names)) if not flagged[i]]
    updates = {names[i]: client_update(clients[names[i]], global_factors, scales) for i in live}
    live_weights = None if weights is None else [float(weights[i]) for i in live]
    notes: list[str] = []
    report = None
    fallback = None
    timing: dict[str, float] = {}

    def unchanged(report: dict[str, Any] | None, fallback: str) -> RoundResult:
        """The round keeps the global adapter as it is."""
        return RoundResult(
            {m: (A.clone(), B.clone()) for m, (A, B) in global_factors.items()},
            names,
            flagged,
            scores,
            reasons,
            report,
            dict.fromkeys(global_factors, 0.0),
            fallback,
            notes,
            timing | {"total": time.perf_counter() - start},
        )

    need = methods.get("clair").min_adapters
    if len(live) < need:
        fallback = on_too_few
        what = "the global adapter is kept unchanged" if on_too_few == "skip" else "their plain mean is taken unaudited"
        notes.append(f"{len(live)} client update(s) to audit, fewer than clair's minimum of {need}: {what}")
        if on_too_few == "skip" or not live:
            return unchanged(None, fallback)
        pool = pipeline.pool_from_factors(updates, base_model, method="mean")
        merged = pipeline.merge(pool, "mean", settings, live_weights, merge_options)
    else:
        pool = pipeline.pool_from_factors(updates, base_model)
        outcome = pipeline.audit(pool, settings)
        timing["audit"] = outcome.timing["audit"]
        report = audit_report(outcome)
        for j, i in enumerate(live):
            verdict = report["adapters"][j]
            scores[i] = float(verdict["score"])
            flagged[i] = bool(verdict["flagged"])
            reasons[i] = [r["text"] for r in verdict["reasons"]]
        if not outcome.auditor.collaborative_set_:
            notes.append("every client was flagged: the global adapter is kept unchanged")
            return unchanged(report, "skip")
        t0 = time.perf_counter()
        merged = pipeline.merge(pool, "clair", settings, live_weights, merge_options, outcome)
        timing["merge"] = time.perf_counter() - t0
    merged_factors = {m: (r.A, r.B) for m, r in merged.modules.items()}
    new_global, errors = _refactor(global_factors, merged_factors, scales, ranks)
    timing["total"] = time.perf_counter() - start
    return RoundResult(new_global, names, flagged, scores, reasons, report, errors, fallback, notes, timing)
