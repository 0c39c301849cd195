"""Failures during a run, through the real CLI in separate processes (a review of 2026-12-06):
inputs that change while they are read, outputs that fill the disk, a stdout that cannot take
what is written to it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_adapters"
WEIGHTS = "adapter_model.safetensors"

# Runs clair with one input file changed just before a stage of the pipeline (the audit, the
# merge), as another process would change it while the run reads the pool.
HOOKED = """
import os, shutil, sys
stage, mode, victim, donor = sys.argv[1:5]
from clair_cli import pipeline
real = getattr(pipeline, stage)
def hooked(*args, **kwargs):
    if mode == "replace":
        shutil.copy(donor, victim + ".new")
        os.replace(victim + ".new", victim)
    else:
        stat = os.stat(victim)
        data = open(donor, "rb").read()
        with open(victim, "r+b") as f:
            f.write(data[: stat.st_size])
        os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the modification time put back
    return real(*args, **kwargs)
setattr(pipeline, stage, hooked)
sys.argv = ["clair", *sys.argv[5:]]
from clair_cli.cli import main
main()
"""


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def _hooked(stage: str, mode: str, victim: Path, donor: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", HOOKED, stage, mode, str(victim), str(donor), *args],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )


def _pool(tmp_path: Path) -> Path:
    pool = tmp_path / "pool"
    shutil.copytree(SAMPLES, pool)
    return pool


def _rank2(source: Path, target: Path) -> None:
    """``source``'s adapter file at rank 2: the same modules, other shapes."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(source))
    save_file({k: (v[:2] if ".lora_A." in k else v[:, :2]).contiguous() for k, v in tensors.items()}, str(target))


@pytest.mark.parametrize("stage", ["audit", "merge"])
@pytest.mark.parametrize("donor", ["flagged", "rank2"])
def test_an_input_replaced_during_the_run_is_refused(stage: str, donor: str, tmp_path: Path) -> None:
    """An adapter file replaced (renamed over) after its header was read: before, a file of other
    shapes ended in "internal error (RuntimeError...)" and one of the same shapes, swapped in
    between the audit and the merge, was merged: a flagged adapter's update went into the merge
    in the place of the clean adapter audited, and the report gave the flagged file's sha256 as
    the clean adapter's."""
    pool = _pool(tmp_path)
    victim = pool / "client_03" / WEIGHTS
    source = pool / "client_13" / WEIGHTS  # flagged by the audit of the sample pool
    if donor == "rank2":
        source = tmp_path / "rank2.safetensors"
        _rank2(pool / "client_03" / WEIGHTS, source)
    out, report = tmp_path / "merged", tmp_path / "report.json"
    res = _hooked(stage, "replace", victim, source, "merge", str(pool), "--out", str(out), "-q", "--json", str(report))
    assert res.returncode == 2, res.stderr
    assert "changed while clair was reading it" in res.stderr and "client_03" in res.stderr, res.stderr
    assert "internal error" not in res.stderr and "Traceback" not in res.stderr
    assert not out.exists() and not report.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_an_input_rewritten_in_place_with_its_time_put_back_is_refused(tmp_path: Path) -> None:
    """The same size, the same tensor table, the modification time set back: the change time
    (which nothing can set back) still tells the file changed after the audit read it."""
    pool = _pool(tmp_path)
    out = tmp_path / "merged"
    res = _hooked(
        "merge", "inplace", pool / "client_03" / WEIGHTS, pool / "client_13" / WEIGHTS, "merge", str(pool),
        "--out", str(out), "-q",
    )  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert "changed while clair was reading it" in res.stderr, res.stderr
    assert not out.exists()


