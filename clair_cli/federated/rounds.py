"""One federated round with CLAIR: clients' LoRA factors in, the next global LoRA out.

This is the math of :class:`clair_cli.federated.flower.ClairStrategy` without Flower (and so
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

Before the audit, a reply is flagged and left out, with its reason, when it cannot be a
client's honest update: factors that are not finite or whose update would overflow the
analysis (:func:`check_factors`), other modules or ranks than the
global adapter's (or a reply the strategy could not read at all: ``refused``), the global
adapter sent back unchanged or re-factored (a zero update: a free rider), or the same update as another
client's (two honest clients never send identical updates, so every member of the group is
left out, not only the later ones). One bad reply never stops the round.

With fewer clients left than the engine's minimum
(``clair_cli.methods.get("clair").min_adapters``), no audit can be calibrated: the round
keeps the global adapter (``on_too_few="skip"``, the default) or, from three clients on,
takes the geometric median of the updates (``"median"``: computed exactly from their Gram
matrix, so a minority of any size of update cannot move it far; :func:`geometric_median_weights`),
and the round's notes say which. Before the median, copies are flagged as an audited round
flags them (:func:`flag_copies`): a group of copies is one point at most, or two Sybils sending
one update would be half the points of a round of four, and the median theirs. Copies do not
count toward the minimum: a round padded to it by copies (found flagged by its audit) is judged
as the round of what remains. With one or two clients left the median is not robust and the
round is skipped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from clair_cli import methods
from clair_cli.errors import AdapterFormatError, ClairError, IncompatibleAdapters
from clair_cli.params import AuditParams

if TYPE_CHECKING:
    import torch

    from clair_cli.params import MergeOptions

Factors = tuple["torch.Tensor", "torch.Tensor"]  # (A: r x d_in, B: d_out x r)
TooFew = Literal["skip", "median"]
TOO_FEW_CHOICES = ("skip", "median")
MEDIAN_MIN_CLIENTS = 3  # the geometric median of two points is any point between them
# A client's merge weight (its claimed number of examples) counts at most this many times the
# median weight of the round's collaborators: a weight is whatever a client says, and one that
# passes the audit would otherwise take the merge over by claiming a million examples.
WEIGHT_CAP = 3.0
FACTOR_DTYPES = ("float16", "bfloat16", "float32", "float64")


def quoted(text: object, limit: int = 200) -> str:
    """A client's string (a key, a module name) as a reason quotes it: ``repr``, cut to ``limit``
    characters, so that a megabyte-long name does not fill the round's history and logs."""
    text = str(text)
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


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
        fallback: None, or what was done instead of an audit (``"skip"``, ``"median"``).
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
    client: Mapping[str, Factors],
    global_factors: Mapping[str, Factors],
    scales: Mapping[str, float],
    global_terms: GlobalTerms | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """A client's update ``s B_k A_k - s B_g A_g`` per module, as LoRA factors: the client's own
    where the global adapter is zero; else the balanced factors of the difference of the two terms'
    canonical factors (:mod:`clair_cli.core.canonical`, whatever either term's factorisation), and an
    exact zero where the two terms agree to ``UNCHANGED_RELATIVE`` (the global's update sent back,
    as it was, re-factored or with its rank permuted: not the rounding of their difference, which
    has a direction of its own and, from a minority that leaves a module untouched, once set that
    module's typical values; docs/security.md, "A module left untouched").
    ``global_terms``: the global term's canonical factors, kept for the round's other clients.
    """
    import torch

    from clair_cli.core.canonical import update_difference

    global_terms = GlobalTerms() if global_terms is None else global_terms
    out = {}
    for module, (A, B) in client.items():
        Ag, Bg = global_factors[module]
        s = scales[module]
        if not bool(Bg.any()) or not bool(Ag.any()):
            out[module] = (A, B, s)
            continue
        Ag, Bg = Ag.to(A.dtype), Bg.to(B.dtype)
        try:
            da, db, relative = update_difference(A, B, Ag, Bg, global_terms.canonical(module, Ag, Bg))
        except ValueError as exc:  # an update past its dtype's range (clair_cli.core.canonical)
            raise ValueError(f"module {module}: {exc}") from exc
        if relative <= UNCHANGED_RELATIVE:
            out[module] = (torch.zeros_like(A), torch.zeros_like(B), s)
        else:  # (float32 at least: a half-precision difference would underflow where it is small)
            wide = torch.promote_types(A.dtype, torch.float32)
            out[module] = (da.to(wide), db.to(wide), s)
    return out


