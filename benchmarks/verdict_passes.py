"""How the verdict's passes end: a fixed point, or a cycle (docs/engine.md, "passes").

``clair_cli.core.verdict.decide`` recomputes every threshold without the adapters the previous
pass flagged and stops when a pass's (flagged, near misses, pulling groups) repeats, after at
most ``PASSES`` passes. :func:`traced` wraps it: each verdict is also run for up to
``LONG_RUN`` passes to see how it ends, and the flags the returned verdict has are compared
with the union and the intersection of the flags over the cycle's passes. The verdicts
returned are ``decide``'s own. Used by ``python -m benchmarks.small_rounds --passes``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import clair_cli.core.audit as audit_module
import clair_cli.core.verdict as verdict

LONG_RUN = 20


@dataclass
class Ending:
    """One verdict's passes: ``kind`` is "clean" (nothing flagged, suspected or pulling),
    "fixed", "cycle" or "open" (no repeat in ``LONG_RUN`` passes); ``flagsets`` the flagged
    adapters (indices) of each pass; ``returned`` those of the verdict ``decide`` returns."""

    kind: str
    length: int
    flagsets: list[frozenset[int]]
    returned: frozenset[int]

    @property
    def cycle(self) -> list[frozenset[int]]:
        return self.flagsets[-self.length - 1 : -1] if self.kind == "cycle" else self.flagsets[-1:]

    @property
    def union(self) -> frozenset[int]:
        return frozenset().union(*self.cycle)

    @property
    def intersection(self) -> frozenset[int]:
        return frozenset.intersection(*self.cycle)


@dataclass
class Trace:
    endings: list[Ending] = field(default_factory=list)


def _ending(signals: verdict.PoolSignals) -> Ending:
    verdicts, pulling = verdict._decide(signals, excluded=set(), suspects=set())
    exclude_above = verdict._exclusion_margin(signals.n_adapters)
    trusted = set(signals.reference or ())
    states: list[tuple] = []
    flagsets: list[frozenset[int]] = []
    kind, length = "open", 0
    for _ in range(LONG_RUN):
        flagged = frozenset(v.index for v in verdicts if v.flagged)
        flagsets.append(flagged)
        suspects = verdict._suspects(verdicts, flagged, exclude_above, trusted)
        state = (flagged, suspects, pulling)
        if not (flagged or suspects or pulling):
            kind = "clean"
            break
        if state in states:
            at = states.index(state)
            kind, length = ("fixed", 0) if at == len(states) - 1 else ("cycle", len(states) - at)
            break
        states.append(state)
        verdicts, pulling = verdict._decide(
            signals, excluded=set(flagged), suspects=set(suspects), centre_without=flagged | pulling
        )
    returned = flagsets[-1] if len(flagsets) <= verdict.PASSES else flagsets[verdict.PASSES - 1]
    return Ending(kind, length, flagsets, returned)


@contextmanager
def traced() -> Iterator[Trace]:
    """Within the block, every audit's verdict also records how its passes end."""
    trace = Trace()
    original = audit_module.decide

    def decide(signals: verdict.PoolSignals) -> list[verdict.AdapterVerdict]:
        out = original(signals)
        ending = _ending(signals)
        assert ending.returned == frozenset(v.index for v in out if v.flagged), "trace out of step with decide"
        trace.endings.append(ending)
        return out

    audit_module.decide = decide
    try:
        yield trace
    finally:
        audit_module.decide = original
