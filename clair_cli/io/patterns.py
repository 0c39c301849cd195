"""Which ``rank_pattern`` / ``alpha_pattern`` keys a config may hold: matching must stay bounded.

A config read from a hub is untrusted input, and its pattern keys are regular expressions
that PEFT matches against every module name. Keys whose matching could backtrack without
bound are refused when the config is read. Stdlib only.
"""

from __future__ import annotations

import re
from typing import Any

from clair_cli.constants import MAX_PATTERNS
from clair_cli.types import PLAIN_PATTERN

__all__ = ["LAYERS_PATTERN_WRAP", "MAX_PATTERNS", "pattern_risk", "split_alternation"]

# How PEFT (peft.tuners.tuners_utils.check_target_module_exists) and clair_cli.io.lora_config._in_layers
# match a layers_pattern: inside this expression, the one form compiled (clair_cli.io.peft_config checks that it does).
LAYERS_PATTERN_WRAP = r"(?:^|.*?\.){key}\.(?P<idx>\d+)\."

MAX_PATTERN_LENGTH = 512
# Adjacent unbounded repetitions over one alphabet cost O(n^k) for k of them: against a
# 1,024-character module name, 1.4 ms for \w*\w*x but 0.47 s for \w*\w*\w*x (half an hour over
# 4,096 modules), and the configs of real adapters use one or two (.*\.(q|v)_proj, ^(?!.*vision).*q_proj).
MAX_UNBOUNDED_REPEATS = 2


# A branch of a top-level alternation that matches one name only: characters that are not special, and
# punctuation escaped (``re.escape``'s output; a backslash and a letter or digit is a class or a backreference).
_LITERAL_BRANCH = re.compile(r"(?:[^\\.^$*+?{}\[\]()|]|\\[^A-Za-z0-9])*", re.S)
_TOKEN = re.compile(r"\\.|\||[^\\|]+", re.S)
# The whole pattern in one plain or non-capturing group, anchored or not: ``^(a|b)$`` full-matches what
# ``a|b`` does (no flags group such as ``(?i:...)``, and no named group, whose ``?`` the lookahead keeps out).
_OUTER_GROUP = re.compile(r"\^?\((?:\?:|(?!\?))(.*)\)\$?", re.S)
ALTERNATION_MIN_LENGTH = 1024  # shorter patterns: the re module's own cache is as fast


def split_alternation(pattern: str) -> tuple[frozenset[str], str | None] | None:
    """A pattern without groups or classes (so every unescaped ``|`` is top-level) as the names its
    literal branches match and its other branches joined (None: no other branch); None where it is
    not such a pattern. ``re.fullmatch`` backtracks across branches, so the pattern full-matches a
    name exactly where the name is one of those names or the other branches full-match it; and it
    compiles exactly where they do (a literal branch always compiles). What :func:`exact_targets
    <clair_cli.io.lora_config.exact_targets>` writes for a merged adapter is names alone. The whole
    alternation may stand in one group, ``(a|b)``, ``(?:a|b)`` or ``^(a|b)$``: for a full match that is
    the alternation itself (an escaped closing parenthesis leaves the group open: not a pattern)."""
    outer = _OUTER_GROUP.fullmatch(pattern)
    if outer is not None:
        pattern = outer.group(1)
    tokens = _TOKEN.findall(pattern)
    if "".join(tokens) != pattern:  # a lone backslash at the end: not a pattern
        return None
    branches: list[str] = []
    current: list[str] = []
    for token in tokens:
        if token == "|":
            branches.append("".join(current))
            current = []
        elif token[0] != "\\" and any(c in token for c in "()[]"):
            return None  # a group or a class: a '|' may be inside it
        else:
            current.append(token)
    branches.append("".join(current))
    names = frozenset(re.sub(r"\\(.)", r"\1", b, flags=re.S) for b in branches if _LITERAL_BRANCH.fullmatch(b))
    rest = [b for b in branches if not _LITERAL_BRANCH.fullmatch(b)]
    return names, "|".join(rest) if rest else None


def _re_internals() -> tuple[Any, Any]:
    try:
        from re import _constants as c  # type: ignore[attr-defined]
        from re import _parser as parser  # type: ignore[attr-defined]
    except ImportError:  # pragma: no cover - Python < 3.11
        import sre_constants as c  # type: ignore[no-redef]
        import sre_parse as parser  # type: ignore[no-redef]
    return c, parser