def test_a_reader_elsewhere_compares_the_tensor_table(tmp_path: Path) -> None:
    """Where the stamp cannot be compared (a Ray worker on another machine reads its own copy),
    a file whose header no longer lists the module's tensors as opened is refused, not read."""
    from clair_cli.errors import AdapterFormatError
    from clair_cli.io.sources import open_adapter, resolve_sources

    pool = _pool(tmp_path)
    (ref,) = resolve_sources([str(pool / "client_03")])
    adapter = open_adapter(ref)
    elsewhere = adapter.for_module(next(iter(adapter.modules)))
    elsewhere.stamp = None
    with elsewhere.reader():
        pass  # the file as opened
    _rank2(pool / "client_03" / WEIGHTS, tmp_path / "rank2.safetensors")
    os.replace(tmp_path / "rank2.safetensors", pool / "client_03" / WEIGHTS)
    with pytest.raises(AdapterFormatError, match="changed while clair was reading it"):
        elsewhere.reader()
    with pytest.raises(AdapterFormatError, match="changed while clair was reading it"):
        adapter.reader()
    with pytest.raises(AdapterFormatError, match="changed while clair was reading it"):
        adapter.file_digests()


def test_a_file_replaced_while_its_header_is_read_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stamp is taken before the header is read: a file replaced between the two (the header
    of one version, the tensors of another) is refused when the adapter is opened, not stamped as
    the new version and read with the old table."""
    from clair_cli.errors import AdapterFormatError
    from clair_cli.io import sources

    pool = _pool(tmp_path)
    victim = pool / "client_03" / WEIGHTS
    _rank2(victim, tmp_path / "rank2.safetensors")
    real = sources.read_header

    def read_then_replace(path: Path) -> object:
        header = real(path)
        if Path(path) == victim:
            os.replace(tmp_path / "rank2.safetensors", victim)
        return header

    monkeypatch.setattr(sources, "read_header", read_then_replace)
    (ref,) = sources.resolve_sources([str(pool / "client_03")])
    with pytest.raises(AdapterFormatError, match="changed while clair was reading it"):
        sources.open_adapter(ref)


@pytest.mark.parametrize("how", ["get_many", "chunks"])
def test_a_write_in_place_during_a_read_is_refused(how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A review: the stamp was compared before each read only, so bytes written in place between
    that check and the read (the last read of a file in a merge) were merged, exit 0, with the
    report's sha256 of the version audited. The stamp is compared after the read as well."""
    from clair_cli.errors import AdapterFormatError
    from clair_cli.io import safetensors_file
    from clair_cli.io.sources import open_adapter, resolve_sources

    pool = _pool(tmp_path)
    victim = pool / "client_03" / WEIGHTS
    (ref,) = resolve_sources([str(pool / "client_03")])
    adapter = open_adapter(ref)
    spec = next(iter(adapter.modules.values()))
    real = safetensors_file.read_range
    reading: list[bool] = []  # the tensors' reads, not the header's

    def written_meanwhile(fd: int, start: int, size: int, path: Path) -> bytearray:
        if not reading:
            return real(fd, start, size, path)
        with open(victim, "r+b") as f:  # another process, after the reader's check
            f.seek(start)
            data = bytearray(f.read(size))
            data[0] ^= 0x40
            f.seek(start)
            f.write(data)
        return real(fd, start, size, path)

    monkeypatch.setattr(safetensors_file, "read_range", written_meanwhile)
    with adapter.reader() as reader, pytest.raises(AdapterFormatError, match="changed while clair was reading it"):
        reading.append(True)
        if how == "get_many":
            reader.get_many([spec.a_key, spec.b_key])
        else:
            list(reader.chunks(spec.b_key))


