"""Write a run's outputs as one transaction: every output or none.

A run may write an adapter directory (``--out``) and report files (``--json``,
``--markdown``, ``--plot``). :class:`Outputs` stages each of them beside its target under a
unique name, and only once every one is completely written renames them into place
together, under an exclusive lock (``flock``) on each target's directory. So:

- a full disk, an interrupt or an error while writing any output leaves every target as
  it was (the old file or directory, or nothing): the staged outputs are removed;
- two runs writing the same targets at once never mix: each installs its whole set under
  the lock; the later one replaces the earlier's with ``--force`` and is refused (its
  staged outputs removed) without it;
- a failure while renaming (rare: the data is already written) puts back what was there.

Staging names are ``.<name>.<pid>.<random>.clair-tmp`` (``.clair-old`` for a replaced
output kept until the commit ends), with ``<name>`` shortened by a hash so that every
staging name fits in ``NAME_MAX`` whatever the target's length; the process id lets a later
run remove what a killed one (SIGKILL, power loss) left, never a live run's work, and put back
an old output that a killed run had moved aside without replacing it (:func:`clean_stale`).

Only a missing path or a regular file is replaced by a report; only a directory by
``--out`` (with ``force``). A symlink, FIFO or device in a target's place is refused, never
followed (:func:`clair_cli.io.paths.check_report_file`, :func:`check_out_dir`). Outputs get
the mode a plain create would give them (umask honoured). ``-`` (stdout) is written after
the files are in place.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import os
import secrets
import shutil
import signal
import sys
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clair_cli import numerics
from clair_cli.errors import ClairError, OutputError
from clair_cli.io.paths import apply_umask, check_out_dir, check_report_file, discarded, printable

try:
    import fcntl
except ImportError as exc:  # Windows: no POSIX file locks
    from clair_cli.constants import POSIX_ONLY

    raise ImportError(POSIX_ONLY) from exc

TMP_SUFFIX = ".clair-tmp"
OLD_SUFFIX = ".clair-old"
STAGE_NAME_BYTES = 80  # of the target's name kept in a staging name; the rest is a hash
COMMITTED: list[Path] = []  # targets renamed into place by this process (for the interrupt message)


def os_error_text(exc: OSError) -> str:
    """An OSError in words, with the usual fix where there is one."""
    if exc.errno == errno.ENOSPC:
        return "no space left on the device"
    if exc.errno == errno.EDQUOT:
        return "disk quota exceeded"
    if exc.errno == errno.ELOOP:
        return "too many levels of symbolic links"
    if exc.errno == errno.ENAMETOOLONG:
        return "file name too long"
    return exc.strerror or str(exc)


def stage_stem(name: str) -> str:
    """The part of a staging name that stands for the target ``name``: the name itself when
    short, else its first bytes and a hash of the whole, so the staging name fits NAME_MAX."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) <= STAGE_NAME_BYTES:
        return name
    head = raw[: STAGE_NAME_BYTES - 17].decode("utf-8", "ignore")
    return f"{head}~{hashlib.sha256(raw).hexdigest()[:16]}"


def _staging_path(target: Path, suffix: str) -> Path:
    return target.parent / f".{stage_stem(target.name)}.{os.getpid()}.{secrets.token_hex(4)}{suffix}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clean_stale(target: Path) -> None:
    """Remove staging entries that killed runs (SIGKILL, power loss) left beside ``target``, and
    put back the previous output that one of them had moved aside when ``target`` is missing.

    Their names carry the writing process's id; only those of processes that no longer
    exist are touched, so a concurrent run's work never is. A run killed between moving the
    old ``target`` aside (``.clair-old``) and renaming its new output in leaves no ``target``:
    that old output is renamed back (under the directory's lock, where no live run is between
    its two renames), not removed, so the next run cannot lose it by failing in its turn.
    """
    stem = stage_stem(target.name)
    with contextlib.suppress(OSError, ClairError), _locked([target.parent]):
        stale = []
        for path in target.parent.glob(f".{glob.escape(stem)}.*"):
            if not path.name.endswith((TMP_SUFFIX, OLD_SUFFIX)):
                continue
            pid = path.name[len(stem) + 2 :].split(".", 1)[0]
            if pid.isdigit() and _abandoned(path, int(pid)):
                stale.append(path)
        # The newest output moved aside first (two killed runs: the later one's is the later output).
        stale.sort(key=lambda p: (p.name.endswith(OLD_SUFFIX), p.lstat().st_mtime_ns), reverse=True)
        for path in stale:
            if path.name.endswith(OLD_SUFFIX) and not os.path.lexists(target):
                with contextlib.suppress(OSError):
                    os.rename(path, target)
                    continue
            _remove(path)


