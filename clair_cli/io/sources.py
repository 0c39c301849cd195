"""Turn source strings into adapters.

A source is a PEFT adapter directory, a directory of such directories (every
adapter below it, sorted, named by relative path), a single ``.safetensors``
file (config beside it or from flags), or a Hugging Face Hub id. Pickle
checkpoints are refused without being opened. Inside a directory source, every
file must resolve inside that directory: a symlink that leads out is refused.
"""

from __future__ import annotations

import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

from clair_cli.constants import (
    CONFIG_NAME,
    DEFAULT_MAX_ADAPTERS,
    DEFAULT_MAX_RANK,
    HUB_PREFIX,
    MAX_SOURCE_DEPTH,
    PICKLE_HINT,
    PICKLE_SUFFIXES,
    PICKLE_WEIGHTS_NAMES,
    SAFETENSORS_WEIGHTS_NAME,
)
from clair_cli.errors import AdapterFormatError, AdapterNotFound, ClairError, UnsafeFormatError, UsageError
from clair_cli.io import hub
from clair_cli.io.adapter import Adapter
from clair_cli.io.base_model import canonical_base_model
from clair_cli.io.paths import printable
from clair_cli.io.peft_config import load_config
from clair_cli.io.safetensors_file import read_header
from clair_cli.types import AdapterConfig, AdapterRef

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class SourceOptions:
    """Options that shape how sources are read.

    Attributes:
        subfolder: hub subfolder applied to hub ids that name none.
        config: config file for bare ``.safetensors`` sources (overrides one beside it).
        lora_alpha: alpha for bare ``.safetensors`` files without a config.
        use_rslora: scale by alpha/sqrt(r) for such files.
        base_model: the base model of every source (it replaces what a config says, with a note).
        max_rank: adapters with a module of higher rank are refused before any factor is read.
        max_adapters: more adapters than this in one run are refused before any is opened.
        revision: hub revision for hub ids that name none (``--revision``).
        token: Hugging Face token for hub sources (``--token``); None: HF_TOKEN or the saved login.
    """

    subfolder: str | None = None
    config: Path | None = None
    lora_alpha: float | None = None
    use_rslora: bool = False
    base_model: str | None = None
    max_rank: int = DEFAULT_MAX_RANK
    max_adapters: int = DEFAULT_MAX_ADAPTERS
    revision: str | None = None
    token: str | None = field(default=None, repr=False)


def _list_entry(line: str, base: Path) -> str:
    """One source of a list file: a relative path is read from the list file's directory."""
    if line.startswith(HUB_PREFIX):
        return line
    if line.startswith("~"):
        line = os.path.expanduser(line)
    if Path(line).is_absolute():
        return line
    beside = os.path.normpath(base / line)
    if Path(beside).exists() or not hub.looks_like_hub_id(line):
        return beside
    return line  # owner/name: a hub id, as on the command line