def test_a_metadata_change_is_refused_and_said_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A review: a chmod (or utime, or an extended attribute: a backup or sync tool) between the
    audit and the merge moves the change time as a write does, and the run was refused with "rewritten
    or replaced" of a file whose content had not changed. Still refused (a write with its modification
    time put back differs in nothing else), and the message names the metadata too."""
    from clair_cli.errors import AdapterFormatError
    from clair_cli.io.sources import open_adapter, resolve_sources

    pool = _pool(tmp_path)
    victim = pool / "client_03" / WEIGHTS
    (ref,) = resolve_sources([str(pool / "client_03")])
    adapter = open_adapter(ref)
    os.chmod(victim, os.stat(victim).st_mode)  # the same mode: only the change time moves
    with pytest.raises(AdapterFormatError, match="changed while clair was reading it") as info:
        adapter.reader()
    assert "permissions, times or extended attributes" in str(info.value)


def test_an_unchanged_pool_reads_as_before(tmp_path: Path) -> None:
    """The checks refuse nothing that did not change: the sample pool merges, with digests."""
    out, report = tmp_path / "merged", tmp_path / "report.json"
    res = subprocess.run(
        [sys.executable, "-m", "clair_cli", "merge", str(SAMPLES), "--out", str(out), "-q", "--json", str(report)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert res.returncode == 1, res.stderr  # the sample pool has flagged adapters
    digests = {a["name"]: a["sha256"] for a in json.loads(report.read_text())["adapters"]}
    assert len(digests) == 16 and (out / WEIGHTS).is_file()


def _limited(limit: int) -> None:
    """In the child: files may grow to ``limit`` bytes (past it a write fails with EFBIG, as on a
    full disk; Python ignores SIGXFSZ)."""
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.parametrize("report", ["--json", "--sarif"])
@pytest.mark.parametrize("unbuffered", ["1", ""], ids=["PYTHONUNBUFFERED", "buffered"])
def test_a_report_on_stdout_that_the_file_cannot_take_is_an_error(report: str, unbuffered: str, tmp_path: Path) -> None:
    """``clair audit --json - > report.json`` on a disk that fills up: under PYTHONUNBUFFERED (many
    container images set it) Python wrote the report with one unchecked write() and the run ended
    0 with the first 16 KiB of a 39 KB report, no message."""
    sink = tmp_path / "report.out"
    with sink.open("wb") as out:
        res = subprocess.run(
            [sys.executable, "-m", "clair_cli", "audit", str(SAMPLES), report, "-", "--exit-zero"],
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            env={**_env(), "PYTHONUNBUFFERED": unbuffered},
            timeout=300,
            preexec_fn=lambda: _limited(16384),
        )
    assert res.returncode == 2, (res.returncode, res.stderr, sink.stat().st_size)
    assert "Error: cannot write the output (File too large)" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("option", ["--version", "--help"])
def test_help_and_version_on_a_full_stdout_end_in_one_line(option: str) -> None:
    """``clair --version > /dev/full`` ended in a traceback (exit 1): eager options write before any
    command's boundary."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    with open("/dev/full", "w") as full:
        res = subprocess.run(
            [sys.executable, "-m", "clair_cli", option], stdout=full, stderr=subprocess.PIPE, text=True, env=_env()
        )
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("Error: cannot write the output (No space left on device)"), res.stderr
    assert "Traceback" not in res.stderr


def test_stdout_under_pythonunbuffered_keeps_every_byte(tmp_path: Path) -> None:
    """The buffered writer put under stdout changes nothing a reader sees: the same report bytes,
    whichever way stdout is buffered, and messages still reach stderr."""
    outs = []
    for unbuffered in ("1", ""):
        res = subprocess.run(
            [sys.executable, "-m", "clair_cli", "audit", str(SAMPLES), "--json", "-", "--exit-zero"],
            capture_output=True,
            text=True,
            env={**_env(), "PYTHONUNBUFFERED": unbuffered, "SOURCE_DATE_EPOCH": "0"},
            timeout=300,
        )
        assert res.returncode == 0, res.stderr
        report = json.loads(res.stdout)
        report.pop("timing_s", None)
        outs.append(report)
    assert outs[0] == outs[1]