def _abandoned(path: Path, pid: int) -> bool:
    """Whether the run that staged ``path`` is gone: no process ``pid`` here, and nothing holds the
    lock a run keeps on what it stages (:func:`_hold`). The process id alone is not enough: a run in
    another PID namespace (a container sharing the directory) or on another machine (a network
    file system) has an id that means nothing here, and its staged output was removed mid-write."""
    if _alive(pid):
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return True  # a symlink, or nothing that can be opened: no run's
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return True  # a file system without locks: the process id decides
    finally:
        os.close(fd)
    return True


def _hold(fd: int) -> int:
    """Take a shared lock on a staged entry through ``fd`` and return it: the run keeps it open (and
    the entry locked) until its outputs are committed or discarded (:func:`_abandoned`)."""
    with contextlib.suppress(OSError):  # a file system without locks: the process id still protects it here
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    return fd


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _remove(path: Path) -> None:
    """Remove a staging entry (a file or a directory tree), never following a symlink."""
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


@dataclass
class _Output:
    target: Path
    shown: str
    directory: bool
    force: bool = False
    adapters_only: bool = False  # with force, replace only an empty directory or an adapter clair wrote
    staged: Path | None = None
    backup: Path | None = None
    installed: bool = False
    held: int | None = None  # a descriptor of the staged entry, locked while the run lives (_hold)
    identity: tuple[int, int] | None = None  # the staged entry's (device, inode), checked at the commit

    def release(self) -> None:
        """Close the staged entry's descriptor (its lock goes with it)."""
        if self.held is not None:
            with contextlib.suppress(OSError):
                os.close(self.held)
            self.held = None


def _foreign(root: Path) -> str | None:
    """Why ``root`` is not empty and not an output of clair's, or None: ``--force`` replaces only
    those, so that a mistyped ``--out`` never deletes someone's data. An output of clair's is a
    tree of directories (``clair refine`` nests adapters as their names do) whose files are the
    ones clair writes, each directory that holds any of them with clair's model card."""
    from clair_cli.constants import (
        CONFIG_NAME,
        DIFFUSERS_WEIGHTS_NAME,
        MLX_WEIGHTS_NAME,
        MODEL_CARD_NAME,
        SAFETENSORS_WEIGHTS_NAME,
    )

    written = {CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, DIFFUSERS_WEIGHTS_NAME, MLX_WEIGHTS_NAME, MODEL_CARD_NAME}
    count = 0
    pending = [root]
    while pending:
        directory = pending.pop()
        inside = directory.relative_to(root)
        files = set()
        with os.scandir(directory) as entries:
            for entry in entries:
                count += 1
                if count > FORCE_MAX_ENTRIES:
                    return f"holds more than {FORCE_MAX_ENTRIES} entries"
                if entry.is_dir(follow_symlinks=False):
                    pending.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False) and entry.name in written:
                    files.add(entry.name)
                elif entry.is_file(follow_symlinks=False) and _os_metadata(entry.name):
                    continue  # a file browser's own (Finder, Explorer), not anyone's data
                else:
                    return f"holds {printable(str(inside / entry.name))}, which clair does not write"
        card = inside / MODEL_CARD_NAME
        if files and MODEL_CARD_NAME not in files:
            return f"holds adapter files without the model card clair writes beside them ({printable(str(card))})"
        if files and not _clair_card(directory / MODEL_CARD_NAME):
            return f"holds a {printable(str(card))} that clair did not write"
    return None


