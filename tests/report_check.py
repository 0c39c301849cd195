"""Check a JSON report or SARIF log that a command wrote against its schema.

clair's reports against ``clair_cli/schemas/<command>.schema.json`` (draft 2020-12), SARIF
logs against the OASIS SARIF 2.1.0 schema (``tests/data``, draft-04). ``tests/conftest.py``
applies :func:`problems` to every report written in the tests' own process (CliRunner) and
``helpers.run_cli`` to the ``--json`` / ``--sarif`` output of every command it runs, so each
test that writes a report also checks it.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

SARIF_SCHEMA = Path(__file__).parent / "data" / "sarif-schema-2.1.0.json"
REPORT_KINDS = ("audit", "gate", "merge", "refine", "inspect")


@functools.cache
def validator(kind: str) -> Any:
    """A validator for a report kind, or ``"sarif"``; formats (date-time, uri) checked."""
    import jsonschema

    if kind == "sarif":
        schema = json.loads(SARIF_SCHEMA.read_text(encoding="utf-8"))
        cls: Any = jsonschema.Draft4Validator
    else:
        from clair_cli import schemas

        schema = schemas.load(kind)
        cls = jsonschema.Draft202012Validator
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def kind_of(doc: Any) -> str | None:
    """``"sarif"``, a report's command, or None for anything else (Markdown, configs)."""
    if not isinstance(doc, dict):
        return None
    if doc.get("version") == "2.1.0" and "runs" in doc:
        return "sarif"
    if doc.get("tool") == "clair" and "schema" in doc and doc.get("command") in REPORT_KINDS:
        return str(doc["command"])
    return None


def problems(doc: Any, where: str = "report") -> list[str]:
    """What is wrong with ``doc`` by its schema (nothing for a document that is no report)."""
    kind = kind_of(doc)
    if kind is None:
        return []
    errors = sorted(validator(kind).iter_errors(doc), key=lambda e: list(e.absolute_path))
    return [f"{where} ({kind}): at {'/'.join(map(str, e.absolute_path)) or '/'}: {e.message[:300]}" for e in errors]


def text_problems(text: str, where: str = "report") -> list[str]:
    """:func:`problems` of a written text, if it is JSON at all."""
    try:
        doc = json.loads(text)
    except ValueError:
        return []
    return problems(doc, where)


def assert_valid(doc: Any, kind: str, where: str = "report") -> None:
    """``doc`` is a valid document of ``kind`` (``"sarif"`` or a command)."""
    assert kind_of(doc) == kind, f"{where}: not a {kind} document"
    found = problems(doc, where)
    assert not found, "\n".join(found)


def option_values(args: list[str] | tuple[str, ...], option: str) -> list[str]:
    """The values given to ``option`` (``--json FILE`` or ``--json=FILE``) in a command line."""
    values = []
    for i, arg in enumerate(args):
        if arg == option and i + 1 < len(args):
            values.append(args[i + 1])
        elif arg.startswith(option + "="):
            values.append(arg.split("=", 1)[1])
    return values


def check_cli_outputs(args: list[str] | tuple[str, ...], returncode: int, stdout: str, cwd: Path | None = None) -> None:
    """The reports and logs a finished command wrote (``--json``, ``--sarif``) follow their schemas.

    Only a run that exited 0 or 1 has written them: exit 2 writes nothing.
    """
    if returncode not in (0, 1):
        return
    found: list[str] = []
    for option in ("--json", "--sarif"):
        for value in option_values(args, option):
            if value in ("-", "/dev/stdout"):
                found += text_problems(stdout, f"{option} -")
                continue
            path = Path(value) if cwd is None else cwd / value
            if value != "/dev/null" and path.is_file():
                found += text_problems(path.read_text(encoding="utf-8"), f"{option} {value}")
    assert not found, "\n".join(found)
