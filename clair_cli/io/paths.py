"""Where clair may write: the one containment check for every output path.

Every file clair writes is either inside ``--out`` (through :class:`AtomicDir`), a
report file the user named (``--json``, ``--markdown``, ``--plot``), or a hub
download inside the huggingface_hub cache. This module owns the rules:

- names that come from inputs (adapter names, hub ids) become path components
  through :func:`safe_relpath`, which can never climb out (no ``..``, no absolute
  path, no control characters, never empty), and :func:`join_inside` checks that
  the joined path resolves inside its root;
- ``--out`` may not be, contain or lie inside an input, the current or home
  directory, the filesystem root or the hub cache (:func:`check_out_dir`);
- a report file may not be an input, nor lie in the directory of a PEFT adapter being read (its
  model card would be replaced), nor be anything but a regular file (:func:`check_report_file`):
  a symlink, a FIFO or a device is refused, not followed.

The umask is honoured for everything clair creates (:func:`umask`).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path

from clair_cli.constants import CONFIG_NAME
from clair_cli.errors import ClairError, OutputError, UsageError

# C0 and C1 control characters, DEL, the Unicode line/paragraph separators, the bidirectional
# controls (marks, embeddings, overrides, isolates: a name with U+202E shows its characters in
# reverse order, so one adapter could pass for another in a report, as in "Trojan Source") and
# the invisible joiners and spaces (two names that look the same), and lone surrogates (a file
# name's bytes that are not UTF-8, as Python decodes them, or a ``\ud800`` escape in a JSON
# string): no UTF-8 output can hold them.
CONTROL_RE = re.compile(
    r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff\ud800-\udfff]"
)
MAX_COMPONENT = 200  # bytes-safe below the usual 255-byte NAME_MAX


def printable(text: str) -> str:
    """``text`` with every control character written as an escape (``\\n``, ``\\x1b``).

    Used wherever an input-derived string reaches a terminal, a Markdown file or a
    model card, so a file name cannot move the cursor, recolour the screen or add lines.
    """
    return CONTROL_RE.sub(lambda m: m.group(0).encode("unicode_escape").decode("ascii"), text)


def shown_path(path: Path | str, limit: int = 300) -> str:
    """``path`` for a one-line message: control characters escaped, the middle of a very
    long path (one the OS refuses) elided."""
    text = str(path)
    if len(text) > limit:
        text = f"{text[: limit // 2]}...{text[-limit // 3 :]}"
    return printable(text)


def resolved(path: Path, what: str, error: type[ClairError] = UsageError) -> Path:
    """``path.resolve()``, with a symlink loop or a path the OS refuses as a one-line ``error``
    naming ``what`` (e.g. ``HOME=/x``)."""
    try:
        return path.resolve()
    except RuntimeError:  # Python 3.11 reports a loop this way; later versions raise OSError(ELOOP)
        raise error(f"{what}: is or passes through a symlink loop") from None
    except (OSError, ValueError) as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        raise error(f"{what}: cannot be resolved ({printable(why)})") from None


def safe_relpath(name: str) -> str:
    """A relative POSIX path built from ``name`` that cannot leave the directory it is joined to.

    ``/`` and ``\\`` separate components; empty and ``.`` components are dropped;
    components made only of dots (``..``, ``...``) become underscores; control
    characters become ``_``; over-long components are cut. Never returns ``""``.
    """
    parts = []
    for part in name.replace("\\", "/").split("/"):
        part = CONTROL_RE.sub("_", part).strip()
        if part in ("", "."):
            continue
        if set(part) == {"."}:
            part = "_" * len(part)
        parts.append(part.encode("utf-8")[:MAX_COMPONENT].decode("utf-8", "ignore") or "_")
    return "/".join(parts) or "adapter"


def join_inside(root: Path, relative: str) -> Path:
    """``root / relative``, refused unless it resolves inside ``root``."""
    path = root / relative
    real_root = resolved(root, shown_path(root), OutputError)
    real = resolved(path, shown_path(path), OutputError)
    if real == real_root or not real.is_relative_to(real_root):
        raise OutputError(f"{printable(str(path))}: would be written outside {printable(str(root))}")
    return path


def umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: Path, directory: bool = False) -> None:
    """Give a file made by mkstemp/mkdtemp (0600/0700) the mode a plain create would have."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def _hub_cache() -> Path | None:
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - a declared dependency
        return None
    return Path(constants.HF_HUB_CACHE)