def _os_metadata(name: str) -> bool:
    """Whether ``name`` is a file that a file browser leaves in any directory it shows (macOS
    Finder's ``.DS_Store`` and ``._*`` AppleDouble files, Windows Explorer's ``Thumbs.db`` and
    ``desktop.ini``, KDE's ``.directory``): ``--force`` replaces an output that holds them."""
    return name in OS_METADATA_FILES or name.startswith("._")


OS_METADATA_FILES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini", ".directory"})
FORCE_MAX_ENTRIES = 100_000  # refine writes one directory per adapter
CARD_MARK_BYTES = 64 << 20  # how far into a model card its "Made by clair" line is looked for


def _clair_card(path: Path) -> bool:
    """Whether the model card at ``path`` is one clair wrote (its "Made by clair" line, after a
    front matter whose base model a config can make long)."""
    mark, tail = b"\nMade by clair ", b""
    try:
        with open(path, "rb") as f:
            for _ in range(0, CARD_MARK_BYTES, 1 << 20):
                chunk = f.read(1 << 20)
                if not chunk:
                    return False
                if mark in tail + chunk:
                    return True
                tail = chunk[-len(mark) :]
    except OSError:
        return False
    return False


class Outputs:
    """A run's outputs, written all together or not at all.

    ``with Outputs(inputs) as outputs:`` register the targets first (checked at once, before
    any work: :meth:`directory`, :meth:`file`), write them (:meth:`stage_directory`,
    :meth:`write`); when the block ends without an exception every output is renamed into
    place (:meth:`commit`), otherwise every staged output is removed.

    ``inputs`` are the paths being read: no target may be, contain or lie inside one.
    """

    def __init__(self, inputs: Iterable[Path] = ()) -> None:
        self.inputs: list[Path] = list(inputs)
        self.outputs: list[_Output] = []
        self.stdout: list[str] = []
        self.left: list[tuple[str, Path]] = []  # replaced outputs that could not be removed entirely
        self.done = False

    # Registration and checks -------------------------------------------------------------

    def directory(self, target: Path, force: bool = False, adapters_only: bool = False) -> None:
        """Register the output directory ``target`` (replaced only with ``force``; with
        ``adapters_only``, only where it is empty or an adapter clair wrote: the commands' ``--out``)
        and check it."""
        out = _Output(Path(target), printable(str(target)), directory=True, force=force, adapters_only=adapters_only)
        clean_stale(out.target)  # a killed run's leftovers gone, its moved-aside output back, before the checks
        self._check(out)
        self.outputs.append(out)

    def file(self, target: str) -> None:
        """Register the report file ``target`` (``-``: stdout) and check it."""
        if target != "-" and not discarded(target):
            self._file(target)

    def _file(self, target: str) -> _Output:
        out = self._find(target)
        if out is None:
            out = _Output(Path(target), printable(target), directory=False)
            self._check(out)
            self.outputs.append(out)
        return out

    def guard(self, inputs: Iterable[Path | None]) -> None:
        """Add the files actually read (adapter files, hub cache files) and check every target again."""
        self.inputs += [p for p in inputs if p is not None]
        for out in self.outputs:
            self._check(out)

    def _check(self, out: _Output) -> None:
        if not out.directory:
            try:
                check_report_file(str(out.target), self.inputs)
            except RuntimeError as exc:  # pathlib's resolve() on a symlink loop (Python < 3.13)
                raise OutputError(f"{out.shown}: cannot be used (too many levels of symbolic links)") from exc
            return
        shown = out.shown
        try:
            check_out_dir(out.target, self.inputs)
            exists = os.path.lexists(out.target)
            if exists and not out.force:
                raise OutputError(f"{shown}: already exists", hint="Pass --force to replace it.")
            if exists and (out.target.is_symlink() or not out.target.is_dir()):
                raise OutputError(f"{shown}: exists and is not a directory; clair replaces only directories")
            foreign = _foreign(out.target) if exists and out.adapters_only else None
            if foreign is not None:
                raise OutputError(
                    f"{shown}: exists and {foreign}; --force replaces only an empty directory or an adapter "
                    "clair wrote (clair merge / clair refine)",
                    hint="Remove it yourself if it should go, or name a new directory.",
                )
            parent = out.target.parent
            if not parent.is_dir():
                raise OutputError(f"{shown}: parent directory {printable(str(parent))} does not exist")
            if not os.access(parent, os.W_OK):
                raise OutputError(f"{shown}: cannot write in {printable(str(parent))} (permission denied)")
        except OSError as exc:
            raise OutputError(f"--out {shown}: cannot be used ({os_error_text(exc)})") from exc
        except RuntimeError as exc:  # pathlib's resolve() on a symlink loop (Python < 3.13)
            raise OutputError(f"--out {shown}: cannot be used (too many levels of symbolic links)") from exc

    def _find(self, target: str | Path) -> _Output | None:
        for out in self.outputs:
            if out.target == Path(target):
                return out
        return None

    # Staging -----------------------------------------------------------------------------

    def stage_directory(self, target: Path) -> Path:
        """A new empty directory, beside the registered ``target``, to write its content into."""
        out = self._find(target)
        if out is None or not out.directory:
            raise ValueError(f"{target} is not a registered output directory")
        if out.staged is not None:
            return out.staged
        # An adapter is written from tensors: the command line's numerical stack is set up before
        # the staging directory exists, so that a Ctrl-C during its import has nothing to lose.
        numerics.require()
        clean_stale(out.target)
        path = _staging_path(out.target, TMP_SUFFIX)
        try:
            path.mkdir(mode=0o700)
            out.staged = path
            out.held = _hold(os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)))
            out.identity = _identity(out.held)
            apply_umask(path, directory=True)
        except OSError as exc:
            raise OutputError(f"{out.shown}: cannot write here ({os_error_text(exc)})") from exc
        return path

    def write(self, target: str, data: bytes) -> None:
        """Stage ``data`` as the content of the report file ``target`` (``-``: stdout, after the commit)."""
        if target == "-":
            self.stdout.append(data.decode("utf-8", "surrogateescape"))
            return
        if discarded(target):
            return
        out = self._file(target)
        clean_stale(out.target)
        path = _staging_path(out.target, TMP_SUFFIX)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        except OSError as exc:
            raise OutputError(f"{out.shown}: cannot write here ({os_error_text(exc)})") from exc
        if out.staged is not None:
            _remove(out.staged)
            out.release()
        out.staged = path
        try:
            out.held = _hold(os.dup(fd))
            out.identity = _identity(fd)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            apply_umask(path)
        except OSError as exc:
            raise OutputError(f"{out.shown}: cannot write ({os_error_text(exc)})") from exc

    def write_text(self, target: str, text: str) -> None:
        """:meth:`write` of UTF-8 text."""
        self.write(target, text.encode("utf-8"))

    # Commit --------------------------------------------------------------------------------

    def commit(self) -> None:
        """Rename every staged output into place, under a lock on each target's directory.

        Raises:
            OutputError: a target changed meanwhile (now exists without --force, became a
                symlink...) or a rename failed; every target is then as it was before.
        """
        if self.done:
            return
        self.done = True
        staged = [o for o in self.outputs if o.staged is not None]
        try:
            for out in staged:  # on the disk before any rename, so that no crash installs files it lost
                self._sync(out)
            with _locked({o.target.parent for o in staged}):
                for out in staged:  # another run may have written meanwhile
                    self._check(out)
                    self._check_staged(out)
                try:
                    for out in staged:
                        self._install(out)
                except BaseException:
                    with _signals_held():  # a second Ctrl-C must not stop the roll-back half-way
                        self._roll_back(staged)
                    raise
                for parent in {o.target.parent for o in staged}:  # the renames themselves
                    _fsync_path(parent, directory=True, strict=False)
        finally:
            self._discard()
        COMMITTED.extend(o.target for o in staged)
        for shown, path in self.left:  # the new output is in place; say where the old one's rest lies
            sys.stderr.write(
                f"warning: the previous {shown} could not be removed entirely; what is left of it is in "
                f"{printable(str(path))}\n"
            )
        for text in self.stdout:  # through the text layer: its encoding and error handler apply
            sys.stdout.write(text)
            sys.stdout.flush()

    @staticmethod
    def _sync(out: _Output) -> None:
        """Flush a staged output to the disk (``fsync`` of each file and directory in it): a power
        loss after the commit's renames must not leave an installed output whose files are empty,
        and a write error that the system reports only then (a network file system, a quota) is
        the run's error, before anything is installed."""
        assert out.staged is not None
        try:
            if not out.directory:
                _fsync_path(out.staged)
                return
            for root, dirs, files in os.walk(out.staged):
                for name in files:
                    if not os.path.islink(os.path.join(root, name)):
                        _fsync_path(Path(root, name))
                for name in dirs:
                    if not os.path.islink(os.path.join(root, name)):
                        _fsync_path(Path(root, name), directory=True)
            _fsync_path(out.staged, directory=True)
        except OSError as exc:
            raise OutputError(f"{out.shown}: cannot write ({os_error_text(exc)})") from exc

    @staticmethod
    def _check_staged(out: _Output) -> None:
        """Refuse to install a staged entry that is not the one this run made and wrote (removed,
        and maybe made again by a later write, while the run wrote it): what is there is not the
        whole output."""
        assert out.staged is not None
        try:
            st = os.lstat(out.staged)
            same = out.identity is None or (st.st_dev, st.st_ino) == out.identity
        except OSError:
            same = False
        if not same:
            raise OutputError(
                f"{out.shown}: its staging {'directory' if out.directory else 'file'} "
                f"{printable(str(out.staged))} was removed or replaced while this run wrote it (by another "
                "process cleaning the directory?); nothing was written",
                hint="Run again; make sure nothing else removes files there meanwhile.",
            )

    def _install(self, out: _Output) -> None:
        assert out.staged is not None
        try:
            if os.path.lexists(out.target):
                out.backup = _staging_path(out.target, OLD_SUFFIX)
                if out.directory:
                    os.rename(out.target, out.backup)
                else:
                    # A hard link keeps the old file reachable while the new one atomically replaces it.
                    try:
                        os.link(out.target, out.backup, follow_symlinks=False)
                    except OSError:
                        os.rename(out.target, out.backup)
            os.replace(out.staged, out.target)
            out.staged = None
            out.installed = True
        except OSError as exc:
            raise OutputError(f"{out.shown}: cannot write ({os_error_text(exc)})") from exc

    def _roll_back(self, outputs: list[_Output]) -> None:
        """Put back what was in place before :meth:`commit` began."""
        for out in reversed(outputs):
            with contextlib.suppress(OSError):
                if out.installed:
                    if out.backup is not None:
                        if out.directory:
                            trash = _staging_path(out.target, TMP_SUFFIX)
                            os.rename(out.target, trash)
                            _remove(trash)
                        os.replace(out.backup, out.target)
                    else:
                        _remove(out.target)
                elif out.backup is not None and not os.path.lexists(out.target):
                    os.replace(out.backup, out.target)
                elif out.backup is not None and os.path.samefile(out.backup, out.target):
                    os.unlink(out.backup)  # the hard link kept of a report file that was not replaced after all
                out.backup = None

    def _discard(self) -> None:
        for out in self.outputs:
            for path in (out.staged, out.backup):
                if path is not None:
                    _remove(path)
            out.release()
            if out.backup is not None and os.path.lexists(out.backup):
                self.left.append((out.shown, out.backup))
            out.staged = out.backup = None

    def discard(self) -> None:
        """Remove every staged output; no target is touched."""
        self.done = True
        self._discard()

    def __enter__(self) -> Outputs:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            if isinstance(exc, ClairError):
                self._name_targets(exc)
            self.discard()
        else:
            self.commit()

    def _name_targets(self, exc: ClairError) -> None:
        """An error that names a staging path (a full disk while the merged adapter was written
        into it) names the target the user gave instead; the staging entry is removed anyway."""
        for out in self.outputs:
            if out.staged is None:
                continue
            staged = printable(str(out.staged))
            if staged in exc.message:
                exc.message = exc.message.replace(staged, out.shown)
                exc.args = (exc.message,)


