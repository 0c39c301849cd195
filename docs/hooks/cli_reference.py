"""MkDocs hook: the command reference, generated from clair's Typer app at build time.

A page that contains the marker ``<!-- clair:cli-reference -->`` gets, in its place, one
section per command of ``clair_cli.cli.app``: usage, the command's help text, its options
(names, metavar, help and default, as ``--help`` shows them) with the choices of each named
option, and its examples. Nothing is copied by hand, so the reference cannot drift from the
code; a build fails if the app cannot be imported.

Only Typer's public API (``typer.main.get_command``) and the command objects' documented
help methods (``make_context``, ``get_params``, ``get_help_record``, ``collect_usage_pieces``)
are used: they exist in Click and in the Click that recent Typer bundles.
"""

from __future__ import annotations

import enum
import inspect
import re
import sys
import typing
from pathlib import Path

MARKER = "<!-- clair:cli-reference -->"
ROOT = Path(__file__).resolve().parents[2]


def _app():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from clair_cli.cli import app

    return app


def _unescape(text: str) -> str:
    """Rich markup escapes (``\\[plot]``) as the terminal shows them."""
    return text.replace("\\[", "[")


def _md_cell(text: str) -> str:
    return _unescape(text).replace("|", "\\|").replace("\n", " ")


def _choices(callbacks: dict[str, typing.Any], command: str) -> dict[str, list[str]]:
    """Parameter name -> the values of its Enum type, read from the command function's annotations."""
    func = callbacks.get(command)
    if func is None:
        return {}
    try:
        hints = typing.get_type_hints(func, include_extras=True)
    except Exception:  # noqa: BLE001 - a reference without choices beats a failed build
        return {}
    found: dict[str, list[str]] = {}
    for name in inspect.signature(func).parameters:
        hint = hints.get(name)
        if typing.get_origin(hint) is typing.Annotated:
            hint = typing.get_args(hint)[0]
        if isinstance(hint, type) and issubclass(hint, enum.Enum):
            found[name] = [str(member.value) for member in hint]
    return found


def _examples(epilog: str | None) -> str:
    if not epilog:
        return ""
    lines = [line.strip() for line in epilog.strip().splitlines()]
    body = [line for line in lines if line and line.rstrip(":") != "Examples"]
    if not body:
        return ""
    return "**Examples**\n\n```bash\n" + "\n".join(body) + "\n```\n"


def _help_text(text: str | None) -> str:
    if not text:
        return ""
    # Typer's docstrings: paragraphs separated by blank lines; keep them, join wrapped lines.
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", inspect.cleandoc(text))]
    return "\n\n".join(_unescape(p) for p in paragraphs if p) + "\n"


def render() -> str:
    import typer.main

    app = _app()
    group = typer.main.get_command(app)
    callbacks = {
        (info.name or info.callback.__name__.replace("_", "-")): info.callback
        for info in app.registered_commands
        if info.callback is not None
    }
    root_ctx = group.make_context("clair", [], resilient_parsing=True)
    out: list[str] = []
    for name in group.list_commands(root_ctx):
        command = group.get_command(root_ctx, name)
        if command is None or command.hidden:
            continue
        ctx = command.make_context(name, [], parent=root_ctx, resilient_parsing=True)
        usage = " ".join(["clair", name, *command.collect_usage_pieces(ctx)])
        out.append(f"## `clair {name}`\n")
        out.append(f"```text\n{usage}\n```\n")
        out.append(_help_text(command.help))
        choices = _choices(callbacks, name)
        rows = []
        arguments = []
        for param in command.get_params(ctx):
            if getattr(param, "hidden", False) and param.param_type_name != "argument":
                continue
            if param.param_type_name == "argument":
                metavar = param.metavar or param.name.upper()
                arguments.append(f"`{metavar}{'...' if param.nargs == -1 else ''}`")
                continue
            record = param.get_help_record(ctx)
            if record is None:
                continue
            names, help_text = record
            if param.name in choices and "|".join(choices[param.name]) not in names:
                help_text = f"{help_text} Choices: " + ", ".join(f"`{c}`" for c in choices[param.name]) + "."
            # Pipes inside a code span do not split a Python-Markdown table cell; outside, escape them.
            rows.append(f"| `{_unescape(names)}` | {_md_cell(help_text)} |")
        if arguments:
            out.append("**Arguments**: " + ", ".join(arguments) + "\n")
        if rows:
            out.append("| option | meaning |\n|---|---|\n" + "\n".join(rows) + "\n")
        out.append(_examples(command.epilog))
    return "\n".join(out)


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 - MkDocs hook signature
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, render())


if __name__ == "__main__":  # python docs/hooks/cli_reference.py: print the generated reference
    print(render())
