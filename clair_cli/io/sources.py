"""Turn source strings into adapters.

A source is a PEFT adapter directory, a directory of such directories (every
adapter below it, sorted, named by relative path), a single ``.safetensors``
file (config beside it or from flags), or a Hugging Face Hub id. Pickle
checkpoints are refused without being opened.

Symlinks are followed, files and directories alike (a Hugging Face cache snapshot
is links into ``../../blobs``; a pool is often links to chosen adapters): what a
link names is read through the one bounded reader (:mod:`clair_cli.io.files`), so
it must be a regular file of bounded size. Dangling links, loops, one directory
reached twice and one weights file read as two adapters are errors, never skipped.
Several states of one training run below a directory source (an adapter with
``checkpoint-N`` folders inside, or two ``checkpoint-N`` folders side by side) are
refused with a list: they are not independent adapters, and the user names the
one to read. Beside adapter directories, a loose ``.safetensors`` file is not an adapter (a base
model's weights), but one whose tensor names are a LoRA's is refused with a list, never skipped.
An adapter inside a snapshot of the Hugging Face cache in use is named ``owner/name@<commit[:12]>``
and recorded as that hub repo and commit; a folder so laid out elsewhere is a local path, with a note.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

from clair_cli.constants import (
    CHECKPOINT_DIR_RE,
    COMFY_KEY_RE,
    CONFIG_NAME,
    DEFAULT_MAX_ADAPTERS,
    DEFAULT_MAX_MODULES,
    DEFAULT_MAX_RANK,
    DIFFUSERS_WEIGHTS_NAME,
    HUB_PREFIX,
    HUB_REPO_RE,
    KOHYA_PREFIXES,
    LAYOUT_NAMES,
    LORA_KEY_RE,
    MAX_LIST_BYTES,
    MAX_SOURCE_DEPTH,
    MLX_WEIGHTS_NAME,
    PICKLE_SUFFIXES,
    PICKLE_WEIGHTS_NAMES,
    SAFETENSORS_WEIGHTS_NAME,
    pickle_hint,
)
from clair_cli.errors import (
    AdapterFormatError,
    AdapterNotFound,
    ClairError,
    HubError,
    UnsafeFormatError,
    UsageError,
)
from clair_cli.io import hub
from clair_cli.io.adapter import Adapter, classify_keys
from clair_cli.io.base_model import CONV1D_LAYER_NAMES, canonical_base_model, conv1d_base_model
from clair_cli.io.diffusion import diffusers_reads_peft, layout_of, open_diffusion
from clair_cli.io.files import os_problem, probe, read_small
from clair_cli.io.hub import COMMIT_RE
from clair_cli.io.paths import printable, resolved, shown_path
from clair_cli.io.peft_config import load_config
from clair_cli.io.safetensors_file import TensorInfo, file_stamp, read_header
from clair_cli.types import AdapterConfig, AdapterRef

Progress = Callable[[str, int, int], None]
# The pickle PeftModel.from_pretrained loads where a directory has no adapter_model.safetensors
# (peft.utils.constants.WEIGHTS_NAME).
PEFT_PICKLE_NAME = PICKLE_WEIGHTS_NAMES[0]


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
        max_modules: adapters with more LoRA modules are refused before any factor is read.
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
    max_modules: int = DEFAULT_MAX_MODULES
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
    owner = base / line.partition("/")[0]
    if Path(beside).exists() or not hub.looks_like_hub_id(line) or owner.is_dir():
        return beside  # (owner/name with owner a directory there: a path, as on the command line)
    return line  # owner/name: a hub id, as on the command line


def list_files(specs: Sequence[str]) -> list[Path]:
    """The ``@FILE`` lists among ``specs`` (as :func:`expand_sources` reads them): inputs too, which
    no report or output may replace."""
    return [Path(spec[1:]) for spec in specs if spec.startswith("@") and len(spec) > 1]


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
                # Bounded like a list file: `clair audit - < /dev/zero` ends with an error, not
                # with the memory. A pipe is fine here (it is what `-` is for).
                text = source.read(MAX_LIST_BYTES + 1)
            except UnicodeDecodeError as exc:
                raise UsageError(f"stdin: the list of sources is not UTF-8 text ({exc.reason})") from None
            except OSError as exc:
                raise UsageError(f"stdin: the list of sources cannot be read ({exc.strerror or exc})") from None
            if len(text) > MAX_LIST_BYTES:
                raise UsageError(f"stdin: the list of sources is longer than {MAX_LIST_BYTES >> 20} MiB")
            text = text.removeprefix("\ufeff")  # a byte-order mark, as in a list file
            base, where = Path("."), "stdin"
        elif spec.startswith("@") and len(spec) > 1:
            listed = Path(spec[1:])
            try:
                if probe(listed) is None:
                    raise UsageError(
                        f"{printable(spec)}: no such list file {shown_path(listed)}",
                        hint="@FILE names a text file listing one source a line; write ./@name for a path "
                        "that starts with @.",
                    )
                raw = read_small(listed, MAX_LIST_BYTES, "a list of sources")
            except (AdapterNotFound, AdapterFormatError) as exc:
                raise UsageError(f"{exc.message} (the list file {printable(spec)})", hint=exc.hint) from None
            try:
                text = raw.decode("utf-8-sig")  # a byte-order mark (Windows editors) is not part of the first source
            except UnicodeDecodeError as exc:
                raise UsageError(f"{printable(spec)}: the list file is not UTF-8 text ({exc.reason})") from None
            base, where = listed.parent, shown_path(listed)
        else:
            out.append(spec)
            continue
        lines = [ln.strip() for ln in text.splitlines()]
        for n, line in enumerate(lines, 1):
            if not line or line.startswith("#"):
                continue
            if line == "-" or line.startswith("@"):
                raise UsageError(f"{where}, line {n}: {printable(line)}: a source list cannot name another list")
            if "\x00" in line:
                raise UsageError(f"{where}, line {n}: holds a NUL byte; a list of sources is text, one source a line")
            out.append(line if where == "stdin" else _list_entry(line, base))
    return out


def _refuse_pickle(path: Path) -> UnsafeFormatError:
    return UnsafeFormatError(f"{shown_path(path)}: pickle checkpoints are never loaded", hint=pickle_hint(path.name))


def _lexists(path: Path) -> bool:
    """Whether anything (a dangling link included) is at ``path``: false when nothing is (ENOENT,
    or ENOTDIR: a component of the path is a file).

    Raises:
        ClairError: any other error, naming the path: a directory without search permission (EACCES)
            cannot tell whether an adapter file is there, and is refused rather than read as no adapter.
    """
    try:
        os.lstat(path)
    except ValueError:  # a NUL byte: nothing of that name can exist
        return False
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return False
        problem = os_problem(exc, path)
        raise type(problem)(
            f"{problem.message} (cannot tell whether it exists)", hint=problem.hint or HINT_FIX
        ) from None
    return True


def _is_adapter_dir(directory: Path) -> bool:
    # lexists: a dangling link in an adapter file's place makes the directory an adapter whose
    # file cannot be read (an error naming it), not something skipped.
    names = (CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, DIFFUSERS_WEIGHTS_NAME, *PICKLE_WEIGHTS_NAMES)
    return any(_lexists(directory / n) for n in names)


def _is_diffusion_file(path: Path) -> bool:
    """Whether a bare weights file is a kohya, ComfyUI or diffusers LoRA (which needs no config).

    Raises:
        AdapterFormatError: the file mixes layouts, or its header cannot be read: a truncated or
            corrupt file, or no safetensors file at all, is that problem (named), not a missing config.
        AdapterNotFound: the file cannot be opened.
    """
    tensors, metadata = read_header(path)
    return layout_of(path, tensors, metadata) != "peft"


def _holds_lora(path: Path) -> bool:
    """Whether a file's tensor names are a LoRA's (kohya's or ComfyUI's ``lora_down`` / ``lora_up``,
    or ``lora_A`` / ``lora_B`` in any layout); False for other weights (a base model's) and for a
    file whose header cannot be read (nothing then tells that it is a LoRA)."""
    try:
        tensors, _metadata = read_header(path)
    except ClairError:
        return False
    return any(k.startswith(KOHYA_PREFIXES) or LORA_KEY_RE.match(k) or COMFY_KEY_RE.match(k) for k in tensors)


def _loose_loras_error(files: Sequence[Path], root: Path, spec: str, adapters: Sequence[Path]) -> AdapterFormatError:
    """The error for LoRA files that lie outside every adapter directory of a directory source
    that holds adapter directories (a scan reads those directories alone)."""
    folders = ", ".join(printable(a.relative_to(root).as_posix()) for a in sorted(adapters)[:3])
    folders += ", ..." if len(adapters) > 3 else ""
    if len(files) == 1:
        what = f"{shown_path(files[0])}: a LoRA file beside the adapter directories of {shown_path(spec)}"
        it = "it"
    else:
        listed = ", ".join(printable(f.relative_to(root).as_posix()) for f in files[:6])
        what = f"{shown_path(spec)}: holds {len(files)} LoRA files ({listed}{', ...' if len(files) > 6 else ''})"
        what += " beside its adapter directories"
        it = "they"
    first = os.path.join(spec, sorted(adapters)[0].relative_to(root).as_posix())
    return AdapterFormatError(
        f"{what} ({folders}); a scan of a directory that holds adapter directories reads only those, so "
        f"{it} would not be audited",
        hint=f"Name what to read: the LoRA files (e.g. {shown_path(files[0])}, or a directory that holds only them), "
        f"or the adapter directories (e.g. {shown_path(first)}); move the others out of {shown_path(spec)}.",
    )


def cache_snapshot(path: Path) -> tuple[str, str, str | None] | None:
    """``(repo_id, commit, subfolder)`` when ``path`` lies in a Hugging Face cache snapshot
    (``.../models--owner--name/snapshots/<40-hex commit>[/subfolder]``), else None."""
    parts = Path(os.path.abspath(path)).parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and COMMIT_RE.match(parts[i + 1]) and parts[i - 1].startswith("models--"):
            owner_name = parts[i - 1].removeprefix("models--").split("--")
            # Only a folder name the cache could have written: a valid repo id (the Hub allows no
            # ".." in one), never "../evil".
            repo_id = "/".join(owner_name)
            if len(owner_name) != 2 or not HUB_REPO_RE.match(repo_id) or ".." in repo_id:
                return None
            sub = "/".join(parts[i + 2 :]) or None
            return repo_id, parts[i + 1], sub
    return None


def in_hub_cache(path: Path) -> bool:
    """Whether ``path`` lies in the Hugging Face cache this process uses (HF_HUB_CACHE, or HF_HOME's
    ``hub``, as huggingface_hub reads them), links resolved: where a hub source, ``owner/name@<commit>``,
    reads the very files of that commit's snapshot."""
    from huggingface_hub import constants

    try:
        cache = os.path.realpath(constants.HF_HUB_CACHE)
        return os.path.realpath(path).startswith(cache.rstrip(os.sep) + os.sep)
    except (OSError, ValueError):
        return False


def unverified_snapshot_note(ref: AdapterRef) -> str | None:
    """The note of a local adapter laid out as a Hugging Face cache snapshot outside the cache in use:
    anyone can make such a folder, so its repo and commit are not recorded (None for any other adapter, and for
    a bare file of a snapshot in that cache: recorded as a local path too, but not outside the cache)."""
    if ref.repo_id is not None:
        return None
    snap = cache_snapshot(ref.weights_file.parent)
    if snap is None or in_hub_cache(ref.weights_file.parent):
        return None
    repo_id, commit, sub = snap
    where = repo_id + (f" (subfolder {sub})" if sub else "")
    return (
        f"a local folder laid out as the Hugging Face cache snapshot of {printable(where)} at commit {commit}, "
        "outside the cache in use (HF_HUB_CACHE / HF_HOME): nothing checks that its files are that commit's, so "
        f"it is recorded as a local path (the source hf://{printable(repo_id)}"
        + (f"/{printable(sub)}" if sub else "")
        + f"@{commit} reads that commit from the Hub)"
    )


def _local_ref(directory: Path, name: str, source: str, weights: Path, config: Path | None, path: str) -> AdapterRef:
    """A local adapter's reference; one inside a snapshot of the Hugging Face cache in use (where the hub
    source of its repo and commit reads the same files) is named and recorded as its hub repo
    (``owner/name[/subfolder]@<commit[:12]>``, commit and repo in reports). A folder so laid out elsewhere
    is a local path (:func:`unverified_snapshot_note` says what it claims)."""
    snap = cache_snapshot(directory)
    if snap is None or not in_hub_cache(directory):
        return AdapterRef(name, source, weights, config, path=path)
    repo_id, commit, sub = snap
    hub_name = repo_id + (f"/{sub}" if sub else "") + f"@{commit[:12]}"
    return AdapterRef(hub_name, source, weights, config, revision=commit, path=path, repo_id=repo_id, subfolder=sub)


def _adapter_dir_ref(directory: Path, name: str, source: str, options: SourceOptions, path: str) -> AdapterRef:
    weights = directory / SAFETENSORS_WEIGHTS_NAME
    config = directory / CONFIG_NAME
    pickle = directory / PEFT_PICKLE_NAME
    if not _lexists(weights) and _lexists(config) and _lexists(pickle) and not _mlx_beside_peft(config):
        # PeftModel.from_pretrained loads adapter_model.bin where adapter_model.safetensors is absent,
        # whatever diffusers or MLX-LM file lies beside it: reading that one would audit another update.
        raise _refuse_pickle(pickle)
    if not _lexists(weights) and _lexists(directory / DIFFUSERS_WEIGHTS_NAME):
        # A diffusion LoRA directory (save_lora_weights, or clair's own output): read at open.
        weights = directory / DIFFUSERS_WEIGHTS_NAME
        if _lexists(config):
            # No loader applies a config to that file: PeftModel.from_pretrained loads adapter_model.safetensors
            # (or .bin), none here, and diffusers' load_lora_weights reads the file without it (a hub repo so laid
            # out is refused too).
            raise AdapterFormatError(
                f"{shown_path(directory)}: has {CONFIG_NAME} beside {DIFFUSERS_WEIGHTS_NAME} and no "
                f"{SAFETENSORS_WEIGHTS_NAME}: PeftModel.from_pretrained loads no weights from it, and diffusers' "
                "load_lora_weights reads the file without that config (at scale 1, or its own metadata's), not at "
                "the config's alpha / r",
                hint=f"Move {CONFIG_NAME} away to read a diffusers LoRA as diffusers does, or name the file "
                f"({shown_path(weights)}) to read it with the config beside it.",
            )
        _refuse_diffusers_rivals(directory)
        return _local_ref(directory, name, source, weights, config if _lexists(config) else None, path)
    mlx = directory / MLX_WEIGHTS_NAME
    if _lexists(mlx) and not _lexists(weights) and not _mlx_beside_peft(config) and hub.is_peft_config(config):
        # PeftModel.from_pretrained loads adapter_model.safetensors (or .bin), none here; diffusers'
        # load_lora_weights reads adapters.safetensors without the config (a hub repo so laid out is refused too).
        raise AdapterFormatError(
            f"{shown_path(directory)}: has a PEFT {CONFIG_NAME} beside {MLX_WEIGHTS_NAME} and no "
            f"{SAFETENSORS_WEIGHTS_NAME}: PeftModel.from_pretrained loads no weights from it, and diffusers' "
            f"load_lora_weights reads {MLX_WEIGHTS_NAME} without that config (at scale 1), not at the config's "
            "alpha / r",
            hint=f"Name the file ({shown_path(mlx)}) to read it with the config beside it, or rename it "
            f"{SAFETENSORS_WEIGHTS_NAME} if it is the PEFT adapter's weights.",
        )
    if _lexists(mlx) and (not _lexists(weights) or _mlx_beside_peft(config)):
        # An MLX-LM adapter (clair_cli.io.mlx): its config gives the rank and scale, read at open; beside
        # an adapter_model.safetensors, read when the config is MLX-LM's (what mlx_lm loads from it).
        weights = mlx
        return _local_ref(directory, name, source, weights, config if _lexists(config) else None, path)
    if not _lexists(weights):
        for pickle_name in PICKLE_WEIGHTS_NAMES:
            if _lexists(directory / pickle_name):
                raise _refuse_pickle(directory / pickle_name)
        checkpoints = sorted(p.name for p in directory.glob(f"*_{MLX_WEIGHTS_NAME}"))[:1]
        raise AdapterFormatError(
            f"{shown_path(directory)}: has {CONFIG_NAME} but no {SAFETENSORS_WEIGHTS_NAME} (PEFT's) or "
            f"{MLX_WEIGHTS_NAME} (MLX-LM's)",
            # mlx_lm.lora saves 0000100_adapters.safetensors every --save-every steps beside the final file
            hint=f"For the MLX-LM checkpoint {printable(checkpoints[0])}, name the file itself: it is read with the "
            "config beside it."
            if checkpoints
            else None,
        )
    has_config = _lexists(config)
    if not has_config and options.config is None and options.lora_alpha is None:
        raise AdapterFormatError(
            f"{shown_path(directory)}: has {SAFETENSORS_WEIGHTS_NAME} but no {CONFIG_NAME}",
            hint="Pass --config FILE, or --lora-alpha (and --base-model) to describe it.",
        )
    _refuse_peft_rivals(directory, weights)
    return _local_ref(directory, name, source, weights, config if has_config else None, path)


def _refuse_diffusers_rivals(directory: Path) -> None:
    """Refuse a diffusers LoRA directory where diffusers' ``load_lora_weights(DIR)`` could load another file
    than its ``pytorch_lora_weights.safetensors``: it loads the first entry, in ``os.listdir`` order, whose
    name ends so (``v2_pytorch_lora_weights.safetensors``), and that order is the file system's."""
    try:
        names = os.listdir(directory)
    except (OSError, ValueError) as exc:
        raise os_problem(exc, directory) from None
    found = hub.diffusers_candidates(names)
    if found != [DIFFUSERS_WEIGHTS_NAME]:
        listed = ", ".join(printable(n) for n in found[:6]) + (", ..." if len(found) > 6 else "")
        raise AdapterFormatError(
            f"{shown_path(directory)}: holds {len(found)} files that diffusers' load_lora_weights may load "
            f"({listed}): it loads the first the directory lists, which need not be the "
            f"{DIFFUSERS_WEIGHTS_NAME} clair would read",
            hint=f"Name the file to read as the source (e.g. {shown_path(directory / DIFFUSERS_WEIGHTS_NAME)}), or "
            "move the others out of the directory.",
        )


def _refuse_peft_rivals(directory: Path, weights: Path) -> None:
    """Refuse a diffusion transformer's PEFT adapter directory where diffusers' ``load_lora_weights(DIR)`` (whose
    Flux.2, Krea 2, ERNIE-Image and Flux loaders read PEFT-format weights) could load another file than its
    ``adapter_model.safetensors``: without a ``weight_name`` it loads the first ``.safetensors`` entry of
    ``os.listdir`` (the file system's order), or of those named ``...pytorch_lora_weights.safetensors``."""
    try:
        names = os.listdir(directory)
    except (OSError, ValueError) as exc:
        raise os_problem(exc, directory) from None
    rivals = hub.peft_rivals(names)
    if not rivals or not diffusers_reads_peft(read_header(weights)[0]):
        return  # an LLM's adapter (no diffusers loader reads it), or nothing else diffusers would load
    raise AdapterFormatError(
        hub.rivals_message(shown_path(directory), rivals),
        hint=f"Move the other files out of the directory, or name the file to read as the source (e.g. "
        f"{shown_path(weights)}, read with the {CONFIG_NAME} beside it).",
    )


def _mlx_beside_peft(config: Path) -> bool:
    from clair_cli.io.mlx import is_mlx_config

    return _lexists(config) and is_mlx_config(config)


def _bare_file_ref(file: Path, name: str, source: str, options: SourceOptions, path: str) -> AdapterRef:
    """A ``.safetensors`` file in a directory of such files: described by --config or --lora-alpha."""
    if options.config is None and options.lora_alpha is None and not _is_diffusion_file(file):
        raise AdapterFormatError(
            f"{shown_path(file)}: a bare .safetensors file in {printable(source)}, with no {CONFIG_NAME}",
            hint="Pass --config FILE, or --lora-alpha (and --base-model), to describe the files of the directory.",
        )
    return AdapterRef(name, source, file, None, path=path)


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


@dataclass
class _Walk:
    """What a walk below a directory source found."""

    adapters: list[Path] = field(default_factory=list)  # adapter directories, in walk order
    bare: list[Path] = field(default_factory=list)  # .safetensors files
    pickles: list[Path] = field(default_factory=list)
    problems: list[tuple[Path, ClairError]] = field(default_factory=list)  # members that cannot be walked


def _walk(root: Path, spec: str) -> _Walk:
    """Every adapter directory, bare ``.safetensors`` file and pickle below ``root``, sorted.

    Symlinks are followed (a directory reached twice, through a loop or two links, is a problem,
    as are dangling links); dot entries are skipped; more than MAX_SOURCE_DEPTH levels end the walk.
    """
    found = _Walk()
    seen: dict[tuple[int, int], Path] = {}

    def visit(here: Path, depth: int) -> None:
        try:
            st = os.stat(here)
        except (OSError, ValueError) as exc:
            found.problems.append((here, os_problem(exc, here)))
            return
        key = (st.st_dev, st.st_ino)
        if key in seen:
            found.problems.append(
                (
                    here,
                    AdapterFormatError(
                        f"{shown_path(here)}: is the directory {shown_path(seen[key])} again "
                        "(a symlink loop, or two links to one directory)",
                        hint="Remove the extra link; each adapter is read once.",
                    ),
                )
            )
            return
        seen[key] = here
        if depth >= MAX_SOURCE_DEPTH:
            raise AdapterFormatError(
                f"{shown_path(here)}: more than {MAX_SOURCE_DEPTH} directory levels below the source {printable(spec)}",
                hint="Name the adapter directories (or a closer parent) as sources.",
            )
        try:
            if here != root and _is_adapter_dir(here):
                found.adapters.append(here)
        except ClairError as exc:  # a member that cannot be looked into is refused, never skipped
            found.problems.append((here, exc))
            return
        try:
            with os.scandir(here) as it:
                entries = sorted(it, key=lambda e: e.name)
        except (OSError, ValueError) as exc:
            problem = os_problem(exc, here)
            found.problems.append(
                (here, type(problem)(f"{problem.message}: directory inside the source cannot be read", hint=HINT_FIX))
            )
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = here / entry.name
            if entry.is_symlink():
                try:
                    os.stat(path)
                except (OSError, ValueError) as exc:
                    found.problems.append((path, os_problem(exc, path)))
                    continue
            if entry.is_dir():
                visit(path, depth + 1)
            elif entry.name.lower().endswith(PICKLE_SUFFIXES):
                found.pickles.append(path)
            elif entry.name.lower().endswith(".safetensors"):
                found.bare.append(path)

    visit(root, 0)
    return found


def _nesting(adapters: list[Path]) -> tuple[dict[Path, list[Path]], list[Path]]:
    """Adapter directories that are several states of one training run, and the rest.

    Returns ``(groups, single)``: ``groups`` maps a directory to the adapter directories it
    holds that cannot be told apart as independent adapters (an adapter with adapters below it,
    e.g. a final save with its ``checkpoint-N`` folders, or a folder of two or more
    ``checkpoint-N`` adapters); ``single`` are the other adapter directories.
    """
    groups: dict[Path, list[Path]] = {}
    found = set(adapters)
    outer: list[Path] = []
    for a in sorted(adapters):
        tops = [p for p in a.parents if p in found]  # nearest first: the last is the outermost
        if tops:
            groups.setdefault(tops[-1], [tops[-1]]).append(a)
        else:
            outer.append(a)
    rest = [a for a in outer if a not in groups]
    by_parent: dict[Path, list[Path]] = {}
    for a in rest:
        if CHECKPOINT_DIR_RE.match(a.name):
            by_parent.setdefault(a.parent, []).append(a)
    for parent, ckpts in by_parent.items():
        if len(ckpts) > 1:
            groups[parent] = ckpts
    grouped = {a for members in groups.values() for a in members}
    return groups, [a for a in rest if a not in grouped]


def _step(path: Path) -> tuple[int, str]:
    m = CHECKPOINT_DIR_RE.match(path.name)
    return (int(path.name.split("-")[1]) if m else -1, path.as_posix())


def _nesting_error(top: Path, members: list[Path], root: Path, spec: str) -> AdapterFormatError:
    where = os.path.join(spec, top.relative_to(root).as_posix()) if top != root else spec
    inner = sorted((m for m in members if m != top), key=_step)
    listed = ", ".join(printable(m.relative_to(top).as_posix()) for m in inner[:6])
    listed += ", ..." if len(inner) > 6 else ""
    latest = shown_path(os.path.join(where, inner[-1].relative_to(top).as_posix()))
    why = "states of one training run are not independent adapters"
    if top in members:
        what = f"is an adapter directory with {_plural(len(inner), 'more adapter')} below it ({listed})"
        pick = f"{shown_path(where)} for this adapter alone, or {latest}"
        if not all(CHECKPOINT_DIR_RE.match(m.name) for m in inner):
            # PEFT's save_pretrained writes each adapter of a model after the first in a subfolder
            why = (
                "states of one training run, or adapters saved together from one model (PEFT puts each "
                "adapter after the first in a subfolder of its name), are not independent adapters"
            )
    else:
        what = f"holds {len(inner)} training checkpoints ({listed})"
        pick = latest
    return AdapterFormatError(
        f"{shown_path(where)}: {what}: {why}",
        hint=f"Name the one to read as a source (e.g. {pick}), or move the others out of the source.",
    )


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


HINT_FIX = "Fix its permissions or move it out of the source; clair does not skip members silently."


def _resolve_local(
    spec: str,
    path: Path,
    st: os.stat_result,
    options: SourceOptions,
    errors: list[tuple[str, str, ClairError]] | None = None,
) -> list[AdapterRef]:
    if not stat.S_ISDIR(st.st_mode):
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise _refuse_pickle(path)
        if path.suffix.lower() != ".safetensors":
            raise AdapterFormatError(f"{shown_path(path)}: expected a .safetensors file or an adapter directory")
        beside = path.parent / CONFIG_NAME
        config = beside if _lexists(beside) and options.config is None else None
        if config is None and options.config is None and options.lora_alpha is None and not _is_diffusion_file(path):
            raise AdapterFormatError(
                f"{shown_path(path)}: no {CONFIG_NAME} beside it",
                hint="Pass --config FILE, or --lora-alpha (and --base-model) to describe it.",
            )
        directory = path.parent
        if path.name in (SAFETENSORS_WEIGHTS_NAME, DIFFUSERS_WEIGHTS_NAME):
            name = resolved(directory, shown_path(directory), AdapterNotFound).name or spec
        else:
            name = path.stem
        return [_local_ref(directory, name, spec, path, config, spec)]

    if _is_adapter_dir(path):
        name = resolved(path, shown_path(path), AdapterNotFound).name or spec
        return [_adapter_dir_ref(path, name, spec, options, spec)]

    found = _walk(path, spec)
    refs: list[AdapterRef] = []

    def rel(p: Path) -> str:
        return p.relative_to(path).as_posix()

    for where, problem in found.problems:
        if errors is None:
            raise problem
        errors.append((rel(where), spec, problem))
    # A pickle outside every adapter directory is an upload in a format never loaded, not a
    # training run's own files (training_args.bin, optimizer.pt sit beside its adapter files):
    # refused rather than skipped, so that a scan never passes over an adapter unread.
    for pickle_file in found.pickles:
        if found.adapters and not any(pickle_file.is_relative_to(a) for a in found.adapters):
            problem = _refuse_pickle(pickle_file)
            if errors is None:
                raise problem
            errors.append((rel(pickle_file), spec, problem))
    groups, single = _nesting(found.adapters)
    for top, members in groups.items():
        problem = _nesting_error(top, members, path, spec)
        if errors is None:
            raise problem
        errors.append((rel(top) if top != path else spec, spec, problem))
    for here in single:
        name = rel(here)
        given = os.path.join(spec, name)
        _add(refs, errors, name, spec, lambda: _adapter_dir_ref(here, name, spec, options, given))  # noqa: B023
    if found.adapters:
        # Beside adapter directories, a loose .safetensors file is something else (a base model's
        # weights) and is not read. One whose tensor names are a LoRA's is no such thing: read it or
        # not, the user decides (a scan never passes over an adapter unread).
        inside = set(found.adapters)
        loose = [f for f in found.bare if not any(p in inside for p in f.parents) and _holds_lora(f)]
        if loose and errors is None:
            raise _loose_loras_error(loose, path, spec, found.adapters)
        for file in loose:
            if errors is not None:
                errors.append((rel(file), spec, _loose_loras_error([file], path, spec, found.adapters)))
    if not found.adapters and not errors:
        # A directory of bare .safetensors files (no adapter directory anywhere below it): each
        # file is an adapter, described by --config or --lora-alpha. Beside adapter directories,
        # such files are something else (a base model's weights) and are not adapters.
        for file in found.bare:
            name = rel(file)[: -len(".safetensors")]
            given = os.path.join(spec, rel(file))
            _add(refs, errors, name, spec, lambda: _bare_file_ref(file, name, spec, options, given))  # noqa: B023
    refs = _one_commit_per_repo(refs, spec, errors)
    if not refs and not errors:
        if found.pickles:
            raise _refuse_pickle(sorted(found.pickles)[0])
        raise AdapterNotFound(
            f"{shown_path(path)}: no adapter found (looked for directories with {CONFIG_NAME} and "
            f"{SAFETENSORS_WEIGHTS_NAME}, and for .safetensors files)"
        )
    return sorted(refs, key=lambda r: r.name)


def _one_commit_per_repo(
    refs: list[AdapterRef], spec: str, errors: list[tuple[str, str, ClairError]] | None
) -> list[AdapterRef]:
    """Refuse the snapshots of several commits of one hub repo (and subfolder) below a directory source (a
    Hugging Face cache, or a repo's folder in it): they are states of one upload, not independent adapters
    (PeftModel.from_pretrained loads one revision), as two checkpoint-N folders of one run are. By the folders'
    layout, in the cache in use or not."""
    commits: dict[tuple[str, str | None], list[tuple[AdapterRef, str]]] = {}
    for ref in refs:
        snap = cache_snapshot(ref.weights_file.parent)
        if snap is not None:
            commits.setdefault((snap[0], snap[2]), []).append((ref, snap[1]))
    refused: set[str] = set()
    for (repo_id, sub), found in commits.items():
        same = [ref for ref, _ in found]
        if len({commit for _, commit in found}) < 2:
            continue
        where = printable(repo_id + (f"/{sub}" if sub else ""))
        listed = ", ".join(printable(r.name) for r in same[:6]) + (", ..." if len(same) > 6 else "")
        problem = AdapterFormatError(
            f"{shown_path(spec)}: holds the cache snapshots of {len(same)} commits of the hub repo {where} ({listed}): "
            "states of one upload are not independent adapters",
            hint=f"Name the one to read as a source (its snapshot folder, or hf://{where}@<commit>), or move the "
            "others out of the source.",
        )
        if errors is None:
            raise problem
        errors.append((where, spec, problem))
        refused.update(r.name for r in same)
    return [r for r in refs if r.name not in refused]


def _same_files(refs: list[AdapterRef]) -> None:
    """Refuse one weights file read as two adapters (two links to it, or a source given twice)."""
    seen: dict[tuple[int, int], AdapterRef] = {}
    for ref in refs:
        if ref.repo_id is not None and ref.path is None:
            continue  # hub downloads: the cache may share one blob between revisions
        try:
            st = os.stat(ref.weights_file)
        except (OSError, ValueError):
            continue  # reported when the file is opened
        key = (st.st_dev, st.st_ino)
        if key in seen:
            first = seen[key]
            raise UsageError(
                f"{printable(first.name)} and {printable(ref.name)} are the same file "
                f"({shown_path(first.weights_file)} and {shown_path(ref.weights_file)})",
                hint="Give each adapter once; a link to an adapter already in the pool reads it twice.",
            )
        seen[key] = ref


def _resolve_one(
    spec: str, options: SourceOptions, errors: list[tuple[str, str, ClairError]] | None
) -> list[AdapterRef]:
    if spec.startswith("hf://"):
        return [hub.fetch(spec, options.subfolder, options.revision, options.token)]
    path = Path(spec)
    st = probe(path)
    if st is not None:
        if options.subfolder and options.subfolder.strip("/"):
            # PeftModel.from_pretrained(base, DIR, subfolder=SUB) loads DIR/SUB: reading DIR itself would audit
            # another adapter than the one the option names.
            raise UsageError(
                f"{shown_path(spec)}: --subfolder {printable(options.subfolder)!r} applies to hub sources, and "
                "this is a local path",
                hint=f"Name the folder in the path ({shown_path(os.path.join(spec, options.subfolder))}), and a "
                "hub repo's folder in its source (hf://owner/name/FOLDER).",
            )
        return _resolve_local(spec, path, st, options, errors)
    owner = spec.partition("/")[0]
    if hub.looks_like_hub_id(spec) and not spec.startswith((".", "/", "~")):
        if not Path(owner).is_dir():
            try:
                return [hub.fetch(spec, options.subfolder, options.revision, options.token)]
            except (HubError, AdapterNotFound) as exc:
                # A local path with a typo reads as a hub id too: say which reading was taken.
                reading = f"(No local path {shown_path(spec)} exists, so it was read as a Hub repo id.)"
                exc.hint = " ".join(filter(None, [exc.hint, reading]))
                raise
        # owner/name where ./owner is a local directory: a path with a typo, not a hub id.
        raise AdapterNotFound(
            f"{shown_path(spec)}: no such file or directory (read as a local path, since {shown_path(owner)}/ is a "
            "directory here)",
            hint=f"For the Hugging Face Hub repo of that name, write hf://{printable(spec)}.",
        )
    raise AdapterNotFound(f"{shown_path(spec)}: no such file or directory")


def resolve_sources(
    specs: Sequence[str],
    options: SourceOptions | None = None,
    errors: list[tuple[str, str, ClairError]] | None = None,
) -> list[AdapterRef]:
    """Resolve source strings to adapter references, in the order given.

    With ``errors`` (a list), a source that cannot be read, or an unreadable adapter inside a
    directory source, is appended to it as ``(name, source, error)`` instead of ending the
    resolution (usage errors, such as two adapters of one name, still end it).

    Raises:
        AdapterNotFound: a path or hub repo does not exist.
        UsageError: no source, or two adapters would get the same name.
    """
    options = options or SourceOptions()
    if not specs:
        raise UsageError("no source given", hint="Name adapter directories, files or hub repo ids.")
    refs: list[AdapterRef] = []
    for spec in specs:
        try:
            refs.extend(_resolve_one(spec, options, errors))
        except (AdapterNotFound, AdapterFormatError, HubError) as exc:
            if errors is None:
                raise
            errors.append((printable(spec), printable(spec), exc))  # inspect shows it as a row
    dupes = [name for name, n in Counter(r.name for r in refs).items() if n > 1]
    if dupes:
        where = [r.weights_file.as_posix() for r in refs if r.name == dupes[0]]
        raise UsageError(
            f"two adapters are both named {dupes[0]!r} ({' and '.join(where)})",
            hint="Give each source once, or put the adapters under one parent directory.",
        )
    _same_files(refs)
    return refs


def _flag_config(
    ref: AdapterRef, options: SourceOptions, tensors: dict[str, TensorInfo], conv1d: bool | None
) -> AdapterConfig:
    """The config of a bare file, from --lora-alpha and the factors' own ranks (no r to check); ``conv1d``:
    whether the base model's layers are GPT-2's Conv1D (:func:`conv1d_base_model`), None if unknown."""
    if options.lora_alpha is None:
        raise AdapterFormatError(
            f"{shown_path(ref.weights_file)}: no config", hint="Pass --config FILE or --lora-alpha."
        )
    ranks: dict[str, int] = {}
    for module, parts in classify_keys(ref.weights_file, tensors).parts.items():
        a = parts.get("lora_A", parts.get("lora_embedding_A"))
        if a is not None and a.shape:
            ranks[module] = a.shape[0]
    common = Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
    return AdapterConfig(
        base_model=options.base_model,
        r=max(common, 1),
        lora_alpha=options.lora_alpha,
        use_rslora=options.use_rslora,
        # GPT-2's Conv1D layers (weights stored in x out), as the base model's config.json says: PEFT sets it so
        # at load, and a merged or refined config written from this one says it too.
        fan_in_fan_out=bool(conv1d),
        rank_pattern={f"^{re.escape(m)}": r for m, r in ranks.items() if r != common and r > 0},
        # A config without peft_version, as PEFT reads one (and the one a refined adapter gets from it).
        out_proj_doubled=True,
    )


def open_adapter(ref: AdapterRef, options: SourceOptions | None = None) -> Adapter:
    """Read one adapter's config and header (no tensor data)."""
    adapter = _open_adapter(ref, options or SourceOptions())
    for said in (unverified_snapshot_note(ref), ref.note):
        if said is not None and said not in adapter.notes:
            adapter.notes.append(said)
    return adapter


def _open_adapter(ref: AdapterRef, options: SourceOptions) -> Adapter:
    config_file = options.config if ref.config_file is None or options.config else ref.config_file
    note = None
    conv1d: bool | None = False
    stamp = file_stamp(ref.weights_file)  # before the header: any change after it is refused at a later read
    header = read_header(ref.weights_file)
    layout = layout_of(ref.weights_file, *header)
    if layout == "mlx":
        from clair_cli.io.mlx import open_mlx

        adapter = open_mlx(ref, header, config_file, options.max_rank, options.max_modules, stamp)
        adapter.notes.extend(_unapplied_options(options, config_file))
        return adapter
    if layout in ("kohya", "comfyui") and config_file is not None:
        raise AdapterFormatError(
            f"{shown_path(ref.weights_file)}: a {LAYOUT_NAMES[layout]} LoRA file, which carries its own alphas "
            f"(alpha = rank where a module has none); the config {shown_path(config_file)} does not apply to it",
            hint="Drop --config (or move the adapter_config.json beside the file away).",
        )
    if layout != "peft" and config_file is None:
        return open_diffusion(ref, header, layout, options, stamp)
    if config_file is not None and ref.weights_file.name == MLX_WEIGHTS_NAME:
        from clair_cli.io.mlx import is_mlx_config

        if is_mlx_config(config_file):  # MLX-LM's file and config, but not its plain LoRA's tensors
            names = sorted(header[0])
            held = f"its tensors are named like {printable(names[0])!r}" if names else "it holds no tensor"
            raise AdapterFormatError(
                f"{shown_path(ref.weights_file)}: holds no MLX-LM LoRA factors (<module>.lora_a / .lora_b): {held}",
                hint="clair reads the plain LoRA layers of mlx_lm.lora; fused and other adapter layers are not read.",
            )
    if config_file is not None:
        config = load_config(config_file, peft_loads=config_file != options.config)
        if options.base_model:
            # --base-model names the base model of every source, whatever its config says.
            given = config.base_model
            if given and canonical_base_model(given) != canonical_base_model(options.base_model):
                note = f"--base-model {options.base_model!r} replaces the config's base model {given!r}"
            elif config.base_revision not in (None, "main"):
                revision = config.base_revision
                note = f"--base-model {options.base_model!r} replaces the config's base model revision {revision!r}"
            config = replace(config, base_model=options.base_model, base_revision=None)
    else:
        conv1d = conv1d_base_model(options.base_model)
        config = _flag_config(ref, options, header[0], conv1d)
    adapter = Adapter.open(
        ref, config, max_rank=options.max_rank, max_modules=options.max_modules, header=header, stamp=stamp
    )
    if note:
        adapter.notes.append(note)
    if config_file is not None:
        adapter.notes.extend(_unapplied_options(options, config_file))
    if conv1d is None:
        named = sorted({m.rsplit(".", 1)[-1] for m in adapter.modules} & CONV1D_LAYER_NAMES)
        if named:
            adapter.notes.append(
                f"fan_in_fan_out taken as false: its layers are named as GPT-2's Conv1D ones ({', '.join(named)}), "
                "which store their weights transposed, but nothing says whether the base model's do (no config.json "
                "of --base-model at hand, locally or in the Hugging Face cache); PEFT sets it per layer at load, "
                "while a merged or refined config says false (--config FILE with fan_in_fan_out says which)",
            )
    return adapter


def _unapplied_options(options: SourceOptions, config_file: Path | None) -> list[str]:
    """The note of an adapter read with its own config (or ``--config``) where ``--lora-alpha`` or ``--rslora`` was
    given: they describe files without one, and were silently not applied."""
    given = [f"--lora-alpha {options.lora_alpha:g}"] if options.lora_alpha is not None else []
    given += ["--rslora"] if options.use_rslora else []
    if not given or config_file is None:
        return []
    return [
        f"{' and '.join(given)} not applied: its scale is the one {shown_path(config_file)} gives "
        f"({'they describe' if len(given) > 1 else 'it describes'} adapter files without a config)"
    ]


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
            hint="The verdict's calibration grows with the square of the pool (docs: Limits); "
            "raise --max-adapters if the machine has the time.",
        )
    adapters = []
    for i, ref in enumerate(refs):
        adapters.append(open_adapter(ref, options))
        if progress:
            progress(ref.name, i + 1, len(refs))
    return adapters