class GlobalTerms:
    """The canonical factors of the global adapter's term of each module, in each dtype clients
    sent: computed once a round instead of once per client (a third of :func:`client_update`)."""

    def __init__(self) -> None:
        self._factors: dict[tuple[str, torch.dtype, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def canonical(self, module: str, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from clair_cli.core.canonical import canonical_factors

        key = (module, A.dtype, B.dtype)
        if key not in self._factors:
            self._factors[key] = canonical_factors(A, B, 1.0)
        return self._factors[key]


UNCHANGED_RELATIVE = 2.0**-26  # a quarter of float32's unit roundoff: what PEFT's float32 product cannot show


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
    name: str,
    client: Mapping[str, Factors],
    global_factors: Mapping[str, Factors],
    ranks: Mapping[str, int],
    scales: Mapping[str, float] | None = None,
    global_terms: GlobalTerms | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]] | None:
    """Refuse a client whose modules or ranks differ from the global adapter's, whose factors
    are not finite, or (given the modules' ``scales``) whose update would overflow the analysis,
    as an adapter file's would (:func:`~clair_cli.io.adapter.update_overflows`). Returns the
    update it checked (:func:`client_update`; None without ``scales``), for the round to reuse.
    ``global_terms``: the round's :class:`GlobalTerms`, shared by its clients.

    Raises:
        IncompatibleAdapters: other modules than the global adapter, or another rank than
            the configured one (the global adapter could not be loaded back).
        AdapterFormatError: a factor with NaN or infinite values, or an update past the bound.
    """
    from clair_cli.io.adapter import peak, update_overflows

    _check_types(name, client)
    check_modules(name, client, global_factors)
    for module, (A, B) in client.items():
        Ag, Bg = global_factors[module]
        if A.shape != Ag.shape or B.shape != Bg.shape:
            raise IncompatibleAdapters(
                f"{name}: module {quoted(module)}: factors of shapes A {tuple(A.shape)}, B {tuple(B.shape)}; the "
                f"global adapter has A {tuple(Ag.shape)}, B {tuple(Bg.shape)} (rank {ranks[module]} in the LoraConfig)",
                hint="Clients of one run must use the strategy's LoraConfig: clair merges updates, but the "
                "global adapter it sends back has one rank per module.",
            )
        if not (bool(A.isfinite().all()) and bool(B.isfinite().all())):
            raise AdapterFormatError(f"{name}: module {module}: the factors hold NaN or infinite values")
    if scales is None:
        return None
    # The update as the audit reads it (client_update), checked as the reader checks every
    # adapter, so that a reply it would refuse is left out here.
    try:
        update = client_update(client, global_factors, scales, global_terms)
    except ValueError as exc:  # canonical factors of an update past its dtype's range (client_update's module)
        raise AdapterFormatError(f"{name}: {exc}") from exc
    for module, (A, B, s) in update.items():
        peaks = [peak(A), peak(B)]
        if update_overflows(s, A.shape[0], peaks):
            raise AdapterFormatError(
                f"{name}: module {module}: factor values (up to {max(peaks):.3g}, scale {s:.3g}) "
                "make its update overflow"
            )
    return update


def check_modules(name: str, modules: Iterable[str], global_modules: Iterable[str]) -> None:
    """Refuse a client whose modules are not the global adapter's.

    Raises:
        IncompatibleAdapters: naming how many differ, and one of them.
    """
    modules, global_modules = set(modules), set(global_modules)
    if modules != global_modules:
        diff = sorted(modules ^ global_modules)
        raise IncompatibleAdapters(
            f"{name} sent LoRA modules other than the global adapter's ({len(diff)} differ, e.g. {quoted(diff[0])})",
            hint="Every client must train the LoraConfig the strategy was given.",
        )


def _check_types(name: str, client: Any) -> None:
    """Refuse a reply that is not, per module, a pair of dense floating-point matrices.

    Raises:
        AdapterFormatError: naming the client and the module.
    """
    import torch

    if not isinstance(client, Mapping):
        raise AdapterFormatError(f"{name}: the reply is a {type(client).__name__}, not LoRA factors by module")
    for module, pair in client.items():
        if not (isinstance(pair, tuple | list) and len(pair) == 2):
            raise AdapterFormatError(f"{name}: module {quoted(module)}: expected (A, B), got {type(pair).__name__}")
        for what, t in zip("AB", pair, strict=True):
            if not isinstance(t, torch.Tensor):
                raise AdapterFormatError(f"{name}: module {quoted(module)}: {what} is a {type(t).__name__}")
            dtype = str(t.dtype).removeprefix("torch.")
            if dtype not in FACTOR_DTYPES or t.layout != torch.strided or t.is_meta or t.dim() != 2:
                raise AdapterFormatError(
                    f"{name}: module {quoted(module)}: {what} is a {t.dim()}-d {dtype} tensor "
                    f"({t.layout}{', meta' if t.is_meta else ''}); LoRA factors are dense floating-point matrices"
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
        if module not in merged:  # no client changed it (:func:`_idle_modules`)
            out[module], errors[module] = (Ag.clone(), Bg.clone()), 0.0
            continue
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


def aggregate_round(  # noqa: PLR0913, PLR0915 - the round API Flower and the experiments call; to group next
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
    refused: Mapping[str, str] | None = None,
    weight_cap: float | None = WEIGHT_CAP,
) -> RoundResult:
    """Audit the clients' updates, merge the collaborators', and write the next global LoRA.

    Args:
        global_factors: the round's global LoRA, per module ``(A, B)``.
        clients: per client name, per module ``(A, B)`` as trained from the global LoRA.
        scales: per module, the LoRA scale (alpha / r, or alpha / sqrt(r) with rsLoRA).
        ranks: per module, the configured rank of the global LoRA.
        weights: per client of ``clients``, its merge weight (e.g. its number of examples);
            equal when None. A weight that is not a finite non-negative number leaves its
            client out as a malformed reply; where the collaborators' weights sum to zero they
            are merged with equal weights.
        settings: the audit settings (``clair audit``'s defaults when None).
        merge_options: how the collaborators' mean is formed (``clair merge``'s defaults
            with the norm bound and centred clipping on: :func:`_round_merge_options`).
        base_model: named in the report.
        on_too_few: with fewer auditable clients than the engine's minimum, ``"skip"``
            keeps the global LoRA, ``"median"`` takes the updates' geometric median.
        refused: clients whose reply could not be read (name: why); flagged, left out, and
            listed after ``clients``.
        weight_cap: a collaborator's weight counts at most this many times the median weight of
            the collaborators (:func:`capped_weights`; the notes name who was capped); None:
            uncapped.

    Raises:
        ValueError: ``on_too_few`` is not one of ``TOO_FEW_CHOICES``, wrong ``weights``, or a
            ``weight_cap`` under 1.
    """
    from clair_cli import pipeline

    _check_arguments(on_too_few, len(clients), weights, weight_cap)
    start = time.perf_counter()
    settings = settings or AuditParams()
    merge_options = merge_options or _round_merge_options()
    refused = {n: why for n, why in (refused or {}).items() if n not in clients}
    names = [*clients, *refused]
    flagged = [False] * len(names)
    scores: list[float | None] = [None] * len(names)
    reasons: list[list[str]] = [[] for _ in names]
    checked: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]] = {}  # the screen's client_update
    global_terms = GlobalTerms()
    for i, name in enumerate(names):
        why = (
            refused.get(name)
            or _bad_weight(weights, i)
            or _screen(name, clients[name], (global_factors, global_terms), ranks, scales, checked)
        )
        if why:
            flagged[i] = True
            reasons[i].append(why)
    live = [i for i in range(len(clients)) if not flagged[i]]
    updates = {
        names[i]: checked.get(names[i]) or client_update(clients[names[i]], global_factors, scales, global_terms)
        for i in live
    }
    notes = [f"{n}: {reasons[i][0]}" for i, n in enumerate(names) if i >= len(clients) or _malformed(reasons[i])]
    live_weights = None if weights is None else [float(weights[i]) for i in live]
    idle = _drop_idle_modules(updates, notes)
    report = None
    timing: dict[str, float] = {}

    def result(new_global: dict[str, Factors] | None, fallback: str | None, errors=None) -> RoundResult:
        if new_global is None:  # the round keeps the global adapter as it is
            new_global = {m: (A.clone(), B.clone()) for m, (A, B) in global_factors.items()}
            errors = dict.fromkeys(global_factors, 0.0)
        timing["total"] = time.perf_counter() - start
        return RoundResult(new_global, names, flagged, scores, reasons, report, errors, fallback, notes, timing)

    need = methods.get("clair").min_adapters
    if updates and len(idle) == len(global_factors):
        notes.append("every client's update is zero: the global adapter is kept unchanged")
        return result(None, "skip")
    pool, outcome, report, copies = _audit_round(updates, need, settings, base_model)
    if outcome is None:
        copies, robust, note = _too_few(updates, copies, need, on_too_few, base_model)
        _flag(names, flagged, reasons, copies)
        notes.append(note)
        if not robust:
            return result(None, "skip")
        kept = {n: u for n, u in updates.items() if n not in copies}
        pool = pipeline.pool_from_factors(kept, base_model, method="mean")
        median = geometric_median_weights(pool)
        merged = pipeline.merge(pool, "mean", settings, median, merge_options)
        new_global, errors = _refactor(global_factors, _factors(merged), scales, ranks)
        return result(new_global, "median", errors)
    assert report is not None
    timing["audit"] = outcome.timing["audit"]
    for j, i in enumerate(live):
        verdict = report["adapters"][j]
        scores[i] = float(verdict["score"])
        flagged[i] = bool(verdict["flagged"])
        reasons[i] = [r["text"] for r in verdict["reasons"]]
    if not outcome.auditor.collaborative_set_:
        notes.append("every client was flagged: the global adapter is kept unchanged")
        return result(None, "skip")
    t0 = time.perf_counter()
    merge_weights = _merge_weights(
        live_weights, outcome.auditor.collaborative_set_, weight_cap, [names[i] for i in live], notes
    )
    merged = pipeline.merge(pool, "clair", settings, merge_weights, merge_options, outcome)
    timing["merge"] = time.perf_counter() - t0
    new_global, errors = _refactor(global_factors, _factors(merged), scales, ranks)
    return result(new_global, None, errors)


