"""The command class every ``clair`` command uses, how commands are added to the app, and the
option groups that several commands share."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from typing import Any

import typer
from typer.core import TyperCommand

from clair_cli import numerics
from clair_cli.cli.common import check_normal
from clair_cli.cli.interrupts import import_numerics
from clair_cli.cli.threads import flush_denormals


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

    def invoke(self, ctx: Any) -> Any:
        for param in self.get_params(ctx):
            value = ctx.params.get(param.name)
            if isinstance(value, float) and param.opts:
                check_normal(max(param.opts, key=len), value)
        # Set up where the command first needs tensors (clair_cli.numerics): a command that ends
        # on its options, a path, a config or a header never imports torch.
        with numerics.deferred(numerical_setup):
            return super().invoke(ctx)


def numerical_setup() -> Callable[[], None]:
    """Import the numerical stack where a Ctrl-C cannot leave it half-imported, then flush
    subnormal numbers to zero before torch starts its threads (each inherits the setting);
    return what puts that setting back, for a program that runs commands in its own process
    (a test's CliRunner)."""
    import_numerics()
    return flush_denormals()


def add_command(app: typer.Typer, name: str, command: Callable[..., Any], help: str, examples: str) -> None:
    """Add ``command`` to ``app`` as ``name``, with ``help`` and an examples epilog (its
    :class:`OptionGroup` parameters expanded into their options)."""
    app.command(name, cls=ClairCommand, help=help, epilog=examples)(expand_groups(command))


class OptionGroup:
    """Base of a frozen dataclass whose fields are options shared by several commands.

    Each field is annotated with an option alias of :mod:`clair_cli.cli.options` and has the
    option's default. A command takes the group as one parameter; :func:`add_command` shows
    Typer the group's fields as options in its place, and the command receives the group
    built from their values.
    """


def _group_fields(group: type[OptionGroup]) -> list[inspect.Parameter]:
    hints = typing.get_type_hints(group, include_extras=True)
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    empty = inspect.Parameter.empty
    return [
        inspect.Parameter(
            f.name, kind, default=empty if f.default is dataclasses.MISSING else f.default, annotation=hints[f.name]
        )
        for f in dataclasses.fields(group)  # type: ignore[arg-type]
    ]


def expand_groups(command: Callable[..., Any]) -> Callable[..., Any]:
    """``command`` with each :class:`OptionGroup` parameter shown to Typer as the group's options.

    The wrapper has the expanded signature (``__signature__`` and ``__annotations__``, which is
    all Typer reads) and calls ``command`` with every group built from its options' values.
    """
    hints = typing.get_type_hints(command, include_extras=True)
    params: list[inspect.Parameter] = []
    groups: dict[str, type[OptionGroup]] = {}
    for p in inspect.signature(command).parameters.values():
        annotation = hints.get(p.name, p.annotation)
        if isinstance(annotation, type) and issubclass(annotation, OptionGroup):
            groups[p.name] = annotation
            params += _group_fields(annotation)
        else:
            params.append(p.replace(annotation=annotation))
    if not groups:
        return command

    @functools.wraps(command)
    def wrapper(**values: Any) -> Any:
        for name, group in groups.items():
            fields = [f.name for f in dataclasses.fields(group)]  # type: ignore[arg-type]
            values[name] = group(**{f: values.pop(f) for f in fields})
        return command(**values)

    del wrapper.__wrapped__  # Typer must see the expanded signature, not the command's
    wrapper.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}
    return wrapper