HELD_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP while the block runs; they are delivered after it.

    A commit interrupted at a rename (Ctrl-C) rolls back; a second Ctrl-C during the roll-back
    stopped it between moving the new output aside and putting the old one back, and the
    clean-up that follows then removed the old output's backup: the previous ``--out`` was lost.
    Held, the second signal arrives once everything is back in place.

    Held by Python-level handlers that note the signal, then put back and the signal raised again:
    blocking it (``pthread_sigmask``) holds it only for the calling thread, and a signal sent to
    the process goes to any thread that does not block it (torch's pool in a run), after which
    Python runs the handler on the main thread anyway. Handlers can be set from the main thread
    only; from another, the signals are blocked for that thread, which is all it can do. So is a
    signal whose handler was installed outside Python (``getsignal`` gives None: a host program
    embedding clair): Python cannot put such a handler back, so it is left in place and the signal
    blocked for the calling thread instead (replacing it, the restore raised TypeError half-way
    through the roll-back)."""
    main = threading.current_thread() is threading.main_thread()
    foreign = HELD_SIGNALS if not main else frozenset(s for s in HELD_SIGNALS if signal.getsignal(s) is None)
    noted: list[int] = []

    def note(signum: int, _frame: object) -> None:
        if signum not in noted:
            noted.append(signum)

    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, foreign) if foreign else None
    previous: dict[signal.Signals, Any] = {}
    try:
        for held in sorted(HELD_SIGNALS - foreign):
            previous[held] = signal.signal(held, note)
        yield
    finally:
        for restored, handler in previous.items():
            signal.signal(restored, handler)
        if previous_mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
        for signum in noted:
            signal.raise_signal(signum)


def _fsync_path(path: Path, directory: bool = False, strict: bool = True) -> None:
    """``fsync`` the file or directory ``path`` (never following a symlink). Errors are raised only
    when ``strict``; a file system that cannot sync a directory (EINVAL) is not an error."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags | os.O_NONBLOCK)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        if strict and not (directory and exc.errno in (errno.EINVAL, errno.EBADF, errno.EISDIR)):
            raise


@contextlib.contextmanager
def _locked(directories: Iterable[Path]) -> Iterator[None]:
    """Hold an exclusive ``flock`` on each directory (in a fixed order, so two runs cannot deadlock)."""
    fds: list[int] = []
    try:
        for d in sorted({Path(os.path.abspath(p)) for p in directories}):
            try:
                fd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            except OSError as exc:
                raise OutputError(f"{printable(str(d))}: cannot be opened ({os_error_text(exc)})") from exc
            fds.append(fd)
            with contextlib.suppress(OSError):  # a file system without locks: unique staging still keeps runs apart
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        for fd in fds:
            os.close(fd)  # closing releases the lock


class AtomicDir(Outputs):
    """``with AtomicDir(target, force, inputs) as tmp:`` write into ``tmp``; it becomes ``target`` on success.

    A transaction of one directory (:class:`Outputs`).
    """

    def __init__(self, target: Path, force: bool = False, inputs: Iterable[Path] = ()) -> None:
        super().__init__(inputs)
        self.target = Path(target)
        self.directory(self.target, force)

    def __enter__(self) -> Path:  # type: ignore[override]
        return self.stage_directory(self.target)


def write_bytes(target: str, data: bytes, inputs: Iterable[Path] = ()) -> None:
    """Write ``data`` to the file ``target`` atomically (``-`` is stdout): one output's transaction.

    Raises:
        OutputError: the target is not a regular file, is an input, or cannot be written.
    """
    with Outputs(inputs) as outputs:
        outputs.write(target, data)


def write_text(target: str, text: str, inputs: Iterable[Path] = ()) -> None:
    """Write ``text`` (UTF-8) to a file atomically, or to stdout when ``target`` is ``-``."""
    write_bytes(target, text.encode("utf-8"), inputs)