def _audit_round(
    updates: Mapping[str, Mapping[str, tuple[torch.Tensor, torch.Tensor, float]]],
    need: int,
    settings: AuditParams,
    base_model: str | None,
) -> tuple[Any, Any, dict[str, Any] | None, dict[str, str] | None]:
    """The round's pool, audit and report; no audit (None) where fewer than ``need`` updates are left
    to audit, with the copies that left them (None where there were too few without copies). In
    rounds of fewer than ``2 need`` the copies are counted first (the whole updates' Gram matrix,
    cheap), so that a round copies pad to an audit's size is not audited and then discarded."""
    from clair_cli import pipeline
    from clair_cli.report.audit import audit_report

    names = list(updates)
    if len(names) < need:
        return None, None, None, None
    if len(names) < 2 * need:
        found = _median_copies(updates, base_model)
        if len(names) - len(found) < need:
            return None, None, None, found
    pool = pipeline.pool_from_factors(updates, base_model)
    outcome = pipeline.audit(pool, settings, copies="flag-all")
    report = audit_report(outcome)
    padded = _copies_in(report, names)
    if len(names) - len(padded) < need:  # copies padded the round to an audit's size: too few all the same
        return None, None, None, padded
    return pool, outcome, report, None


def _check_arguments(on_too_few: str, n_clients: int, weights: Sequence[float] | None, cap: float | None) -> None:
    if on_too_few not in TOO_FEW_CHOICES:
        raise ValueError(f"on_too_few must be one of {', '.join(TOO_FEW_CHOICES)}, got {on_too_few!r}")
    if weights is not None and len(weights) != n_clients:
        raise ValueError(f"expected {n_clients} weights, got {len(weights)}")
    if cap is not None and not (math.isfinite(cap) and cap >= 1):
        raise ValueError(f"weight_cap must be a number of at least 1, or None; got {cap!r}")


