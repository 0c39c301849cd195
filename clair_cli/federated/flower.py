"""CLAIR as a Flower strategy: ``ClairStrategy`` for federated LoRA fine-tuning.

Install with ``pip install 'clair-lora[flower]'``. The strategy runs on Flower's Message API
(``flwr.serverapp.strategy``): it is a ``FedAvg`` whose ``aggregate_train`` reads each
reply's LoRA state dict (``...lora_A.weight`` / ``...lora_B.weight``, as
``get_peft_model_state_dict`` writes them), audits the clients' updates with the engine of
``clair audit``, and returns the collaborators' mean update written as the next global
LoRA at the configured rank (:mod:`clair_cli.federated` has the math). Each round's
metrics carry every client's score and verdict; with ``audit_dir`` each round's ``clair
audit`` JSON report is written there too.

A reply that is not a client's LoRA factors (other tensors, DoRA, LoRA biases, ranks or
modules other than the strategy's ``LoraConfig``, two tensors for one factor, NaN or infinite
values, factors whose update would overflow the analysis, arrays that do not decode, a missing
or negative weight, secure-aggregation records) is flagged with its reason and left out; the
round goes on, whatever the reply's bytes raise. Metrics that cannot be aggregated are dropped,
not the round. Refused with a :class:`clair_cli.errors.ClairError`: a ``LoraConfig`` that is
not LoRA, a global adapter that does not match it, and a round in which every reply carries
secure-aggregation records (the server runs SecAgg, which hides each client's factors, what
clair needs).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from logging import INFO
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clair_cli.constants import LORA_KEY_RE, PEFT_KEY_PREFIX
from clair_cli.errors import AdapterFormatError, ClairError, IncompatibleAdapters, UsageError
from clair_cli.federated.rounds import (
    TOO_FEW_CHOICES,
    WEIGHT_CAP,
    RoundResult,
    TooFew,
    aggregate_round,
    capped_weights,
    quoted,
)
from clair_cli.io.writers import write_text
from clair_cli.report import json_text

try:
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import FedAvg
    from flwr.supercore import log
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "clair_cli.federated.flower needs Flower: pip install 'clair-lora[flower]' "
        f"(the Message API, flwr.serverapp.strategy; import failed with: {exc})"
    ) from exc

if TYPE_CHECKING:
    import torch

    from clair_cli.params import AuditParams, MergeOptions
    from clair_cli.types import AdapterConfig

SECAGG_MARKERS = ("secagg",)
METRIC_PREFIX = "clair"


def parse_lora_config(config: Any) -> AdapterConfig:
    """clair's view of a PEFT ``LoraConfig`` (or the dict of one): ranks and scales per module.

    Raises:
        AdapterFormatError: not a LoRA config, or DoRA (magnitude vectors are not LoRA factors).
    """
    from clair_cli.io.peft_config import parse_config

    data = dict(config.to_dict()) if hasattr(config, "to_dict") else dict(config)
    for key in ("target_modules", "modules_to_save"):
        if isinstance(data.get(key), set):
            data[key] = sorted(data[key])
    parsed = parse_config(data, "LoraConfig")
    if parsed.use_dora:
        raise AdapterFormatError(
            "LoraConfig: use_dora=True; ClairStrategy aggregates plain LoRA factors",
            hint="Train without DoRA, or aggregate with a Flower strategy that averages every tensor.",
        )
    return parsed


def split_state_dict(
    name: str, state: Mapping[str, torch.Tensor]
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, tuple[str, str]]]:
    """Per module ``(A, B)`` from a LoRA state dict, and the keys they came from.

    Raises:
        AdapterFormatError: a tensor that is not a LoRA factor, an unpaired factor, or a
            factor that is not a floating-point matrix.
    """
    import torch

    parts: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    kinds: dict[str, set[str]] = {}
    for key, value in state.items():
        short = key[len(PEFT_KEY_PREFIX) :] if key.startswith(PEFT_KEY_PREFIX) else key
        m = LORA_KEY_RE.match(short)
        ok = m is not None and (
            (m["part"] in ("lora_A", "lora_B") and m["suffix"] == ".weight")
            or (m["part"].startswith("lora_embedding") and m["suffix"] is None)
        )
        if not ok or m is None:
            raise AdapterFormatError(
                f"{name}: {quoted(key)} is not a LoRA factor (expected '<module>.lora_A.weight' / '.lora_B.weight')",
                hint="Send only get_peft_model_state_dict(model) of a plain LoRA (no modules_to_save, "
                "bias='none', no DoRA).",
            )
        part = "A" if m["part"].endswith("A") else "B"
        kind = "embedding" if m["part"].startswith("lora_embedding") else "linear"
        entry = parts.setdefault(m["module"], {})
        if part in entry:  # two keys for one factor (with and without the prefix, or ``.default``)
            raise AdapterFormatError(
                f"{name}: {quoted(entry[part][0])} and {quoted(key)} are both "
                f"module {quoted(m['module'])}'s lora_{part}"
            )
        entry[part] = (key, value)
        kinds.setdefault(m["module"], set()).add(kind)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    keys: dict[str, tuple[str, str]] = {}
    for module, p in sorted(parts.items()):
        if set(p) != {"A", "B"}:
            raise AdapterFormatError(f"{name}: module {quoted(module)} has lora_{next(iter(p))} but not its pair")
        if len(kinds[module]) > 1:
            raise AdapterFormatError(f"{name}: module {quoted(module)} pairs an embedding factor with a linear one")
        (ka, A), (kb, B) = p["A"], p["B"]
        if A.dim() != 2 or B.dim() != 2 or not A.is_floating_point() or not B.is_floating_point():
            raise AdapterFormatError(
                f"{name}: module {quoted(module)}: LoRA factors must be floating-point matrices, got "
                f"{A.dtype} {tuple(A.shape)} and {B.dtype} {tuple(B.shape)}",
                hint="Integer arrays are what secure aggregation's masking sends; clair needs the factors.",
            )
        # float64 stays float64 until the audit reads it (``in_dtype`` balances its factors
        # before narrowing them, so an ill-conditioned factorisation keeps its update).
        factors[module] = (A, B) if A.dtype == B.dtype == torch.float64 else (A.float(), B.float())
        keys[module] = (ka, kb)
    if not factors:
        raise AdapterFormatError(f"{name}: the reply holds no LoRA factor")
    return factors, keys


SECAGG_REASON = "carries secure-aggregation records (masked updates are not LoRA factors)"


def _secure_aggregation(message: Message) -> bool:
    """Whether a reply carries records of secure aggregation (SecAgg / SecAgg+): a record or
    config key named for it."""
    content = message.content
    names = [*content.config_records.keys(), *content.array_records.keys(), *content.metric_records.keys()]
    for record in content.config_records.values():
        names.extend(record.keys())
    return any(marker in str(n).lower() for n in names for marker in SECAGG_MARKERS)


def _refuse_secure_aggregation(replies: list[Message]) -> None:
    """Refuse the run when every reply (two or more) carries secure-aggregation records: the
    server runs SecAgg, which hides what clair needs. One client's such reply is only that
    client's (left out with its reason), or any client could stop the federation."""
    if len(replies) > 1 and all(_secure_aggregation(m) for m in replies):
        raise UsageError(
            "every reply carries secure-aggregation records; ClairStrategy needs each client's LoRA "
            "factors, which secure aggregation hides",
            hint="Run ClairStrategy without SecAgg/SecAgg+ (the server must see every client's update).",
        )