def expand_sources(specs: Sequence[str], stdin: TextIO | None = None) -> list[str]:
    """Replace ``@FILE`` by the sources it lists and ``-`` by those listed on ``stdin``.

    A list holds one source a line; blank lines and lines starting with ``#`` are skipped;
    relative paths in a file are read from that file's directory (from the working directory
    for stdin). A list cannot name further lists.

    Raises:
        UsageError: a list file that cannot be read, ``-`` given twice, or a list naming a list.
    """
    out: list[str] = []
    read_stdin = False
    for spec in specs:
        if spec == "-":
            if read_stdin:
                raise UsageError("- (sources from stdin) is given twice")
            read_stdin = True
            source = stdin or sys.stdin
            if stdin is None and source.isatty():
                raise UsageError(
                    "- reads the sources from stdin, which is a terminal",
                    hint="Pipe the list in (ls -d runs/* | clair audit -), or use @FILE.",
                )
            try:
                text = source.read()
            except UnicodeDecodeError as exc:
                raise UsageError(f"stdin: the list of sources is not UTF-8 text ({exc.reason})") from None
            base, where = Path("."), "stdin"
        elif spec.startswith("@") and len(spec) > 1:
            listed = Path(spec[1:])
            try:
                text = listed.read_text(encoding="utf-8")
            except FileNotFoundError:
                raise UsageError(
                    f"{printable(spec)}: no such list file {printable(str(listed))}",
                    hint="@FILE names a text file listing one source a line; write ./@name for a path "
                    "that starts with @.",
                ) from None
            except (OSError, UnicodeDecodeError) as exc:
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise UsageError(f"{printable(spec)}: the list file cannot be read ({printable(why)})") from None
            base, where = listed.parent, printable(str(listed))
        else:
            out.append(spec)
            continue
        lines = [ln.strip() for ln in text.splitlines()]
        for n, line in enumerate(lines, 1):
            if not line or line.startswith("#"):
                continue
            if line == "-" or line.startswith("@"):
                raise UsageError(f"{where}, line {n}: {printable(line)}: a source list cannot name another list")
            out.append(line if where == "stdin" else _list_entry(line, base))
    return out


def _refuse_pickle(path: Path) -> UnsafeFormatError:
    return UnsafeFormatError(f"{path}: pickle checkpoints are never loaded", hint=PICKLE_HINT)


def _inside(path: Path, root: Path) -> Path:
    real = path.resolve()
    if not real.is_relative_to(root):
        raise UnsafeFormatError(
            f"{path}: symlink leads outside the source directory {root} (to {real})",
            hint="Copy the file into the adapter directory if you trust it.",
        )
    return path


def _adapter_dir_ref(
    directory: Path, name: str, source: str, root: Path, options: SourceOptions, path: str
) -> AdapterRef:
    weights = directory / SAFETENSORS_WEIGHTS_NAME
    config = directory / CONFIG_NAME
    if not weights.exists():
        for pickle_name in PICKLE_WEIGHTS_NAMES:
            if (directory / pickle_name).exists():
                raise _refuse_pickle(directory / pickle_name)
        raise AdapterFormatError(f"{directory}: has {CONFIG_NAME} but no {SAFETENSORS_WEIGHTS_NAME}")
    _inside(weights, root)
    if config.exists():
        _inside(config, root)
    elif options.config is None and options.lora_alpha is None:
        raise AdapterFormatError(
            f"{directory}: has {SAFETENSORS_WEIGHTS_NAME} but no {CONFIG_NAME}",
            hint="Pass --config FILE, or --lora-alpha (and --base-model) to describe it.",
        )
    return AdapterRef(name, source, weights, config if config.exists() else None, root=root, path=path)


def _bare_file_ref(file: Path, name: str, source: str, root: Path, options: SourceOptions, path: str) -> AdapterRef:
    """A ``.safetensors`` file in a directory of such files: described by --config or --lora-alpha."""
    _inside(file, root)
    if options.config is None and options.lora_alpha is None:
        raise AdapterFormatError(
            f"{printable(str(file))}: a bare .safetensors file in {printable(source)}, with no {CONFIG_NAME}",
            hint="Pass --config FILE, or --lora-alpha (and --base-model), to describe the files of the directory.",
        )
    return AdapterRef(name, source, file, None, root=root, path=path)


def _is_adapter_dir(directory: Path) -> bool:
    return any((directory / n).exists() for n in (CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, *PICKLE_WEIGHTS_NAMES))


def _add(
    refs: list[AdapterRef],
    errors: list[tuple[str, str, ClairError]] | None,
    name: str,
    source: str,
    make: Callable[[], AdapterRef],
) -> None:
    """Append ``make()`` to ``refs``; with an ``errors`` list, its error goes there instead of ending the run."""
    try:
        refs.append(make())
    except ClairError as exc:
        if errors is None:
            raise
        errors.append((name, source, exc))


