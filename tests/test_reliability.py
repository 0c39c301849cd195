"""Runs that fail halfway, outputs that cannot be written, and determinism, through the real CLI."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_adapters"


def _clair(
    *args: str, threads: int | None = None, timeout: float = 180, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    # PYTHONPATH: with ``cwd`` elsewhere, still this checkout's clair_cli (a worktree shares its venv).
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", "PYTHONPATH": path}
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return subprocess.run(
        [sys.executable, "-m", "clair_cli", *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd
    )


def _leftovers(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_killed_merge_leaves_no_partial_target_and_a_second_run_succeeds(
    sig: signal.Signals, seed: int, tmp_path: Path
) -> None:
    target = tmp_path / "merged"
    proc = subprocess.Popen(
        [sys.executable, "-m", "clair_cli", "merge", str(SAMPLES), "--out", str(target), "-q", "--exit-zero"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(random.Random(seed).uniform(0.3, 4.0))  # anywhere from start-up to writing
    proc.send_signal(sig)
    _out, err = proc.communicate(timeout=60)
    if proc.returncode == 0:  # it had finished: the output must be complete
        assert (target / "adapter_model.safetensors").is_file()
    else:
        assert "Traceback" not in err or "clair_cli" not in err, err
        if sig == signal.SIGINT:
            # A SIGINT that lands while the interpreter itself is still starting (its site
            # packages), before any of clair's code runs, ends the process there (-2 or 130
            # and no message; reached on a loaded machine): nothing can have been written.
            # Once clair runs, the message and exit code 130 are required.
            if "Interrupted" in err or "clair_cli" in err:
                assert proc.returncode == 130 and "Interrupted" in err, err
            else:
                assert proc.returncode in (-signal.SIGINT, 130, 1) and not target.exists(), (proc.returncode, err)
            assert _leftovers(tmp_path, "merged") == []
        if target.exists():  # only possible if the rename into place had happened
            assert (target / "adapter_model.safetensors").is_file() and (target / "adapter_config.json").is_file()
    again = _clair("merge", str(SAMPLES), "--out", str(target), "-q", "--force", "--exit-zero")
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert _leftovers(tmp_path, "merged") == [], "stale temporary directories of killed runs are removed"


def test_stale_temporary_directories_of_live_processes_are_kept(tmp_path: Path) -> None:
    live = tmp_path / f".merged.{os.getpid()}.abc.clair-tmp"  # this test process is alive
    dead = tmp_path / ".merged.999999999.abc.clair-tmp"
    live.mkdir()
    dead.mkdir()
    proc = _clair("merge", str(SAMPLES), "--out", str(tmp_path / "merged"), "-q", "--exit-zero")
    assert proc.returncode == 0, proc.stderr
    assert live.exists() and not dead.exists()


@contextlib.contextmanager
def _read_only(directory: Path) -> Iterator[list[str]]:
    """Make ``directory`` unwritable even for root; yields a command prefix to run clair under.

    Not root: chmod 0555. Root (as CI runs): the immutable attribute (``chattr +i``), or, where
    the file system has none, a read-only bind mount in a private mount namespace (``unshare``).
    """
    if os.geteuid() != 0:
        directory.chmod(0o555)
        try:
            yield []
        finally:
            directory.chmod(0o755)
        return
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode == 0:
        try:
            yield []
        finally:
            subprocess.run(["chattr", "-i", str(directory)], check=True)
        return
    d = shlex.quote(str(directory))
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind -o ro {d} {d}"], capture_output=True)
    if shutil.which("unshare") is None or probe.returncode != 0:
        pytest.fail("as root, neither chattr +i nor a read-only bind mount works here: the test cannot run")
    yield ["unshare", "-m", "sh", "-c", f'mount --bind -o ro {d} {d} && exec "$@"', "sh"]


def test_read_only_output_location(tmp_path: Path) -> None:
    # Runs as root too (CI): see _read_only.
    parent = tmp_path / "ro"
    parent.mkdir()
    with _read_only(parent) as prefix:
        env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
        proc = subprocess.run(
            [*prefix, sys.executable, "-m", "clair_cli", "merge", str(SAMPLES), "--out", str(parent / "merged")],
            capture_output=True,
            text=True,
            env=env,
            timeout=180,
        )
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        first = proc.stderr.splitlines()[0]
        assert first.startswith("Error:") and str(parent / "merged") in first and "permission denied" in first
        assert list(parent.iterdir()) == []


def test_unwritable_output_location_is_refused_before_any_work(tmp_path: Path) -> None:
    # Works as root too: the parent is a file, so nothing can be created under it.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = _clair("merge", str(SAMPLES), "--out", str(blocker / "merged"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "does not exist" in proc.stderr.splitlines()[0]
    assert blocker.read_text() == "x"


def test_existing_output_is_kept_without_force(tmp_path: Path) -> None:
    target = tmp_path / "merged"
    target.mkdir()
    (target / "mine.txt").write_text("keep me")
    proc = _clair("merge", str(SAMPLES), "--out", str(target))
    assert proc.returncode == 2 and "already exists" in proc.stderr and "--force" in proc.stderr
    assert [p.name for p in target.iterdir()] == ["mine.txt"] and (target / "mine.txt").read_text() == "keep me"
    # A report file is replaced atomically, and only by a run that succeeds.
    json_out = tmp_path / "report.json"
    json_out.write_text("old")
    proc = _clair("audit", str(tmp_path / "missing"), "--json", str(json_out))
    assert proc.returncode == 2 and json_out.read_text() == "old"


def _without_timing(path: Path) -> dict:
    report = json.loads(path.read_text())
    report.pop("timing_s", None)
    report.pop("generated_at", None)
    return report


def test_same_inputs_give_byte_identical_reports_and_merges_across_runs_and_threads(tmp_path: Path) -> None:
    runs = [(1, "a"), (2, "b"), (2, "c")]  # one thread, two threads, two threads again
    for threads, tag in runs:
        # The same relative paths in every run: the model card records the command line.
        work = tmp_path / tag
        work.mkdir()
        # The merge's report holds the audit's (every adapter's verdict, every module's rank) and the merge's.
        args = ("merge", str(SAMPLES), "--out", "merged", "--json", "report.json", "-q", "--exit-zero")
        merge = _clair(*args, threads=threads, cwd=work)
        assert merge.returncode == 0, merge.stderr
    first = _without_timing(tmp_path / "a" / "report.json")
    assert first["adapters"] and first["modules"] and first["merge"]
    for _threads, tag in runs[1:]:
        assert _without_timing(tmp_path / tag / "report.json") == first
        for name in ("adapter_model.safetensors", "adapter_config.json", "README.md"):
            assert (tmp_path / tag / "merged" / name).read_bytes() == (tmp_path / "a" / "merged" / name).read_bytes()


def test_read_only_location_is_refused_even_where_permissions_are_not_enforced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As root, chmod does not stop writes; the check itself is exercised by faking the answer.
    from typer.testing import CliRunner

    from clair_cli.cli import app

    real_access = os.access
    monkeypatch.setattr(
        "clair_cli.io.writers.os.access", lambda p, mode: False if Path(p) == tmp_path else real_access(p, mode)
    )
    result = CliRunner().invoke(app, ["merge", str(SAMPLES), "--out", str(tmp_path / "merged")])
    assert result.exit_code == 2 and "permission denied" in result.stderr
    assert list(tmp_path.iterdir()) == []


_SIGNAL_DURING_IMPORT = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a background job ignores it)

class SignalOnImport:  # the signal lands while {module} is being imported
    def find_spec(self, name, path, target=None):
        if name == "{module}":
            os.kill(os.getpid(), signal.{sig})
        return None

sys.meta_path.insert(0, SignalOnImport())
from clair_cli.cli.interrupts import import_numerics
import_numerics()
print("imported")
"""