# Dies as SIGKILL would, right after the old --out is moved aside and before the new one is in.
KILLED_BETWEEN_RENAMES = """
import os, sys
from clair_cli.io import writers
real = os.rename
def rename(src, dst, *args, **kwargs):
    real(src, dst, *args, **kwargs)
    if str(dst).endswith(".clair-old"):
        os.kill(os.getpid(), 9)
writers.os.rename = rename
sys.argv = ["clair", *sys.argv[1:]]
from clair_cli.cli import main
main()
"""


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_an_output_moved_aside_by_a_killed_run_is_put_back_not_lost(tmp_path: Path) -> None:
    """``--force``: a run killed between moving the old ``--out`` aside and renaming its own in left
    the old output as ``.merged.<pid>.<random>.clair-old``; the next run writing there removed it
    as a stale leftover, so when that run failed too (here: the disk full under it), the previous
    output was gone. It is put back now, and the next run answers as if the kill had not happened."""
    out = tmp_path / "merged"
    first = subprocess.run(
        [sys.executable, "-m", "clair_cli", "merge", str(SAMPLES), "--out", str(out), "-q", "--exit-zero"],
        capture_output=True, text=True, env=_env(), timeout=300,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    before = _files(out)
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_BETWEEN_RENAMES, "merge", str(SAMPLES), "--out", str(out), "-q", "--force",
         "--method", "fedavg"],
        capture_output=True, text=True, env=_env(), timeout=300,
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr
    assert not out.exists() and any(p.name.endswith(".clair-old") for p in tmp_path.iterdir())
    failing = subprocess.run(
        [sys.executable, "-m", "clair_cli", "merge", str(SAMPLES), "--out", str(out), "-q", "--force", "--exit-zero"],
        capture_output=True, text=True, env=_env(), timeout=300, preexec_fn=lambda: _limited(100_000),
    )  # fmt: skip
    assert failing.returncode == 2 and "File too large" in failing.stderr, failing.stderr
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    again = subprocess.run(
        [sys.executable, "-m", "clair_cli", "merge", str(SAMPLES), "--out", str(out), "-q"],
        capture_output=True, text=True, env=_env(), timeout=300,
    )  # fmt: skip
    assert again.returncode == 2 and "already exists" in again.stderr, again.stderr


def test_clean_stale_puts_back_only_where_the_target_is_missing(tmp_path: Path) -> None:
    from clair_cli.io.writers import OLD_SUFFIX, TMP_SUFFIX, clean_stale

    target = tmp_path / "merged"
    old = tmp_path / f".merged.999999999.aaaa{OLD_SUFFIX}"
    tmp = tmp_path / f".merged.999999999.bbbb{TMP_SUFFIX}"
    for d in (old, tmp):
        d.mkdir()
        (d / "README.md").write_text(d.name)
    clean_stale(target)
    assert (target / "README.md").read_text() == old.name and not old.exists() and not tmp.exists()
    old.mkdir()  # the target exists now: a dead run's moved-aside output is only a leftover
    clean_stale(target)
    assert not old.exists() and (target / "README.md").read_text() == old.name


