"""Module names as reports show them: short, unique within the pool, in layer order.

GPT-2 has ``attn.c_proj`` and ``mlp.c_proj`` in every block, so the leaf name alone is
ambiguous. :class:`ModuleNames` labels a module ``layer N <suffix>`` with the shortest
dotted suffix (after the layer number) that no other kind of module in the pool shares:
``layer 0 attn.c_proj`` and ``layer 0 mlp.c_proj`` for GPT-2, ``layer 0 q_proj`` for Llama.
Every report (terminal, Markdown, JSON reasons, plot) goes through it.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable

_LAYER_RE = re.compile(r"^(?P<prefix>.*?)(?:^|\.)(?:layers?|h|blocks?)\.(?P<n>\d+)\.(?P<rest>.+)$")
_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that puts ``layers.2`` before ``layers.10``."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in _DIGITS.split(name) if p)


def natural_sorted(names: Iterable[str]) -> list[str]:
    return sorted(names, key=natural_key)


def _ranges(nums: list[int]) -> str:
    nums = sorted(set(nums))
    parts, start, prev = [], nums[0], nums[0]
    for n in [*nums[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(parts)


class ModuleNames:
    """Short, unique labels for the modules of one pool.

    Args:
        names: every module the pool analyses (labels are unique among them).
    """

    def __init__(self, names: Iterable[str]) -> None:
        self.names = natural_sorted(set(names))
        parsed: dict[str, tuple[str, int | None, tuple[str, ...]]] = {}
        for name in self.names:
            m = _LAYER_RE.match(name)
            if m:
                parsed[name] = (m["prefix"], int(m["n"]), tuple(m["rest"].split(".")))
            else:
                parsed[name] = ("", None, tuple(name.split(".")))
        kinds = {rest for _, _, rest in parsed.values()}
        suffix: dict[tuple[str, ...], str] = {}
        for rest in kinds:
            for k in range(1, len(rest) + 1):
                if sum(other[-k:] == rest[-k:] for other in kinds) == 1:
                    break
            suffix[rest] = ".".join(rest[-k:])
        self._layer: dict[str, int | None] = {}
        self._kind: dict[str, str] = {}
        labels: dict[str, str] = {}
        for name, (_prefix, layer, rest) in parsed.items():
            kind = suffix[rest] if layer is not None else ".".join(rest)
            self._layer[name], self._kind[name] = layer, kind
            labels[name] = f"layer {layer} {kind}" if layer is not None else kind
        # Two stacks with the same layer numbers (encoder and decoder): the full name is unique.
        clash = {label for label, n in Counter(labels.values()).items() if n > 1}
        for name, label in labels.items():
            if label in clash:
                labels[name] = name
                self._layer[name], self._kind[name] = None, name
        self._labels = labels

    def short(self, name: str) -> str:
        """The label of ``name`` (the name itself for a module not in the pool)."""
        return self._labels.get(name, name)

    def summarise(self, names: list[str]) -> str:
        """Modules in words: ``layers 0-1 attn.c_proj``, ``all 8 modules``, or the first few."""
        n_total = len(self.names)
        if n_total > 1 and len(set(names)) == n_total:
            return f"all {n_total} modules"
        by_kind: dict[str, list[int]] = defaultdict(list)
        other = []
        for name in natural_sorted(names):
            layer = self._layer.get(name)
            if layer is None:
                other.append(self.short(name))
            else:
                by_kind[self._kind[name]].append(layer)
        parts = [
            f"layer{'s' if len(set(v)) > 1 else ''} {_ranges(v)} {kind}"
            for kind, v in sorted(by_kind.items(), key=lambda kv: (min(kv[1]), kv[0]))
        ]
        parts += other
        if len(parts) > 3:
            return ", ".join(parts[:3]) + f" and {len(parts) - 3} more"
        return ", ".join(parts)