def capped_weights(
    weights: Sequence[float], cap: float | None = WEIGHT_CAP, zeros: bool = True
) -> tuple[list[float], list[tuple[int, float]]]:
    """``weights`` with each at most ``cap`` times the median of all of them (zeros included),
    and the ``(index, new weight)`` of those lowered.

    A client's weight is what it claims (its number of examples); one that passes the audit
    could otherwise take the merge over with a large enough claim, whatever bounds its update.
    Capped, a client's share of the merge is at most ``cap / (cap + n_other)`` of a round where
    the others sit at the median weight, and no minority can raise the median past the
    majority's weights. Zero claims count in the median: where most claims are zero the median
    is zero and so is every capped weight (the merge then counts its members equally, as where
    every claim is zero). Taken over the positive claims alone, the median of a round whose
    other clients all claimed zero was one client's own claim (1e-300 was enough), and that
    client was merged alone. ``zeros=False`` takes the median of the positive claims (federated
    evaluation, where a claim of zero is a client with no test data, whose metrics count for
    nothing). Honest clients of very unequal data sizes lose the part of their weight above the
    cap (None: uncapped, FedAvg's weighting).
    """
    out = [float(w) for w in weights]
    counted = out if zeros else [w for w in out if w > 0]
    if cap is None or not any(w > 0 for w in out):
        return out, []
    import statistics

    bound = cap * statistics.median(counted)
    capped = [(j, bound) for j, w in enumerate(out) if w > bound]
    for j, w in capped:
        out[j] = w
    return out, capped