def _related(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def input_paths(sources: Iterable[str], extra: Iterable[Path | None] = ()) -> list[Path]:
    """The local paths among the command's sources (and files such as ``--config``)."""
    paths = [Path(s) for s in sources if not s.startswith("hf://") and os.path.lexists(s)]
    paths += [p for p in extra if p is not None]
    return paths


def check_out_dir(out: Path, inputs: Iterable[Path]) -> None:
    """Refuse an output directory that replacing could destroy something it must not.

    Raises:
        OutputError: ``out`` is the filesystem root, the current or home directory (or
            contains one), the hub cache, or is, contains or lies inside an input.
    """
    shown = printable(str(out))
    real = resolved(out, f"--out {shown_path(out)}", OutputError)
    try:
        cwd = resolved(Path.cwd(), "the current directory")
    except FileNotFoundError:
        raise UsageError("the current directory no longer exists") from None
    home = resolved(Path(os.path.expanduser("~")), f"HOME={shown_path(os.path.expanduser('~'))}")
    if real == Path(real.anchor) or cwd.is_relative_to(real) or home.is_relative_to(real):
        where = "the filesystem root" if real == Path(real.anchor) else "the current or home directory"
        raise OutputError(
            f"--out {shown}: is or contains {where}; refusing to replace it",
            hint="Name a new directory for the output, e.g. --out merged/.",
        )
    cache = _hub_cache()
    if cache is not None and _related(real, resolved(cache, f"the Hugging Face cache {shown_path(cache)} (HF_HOME)")):
        raise OutputError(f"--out {shown}: is, contains or lies inside the Hugging Face cache {cache}")
    for path in inputs:
        src = resolved(path, shown_path(path))
        if _related(real, src) or _related(real, path.absolute()):
            raise OutputError(
                f"--out {shown}: is, contains or lies inside the input {printable(str(path))}",
                hint="Write the output somewhere outside the adapters being read.",
            )


def discarded(target: str) -> bool:
    """Whether a report target is the null device (``--json /dev/null``): accepted, never replaced."""
    return target == os.devnull or os.path.realpath(target) == os.devnull


def check_report_file(target: str, inputs: Iterable[Path] = ()) -> Path:
    """Check that a report file can be (re)placed: not an input nor beside an input file, and a
    regular file if it exists.

    Raises:
        OutputError: the path exists and is a directory, symlink, FIFO, socket or
            device; its directory does not exist; it is one of the inputs, or lies in the
            directory of a PEFT adapter whose files are inputs.
    """
    path = Path(target)
    shown = printable(target)
    if discarded(target):
        return Path(os.devnull)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise OutputError(f"{shown}: cannot be written ({exc.strerror or exc})") from exc
    if st is None and os.path.basename(target) in ("", "."):  # "reports/": Path() would drop the slash
        raise OutputError(
            f"{shown}: names a directory, which does not exist; a report is written to a file",
            hint="Give the path of a new or regular file.",
        )
    if st is not None and not stat.S_ISREG(st.st_mode):
        kind = (
            "a directory"
            if stat.S_ISDIR(st.st_mode)
            else "a symlink"
            if stat.S_ISLNK(st.st_mode)
            else "a FIFO"
            if stat.S_ISFIFO(st.st_mode)
            else "a device or socket"
        )
        raise OutputError(
            f"{shown}: exists and is {kind}; clair replaces only regular files",
            hint="Give the path of a new or regular file.",
        )
    parent = path.parent
    if not parent.is_dir():
        raise OutputError(f"{shown}: directory {printable(str(parent))} does not exist")
    real = resolved(path, shown, OutputError)
    sources = [(src, resolved(src, shown_path(src))) for src in inputs]
    for src, source in sources:
        if real == source:
            raise OutputError(f"{shown}: is one of the inputs ({printable(str(src))}); refusing to overwrite it")
    for src, source in sources:
        # (the directory the file is in, and the one its link lies in: git-annex links each file)
        if source.is_file() and any(
            real.parent == parent and (parent / CONFIG_NAME).exists()
            for parent in (source.parent, resolved(src.absolute().parent, shown_path(src)))
        ):
            # A file in a PEFT adapter's directory is part of that adapter (its model card, its
            # tokenizer), or would become part of it: reports go where no adapter lives. (A
            # folder of single-file LoRAs, kohya's, belongs to no one adapter.)
            raise OutputError(
                f"{shown}: lies in the directory of {printable(str(src))}, an adapter being read; "
                "refusing to write a report there",
                hint="Write the report outside the adapters' directories.",
            )
    return path