def reply_state_dict(name: str, record: ArrayRecord) -> dict[str, torch.Tensor]:
    """A reply's arrays as tensors (``ArrayRecord.to_torch_state_dict``, with every failure one
    :class:`AdapterFormatError` naming the array: bytes that are not a NumPy array, another
    serialisation, a dtype torch has no tensor of). Big-endian floating-point arrays are read
    in the machine's byte order.

    Raises:
        AdapterFormatError: an array that cannot be read as a tensor.
    """
    import numpy as np
    import torch

    out: dict[str, torch.Tensor] = {}
    for key in record:
        try:
            array = record[key].numpy()
            if array.dtype.kind == "f" and not array.dtype.isnative:
                array = array.astype(array.dtype.newbyteorder("="))
            out[key] = torch.from_numpy(np.ascontiguousarray(array))
        except Exception as exc:  # noqa: BLE001 - a client's bytes: any failure is a malformed reply
            raise AdapterFormatError(
                f"{name}: array {quoted(key)} cannot be read as a tensor ({type(exc).__name__}: {str(exc)[:200]})"
            ) from None
    return out


def _metric_weight(record: Any, key: str) -> float | None:
    """A metric record's weight: a finite non-negative number (not a boolean), else None."""
    value = record.get(key) if key in record else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    weight = float(value)
    return weight if math.isfinite(weight) and weight >= 0 else None