class _Walk:
    """A walk over ``re``'s parse tree that names the first construct that could backtrack
    without bound, and counts the unbounded repetitions on the way."""

    def __init__(self, constants: Any) -> None:
        self.c = constants
        self.repeats = (constants.MAX_REPEAT, constants.MIN_REPEAT, getattr(constants, "POSSESSIVE_REPEAT", None))
        self.unbounded = 0

    def items(self, items: Any, in_repeat: bool) -> str | None:
        for op, av in items:
            why = self.node(op, av, in_repeat)
            if why:
                return why
        return None

    def node(self, op: Any, av: Any, in_repeat: bool) -> str | None:
        c = self.c
        if op in (c.GROUPREF, c.GROUPREF_EXISTS):
            return "uses a backreference"
        if op in self.repeats:
            return self.repeat(av, in_repeat)
        if op == c.BRANCH:
            if in_repeat:
                return "repeats an alternation (catastrophic backtracking)"
            return self.first(av[1], in_repeat)
        return self.first(self.bodies(op, av), in_repeat)

    def repeat(self, av: Any, in_repeat: bool) -> str | None:
        lo, hi, body = av
        if hi <= 1:
            # An optional element inside a repetition makes the repeated body match strings of
            # several lengths, as an alternation does: (?:\w\w?)+ splits a run of n letters in
            # exponentially many ways, and (?:\w?){40}\w{40} in C(80, 40).
            if in_repeat and lo < hi:
                return "repeats an optional element (catastrophic backtracking)"
            return self.items(body, in_repeat)
        if in_repeat:
            return "nests one repetition inside another (catastrophic backtracking)"
        self.unbounded += hi == self.c.MAXREPEAT
        return self.items(body, True)

    def first(self, bodies: Any, in_repeat: bool) -> str | None:
        for body in bodies:
            why = self.items(body, in_repeat)
            if why:
                return why
        return None

    def bodies(self, op: Any, av: Any) -> list[Any]:
        c = self.c
        if op == c.SUBPATTERN:
            return [av[3]]
        if op in (c.ASSERT, c.ASSERT_NOT):
            return [av[1]]
        if op == getattr(c, "ATOMIC_GROUP", None):
            return [av]
        return []


def _matches_the_rest(c: Any, item: Any) -> bool:
    """Whether ``item`` is a final ``.*``: it takes what is left of a module name in one step
    (names hold no newline: :func:`clair_cli.io.safetensors_file.read_header`), so it adds no
    backtracking and is not counted (``.*\\.layers\\.\\d+\\.mlp\\..*``, Idefics2's
    ``.*(text_model|...).*(q_proj|...).*$``)."""
    op, av = item
    return op in (c.MAX_REPEAT, c.MIN_REPEAT) and av[0] == 0 and av[1] == c.MAXREPEAT and list(av[2]) == [(c.ANY, None)]


def pattern_risk(key: str, anchored: bool = False) -> str | None:
    """Why matching ``key`` (a rank_pattern / alpha_pattern key) could take unbounded time, or ``None``.

    Backtracking blows up on a repetition whose body can itself repeat, branch or skip an
    optional element (``(a+)+``, ``(a|ab)*``, ``(ab?)+``) and on backreferences; those are
    refused, as are very long patterns and more than two unbounded repetitions (matching then
    stays at most quadratic in the module name's length; a final ``.*`` is not counted, see
    :func:`_matches_the_rest`). Everything PEFT's own examples use passes.

    ``anchored``: the pattern is matched from the start of the name only (``target_modules`` and
    ``exclude_modules``, which PEFT full-matches), so a lookaround it starts with is tried once,
    in linear time, and its repetitions are not counted (``^(?!.*visual).*(?:q_proj|v_proj).*``,
    as vision-language fine-tunes write it). A rank_pattern key is matched after PEFT's
    ``(.*\\.)?``, at every dot, and each of its repetitions counts.
    """
    if len(key) > MAX_PATTERN_LENGTH:
        return f"is longer than {MAX_PATTERN_LENGTH} characters"
    if PLAIN_PATTERN.match(key):
        return None
    c, parser = _re_internals()
    walk = _Walk(c)
    try:
        items = list(parser.parse(key))
        lead = 0
        while anchored and lead < len(items) and items[lead][0] in (c.AT, c.ASSERT, c.ASSERT_NOT):
            lead += 1
        end = len(items)
        while end > lead and items[end - 1] in ((c.AT, c.AT_END), (c.AT, c.AT_END_STRING)):
            end -= 1
        if end > lead and _matches_the_rest(c, items[end - 1]):
            end -= 1
        # (the leading lookarounds are still checked for what backtracks without bound)
        why = _Walk(c).items(items[:lead], False) or walk.items(items[lead:end], False)
    except Exception as exc:  # noqa: BLE001 - re's own parser errors, reported as an invalid pattern
        return f"is not a valid regular expression ({exc})"
    if why is None and walk.unbounded > MAX_UNBOUNDED_REPEATS:
        why = f"has more than {MAX_UNBOUNDED_REPEATS} unbounded repetitions"
    return why