def _resolve_local(
    spec: str, path: Path, options: SourceOptions, errors: list[tuple[str, str, ClairError]] | None = None
) -> list[AdapterRef]:
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise _refuse_pickle(path)
        if path.suffix.lower() != ".safetensors":
            raise AdapterFormatError(f"{path}: expected a .safetensors file or an adapter directory")
        beside = path.parent / CONFIG_NAME
        config = beside if beside.exists() and options.config is None else None
        if config is None and options.config is None and options.lora_alpha is None:
            raise AdapterFormatError(
                f"{path}: no {CONFIG_NAME} beside it",
                hint="Pass --config FILE, or --lora-alpha (and --base-model) to describe it.",
            )
        name = path.parent.resolve().name if path.name == SAFETENSORS_WEIGHTS_NAME else path.stem
        return [AdapterRef(name, spec, path, config, path=spec)]

    root = path.resolve()
    if _is_adapter_dir(path):
        return [_adapter_dir_ref(path, root.name or spec, spec, root, options, spec)]

    refs: list[AdapterRef] = []
    pickles: list[Path] = []
    bare: list[Path] = []

    def unreadable(exc: OSError) -> None:
        where = printable(str(exc.filename or path))
        raise AdapterNotFound(
            f"{where}: directory inside the source cannot be read ({exc.strerror or exc})",
            hint="Fix its permissions or move it out of the source; clair does not skip members silently.",
        )

    for dirpath, dirnames, filenames in os.walk(path, onerror=unreadable):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        if len(here.relative_to(path).parts) >= MAX_SOURCE_DEPTH:
            raise AdapterFormatError(
                f"{printable(str(here))}: more than {MAX_SOURCE_DEPTH} directory levels below the source "
                f"{printable(spec)}",
                hint="Name the adapter directories (or a closer parent) as sources.",
            )
        links = [d for d in dirnames if (here / d).is_symlink()]
        if links:
            raise UnsafeFormatError(
                f"{printable(str(here / links[0]))}: is a symlinked directory inside the source; "
                "clair does not follow directory links",
                hint="Give the link's target as a source of its own, or copy the adapter in.",
            )
        if here != path and _is_adapter_dir(here):
            rel = here.relative_to(path).as_posix()
            path_as_given = os.path.join(spec, rel)
            _add(refs, errors, rel, spec, lambda: _adapter_dir_ref(here, rel, spec, root, options, path_as_given))  # noqa: B023
            dirnames[:] = []  # an adapter's own subfolders are not further adapters
            continue
        pickles += [here / f for f in filenames if f.lower().endswith(PICKLE_SUFFIXES)]
        bare += [here / f for f in sorted(filenames) if f.lower().endswith(".safetensors") and not f.startswith(".")]
    if not refs and not errors:
        # A directory of bare .safetensors files (no adapter directory anywhere below it): each
        # file is an adapter, described by --config or --lora-alpha. Beside adapter directories,
        # such files are something else (a base model's weights) and are not adapters.
        for file in bare:
            rel = file.relative_to(path).as_posix()[: -len(".safetensors")]
            given = os.path.join(spec, file.relative_to(path).as_posix())
            _add(refs, errors, rel, spec, lambda: _bare_file_ref(file, rel, spec, root, options, given))  # noqa: B023
    if not refs and not errors:
        if pickles:
            raise _refuse_pickle(sorted(pickles)[0])
        raise AdapterNotFound(
            f"{path}: no adapter found (looked for directories with {CONFIG_NAME} and {SAFETENSORS_WEIGHTS_NAME}, "
            "and for .safetensors files)"
        )
    return sorted(refs, key=lambda r: r.name)