def test_a_staging_directory_removed_mid_run_is_not_installed(tmp_path: Path) -> None:
    """A staging directory removed while the run wrote into it (and made again by the writer's
    ``mkdir(parents=True)``): before, the commit installed what was left, an adapter directory
    without its ``adapter_model.safetensors``, with exit 0, over the previous output."""
    from clair_cli.errors import OutputError
    from clair_cli.io.writers import Outputs

    target = tmp_path / "merged"
    target.mkdir()
    (target / "adapter_config.json").write_text("old")
    outputs = Outputs()
    outputs.directory(target, force=True)
    staged = outputs.stage_directory(target)
    (staged / "adapter_model.safetensors").write_text("weights")
    shutil.rmtree(staged)  # another process "cleaning up"
    staged.mkdir(parents=True)
    (staged / "adapter_config.json").write_text("new")
    with pytest.raises(OutputError, match="was removed or replaced while this run wrote it"):
        outputs.__exit__(None, None, None)
    assert _files(target) == {"adapter_config.json": b"old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_a_staged_report_replaced_mid_run_is_not_installed(tmp_path: Path) -> None:
    from clair_cli.errors import OutputError
    from clair_cli.io.writers import Outputs

    report = tmp_path / "report.json"
    report.write_text("old")
    outputs = Outputs()
    outputs.write_text(str(report), "new")
    (staged,) = [p for p in tmp_path.iterdir() if p.name.endswith(".clair-tmp")]
    staged.unlink()
    staged.write_text("someone else's")
    with pytest.raises(OutputError, match="was removed or replaced"):
        outputs.__exit__(None, None, None)
    assert report.read_text() == "old"


def test_a_live_staging_entry_whose_pid_means_nothing_here_is_kept(tmp_path: Path) -> None:
    """A run in another PID namespace (a container sharing the directory) or on another machine
    has a process id that is not alive here: its staging directory was removed as stale by the next
    run writing the same ``--out``, mid-write, and that run then installed an adapter directory
    without its weights (exit 0; reproduced with ``unshare --pid``). The lock such a run holds on
    what it stages keeps it now; once released, the entry is a leftover and goes."""
    import fcntl

    from clair_cli.io.writers import TMP_SUFFIX, clean_stale

    target = tmp_path / "merged"
    foreign = tmp_path / f".merged.999999999.abcd{TMP_SUFFIX}"  # no such process here
    foreign.mkdir()
    (foreign / "adapter_model.safetensors").write_text("being written")
    fd = os.open(foreign, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # what the live run holds
        clean_stale(target)
        assert (foreign / "adapter_model.safetensors").exists()
    finally:
        os.close(fd)
    clean_stale(target)
    assert not foreign.exists()


def test_a_run_holds_its_staging_entries_locked(tmp_path: Path) -> None:
    """What the live-entry check relies on: while a run writes, its staged directory and report file
    are locked against the exclusive lock :func:`clean_stale` tries, and released after."""
    import fcntl

    from clair_cli.io.writers import Outputs

    def locked(path: Path) -> bool:
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    with Outputs() as outputs:
        outputs.directory(tmp_path / "merged")
        staged = outputs.stage_directory(tmp_path / "merged")
        outputs.write_text(str(tmp_path / "r.json"), "{}")
        (report,) = [p for p in tmp_path.iterdir() if p.name.startswith(".r.json.")]
        assert locked(staged) and locked(report)
    assert not locked(tmp_path / "merged") and not locked(tmp_path / "r.json")


@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError], ids=["ctrl-c", "full-disk"])
def test_a_commit_that_fails_at_a_report_leaves_no_hard_link_behind(
    failure: type[BaseException], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit installs ``--out``, then the report; a failure (Ctrl-C, an error) at the report's
    rename rolls both back, and left the report's hard-linked copy (``.r.json.<pid>.<random>.clair-old``)
    beside it."""
    from clair_cli.io import writers

    out, report = tmp_path / "merged", tmp_path / "r.json"
    out.mkdir()
    (out / "adapter_config.json").write_text("old")
    report.write_text("old report")
    real = os.replace

    def replace(src: object, dst: object) -> None:
        if Path(str(dst)) == report:
            raise failure(28, "No space left on device") if failure is OSError else failure()
        real(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(writers.os, "replace", replace)
    with pytest.raises((KeyboardInterrupt, writers.OutputError)), writers.Outputs() as outputs:
        outputs.directory(out, force=True)
        (outputs.stage_directory(out) / "adapter_config.json").write_text("new")
        outputs.write_text(str(report), "new report")
    assert _files(out) == {"adapter_config.json": b"old"} and report.read_text() == "old report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "r.json"]


def test_a_second_ctrl_c_during_the_roll_back_does_not_lose_the_old_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ctrl-C at the report's rename rolls ``--out`` back; a second one during that roll-back
    stopped it after the new output was moved aside and before the old one was put back, and the
    clean-up then removed the old one's backup. Signals are held during the roll-back: the second
    Ctrl-C arrives once the old output is back."""
    import signal

    from clair_cli.io import writers

    out, report = tmp_path / "merged", tmp_path / "r.json"
    out.mkdir()
    (out / "adapter_config.json").write_text("old")
    real = os.replace

    def replace(src: object, dst: object) -> None:
        if Path(str(dst)) == report:
            raise KeyboardInterrupt  # the first Ctrl-C, at the report's rename
        if Path(str(dst)) == out and ".clair-old" in str(src):  # the roll-back putting the old --out back
            os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C
        real(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(writers.os, "replace", replace)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # CI runs with SIGINT ignored
    # Another thread that does not block the signal (torch's pool in a real run): a signal sent to
    # the process goes to it while the main thread blocks it, and Python still runs the handler on
    # the main thread, so blocking the main thread alone (pthread_sigmask) held nothing there.
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, daemon=True)
    other.start()
    try:
        with pytest.raises(KeyboardInterrupt), writers.Outputs() as outputs:
            outputs.directory(out, force=True)
            (outputs.stage_directory(out) / "adapter_config.json").write_text("new")
            outputs.write_text(str(report), "new report")
    finally:
        stop.set()
        other.join()
        signal.signal(signal.SIGINT, previous)
    assert _files(out) == {"adapter_config.json": b"old"} and not report.exists()


def test_the_error_line_needs_no_import(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A run out of address space (``ulimit -v``) could not import rich to say so: "out of memory"
    became a chain of MemoryError tracebacks (exit 1). The line is written plainly then."""
    from clair_cli import cli

    monkeypatch.setitem(sys.modules, "rich.console", None)  # its import fails
    assert cli.report_error("out of memory\x1b[2J", "Use fewer adapters.") == 2
    assert capsys.readouterr().err == "Error: out of memory\\x1b[2J\nUse fewer adapters.\n"


@pytest.mark.parametrize(
    "exc",
    [
        ImportError("libtorch_cpu.so: failed to map segment from shared object"),
        RuntimeError("std::bad_alloc"),
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"),
    ],
)
def test_memory_failures_are_out_of_memory_not_a_bug(exc: BaseException) -> None:
    """Under ``ulimit -v`` torch's import and allocations fail in these words: "internal error (...)
    This is a bug in clair" before."""
    from clair_cli import cli

    assert cli._out_of_memory(exc)
    assert not cli._out_of_memory(ImportError("No module named 'torch'"))


def test_outputs_are_on_the_disk_before_they_are_renamed_into_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit renamed outputs whose files (the config, the card, the reports) had never been
    flushed: after a power loss the renames could survive and the files be empty. Every staged file
    and directory is synced before the first rename, and the targets' directories after them."""
    from clair_cli.io import writers

    synced: set[tuple[int, int]] = set()
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        synced.add((st.st_dev, st.st_ino))
        real_fsync(fd)

    def key(path: Path) -> tuple[int, int]:
        st = os.lstat(path)
        return st.st_dev, st.st_ino

    def replace(src: object, dst: object) -> None:
        staged = Path(str(src))
        if staged.name.endswith(writers.TMP_SUFFIX):
            inside = [staged, *staged.rglob("*")] if staged.is_dir() else [staged]
            assert all(key(p) in synced for p in inside), f"{staged} renamed before it was synced"
        real_replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(writers.os, "fsync", fsync)
    monkeypatch.setattr(writers.os, "replace", replace)
    with writers.Outputs() as outputs:
        outputs.directory(tmp_path / "merged")
        staged = outputs.stage_directory(tmp_path / "merged")
        (staged / "adapter_config.json").write_text("{}")
        (staged / "nested").mkdir()
        (staged / "nested" / "README.md").write_text("card")
        outputs.write_text(str(tmp_path / "r.json"), "{}")
    assert key(tmp_path) in synced  # the renames
    assert (tmp_path / "merged" / "nested" / "README.md").read_text() == "card"


def test_holding_signals_leaves_a_handler_installed_outside_python_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    """A handler installed outside Python (``getsignal`` None: a host program embedding clair)
    cannot be put back by Python: replacing it during the roll-back, the restore raised TypeError
    half-way through. Such a signal is left alone and blocked for the thread instead; the others
    are still noted and delivered after the block."""
    import signal

    from clair_cli.io import writers

    real_getsignal = signal.getsignal
    monkeypatch.setattr(writers.signal, "getsignal", lambda s: None if s == signal.SIGHUP else real_getsignal(s))
    before_hup = real_getsignal(signal.SIGHUP)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # CI runs with SIGINT ignored
    try:
        with pytest.raises(KeyboardInterrupt), writers._signals_held():
            assert signal.SIGHUP in signal.pthread_sigmask(signal.SIG_BLOCK, [])
            assert real_getsignal(signal.SIGHUP) is before_hup  # not replaced
            os.kill(os.getpid(), signal.SIGINT)
            reached = True  # the SIGINT is held
        assert reached
    finally:
        signal.signal(signal.SIGINT, previous)
    assert signal.SIGHUP not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert real_getsignal(signal.SIGHUP) is before_hup