def _drop_idle_modules(
    updates: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]], notes: list[str]
) -> list[str]:
    """Take the modules no client changed (:func:`_idle_modules`) out of ``updates``, with a note."""
    idle = _idle_modules(updates)
    for update in updates.values():
        for m in idle:
            del update[m]
    if idle:
        notes.append(f"{len(idle)} module(s) where no client's update is non-zero (e.g. {idle[0]}): kept as they are")
    return idle


def _merge_weights(
    weights: list[float] | None, collaborators: Sequence[int], cap: float | None, names: list[str], notes: list[str]
) -> list[float] | None:
    """The merge weights of the audited clients (``weights``, by pool index): the collaborators'
    capped at ``cap`` times their own median (:func:`capped_weights`; the flagged, copies
    included, neither count in the median nor are merged), a note for each one capped; None
    (equal weights, with a note) where the collaborators' weights sum to zero."""
    if weights is None:
        return None
    out = list(weights)
    capped, lowered = capped_weights([weights[j] for j in collaborators], cap)
    for k, c in zip(collaborators, capped, strict=True):
        out[k] = c
    notes += [
        f"{names[collaborators[j]]}: weight {weights[collaborators[j]]:.6g} counted as {w:.6g}" for j, w in lowered
    ]
    if not any(out[j] > 0 for j in collaborators):
        notes.append("the collaborators' weights are all zero: they are merged with equal weights")
        return None
    return out


def _bad_weight(weights: Sequence[float] | None, i: int) -> str | None:
    """Why client ``i``'s weight is refused (not a finite non-negative number), or None."""
    if weights is None or i >= len(weights):
        return None
    try:
        w = float(weights[i])
    except (TypeError, ValueError, ArithmeticError):  # (an integer past float's range overflows)
        w = math.nan
    return (
        None
        if math.isfinite(w) and w >= 0
        else f"malformed reply: its weight {repr(weights[i])[:40]} is not a non-negative number"
    )


def _idle_modules(updates: Mapping[str, Mapping[str, tuple[torch.Tensor, torch.Tensor, float]]]) -> list[str]:
    """The modules where every client's update is exactly zero (``||B A||^2 = tr(B^T B A A^T) = 0``;
    a module no client trained in the first round, where the global is zero): they span no
    subspace to audit, and the global keeps them as they are."""
    if not updates:
        return []
    first = next(iter(updates.values()))
    return [m for m in first if all(_zero_update(A, B) for A, B, _s in (u[m] for u in updates.values()))]


