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
round goes on, whatever the reply's bytes raise. A reply's key names are checked before its
arrays are decoded. Metrics that cannot be aggregated are dropped, not the round. Each round
logs one line (Flower's logger) of who was left out and why, and leaves an entry in
``history``, a round of error replies included. Refused with a
:class:`clair_cli.errors.ClairError`: a ``LoraConfig`` that is not LoRA, a global adapter that
does not match it, and train instructions that carry secure-aggregation records (the server
runs SecAgg, which hides each client's factors, what clair needs; decided from what the server
sends, never from the replies).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from logging import INFO, WARNING
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
    check_modules,
    quoted,
)
from clair_cli.io.writers import write_text
from clair_cli.report import json_text

try:
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import FedAvg
    from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
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


def lora_keys(name: str, keys: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Per module, the keys of its ``A`` and ``B`` factors, from a LoRA state dict's key names
    alone (nothing decoded).

    Raises:
        AdapterFormatError: a key that is not a LoRA factor's, two keys for one factor, an
            unpaired factor, or an embedding factor paired with a linear one.
    """
    parts: dict[str, dict[str, str]] = {}
    kinds: dict[str, set[str]] = {}
    for key in keys:
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
                f"{name}: {quoted(entry[part])} and {quoted(key)} are both module {quoted(m['module'])}'s lora_{part}"
            )
        entry[part] = key
        kinds.setdefault(m["module"], set()).add(kind)
    out: dict[str, tuple[str, str]] = {}
    for module, p in sorted(parts.items()):
        if set(p) != {"A", "B"}:
            raise AdapterFormatError(f"{name}: module {quoted(module)} has lora_{next(iter(p))} but not its pair")
        if len(kinds[module]) > 1:
            raise AdapterFormatError(f"{name}: module {quoted(module)} pairs an embedding factor with a linear one")
        out[module] = (p["A"], p["B"])
    return out


def split_state_dict(
    name: str, state: Mapping[str, torch.Tensor]
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, tuple[str, str]]]:
    """Per module ``(A, B)`` from a LoRA state dict, and the keys they came from.

    Raises:
        AdapterFormatError: a tensor that is not a LoRA factor, an unpaired factor (see
            :func:`lora_keys`), or a factor that is not a floating-point matrix.
    """
    import torch

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    keys = lora_keys(name, state)
    for module, (ka, kb) in keys.items():
        A, B = state[ka], state[kb]
        if A.dim() != 2 or B.dim() != 2 or not A.is_floating_point() or not B.is_floating_point():
            raise AdapterFormatError(
                f"{name}: module {quoted(module)}: LoRA factors must be floating-point matrices, got "
                f"{A.dtype} {tuple(A.shape)} and {B.dtype} {tuple(B.shape)}",
                hint="Integer arrays are what secure aggregation's masking sends; clair needs the factors.",
            )
        # float64 stays float64 until the audit reads it (``in_dtype`` balances its factors
        # before narrowing them, so an ill-conditioned factorisation keeps its update).
        factors[module] = (A, B) if A.dtype == B.dtype == torch.float64 else (A.float(), B.float())
    if not factors:
        raise AdapterFormatError(f"{name}: the reply holds no LoRA factor")
    return factors, keys


SECAGG_REASON = "carries secure-aggregation records (masked updates are not LoRA factors)"


def _secure_aggregation(message: Message, config_keys: bool = True) -> bool:
    """Whether a message carries records of secure aggregation (SecAgg / SecAgg+): a record (or,
    with ``config_keys``, a config key) named for it. Flower's SecAgg+ workflow sends its stages
    in a ConfigRecord named ``secaggplus_configs`` and its mod replies with one."""
    content = message.content
    names = [*content.config_records.keys(), *content.array_records.keys(), *content.metric_records.keys()]
    if config_keys:
        for record in content.config_records.values():
            names.extend(record.keys())
    return any(marker in str(n).lower() for n in names for marker in SECAGG_MARKERS)


def _refuse_secure_aggregation(server_round: int, instructions: list[Message]) -> None:
    """Refuse the run when the server's own train instructions carry secure-aggregation records:
    the server runs SecAgg, which hides what clair needs. Decided from what the server sends, never
    from the replies: a client's record names are its own choice, and such a reply is only that
    client's (left out with its reason), or two clients could stop the federation."""
    if any(_secure_aggregation(m, config_keys=False) for m in instructions):
        raise UsageError(
            f"round {server_round}: the train instructions carry secure-aggregation records; ClairStrategy "
            "needs each client's LoRA factors, which secure aggregation hides",
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


def _number(value: Any) -> float:
    """A metric value as a float; ``inf`` for an integer past float's range (a message built in
    the ServerApp's process, as a simulation's or a custom grid's, carries Python integers of any
    size; Flower's wire format holds 64 bits): ``float(10**400)`` raised out of the round."""
    try:
        return float(value)
    except OverflowError:
        return math.inf


def _metric_weight(record: Any, key: str) -> float | None:
    """A metric record's weight: a finite non-negative number (not a boolean), else None."""
    value = record.get(key) if key in record else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    weight = _number(value)
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


def weighted_metrics(records: list[Any], key: str) -> tuple[MetricRecord, list[str]]:
    """The weighted mean of each metric of ``records`` (MetricRecords of one layout), weighted by
    ``key``, as Flower's ``aggregate_metricrecords`` (FedAvg's default) means it, but finite and
    exact where that is not: the weights are divided by the largest before they are summed
    (claims of 1e308 summed to infinity, and every metric came out 0.0), and a value that is not
    finite is left out of its metric (with its weight) instead of the reply's whole record. Where
    every weight is zero the records count equally, as in the merge. Returns the means (the weight
    itself left out, as Flower does) and a note for each thing left out."""
    weights = [_metric_weight(r, key) or 0.0 for r in records]
    top = max(weights, default=0.0)
    scaled = [w / top for w in weights] if top > 0 else [1.0] * len(weights)
    notes = [] if top > 0 or not records else ["every weight is zero: the metrics are averaged with equal weights"]
    out = MetricRecord()
    for name, first in records[0].items() if records else ():
        if name == key:
            continue
        columns = range(len(first)) if isinstance(first, list) else [None]
        means: list[float] = []
        bad = set()
        for c in columns:
            pairs = []
            for j, (s, record) in enumerate(zip(scaled, records, strict=True)):
                value = _number(record[name] if c is None else record[name][c])
                if math.isfinite(value):
                    pairs.append((s, value))
                else:
                    bad.add(j)
            mean = _weighted_mean(pairs)
            if mean is None:
                break
            means.append(mean)
        if bad:
            notes.append(f"{quoted(name, 60)}: {len(bad)} of {len(records)} replies' values are not finite (left out)")
        if len(means) < len(columns):
            notes.append(f"{quoted(name, 60)} cannot be averaged (no finite value of a positive weight): left out")
            continue
        out[name] = means if isinstance(first, list) else means[0]
    return out, notes


def _weighted_mean(pairs: list[tuple[float, float]]) -> float | None:
    """``sum w v / sum w`` of ``(w, v)`` (weights at most 1, values finite), finite; None where the
    weights sum to zero or (at values near float's limit) the mean does not fit."""
    total = math.fsum(w for w, _ in pairs)
    if total <= 0:
        return None
    try:
        mean = math.fsum(w * v for w, v in pairs) / total
    except OverflowError:
        mean = math.inf
    if not math.isfinite(mean):  # sums past float's range: each value's share first
        try:
            mean = math.fsum(w / total * v for w, v in pairs)
        except OverflowError:
            return None
    return mean if math.isfinite(mean) else None


def _error_text(message: Message) -> str:
    """A reply's Flower error in words, cut as a reason is."""
    error = message.error
    return f"error reply (code {error.code}): {quoted(error.reason)}"


def round_summary(server_round: int, result: RoundResult, errors: Mapping[str, str], shown: int = 5) -> str:
    """One log line for a round: how many replies, who was left out and why (the clients of one
    reason together; ``shown`` reasons and names a reason at most, each reason cut to 100
    characters: ``strategy.history`` has them all), and what was done."""
    why: dict[str, list[str]] = {}
    for n, reasons, f in zip(result.names, result.reasons, result.flagged, strict=True):
        if f:
            text = (reasons[0] if reasons else "").replace(f"{n}: ", "", 1)
            why.setdefault(text[:100] + ("..." if len(text) > 100 else ""), []).append(n)
    for n, text in errors.items():
        why.setdefault(text[:100], []).append(n)
    if result.fallback == "skip":
        done = "the global LoRA kept unchanged"
    elif result.fallback == "median":
        done = f"the geometric median of {len(result.collaborators)} taken"
    else:
        done = f"{len(result.collaborators)} merged"
    left_out = sum(len(names) for names in why.values())
    line = f"CLAIR round {server_round}: {len(result.names) + len(errors)} replies, {left_out} left out"
    groups = [
        ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "") + f": {text}"
        for text, names in list(why.items())[:shown]
    ]
    if len(why) > shown:
        groups.append(f"{len(why) - shown} other reasons")
    return f"{line}{' (' + '; '.join(groups) + ')' if groups else ''}; {done}"


def _finite_metric(value: Any) -> bool:
    """Whether a metric value (a number or a list of numbers) is finite throughout."""
    values = value if isinstance(value, list) else [value]
    return all(isinstance(v, int | float) and math.isfinite(_number(v)) for v in values)


class ClairStrategy(FedAvg):
    """Flower's ``FedAvg`` with CLAIR's audit and merge in ``aggregate_train``.

    Args:
        lora_config: the clients' PEFT ``LoraConfig`` (or its dict): ranks and scales.
        settings: the audit settings (``clair audit``'s defaults when None).
        merge_options: how the collaborators' mean is formed (None: ``clair merge``'s defaults
            with the norm bound and centred clipping on, as every round).
        on_too_few: with fewer auditable replies than clair's minimum (5), ``"skip"`` keeps
            the global LoRA for that round, ``"median"`` takes the updates' geometric median
            (from three replies on, copies left out; fewer are skipped). The round's metrics
            (``clair-fallback``, ``clair-skipped``) and history say which.
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
            truncation error, fallback, error replies by node, notes, seconds).
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
        """FedAvg's, remembering the round's global LoRA: updates are measured from it.

        Raises:
            UsageError: the instructions carry secure-aggregation records (the server runs SecAgg).
        """
        self._round_arrays = {server_round: arrays}
        instructions = list(super().configure_train(server_round, arrays, config, grid))
        _refuse_secure_aggregation(server_round, instructions)
        return instructions

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Audit the replies' updates, merge the collaborators', return the next global LoRA."""
        # FedAvg's own consistency check would drop the whole round for one odd reply;
        # each reply is checked on its own below instead.
        valid, failed = self._check_and_log_replies(list(replies), is_train=True, validate=False)
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
                factors, weight = self._read_reply(name, msg, global_factors)
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
        metrics = self._metrics(kept, self.train_metrics_aggr_fn, "train", result.notes)
        for key, value in self._round_metrics(result, [node_of[n] for n in result.names]).items():
            metrics[key] = value
        errors = {f"node-{m.metadata.src_node_id}": _error_text(m) for m in failed}
        if errors and not valid:
            result.notes.append(f"every reply ({len(errors)}) is an error: the global adapter is kept unchanged")
        self._record(server_round, result, time.perf_counter() - start, errors)
        log(
            WARNING if left_out or errors or result.fallback == "skip" else INFO,
            "%s",
            round_summary(server_round, result, errors),
        )
        return arrays, metrics

    def _read_reply(
        self, name: str, msg: Message, global_factors: Mapping[str, Any]
    ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
        """A reply's LoRA factors and merge weight. Its key names are checked against the global
        adapter's modules before any array is decoded: a reply of 20,000 tiny arrays for other
        modules took 3.2 s to decode before it was refused.

        Raises:
            AdapterFormatError: not LoRA factors (see :func:`split_state_dict`), or a weight
                that is missing, not finite or negative.
            IncompatibleAdapters: other modules than the global adapter's.
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
        check_modules(name, lora_keys(name, record.keys()), global_factors)
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

    def _metrics(self, contents: list[Any], aggregate: Any, what: str, notes: list[str] | None = None) -> MetricRecord:
        """The replies' metrics aggregated as FedAvg does, from the replies that can be: one
        MetricRecord whose weight (``weighted_by_key``) is a non-negative number, with the most
        common layout (keys, and a number or a list of one length for each). Each weight counts
        at most ``weight_cap`` times the median weight, as in the merge
        (:func:`clair_cli.federated.rounds.capped_weights`): a client's claim sets its share of
        the round's metrics no more than of its model. FedAvg's default aggregator is replaced by
        :func:`weighted_metrics` (the same weighted mean, finite whatever the weights; a value
        that is not finite is left out of its metric alone); a custom aggregator gets the replies
        whose values are all finite, as they came, with all their records, but for the weight of
        a reply the cap lowered. Replies and values left out are logged (and added to ``notes``);
        metrics that cannot be aggregated at all are dropped, never the run."""
        own = aggregate is aggregate_metricrecords
        usable = self._usable(contents, finite=not own, zeros=what == "train")
        said: list[str] = []
        if len(usable) < len(contents):
            said.append(
                f"{len(contents) - len(usable)} of {len(contents)} replies left out of the metrics (no single "
                "MetricRecord with a non-negative weight, "
                + ("" if own else "non-finite values, ")
                + "or other keys or value lengths than the rest)"
            )
        metrics = MetricRecord()
        if usable and own:
            metrics, left = weighted_metrics(
                [next(iter(c.metric_records.values())) for c in usable], self.weighted_by_key
            )
            said += left
        for note in said:
            log(INFO, "CLAIR: %s metrics: %s", what, note)
        if notes is not None:
            notes += [f"{what} metrics: {note}" for note in said]
        if not usable or own:
            return metrics
        try:  # weights summing to zero, a custom aggregator's own failure: the metrics are lost, not the round
            return aggregate(usable, self.weighted_by_key)
        except Exception as exc:  # noqa: BLE001
            log(INFO, "CLAIR: the %s metrics cannot be aggregated (%s: %s)", what, type(exc).__name__, exc)
            return MetricRecord()

    def _usable(self, contents: list[Any], finite: bool, zeros: bool = True) -> list[Any]:
        """The replies whose metrics can be aggregated (:meth:`_metrics`), with the weight the cap
        leaves each. ``zeros``: whether claims of zero count in the cap's median, as in the merge
        (:func:`~clair_cli.federated.rounds.capped_weights`); not in federated evaluation, where a
        client with no test data claims zero and its metrics count for nothing."""
        usable = []
        for content in contents:
            if len(content.metric_records) != 1:
                continue
            record = next(iter(content.metric_records.values()))
            if _metric_weight(record, self.weighted_by_key) is not None and (
                not finite or all(_finite_metric(v) for v in record.values())
            ):
                usable.append(content)
        if not usable:
            return []
        common = Counter(_layout(c) for c in usable).most_common(1)[0][0]
        usable = [c for c in usable if _layout(c) == common]
        claimed = [_metric_weight(next(iter(c.metric_records.values())), self.weighted_by_key) or 0.0 for c in usable]
        _, lowered = capped_weights(claimed, self.weight_cap, zeros)
        for j, weight in lowered:
            usable[j] = _with_weight(usable[j], self.weighted_by_key, weight)
        return usable

    @staticmethod
    def _round_metrics(result: RoundResult, node_ids: list[int]) -> dict[str, int | float]:
        """The round's ``clair-*`` metrics. ``clair-fallback`` is 1 where no audit decided the
        round (skipped, or the geometric median); ``clair-skipped`` is 1 where the round kept the
        global LoRA unchanged: a median round is ``clair-fallback`` 1, ``clair-skipped`` 0."""
        out: dict[str, int | float] = {
            f"{METRIC_PREFIX}-clients": len(node_ids),
            f"{METRIC_PREFIX}-flagged": sum(result.flagged),
            f"{METRIC_PREFIX}-fallback": int(result.fallback is not None),
            f"{METRIC_PREFIX}-skipped": int(result.fallback == "skip"),
            f"{METRIC_PREFIX}-truncation-error": max(result.truncation_error.values(), default=0.0),
        }
        for node, flag, score in zip(node_ids, result.flagged, result.scores, strict=True):
            out[f"{METRIC_PREFIX}-flagged-{node}"] = int(flag)
            out[f"{METRIC_PREFIX}-score-{node}"] = -1.0 if score is None else float(score)
        return out

    def _record(self, server_round: int, result: RoundResult, seconds: float, errors: Mapping[str, str]) -> None:
        entry = {
            "round": server_round,
            "clients": result.names,
            "flagged": [n for n, f in zip(result.names, result.flagged, strict=True) if f],
            "scores": dict(zip(result.names, result.scores, strict=True)),
            "reasons": {n: r for n, r in zip(result.names, result.reasons, strict=True) if r},
            "truncation_error": {m: round(e, 8) for m, e in result.truncation_error.items()},
            "fallback": result.fallback,
            "errors": dict(errors),
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