@pytest.mark.parametrize("module", ["numpy", "torch"])
@pytest.mark.parametrize(("sig", "code"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_signal_while_the_numerical_stack_is_imported_ends_the_run_at_once(module: str, sig: str, code: int) -> None:
    # torch's start-up imports numpy from C and swallows any error there, a Ctrl-C included: the
    # command then failed on a half-imported numpy ("internal error ... no attribute 'matrix'",
    # exit 2; CI saw this). Nothing has been written yet, so the process ends with the code.
    script = _SIGNAL_DURING_IMPORT.format(module=module, sig=sig)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert done.returncode == code, (done.returncode, done.stderr)
    assert "Interrupted: no output was written." in done.stderr and "imported" not in done.stdout
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("handler", ["default_int_handler", "SIG_IGN"])
def test_importing_the_numerical_stack_gives_ctrl_c_back_to_the_writers(handler: str) -> None:
    # After the import, Ctrl-C raises KeyboardInterrupt again so that writers clean up; where it
    # was ignored (a background job), it stays ignored.
    script = (
        "import signal, sys\n"
        f"signal.signal(signal.SIGINT, signal.{handler})\n"
        "from clair_cli.cli.interrupts import NUMERICS, import_numerics\n"
        "import_numerics()\n"
        "assert all(name in sys.modules for name in NUMERICS)\n"
        f"assert signal.getsignal(signal.SIGINT) is signal.{handler}\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_a_command_that_ends_before_its_work_never_sets_up_the_numerical_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    # Importing torch is most of a command's start-up: a command refused on a path never needs it.
    from typer.testing import CliRunner

    import clair_cli.cli
    import clair_cli.cli.command

    calls: list[str] = []
    monkeypatch.setattr(clair_cli.cli.command, "numerical_setup", lambda: calls.append("setup") or (lambda: None))
    needs = {"merge": ["--out", "/nonexistent/out"], "refine": ["--out", "/nonexistent/out"]}
    needs["gate"] = ["--reference", "/nonexistent/reference"]
    commands = [c.name for c in clair_cli.cli.app.registered_commands]
    assert set(needs) < set(commands)
    for name in commands:
        result = CliRunner().invoke(clair_cli.cli.app, [name, "/nonexistent/source", *needs.get(name, [])])
        assert result.exit_code == 2, (name, result.output)
    assert calls == []
    result = CliRunner().invoke(clair_cli.cli.app, ["inspect", str(SAMPLES / "client_01")])
    assert result.exit_code == 0 and calls == ["setup"], result.output  # once, where it reads a tensor


# Reports, on stderr, where numpy and torch are first imported: under the handler that ends the
# process at once (clair_cli.cli.interrupts), and with no output entry beside --out yet.
_WATCH_IMPORTS = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal

class Watch:
    def find_spec(self, name, path, target=None):
        if name in ("numpy", "torch") and name not in seen:
            from clair_cli.cli import interrupts
            seen.append(name)
            guarded = signal.getsignal(signal.SIGINT) is interrupts._exit_now
            print(f"{{name}} guarded={{guarded}} beside={{sorted(os.listdir({work!r}))}}", file=sys.stderr)
        return None

seen = []
sys.meta_path.insert(0, Watch())
sys.argv = ["clair", *{argv!r}]
from clair_cli.__main__ import run
run()
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["audit", "{samples}", "--json", "{work}/report.json"],
        ["merge", "{samples}", "--out", "{work}/out"],
        ["merge", "{samples}", "--out", "{work}/out", "--method", "median"],  # writes before it reads a tensor
        ["merge", "{samples}", "--out", "{work}/out", "--plot", "{work}/plot.png"],  # --plot checks for matplotlib
        ["refine", "{samples}", "--out", "{work}/out"],
        ["gate", "{samples}/client_16", *(f"--reference={{samples}}/client_0{k}" for k in range(1, 6))],
        ["inspect", "{samples}/client_01"],
    ],
    ids=["audit", "merge", "merge-median", "merge-plot", "refine", "gate", "inspect"],
)
def test_every_command_imports_the_numerical_stack_where_a_ctrl_c_ends_it_at_once(
    tmp_path: Path, argv: list[str]
) -> None:
    # torch's start-up imports numpy from C and swallows any error there, a Ctrl-C included, so a
    # signal during that import must end the process at once (exit 130, nothing to clean up):
    # wherever a command first needs torch, that handler is in place and nothing is written yet.
    work = tmp_path / "work"
    work.mkdir()
    args = [a.format(samples=SAMPLES, work=work) for a in argv] + ["-q"]
    script = _WATCH_IMPORTS.format(work=str(work), argv=args)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode in (0, 1), done.stderr[-2000:]
    watched = [line for line in done.stderr.splitlines() if " guarded=" in line]
    assert watched == ["numpy guarded=True beside=[]", "torch guarded=True beside=[]"], done.stderr[-2000:]


def test_ctrl_c_wrapped_by_an_import_is_still_an_interrupt(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A Ctrl-C landing in a class body during torch's import reaches us as
    # "RuntimeError: Error calling __set_name__" caused by the KeyboardInterrupt (CI saw this).
    import clair_cli.cli
    from clair_cli.__main__ import run

    def wrapped() -> None:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:
            raise RuntimeError("Error calling __set_name__") from exc

    import clair_cli.__main__

    def exit_here(code: int) -> None:
        raise SystemExit(code)  # run() leaves through os._exit, which would end pytest itself

    monkeypatch.setattr(clair_cli.cli, "main", wrapped)
    monkeypatch.setattr(clair_cli.__main__, "_exit_interrupted", exit_here)
    with pytest.raises(SystemExit) as exit_info:
        run()
    assert exit_info.value.code == 130 and "Interrupted" in capsys.readouterr().err

    # The same inside a command, where the CLI's one exception boundary catches it.
    from typer.testing import CliRunner

    import clair_cli.io.sources

    def wrapped_resolve(*_args: object, **_kwargs: object) -> None:
        wrapped()

    monkeypatch.undo()
    monkeypatch.setattr(clair_cli.io.sources, "resolve_sources", wrapped_resolve)
    result = CliRunner().invoke(clair_cli.cli.app, ["inspect", str(SAMPLES)])
    assert result.exit_code == 130 and "Interrupted" in result.stderr and "internal error" not in result.stderr

    # A bad-input error raised by a cleanup while the Ctrl-C unwinds is still the Ctrl-C (exit
    # 130, not 2: the input was fine).
    from clair_cli.errors import UsageError

    def refused_while_interrupted(*_args: object, **_kwargs: object) -> None:
        try:
            raise KeyboardInterrupt
        finally:
            raise UsageError("a check in a cleanup")

    monkeypatch.setattr(clair_cli.io.sources, "resolve_sources", refused_while_interrupted)
    result = CliRunner().invoke(clair_cli.cli.app, ["inspect", str(SAMPLES)])
    assert result.exit_code == 130 and "Interrupted" in result.stderr and "a check" not in result.stderr

    def broken() -> None:
        raise RuntimeError("a real bug")

    monkeypatch.setattr(clair_cli.cli, "main", broken)
    with pytest.raises(RuntimeError, match="a real bug"):
        run()