def _round_merge_options() -> MergeOptions:
    """A round's default merge: ``clair merge``'s, with bounded influence on (a norm bound at
    ``NORM_BOUND``, then centred clipping at ``CLIP_FACTOR``). Clients of one run share one
    ``LoraConfig`` and recipe, so their updates have comparable norms (at most 1.19x the
    median on the project's trained pools, where the bound is 1.5x) and lie at comparable
    distances from their centre (at most 1.26x the median, where the clipping radius is 2x):
    both then change nothing, and bound what a client the audit lets through can do."""
    from clair_cli.core.influence import CLIP_FACTOR, NORM_BOUND
    from clair_cli.params import MergeOptions

    return MergeOptions(clip=CLIP_FACTOR, norm_bound=NORM_BOUND)


def _factors(merged: Any) -> dict[str, Factors]:
    return {m: (r.A, r.B) for m, r in merged.modules.items()}


FREE_RIDER = "sent the global adapter back unchanged (a zero update: free rider?)"
ZERO_UPDATE = "sent a zero update (the global adapter's update, factored otherwise: free rider?)"


def _screen(
    name: str,
    client: Mapping[str, Factors],
    global_adapter: tuple[Mapping[str, Factors], GlobalTerms],
    ranks: Mapping[str, int],
    scales: Mapping[str, float],
    checked: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]] | None = None,
) -> str | None:
    """Why a reply is left out before the audit (malformed, or a zero update); None if it is not.
    ``global_adapter``: the global factors and their terms (:class:`GlobalTerms`). ``checked``: where
    the update the screen computed is kept by client name (:func:`check_factors`)."""
    global_factors, global_terms = global_adapter
    try:
        update = check_factors(name, client, global_factors, ranks, scales, global_terms)
        if checked is not None and update is not None:
            checked[name] = update
    except ClairError as exc:
        return f"malformed reply: {exc.message}"
    except Exception as exc:  # noqa: BLE001 - whatever a client sent, only its reply is lost
        return f"malformed reply: cannot be read ({type(exc).__name__}: {str(exc)[:200]})"
    if _unchanged(client, global_factors):
        return FREE_RIDER
    # The global's update sent back re-factored ((c A_g, B_g / c), its rank permuted) is the same
    # zero update (client_update): flagged as the unchanged copy is, or it counts as a point at
    # zero in a median round (two such replies among four put the median at the global).
    if update is not None and all(_zero_update(A, B) for A, B, _s in update.values()):
        return ZERO_UPDATE
    return None


def _zero_update(A: torch.Tensor, B: torch.Tensor) -> bool:
    """Whether ``B A`` is exactly zero (``||B A||^2 = tr(B^T B A A^T)``, in float64)."""
    if not (bool(A.any()) and bool(B.any())):
        return True
    return float(((B.double().T @ B.double()) * (A.double() @ A.double().T)).sum()) == 0.0


def _malformed(reasons: list[str]) -> bool:
    return bool(reasons) and reasons[0].startswith("malformed reply")


def whole_gram(pool: Any) -> torch.Tensor:
    """The Gram matrix (float64) of the pool's whole updates, all modules together, from their
    canonical factors: the audit's ``inner_``, without the audit."""
    import torch

    from clair_cli import pipeline
    from clair_cli.core.canonical import canonical_module
    from clair_cli.core.pairwise import gram

    K = len(pool.adapters)
    G = torch.zeros(K, K, dtype=torch.float64)
    for mod in pipeline.iter_modules(pool):
        idx = torch.tensor(mod.members)
        G[idx[:, None], idx[None, :]] += gram(*canonical_module(mod.A, mod.B, mod.scales)).double()
    return G


def _flag(names: list[str], flagged: list[bool], reasons: list[list[str]], why: Mapping[str, str]) -> None:
    """Flag the clients named in ``why``, each with its reason."""
    for i, name in enumerate(names):
        if name in why:
            flagged[i] = True
            reasons[i].append(why[name])