def resolve_sources(
    specs: Sequence[str],
    options: SourceOptions | None = None,
    errors: list[tuple[str, str, ClairError]] | None = None,
) -> list[AdapterRef]:
    """Resolve source strings to adapter references, in the order given.

    With ``errors`` (a list), an unreadable adapter inside a directory source is appended
    to it as ``(name, source, error)`` instead of ending the resolution.

    Raises:
        AdapterNotFound: a path or hub repo does not exist.
        UsageError: no source, or two adapters would get the same name.
    """
    options = options or SourceOptions()
    if not specs:
        raise UsageError("no source given", hint="Name adapter directories, files or hub repo ids.")
    refs: list[AdapterRef] = []
    for spec in specs:
        path = Path(spec)
        if spec.startswith("hf://"):
            refs.append(hub.fetch(spec, options.subfolder, options.revision, options.token))
        elif path.exists():
            refs.extend(_resolve_local(spec, path, options, errors))
        elif hub.looks_like_hub_id(spec) and not spec.startswith((".", "/", "~")):
            refs.append(hub.fetch(spec, options.subfolder, options.revision, options.token))
        else:
            raise AdapterNotFound(f"{spec}: no such file or directory")
    dupes = [name for name, n in Counter(r.name for r in refs).items() if n > 1]
    if dupes:
        where = [r.weights_file.as_posix() for r in refs if r.name == dupes[0]]
        raise UsageError(
            f"two adapters are both named {dupes[0]!r} ({' and '.join(where)})",
            hint="Give each source once, or put the adapters under one parent directory.",
        )
    return refs


def _flag_config(ref: AdapterRef, options: SourceOptions) -> AdapterConfig:
    # A bare file has no r: take each module's rank from its tensors.
    if options.lora_alpha is None:
        raise AdapterFormatError(f"{ref.weights_file}: no config", hint="Pass --config FILE or --lora-alpha.")
    tensors, _ = read_header(ref.weights_file)
    ranks: dict[str, int] = {}
    for key, info in tensors.items():
        if (key.endswith(".lora_A.weight") or key.endswith(".lora_embedding_A")) and info.shape:
            module = key.rsplit(".lora_", 1)[0].removeprefix("base_model.model.")
            ranks[module] = info.shape[0]
    common = Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
    return AdapterConfig(
        base_model=options.base_model,
        r=max(common, 1),
        lora_alpha=options.lora_alpha,
        use_rslora=options.use_rslora,
        rank_pattern={f"^{re.escape(m)}": r for m, r in ranks.items() if r != common and r > 0},
    )


def open_adapter(ref: AdapterRef, options: SourceOptions | None = None) -> Adapter:
    """Read one adapter's config and header (no tensor data)."""
    options = options or SourceOptions()
    config_file = options.config if ref.config_file is None or options.config else ref.config_file
    note = None
    if config_file is not None:
        config = load_config(config_file)
        if options.base_model:
            # --base-model names the base model of every source, whatever its config says.
            given = config.base_model
            if given and canonical_base_model(given) != canonical_base_model(options.base_model):
                note = f"--base-model {options.base_model!r} replaces the config's base model {given!r}"
            config = replace(config, base_model=options.base_model)
    else:
        config = _flag_config(ref, options)
    adapter = Adapter.open(ref, config, max_rank=options.max_rank)
    if note:
        adapter.notes.append(note)
    return adapter


def open_adapters(
    specs: Sequence[str],
    options: SourceOptions | None = None,
    progress: Progress | None = None,
) -> list[Adapter]:
    """Resolve sources and open every adapter.

    Args:
        specs: source strings.
        options: how to read them.
        progress: called as ``progress(name, done, total)`` after each adapter.
    """
    options = options or SourceOptions()
    refs = resolve_sources(specs, options)
    if len(refs) > options.max_adapters:
        raise UsageError(
            f"{len(refs)} adapters in {printable(', '.join(specs)[:200])}: more than --max-adapters "
            f"{options.max_adapters}",
            hint="The verdict's calibration grows with the square of the pool (README, Limits); "
            "raise --max-adapters if the machine has the time.",
        )
    adapters = []
    for i, ref in enumerate(refs):
        adapters.append(open_adapter(ref, options))
        if progress:
            progress(ref.name, i + 1, len(refs))
    return adapters
