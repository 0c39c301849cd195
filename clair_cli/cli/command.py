"""The command class every ``clair`` command uses, and how commands are added to the app."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import typer
from typer.core import TyperCommand


def flags_without_type(params: list[Any]) -> list[Any]:
    """Flags show no value placeholder: newer Typer prints their Python type (<bool>) unless a
    metavar is set, and "" sets none. Options that take a value name it in options.py."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class ClairCommand(TyperCommand):
    """A command whose usage line reads ``[OPTIONS] SOURCE...`` under every Typer version."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = (param.metavar or param.name or "").upper()
                name = name if param.required else f"[{name}]"
                pieces.append(name + ("..." if param.nargs != 1 else ""))
        return pieces

    def get_params(self, ctx: Any) -> list[Any]:
        return flags_without_type(super().get_params(ctx))


def add_command(app: typer.Typer, name: str, command: Callable[..., Any], help: str, examples: str) -> None:
    """Add ``command`` to ``app`` as ``name``, with ``help`` and an examples epilog."""
    app.command(name, cls=ClairCommand, help=help, epilog=examples)(command)
