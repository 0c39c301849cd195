"""Input-derived text placed in Markdown (PR comments, model cards) and YAML front matter.

Adapter names, sources and notes come from uploaders. Here they become inert, through
:func:`md_inert` (which every other function here applies): control characters escaped,
``@`` followed by a word joiner so that ``@org/team`` never mentions anyone on GitHub, and
``&`` / ``<`` as HTML entities where text is rendered as Markdown. Code spans are fenced
with more backticks than the text holds (CommonMark), table pipes escaped, Markdown
punctuation in plain text backslash-escaped, and YAML values written as JSON strings
(valid YAML, one line whatever the input).
"""

from __future__ import annotations

import json
import re

from clair_cli.io.paths import printable

_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~])")
WORD_JOINER = "\u2060"  # invisible; after "@" it stops GitHub's @mentions


def md_inert(text: str) -> str:
    """``text`` with what could act in any Markdown context made inert: control characters
    escaped (:func:`clair_cli.io.paths.printable`) and ``@`` followed by a word joiner (no
    @mention). The one function every input-derived string passes through."""
    return printable(text).replace("@", "@" + WORD_JOINER)


def md_code(text: str) -> str:
    """``text`` as an inline code span that it cannot break out of (safe inside a table cell)."""
    text = md_inert(text).replace("|", "\\|")
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text.strip() else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def md_text(text: str) -> str:
    """``text`` as plain Markdown text: no markup, links, HTML or table cells can come from it."""
    escaped = _MD_SPECIAL.sub(r"\\\1", md_inert(text))
    return escaped.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def md_fence(text: str) -> str:
    """A fenced code block holding ``text`` (the fence is longer than any backtick run in it)."""
    text = md_inert(text)
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text}\n{fence}"


def yaml_string(text: str) -> str:
    """A YAML scalar for ``text``: a JSON string, which YAML reads as a double-quoted scalar."""
    return json.dumps(text, ensure_ascii=True)
