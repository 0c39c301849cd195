"""Results to JSON dicts, rich tables, Markdown and PNG. No math, no file reading."""

from __future__ import annotations

import json
import re
from typing import Any

_SURROGATE = re.compile("[\ud800-\udfff]")


def json_text(obj: Any, **options: Any) -> str:
    """``json.dumps(obj, **options)`` whose strings are text every JSON parser reads: a lone UTF-16
    surrogate, which Python holds for a byte of a file name that is not UTF-8 (``b"\\xff"`` read
    as ``"\\udcff"``), would be written as the escape ``"\\udcff"``, which Python reads back but
    strict parsers (serde_json, Go's encoding/json) refuse or replace; it is written as the six
    characters ``\\udcff`` instead, as the terminal and Markdown show it."""
    return json.dumps(_without_surrogates(obj), **options)


def _without_surrogates(obj: Any) -> Any:
    if isinstance(obj, str):
        return _SURROGATE.sub(lambda m: m.group(0).encode("unicode_escape").decode("ascii"), obj)
    if isinstance(obj, dict):
        return {_without_surrogates(k): _without_surrogates(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_without_surrogates(v) for v in obj]
    return obj
