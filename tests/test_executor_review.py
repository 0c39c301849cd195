"""What a review of the parallel executors (``--jobs N``, ``--executor ray``) found on 2026-12-07:
each was an internal error, a misleading message or a connection to another port before."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from benchmarks import poolgen
from clair_cli.cli import app
from clair_cli.errors import ClairError, UsageError
from clair_cli.params import AuditParams

ROOT = Path(__file__).parents[1]
SAMPLES = ROOT / "sample_adapters"


def _namespace_ray(folder: Path):
    """What ``import ray`` gives without Ray where a folder named ray is on the import path (the
    working directory under ``python -m``, e.g. /tmp, which holds Ray's own /tmp/ray)."""
    (folder / "ray" / "session_latest").mkdir(parents=True)
    spec = importlib.machinery.PathFinder.find_spec("ray", [str(folder)])
    assert spec is not None and spec.origin in (None, "namespace")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_a_folder_named_ray_is_not_ray(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Was: ``Error: internal error (AttributeError: module 'ray' has no attribute 'is_initialized')``."""
    from clair_cli.executors import _ray

    monkeypatch.setitem(sys.modules, "ray", _namespace_ray(tmp_path))
    with pytest.raises(UsageError, match="needs Ray, which is not installed") as raised:
        _ray()
    assert str(tmp_path / "ray") in raised.value.message
    result = CliRunner().invoke(app, ["audit", str(SAMPLES), "--executor", "ray"], env={"NO_COLOR": "1"})
    assert result.exit_code == 2, result.output
    assert "Error: --executor ray needs Ray, which is not installed" in result.output
    assert "internal error" not in result.output and "Traceback" not in result.output


def test_a_worker_ended_by_sigterm_is_named(tmp_path: Path) -> None:
    """A worker sent SIGTERM alone (a process manager, a user's ``kill``) was reported as having
    left with "exit code 0"; it is named as killed by SIGTERM, as a SIGKILL is."""
    from clair_cli import pipeline
    from clair_cli.core.audit import ClairAuditor
    from clair_cli.executors import ProcessExecutor

    spec = poolgen.PoolSpec(k=6, layers=1, hidden=32, rank=4, shared=2, bad=1, dtype="float32")
    pool = pipeline.open_pool([str(poolgen.generate(spec, tmp_path / "pool"))])
    with ProcessExecutor(2) as executor:
        process = executor._workers[1][0]
        os.kill(process.pid, signal.SIGTERM)
        process.join(timeout=120)
        assert process.exitcode == -signal.SIGTERM
        with pytest.raises(ClairError, match=r"stopped before finishing its module \(killed by SIGTERM\)"):
            list(executor.audits(pool, ClairAuditor()))


class _RayError(Exception):
    pass


class _RayTaskError(_RayError):
    pass


class WorkerCrashedError(_RayError):
    pass


class OutOfMemoryError(_RayError):
    pass


def _fake_ray(error: BaseException) -> SimpleNamespace:
    def get(_ref: object) -> None:
        raise error

    return SimpleNamespace(get=get, exceptions=SimpleNamespace(RayError=_RayError, RayTaskError=_RayTaskError))


def test_a_ray_task_whose_worker_died_is_one_line() -> None:
    """A Ray worker that died on every retry (killed by the kernel's OOM killer, a crash) ended the
    run with ``internal error (WorkerCrashedError: ...)`` and a request to report a bug."""
    from clair_cli.executors import _result

    died = WorkerCrashedError("The worker died unexpectedly while executing this task.\nCheck the logs.")
    with pytest.raises(ClairError, match=r"Ray task stopped before finishing its module \(WorkerCrashedError: The"):
        _result(_fake_ray(died), object())
    with pytest.raises(OutOfMemoryError):  # Ray's memory monitor: the CLI's "out of memory"
        _result(_fake_ray(OutOfMemoryError("memory")), object())


def test_a_real_ray_worker_crash_is_one_line() -> None:
    ray = pytest.importorskip("ray")
    if getattr(ray, "__file__", None) is None:
        pytest.skip("Ray is not installed")
    from clair_cli.executors import _result

    fake = SimpleNamespace(get=lambda _ref: (_ for _ in ()).throw(ray.exceptions.WorkerCrashedError()))
    fake.exceptions = ray.exceptions
    with pytest.raises(ClairError, match=r"Ray task stopped before finishing its module \(WorkerCrashedError"):
        _result(fake, object())


@pytest.mark.parametrize("port", ["0", "65536", "99999"])
def test_a_ray_port_out_of_range_is_refused(port: str) -> None:
    """``ray://HOST:99999`` was accepted and connected to port 34463 (99999 modulo 65536)."""
    from clair_cli.executors import check_reachable

    with pytest.raises(UsageError, match="a port from 1 to 65535"):
        AuditParams(executor=f"ray://127.0.0.1:{port}")
    with pytest.raises(UsageError, match="a port from 1 to 65535"):
        check_reachable(f"ray://127.0.0.1:{port}")
    assert AuditParams(executor="ray://127.0.0.1:65535").executor == "ray://127.0.0.1:65535"


def _fake_ray_init(calls: list[str], during_init) -> SimpleNamespace:
    """A Ray whose ``init`` sets its own SIGTERM handler, as Ray's does (``sys.exit(signum)``),
    then runs ``during_init``; ``calls`` notes ``init`` and ``shutdown``."""

    def set_sigterm_handler(handler) -> None:
        signal.signal(signal.SIGTERM, handler)

    fake = SimpleNamespace(_private=SimpleNamespace(utils=SimpleNamespace(set_sigterm_handler=set_sigterm_handler)))

    def init(*_args, **_kwargs) -> None:
        calls.append("init")
        fake._private.utils.set_sigterm_handler(lambda signum, _frame: sys.exit(signum))
        during_init()

    fake.init = init
    fake.shutdown = lambda: calls.append("shutdown")
    fake.is_initialized = lambda: False
    return fake


@pytest.fixture
def clair_sigterm():
    """clair's own SIGTERM handler (``Terminated``, exit 143), as ``clair_cli.__main__`` installs it."""
    from clair_cli.__main__ import _on_sigterm

    before = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def test_sigterm_while_ray_starts_is_terminated(clair_sigterm: None) -> None:
    """A SIGTERM in the middle of ``ray.init`` ran Ray's handler, ``sys.exit(15)``: exit code 15 and
    no message, and the local cluster's processes left running (the exit skips Ray's atexit)."""
    from clair_cli.errors import Terminated
    from clair_cli.executors import _connect

    def sigterm() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100_000):  # Python runs the handler at the next instruction
            pass

    calls: list[str] = []
    with pytest.raises(Terminated):
        _connect(_fake_ray_init(calls, sigterm), "ray")
    assert calls == ["init", "shutdown"]
    from clair_cli.__main__ import _on_sigterm

    assert signal.getsignal(signal.SIGTERM) is _on_sigterm


def test_ctrl_c_while_ray_workers_are_checked_stops_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C (or a refusal) while the first task checks the workers' versions came out of
    ``__enter__``, so no ``__exit__`` stopped the local cluster that had just been started."""
    from clair_cli import executors

    calls: list[str] = []
    fake = _fake_ray_init(calls, lambda: None)
    monkeypatch.setattr(executors, "_ray", lambda: fake)

    def interrupted(_ray) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(executors.RayExecutor, "_check_workers", staticmethod(interrupted))
    with pytest.raises(KeyboardInterrupt), executors.RayExecutor("ray"):
        pass
    assert calls == ["init", "shutdown"]


def test_sigterm_while_waiting_on_ray_is_terminated(clair_sigterm: None) -> None:
    """``ray.get`` turns what a signal handler raises into a plain KeyboardInterrupt: a SIGTERM to
    clair while it waited for a Ray task ended the run as a Ctrl-C, exit 130 instead of 143."""
    from clair_cli.errors import Terminated
    from clair_cli.executors import _result

    def get(_ref: object) -> None:  # as Ray's: the handler's exception becomes KeyboardInterrupt()
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100_000):
                pass
        except KeyboardInterrupt:
            raise KeyboardInterrupt from None

    fake = SimpleNamespace(get=get, exceptions=SimpleNamespace(RayError=_RayError, RayTaskError=_RayTaskError))
    with pytest.raises(KeyboardInterrupt) as raised:
        _result(fake, object())
    assert isinstance(raised.value, Terminated)
    from clair_cli.__main__ import _on_sigterm

    assert signal.getsignal(signal.SIGTERM) is _on_sigterm