def _layout(content: Any) -> frozenset[tuple[str, int]]:
    """A reply's metric layout: each key with -1 for a number, the length for a list."""
    record = next(iter(content.metric_records.values()))
    return frozenset((key, len(value) if isinstance(value, list) else -1) for key, value in record.items())


def _with_weight(content: Any, key: str, weight: float) -> Any:
    """A copy of a reply's content whose one MetricRecord has ``key`` set to ``weight``."""
    (name, record), *_ = content.metric_records.items()
    out = RecordDict(dict(content.items()))
    out[name] = MetricRecord({**dict(record.items()), key: weight})
    return out


def _finite_metric(value: Any) -> bool:
    """Whether a metric value (a number or a list of numbers) is finite throughout."""
    values = value if isinstance(value, list) else [value]
    return all(isinstance(v, int) or (isinstance(v, float) and math.isfinite(v)) for v in values)


class ClairStrategy(FedAvg):
    """Flower's ``FedAvg`` with CLAIR's audit and merge in ``aggregate_train``.

    Args:
        lora_config: the clients' PEFT ``LoraConfig`` (or its dict): ranks and scales.
        settings: the audit settings (``clair audit``'s defaults when None).
        merge_options: how the collaborators' mean is formed (None: ``clair merge``'s defaults
            with the norm bound and centred clipping on, as every round).
        on_too_few: with fewer auditable replies than clair's minimum (5), ``"skip"`` keeps
            the global LoRA for that round, ``"median"`` takes the updates' geometric median
            (from three replies on; fewer are skipped). The round's metrics and history say which.
        audit_dir: where to write each round's ``clair audit`` JSON report
            (``round-001.json``, ...); None writes none.
        base_model: the base model's name, for the reports.
        weight_cap: a reply's weight (its ``num-examples``, or ``weighted_by_key``: what the
            client claims) counts at most this many times the median weight of the round's
            collaborators
            (:func:`clair_cli.federated.rounds.capped_weights`); None: FedAvg's weights, uncapped.
        **kwargs: ``FedAvg``'s own arguments (fractions, minimum nodes, keys, ...).

    Attributes:
        history: per round, a dict of what was decided (clients, flags, scores, reasons,
            truncation error, fallback, seconds).
        reports: per round, the ``clair audit`` JSON report (when an audit ran).
    """

    def __init__(
        self,
        lora_config: Any,
        *,
        settings: AuditParams | None = None,
        merge_options: MergeOptions | None = None,
        on_too_few: TooFew = "skip",
        audit_dir: str | Path | None = None,
        base_model: str | None = None,
        weight_cap: float | None = WEIGHT_CAP,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if weight_cap is not None and not (math.isfinite(weight_cap) and weight_cap >= 1):
            raise UsageError(f"weight_cap={weight_cap!r}: expected a number of at least 1, or None")
        self.weight_cap = weight_cap
        if on_too_few not in TOO_FEW_CHOICES:
            raise UsageError(f"on_too_few={on_too_few!r}: expected one of {', '.join(TOO_FEW_CHOICES)}")
        self.config = parse_lora_config(lora_config)
        self.settings = settings
        self.merge_options = merge_options
        self.on_too_few = on_too_few
        self.audit_dir = None if audit_dir is None else Path(audit_dir)
        self.base_model = base_model or self.config.base_model
        self.history: list[dict[str, Any]] = []
        self.reports: dict[int, dict[str, Any]] = {}
        self._round_arrays: dict[int, ArrayRecord] = {}

    def summary(self) -> None:
        """Log the strategy's settings (Flower calls it when the run starts)."""
        log(INFO, "\t├──> CLAIR: LoRA r=%s, alpha=%s", self.config.r, self.config.lora_alpha)
        log(INFO, "\t│\t├── too few clients to audit: %s", self.on_too_few)
        log(INFO, "\t│\t└── weight cap: %s", "none" if self.weight_cap is None else f"{self.weight_cap}x the median")
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's, remembering the round's global LoRA: updates are measured from it."""
        self._round_arrays = {server_round: arrays}
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Audit the replies' updates, merge the collaborators', return the next global LoRA."""
        replies = list(replies)
        _refuse_secure_aggregation([m for m in replies if not m.has_error()])
        # FedAvg's own consistency check would drop the whole round for one odd reply;
        # each reply is checked on its own below instead.
        valid, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        if not valid:
            return None, None
        if server_round not in self._round_arrays:
            raise UsageError(f"round {server_round}: aggregate_train without configure_train")
        start = time.perf_counter()
        valid.sort(key=lambda m: m.metadata.src_node_id)
        global_state = self._round_arrays[server_round].to_torch_state_dict()
        global_factors, keys = split_state_dict("the global adapter", global_state)
        scales = {m: self.config.scale_for(m) for m in global_factors}
        ranks = {m: self.config.rank_for(m) for m in global_factors}
        for m, (A, _B) in global_factors.items():
            if A.shape[0] != ranks[m]:
                raise IncompatibleAdapters(
                    f"module {m}: the global adapter has rank {A.shape[0]}, the LoraConfig gives {ranks[m]}",
                    hint="Give ClairStrategy the LoraConfig the clients train.",
                )
        clients: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        refused: dict[str, str] = {}
        weights: list[float] = []
        node_of: dict[str, int] = {}
        sent = Counter(msg.metadata.src_node_id for msg in valid)
        for msg in valid:
            name = f"node-{msg.metadata.src_node_id}"
            node_of[name] = msg.metadata.src_node_id
            if sent[node_of[name]] > 1:  # which of its replies counts? none
                refused[name] = f"malformed reply: node {node_of[name]} sent {sent[node_of[name]]} replies this round"
                continue
            try:  # one unreadable reply is left out with its reason; the round goes on
                factors, weight = self._read_reply(name, msg)
            except ClairError as exc:
                refused[name] = f"malformed reply: {exc.message}"
                continue
            except Exception as exc:  # noqa: BLE001 - whatever a client's bytes do, only its reply is lost
                refused[name] = f"malformed reply: cannot be read ({type(exc).__name__}: {str(exc)[:200]})"
                continue
            clients[name] = factors
            weights.append(weight)
        result = aggregate_round(
            global_factors,
            clients,
            scales,
            ranks,
            weights=weights,
            settings=self.settings,
            merge_options=self.merge_options,
            base_model=self.base_model,
            on_too_few=self.on_too_few,
            refused=refused,
            weight_cap=self.weight_cap,
        )
        state = {}
        for m, (A, B) in result.global_factors.items():
            ka, kb = keys[m]
            state[ka] = A.float().contiguous()
            state[kb] = B.float().contiguous()
        arrays = ArrayRecord({k: state[k] for k in global_state})  # the global's key order
        left_out = {n for n, f in zip(result.names, result.flagged, strict=True) if f}
        left_out |= set(refused)
        kept = [msg.content for msg in valid if f"node-{msg.metadata.src_node_id}" not in left_out]
        metrics = self._metrics(kept, self.train_metrics_aggr_fn, "train")
        for key, value in self._round_metrics(result, [node_of[n] for n in result.names]).items():
            metrics[key] = value
        self._record(server_round, result, time.perf_counter() - start)
        return arrays, metrics

    def _read_reply(self, name: str, msg: Message) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
        """A reply's LoRA factors and merge weight.

        Raises:
            AdapterFormatError: not LoRA factors (see :func:`split_state_dict`), or a weight
                that is missing, not finite or negative.
        """
        content = msg.content
        if _secure_aggregation(msg):
            raise AdapterFormatError(f"{name}: the reply {SECAGG_REASON}")
        if len(content.array_records) != 1 or len(content.metric_records) != 1:
            raise AdapterFormatError(
                f"{name}: the reply holds {len(content.array_records)} ArrayRecord(s) and "
                f"{len(content.metric_records)} MetricRecord(s); expected one of each"
            )
        record = next(iter(content.array_records.values()))
        factors, _ = split_state_dict(name, reply_state_dict(name, record))
        metrics = next(iter(content.metric_records.values()))
        weight = _metric_weight(metrics, self.weighted_by_key)  # the metrics' own test of a weight
        if weight is None:
            raise AdapterFormatError(f"{name}: the metric {self.weighted_by_key!r} is not a non-negative number")
        return factors, weight

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """FedAvg's, without its all-or-nothing check (which ends the run for one odd reply): the
        replies whose metrics cannot be aggregated are left out with a log line (:meth:`_metrics`)."""
        valid, _ = self._check_and_log_replies(list(replies), is_train=False, validate=False)
        metrics = self._metrics([msg.content for msg in valid], self.evaluate_metrics_aggr_fn, "evaluate")
        return metrics if len(metrics) else None

    def _metrics(self, contents: list[Any], aggregate: Any, what: str) -> MetricRecord:
        """The replies' metrics aggregated as FedAvg does, from the replies that can be: one
        MetricRecord whose weight (``weighted_by_key``) is a non-negative number and whose values
        are finite, with the most common layout (keys, and a number or a list of one length for
        each). Each weight counts at most ``weight_cap`` times the median weight, as in the merge
        (:func:`clair_cli.federated.rounds.capped_weights`): a client's claim sets its share of
        the round's metrics no more than of its model. The aggregator gets the replies as they
        came, with all their records, but for the weight of a reply the cap lowered. Replies
        left out are logged; metrics that cannot be aggregated at all are dropped, never the run."""
        usable = []
        for content in contents:
            if len(content.metric_records) != 1:
                continue
            record = next(iter(content.metric_records.values()))
            if _metric_weight(record, self.weighted_by_key) is not None and all(
                _finite_metric(v) for v in record.values()
            ):
                usable.append(content)
        if usable:
            common = Counter(_layout(c) for c in usable).most_common(1)[0][0]
            usable = [c for c in usable if _layout(c) == common]
        if len(usable) < len(contents):
            log(
                INFO,
                "CLAIR: %d of %d %s replies left out of the metrics (no single MetricRecord with a non-negative "
                "weight, non-finite values, or other keys or value lengths than the rest)",
                len(contents) - len(usable),
                len(contents),
                what,
            )
        if not usable:
            return MetricRecord()
        claimed = [_metric_weight(next(iter(c.metric_records.values())), self.weighted_by_key) or 0.0 for c in usable]
        _, lowered = capped_weights(claimed, self.weight_cap)
        for j, weight in lowered:
            usable[j] = _with_weight(usable[j], self.weighted_by_key, weight)
        try:  # weights summing to zero, a custom aggregator's own failure: the metrics are lost, not the round
            return aggregate(usable, self.weighted_by_key)
        except Exception as exc:  # noqa: BLE001
            log(INFO, "CLAIR: the %s metrics cannot be aggregated (%s: %s)", what, type(exc).__name__, exc)
            return MetricRecord()

    @staticmethod
    def _round_metrics(result: RoundResult, node_ids: list[int]) -> dict[str, int | float]:
        out: dict[str, int | float] = {
            f"{METRIC_PREFIX}-clients": len(node_ids),
            f"{METRIC_PREFIX}-flagged": sum(result.flagged),
            f"{METRIC_PREFIX}-fallback": int(result.fallback is not None),
            f"{METRIC_PREFIX}-truncation-error": max(result.truncation_error.values(), default=0.0),
        }
        for node, flag, score in zip(node_ids, result.flagged, result.scores, strict=True):
            out[f"{METRIC_PREFIX}-flagged-{node}"] = int(flag)
            out[f"{METRIC_PREFIX}-score-{node}"] = -1.0 if score is None else float(score)
        return out

    def _record(self, server_round: int, result: RoundResult, seconds: float) -> None:
        entry = {
            "round": server_round,
            "clients": result.names,
            "flagged": [n for n, f in zip(result.names, result.flagged, strict=True) if f],
            "scores": dict(zip(result.names, result.scores, strict=True)),
            "reasons": {n: r for n, r in zip(result.names, result.reasons, strict=True) if r},
            "truncation_error": {m: round(e, 8) for m, e in result.truncation_error.items()},
            "fallback": result.fallback,
            "notes": result.notes,
            "seconds": round(seconds, 3),
        }
        self.history.append(entry)
        if result.report is not None:
            report = dict(result.report)
            report["round"] = server_round
            self.reports[server_round] = report
            if self.audit_dir is not None:
                self.audit_dir.mkdir(parents=True, exist_ok=True)
                path = self.audit_dir / f"round-{server_round:03d}.json"
                # Atomically, as every report clair writes: a crash mid-round leaves no half file.
                write_text(str(path), json_text(report, indent=2) + "\n")