def _too_few(
    updates: Mapping[str, Mapping[str, tuple[torch.Tensor, torch.Tensor, float]]],
    copies: dict[str, str] | None,
    need: int,
    on_too_few: str,
    base_model: str | None,
) -> tuple[dict[str, str], bool, str]:
    """A round with fewer updates than an audit needs: the copies left out (``copies`` where its
    audit found them, else those of a median round), whether the median of the rest is taken, and
    the round's note."""
    n = len(updates)
    if copies is None:
        copies = _median_copies(updates, base_model) if on_too_few == "median" and n >= MEDIAN_MIN_CLIENTS else {}
    left = n - len(copies)
    robust = on_too_few == "median" and left >= MEDIAN_MIN_CLIENTS
    what = "the global adapter is kept unchanged"
    if robust:
        what = f"the geometric median of the other {left} is taken" if copies else "their geometric median is taken"
    if n >= need:  # copies padded the round
        return (
            copies,
            robust,
            f"{n} client updates, {len(copies)} of them copies, left out: {left} to audit, "
            + (f"fewer than clair's minimum of {need}: {what}"),
        )
    copied = f"; {len(copies)} left out as copies" if copies else ""
    return copies, robust, f"{n} client update(s) to audit, fewer than clair's minimum of {need}{copied}: {what}"


def _copies_in(report: Mapping[str, Any], names: list[str]) -> dict[str, str]:
    """The updates an audit's report flags as copies (reason ``duplicate``), by name, with that reason."""
    return {
        names[j]: next(r["text"] for r in verdict["reasons"] if r["kind"] == "duplicate")
        for j, verdict in enumerate(report["adapters"])
        if any(r["kind"] == "duplicate" for r in verdict["reasons"])
    }


def _median_copies(
    updates: Mapping[str, Mapping[str, tuple[torch.Tensor, torch.Tensor, float]]], base_model: str | None
) -> dict[str, str]:
    """The copies among a median round's updates (:func:`flag_copies`), by name, with their reasons."""
    from clair_cli import pipeline

    names = list(updates)
    G = whole_gram(pipeline.pool_from_factors(updates, base_model, method="mean"))
    return {names[j]: why for j, why in flag_copies(G, names).items()}


def flag_copies(G: torch.Tensor, names: list[str]) -> dict[int, str]:
    """The updates a federated audit flags as copies (``copies="flag-all"``), by index into
    ``G`` (the whole updates' Gram matrix), with the audit's reason: the audit's own groups
    (:func:`clair_cli.core.verdict.duplicate_groups`, cosine above 0.999), ordered by
    :func:`~clair_cli.core.verdict.copy_order`; every member but the first is a copy
    (:class:`~clair_cli.core.rules.duplicate.Duplicate`), and the first too where the group's
    norms agree (:func:`~clair_cli.core.verdict.flag_every_copy`; a scaled copy does not get the
    update it copies left out). For the rounds no audit judges (the geometric median)."""
    from clair_cli.core.pairwise import cosine_from_gram
    from clair_cli.core.rules import AdapterVerdict
    from clair_cli.core.rules.duplicate import Duplicate, nearest_copy
    from clair_cli.core.verdict import copy_order, duplicate_groups, flag_every_copy
    from clair_cli.report.audit import reason_text
    from clair_cli.report.modules import ModuleNames

    order = copy_order(G.diagonal(), names)
    groups = [order(g) for g in duplicate_groups(cosine_from_gram(G))]
    verdicts = [AdapterVerdict(index=k, score=0.0, flagged=False) for k in range(len(names))]
    rule = Duplicate()
    for group in groups:
        for k in group[1:]:
            of = [j for j in group if j != k]
            verdicts[k].flagged = True
            verdicts[k].reasons.append(rule.reason(of, *nearest_copy(G, k, of)))
    flag_every_copy(verdicts, groups, set(), G.diagonal(), G)
    labels = ModuleNames([])
    return {v.index: reason_text(v.reasons[0], names, labels) for v in verdicts if v.flagged}


def geometric_median_weights(pool: Any) -> list[float]:
    """Weights ``beta`` (summing to 1) with ``sum_k beta_k Theta_k`` the geometric median of
    the pool's whole updates (all modules together), by Weiszfeld's iteration on their Gram
    matrix (:func:`whole_gram`): exact in factored form, and no minority can move it past the
    spread of the majority (breakdown point 1/2)."""
    import torch

    from clair_cli.core.insubspace import centre_weights

    G = whole_gram(pool)
    return centre_weights(G, torch.ones(1, G.shape[0], dtype=torch.bool))[0].tolist()
