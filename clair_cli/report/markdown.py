"""Input-derived text placed in Markdown (PR comments, model cards) and YAML front matter.

Adapter names, sources and notes come from uploaders. Here they become inert: control
characters escaped, code spans fenced with more backticks than the text holds, table
pipes escaped, Markdown and HTML punctuation in plain text backslash-escaped, and YAML
values written as JSON strings (valid YAML, one line whatever the input).
"""

from __future__ import annotations

import json
import re

from clair_cli.io.paths import printable

_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|~])")


def md_code(text: str) -> str:
    """``text`` as an inline code span that it cannot break out of (safe inside a table cell)."""
    text = printable(text).replace("|", "\\|")
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text.strip() else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def md_text(text: str) -> str:
    """``text`` as plain Markdown text: no markup, links, HTML or table cells can come from it."""
    return _MD_SPECIAL.sub(r"\\\1", printable(text))


def md_fence(text: str) -> str:
    """A fenced code block holding ``text`` (the fence is longer than any backtick run in it)."""
    text = printable(text)
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text}\n{fence}"


def yaml_string(text: str) -> str:
    """A YAML scalar for ``text``: a JSON string, which YAML reads as a double-quoted scalar."""
    return json.dumps(text, ensure_ascii=True)
