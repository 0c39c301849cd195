"""Where the audit's per-module work runs: in this process (``local``), in worker processes on
this machine (``--jobs N``) or on a Ray cluster.

One module's audit is a function of the pool's description, the module's name and the
auditor's parameters (:meth:`clair_cli.core.audit.ClairAuditor.audit_module`): its random
draws come from generators seeded per module, and its arithmetic runs on the driver's thread
count. The driver folds the modules' audits into the pool-wide sums in module order
(:meth:`~clair_cli.core.audit.ClairAuditor.fit_audits`) and decides the verdict itself, so a
report is the same, bit for bit, whatever ran the modules.

With Ray, workers read the factors themselves, where they run: a task carries the adapters'
absolute file paths and that module's table entry (in-memory adapters: that module's factors),
never the pool's tensors. Tasks are submitted in module order with at most a few per worker
in flight, and their results gathered in that order, so the driver holds a bounded number of
modules' results, not the pool's. The only module that imports ray (extra ``clair-lora[ray]``).

With ``--jobs N`` the same tasks run in N worker processes of this machine
(:class:`ProcessExecutor`, the standard library's process pool; no Ray needed).
"""

from __future__ import annotations

import contextlib
import signal
import socket
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from clair_cli.constants import WAIT_SLICE_S
from clair_cli.errors import ClairError, UsageError

if TYPE_CHECKING:
    from clair_cli.core.audit import ClairAuditor, ModuleAudit
    from clair_cli.results import Pool

INSTALL = "pip install 'clair-lora[ray]'"
# Seconds to wait for a ray://HOST:PORT to accept a connection before calling it unreachable
# (a server that accepts it but does not answer as Ray Client fails after Ray Client's own
# retries, about 30 s).
CONNECT_TIMEOUT_S = 10.0
# Tasks in flight per worker: enough to keep each busy while the driver folds a result.
IN_FLIGHT_PER_WORKER = 2


def _ray() -> Any:
    """The ray module, or a one-line usage error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UsageError(f"--executor ray needs Ray, which is not installed: {INSTALL}") from None
    if getattr(ray, "__file__", None) is None or not hasattr(ray, "init"):
        # A folder named ray on the import path (the working directory under ``python -m``; Ray's
        # own session folder /tmp/ray among them), imported as an empty namespace package.
        from clair_cli.io.paths import printable

        folder = next(iter(getattr(ray, "__path__", None) or ()), "?")
        raise UsageError(
            f"--executor ray needs Ray, which is not installed: {INSTALL} "
            f"(Python found the folder {printable(str(folder))} instead)"
        )
    return ray


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Refuse, within ``timeout`` seconds, a ``ray://HOST:PORT`` that accepts no connection
    (Ray Client itself retries for much longer)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:  # the resolver takes 65536 and up modulo 65536
        raise UsageError(f"--executor {address}: expected a port from 1 to 65535")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise UsageError(f"--executor {address}: cannot reach the Ray cluster ({reason})") from None


def audit_one(
    pool: Pool,
    auditor: ClairAuditor,
    reference: list[int] | None,
    settings: tuple[int, str, bool],
    without: frozenset[int] = frozenset(),
) -> ModuleAudit:
    """A worker's task: read the pool's one module where it runs and audit it with the driver's
    numerical settings, ``(threads, float32 matmul precision, subnormals flushed to zero)`` (``without``: as
    :meth:`~clair_cli.core.audit.ClairAuditor.audit_module`'s)."""
    from contextlib import ExitStack

    import torch

    from clair_cli.pipeline import module_input

    threads, precision, flush = settings
    if flush and not denormals_flushed():  # before set_num_threads starts the worker's threads
        torch.set_flush_denormal(True)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    if precision != torch.get_float32_matmul_precision():
        torch.set_float32_matmul_precision(precision)
    idx = list(range(len(pool.adapters)))
    with ExitStack() as stack:
        readers = [stack.enter_context(a.reader()) for a in pool.adapters]
        given = module_input(pool, pool.modules[0], idx, readers, auditor.dtype, str(auditor.device))
    return auditor.audit_module(given, reference, without)


def numeric_settings() -> tuple[int, str, bool]:
    """The driver's settings that a worker's arithmetic must share for the same numbers
    (:func:`audit_one`): threads, float32 matmul precision, subnormals flushed to zero."""
    import torch

    return torch.get_num_threads(), torch.get_float32_matmul_precision(), denormals_flushed()


def denormals_flushed() -> bool:
    """Whether this thread's float arithmetic flushes subnormal numbers to zero
    (:func:`clair_cli.cli.threads.flush_denormals`): the CPU's own answer, the smallest
    subnormal float64 times one."""
    import torch

    return float(torch.tensor(5e-324, dtype=torch.float64) * 1.0) == 0.0


def versions() -> tuple[str, str]:
    """clair's and torch's versions where this runs (a worker's must be the driver's)."""
    import torch

    from clair_cli import __version__

    return __version__, torch.__version__


def module_pool(pool: Pool, module: str, absolute: bool = True) -> Pool:
    """The pool as one task needs it: its adapters with one module (:meth:`Adapter.for_module`;
    ``absolute``: files named by absolute paths, for workers whose working directory is not the
    driver's)."""
    from clair_cli.results import Pool

    return Pool([a.for_module(module, absolute) for a in pool.adapters], [module], base_model=pool.base_model)


class RayExecutor:
    """Runs modules' audits as Ray tasks, gathered in module order.

    Args:
        address: ``ray`` (``ray.init()``'s own choice: ``RAY_ADDRESS``, a cluster started on
            this machine, or a new local one) or ``ray://HOST:PORT``. A Ray already initialised
            in this process (a library caller's, a test's) is used as it is, and left running.
    """

    def __init__(self, address: str = "ray") -> None:
        self.address = address
        self._started = False

    def __enter__(self) -> RayExecutor:
        ray = _ray()
        if not ray.is_initialized():
            _connect(ray, self.address)
            self._started = True
        try:
            self._check_workers(ray)
        except BaseException:  # a refusal, Ctrl-C, SIGTERM: no __exit__ follows to stop what we started
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._started:
            _ray().shutdown()

    @staticmethod
    def _check_workers(ray: Any) -> None:
        """Refuse a cluster whose workers run another clair or torch (results would differ)."""
        try:
            with _sigterm_kept():
                theirs = ray.get(ray.remote(versions).options(num_cpus=0).remote())
        except ray.exceptions.RayError as exc:
            raise UsageError(
                f"the Ray cluster's workers cannot run clair ({_first_line(exc)}): install clair-lora on every node"
            ) from None
        if theirs != versions():
            raise UsageError(
                f"the Ray cluster's workers run clair {theirs[0]} with torch {theirs[1]}, this process clair "
                f"{versions()[0]} with torch {versions()[1]}: install the same versions on every node"
            )

    def audits(
        self,
        pool: Pool,
        auditor: ClairAuditor,
        reference: list[int] | None = None,
        progress: Callable[[str, int, int], None] | None = None,
        modules: list[str] | None = None,
        without: frozenset[int] = frozenset(),
    ) -> Iterator[ModuleAudit]:
        """The modules' audits in module order, computed by Ray tasks (a bounded number in flight);
        ``modules``: those of the pool's only; ``without``: as
        :meth:`~clair_cli.core.audit.ClairAuditor.audit_module`'s."""
        import torch

        ray = _ray()
        threads = torch.get_num_threads()
        settings = numeric_settings()
        gpu = str(auditor.device).startswith("cuda")
        task = ray.remote(audit_one).options(num_cpus=threads, num_gpus=1 if gpu else 0)
        auditor = auditor.unfitted()  # a refit's second round: not the first one's state
        if gpu:  # Ray shows each task its own GPU as the first one
            auditor.device = "cuda"
        shared = ray.put(auditor)
        window = IN_FLIGHT_PER_WORKER * _workers(ray, threads, gpu)
        names = _names(pool, modules)
        yield from _in_order(
            (task.remote(module_pool(pool, n), shared, reference, settings, without) for n in names),
            lambda ref: _result(ray, ref),
            window,
            len(names),
            progress,
        )


class ProcessExecutor:
    """Runs modules' audits in ``jobs`` worker processes on this machine, gathered in module order.

    The tasks are :class:`RayExecutor`'s (:func:`audit_one`: each reads its module's factors
    itself and audits it on the driver's thread count and float32 matmul precision), so the
    results are the local run's, bit for bit. Each worker is a fresh process (``spawn``: none of
    the driver's threads, locks or open files is inherited) with its own pipe; tasks and results
    cross it pickled by value with the standard pickler (never through shared memory or passed
    file descriptors, which container limits and open-file limits would break). Workers are
    started together, with Ctrl-C and SIGTERM blocked and deferred, so that a signal sent while
    they import torch reaches the driver alone; then they ignore Ctrl-C (the driver handles it
    and stops them), leave quietly on SIGTERM, and die with the driver however it ends (Linux:
    ``PR_SET_PDEATHSIG`` where the main thread starts them; else they watch the driver's pid).
    A script that uses this must guard its entry point (``if __name__ == "__main__":``), as for
    any spawned process.
    """

    def __init__(self, jobs: int) -> None:
        if jobs < 1:
            raise ValueError(f"jobs must be at least 1, got {jobs}")
        self.jobs = jobs
        self._workers: list[tuple[Any, Any]] = []  # (process, its end of the pipe)

    def __enter__(self) -> ProcessExecutor:
        import multiprocessing
        import os
        import threading

        context = multiprocessing.get_context("spawn")
        signals = {signal.SIGINT, signal.SIGTERM}
        if os.name == "posix":
            from multiprocessing import resource_tracker

            # Spawned processes need multiprocessing's resource tracker, whose start unblocks these
            # two signals in the starting thread: started first, it leaves the mask below alone.
            resource_tracker.ensure_running()
        # The kernel's "die with your parent" follows the thread that starts a process: only the
        # main thread outlives the workers for sure; from another, the workers watch the pid.
        by_kernel = threading.current_thread() is threading.main_thread()
        try:
            # While the workers start, Ctrl-C and SIGTERM wait: blocked in this thread, so that the
            # workers start with them blocked (one pressed while they import torch reaches the
            # driver alone), and deferred by Python's handler, which any other thread of this
            # process could run. A start cut in half would leave a worker nobody stops.
            old = signal.pthread_sigmask(signal.SIG_BLOCK, signals) if hasattr(signal, "pthread_sigmask") else None
            deferred: list[int] = []
            handlers = _defer(signals, deferred)
            try:
                for _ in range(self.jobs):
                    ours, theirs = context.Pipe(duplex=True)
                    process = context.Process(target=_worker, args=(theirs, os.getpid(), by_kernel), daemon=True)
                    self._workers.append((process, ours))
                    try:
                        process.start()
                    finally:
                        theirs.close()
                    if old is not None:  # blocked still, whatever the start did
                        signal.pthread_sigmask(signal.SIG_BLOCK, signals)
            finally:
                _restore(handlers, old)
            for signum in dict.fromkeys(deferred):  # now handled as they would have been, once each
                handler = handlers.get(signal.Signals(signum), signal.SIG_DFL)
                if callable(handler):
                    handler(signum, None)
                else:
                    signal.raise_signal(signum)
        except OSError as exc:  # no more processes or open files allowed
            self._stop()
            raise ClairError(
                f"cannot start {self.jobs} worker processes for --jobs ({exc.strerror or exc})",
                hint="Run again with fewer --jobs, or without --jobs.",
            ) from None
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        self._stop(graceful=exc_type is None)

    def _stop(self, graceful: bool = False) -> None:
        """Stop the workers: asked to leave after a run that ended well, killed otherwise."""
        workers, self._workers = self._workers, []
        for process, conn in workers:
            if graceful and process.is_alive():
                with contextlib.suppress(OSError):
                    conn.send_bytes(_STOP)
            elif process.pid is not None:
                with contextlib.suppress(OSError, ValueError):
                    process.kill()
        for process, conn in workers:
            if process.pid is not None:
                process.join(timeout=10)
                if process.is_alive():
                    process.kill()
                    process.join(timeout=10)
            conn.close()

    def audits(
        self,
        pool: Pool,
        auditor: ClairAuditor,
        reference: list[int] | None = None,
        progress: Callable[[str, int, int], None] | None = None,
        modules: list[str] | None = None,
        without: frozenset[int] = frozenset(),
    ) -> Iterator[ModuleAudit]:
        """As :meth:`RayExecutor.audits`, on this machine's worker processes: each task goes to
        the next idle worker (one task a worker at a time), at most ``IN_FLIGHT_PER_WORKER`` tasks
        per worker are in flight or done and held, and results are yielded in module order; an
        error raised by a module's audit is raised when its turn comes, as in one process."""
        import pickle
        from multiprocessing.connection import wait

        if not self._workers:
            raise RuntimeError("ProcessExecutor.audits outside its with block")
        settings = numeric_settings()
        unfitted = auditor.unfitted()  # a refit's second round: not the first one's state
        names = _names(pool, modules)
        idle = list(range(len(self._workers)))[::-1]
        busy: dict[int, int] = {}  # worker -> the task it works on
        ready: dict[int, tuple[str, Any]] = {}  # results (or errors) not yet yielded, by task
        window = IN_FLIGHT_PER_WORKER * len(self._workers)
        following = 0
        done = 0
        finished = False
        try:
            while done < len(names):
                while idle and following < len(names) and len(busy) + len(ready) < window:
                    worker = idle.pop()
                    task = (module_pool(pool, names[following], absolute=False), unfitted, reference, settings, without)
                    process, conn = self._workers[worker]
                    try:
                        conn.send_bytes(pickle.dumps(task, protocol=pickle.HIGHEST_PROTOCOL))
                    except OSError:
                        raise _died(process) from None
                    busy[worker] = following
                    following += 1
                if done in ready:
                    status, value = ready.pop(done)
                    if status == "error":
                        error, trace = value
                        raise error from RemoteTraceback(trace)
                    yield value
                    done += 1
                    if progress is not None:
                        progress("modules", done, len(names))
                    continue
                conns = {id(self._workers[w][1]): w for w in busy}
                answered: list = []
                while not answered:
                    answered = wait([self._workers[w][1] for w in busy], timeout=WAIT_SLICE_S)
                for conn in answered:
                    worker = conns[id(conn)]
                    ready[busy.pop(worker)] = self._result(worker)
                    idle.append(worker)
            finished = True
        finally:
            if not finished:  # stopped early (an error, or the caller gave up): no stale result may follow
                self._stop()

    def _result(self, worker: int) -> tuple[str, Any]:
        """One task's ``("ok", result)`` or ``("error", (exception, traceback))`` from ``worker``
        (the exception as raised there: a ClairError, or the ValueError of a module the audit
        cannot handle; the traceback as text)."""
        import pickle

        process, conn = self._workers[worker]
        try:
            return pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            raise _died(process) from None


_STOP = b"stop"


def _restore(handlers: dict[signal.Signals, Any], mask: set[Any] | None) -> None:
    """Put ``handlers`` and the thread's signal ``mask`` back, whatever signal is handled meanwhile
    (one raised by a handler just put back is raised once everything is restored)."""
    error: BaseException | None = None
    for sig, handler in handlers.items():
        while True:
            try:
                signal.signal(sig, handler)
                break
            except BaseException as exc:  # a signal handled before the change: make it again
                error = error or exc
    if mask is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    if error is not None:
        raise error


def _defer(signals: set[signal.Signals], deferred: list[int]) -> dict[signal.Signals, Any]:
    """Install a handler that notes ``signals`` in ``deferred`` instead of acting on them; return
    the handlers it replaced. Only in the main thread (the only one that may set handlers), and
    never over a signal that is ignored."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    replaced = {}
    for sig in signals:
        handler = signal.getsignal(sig)
        if handler in (signal.SIG_IGN, None):
            continue
        replaced[sig] = signal.signal(sig, lambda signum, _frame: deferred.append(signum))
    return replaced


def _died(process: Any) -> ClairError:
    """A worker that stopped before finishing its module, as one line."""
    process.join(timeout=5)
    code = process.exitcode
    if code is not None and code < 0:
        try:
            how = f"killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"killed by signal {-code}"
    else:
        how = f"exit code {code}"
    if code == -9:
        how += "; out of memory?"
    return ClairError(
        f"a worker process of --jobs stopped before finishing its module ({how})",
        hint="Run again with fewer --jobs, or without --jobs.",
    )


class RemoteTraceback(Exception):
    """The cause of an error raised in a worker process: its traceback there, as text (what
    ``CLAIR_DEBUG=1`` shows under the driver's own; ``concurrent.futures`` does the same)."""

    def __init__(self, trace: str) -> None:
        super().__init__(trace)
        self.trace = trace

    def __str__(self) -> str:
        return f'\n"""\n{self.trace}"""'


def _worker(conn: Any, parent: int, by_kernel: bool) -> None:
    """A worker process of :class:`ProcessExecutor`: tasks in, results out, until told to stop."""
    import pickle
    import traceback

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver handles Ctrl-C, and stops the workers
    # SIGTERM: end at once and quietly, by the kernel (not after a long torch call returns), and as
    # killed by SIGTERM, which the driver names when the signal reached this worker alone (a
    # group's SIGTERM reaches the driver too, which ends the run with exit 143).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    _die_with(parent, by_kernel)
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return
        if data == _STOP:
            return
        result: tuple[str, Any]  # ("ok", ModuleAudit) or ("error", (exception, traceback))
        try:
            pool, auditor, reference, settings, without = pickle.loads(data)
            audited: Any = audit_one(pool, auditor, reference, settings, without)
            result = ("ok", audited)
        except BaseException as exc:  # raised in the driver as itself, this traceback its cause
            result = ("error", (exc, traceback.format_exc()))
        try:
            payload = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # what does not pickle: an exception's type and message
            failure: tuple[BaseException, str] = (exc, traceback.format_exc()) if result[0] == "ok" else result[1]
            error, trace = failure
            payload = pickle.dumps(("error", (RuntimeError(f"{type(error).__name__}: {error}"), trace)))
        del data, result
        conn.send_bytes(payload)
        del payload  # an idle worker holds nothing of its last task


def _die_with(parent: int, by_kernel: bool = True) -> None:
    """End this worker when the driver ends, however it ends (SIGKILL, out of memory): by the
    kernel where the driver's main thread started it (Linux), else by watching the driver's pid."""
    import os
    import sys

    if by_kernel and sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            done = libc.prctl(1, signal.SIGKILL, 0, 0, 0) == 0  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            done = False
        if done:
            if os.getppid() != parent:  # the driver died before the request
                os._exit(1)
            return
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _names(pool: Pool, modules: list[str] | None) -> list[str]:
    """The pool's modules, or those of them named in ``modules``, in the pool's order."""
    wanted = None if modules is None else set(modules)
    return list(pool.modules) if wanted is None else [m for m in pool.modules if m in wanted]


def _in_order(
    tasks: Iterator[Any],
    result: Callable[[Any], ModuleAudit],
    window: int,
    total: int,
    progress: Callable[[str, int, int], None] | None,
) -> Iterator[ModuleAudit]:
    """The results of ``tasks`` (submitted lazily, at most ``window`` in flight) in their order."""
    pending: deque = deque()
    done = 0

    def take() -> ModuleAudit:
        nonlocal done
        out = result(pending.popleft())
        done += 1
        if progress is not None:
            progress("modules", done, total)
        return out

    for task in tasks:
        pending.append(task)
        if len(pending) >= window:
            yield take()
    while pending:
        yield take()


def _connect(ray: Any, address: str) -> None:
    """``ray.init`` for ``--executor address``; a cluster that cannot be reached is a one-line error.

    Ray's start-up notes are silenced, and clair's own SIGTERM handler (which cleans up
    like Ctrl-C) stays: ``ray.init`` would replace it with one that exits at once (``sys.exit(15)``:
    exit code 15, no message), and it is put back should ``ray.init`` set another. A Ctrl-C or
    SIGTERM in the middle of ``ray.init`` stops what it has started of a local cluster (the exit
    that follows skips Ray's own ``atexit`` clean-up).
    """
    import logging
    import signal
    import threading
    import warnings

    if address.startswith("ray://"):
        check_reachable(address)
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if main else None
    ray_log = logging.getLogger("ray")
    level = ray_log.level
    ray_log.setLevel(logging.ERROR)
    utils: Any = getattr(getattr(ray, "_private", None), "utils", None)
    replace = getattr(utils, "set_sigterm_handler", None) if main else None
    if replace is not None:
        utils.set_sigterm_handler = _keep_sigterm_handler
    try:
        with warnings.catch_warnings():
            # Ray's notes on its future defaults, and Ray Client's on a timed-out connection
            # (the error below says it in one line).
            warnings.simplefilter("ignore")
            if address == "ray":
                ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
            else:  # Ray Client: its other arguments would be passed on to ray.init on the cluster
                ray.init(address, configure_logging=False)
    except (ConnectionError, RuntimeError, TimeoutError) as exc:
        _shutdown(ray)
        raise UsageError(f"--executor {address}: cannot connect to Ray ({_first_line(exc)})") from None
    except BaseException:
        _shutdown(ray)
        raise
    finally:
        if replace is not None:
            utils.set_sigterm_handler = replace
        ray_log.setLevel(level)
        if main and handler is not None:
            signal.signal(signal.SIGTERM, handler)


def _keep_sigterm_handler(_handler: Any) -> None:
    """Stands in for Ray's ``set_sigterm_handler`` during ``ray.init``: clair's handler stays."""


def _shutdown(ray: Any) -> None:
    """``ray.shutdown()`` after a ``ray.init`` that did not finish; a second Ctrl-C or SIGTERM
    meanwhile waits until it ends (processes of a local cluster would be left running)."""
    deferred: list[int] = []
    handlers = _defer({signal.SIGINT, signal.SIGTERM}, deferred)
    try:
        with contextlib.suppress(Exception):
            ray.shutdown()
    finally:
        _restore(handlers, None)


def _workers(ray: Any, threads: int, gpu: bool) -> int:
    """How many tasks the cluster runs at once (at least one); refuses a cluster that can run none."""
    have = ray.cluster_resources()
    cpus, gpus = int(have.get("CPU", 0)), int(have.get("GPU", 0))
    if cpus < threads or (gpu and gpus < 1):
        need = f"{threads} CPU(s)" + (" and a GPU" if gpu else "")
        raise UsageError(
            f"the Ray cluster has {cpus} CPU(s) and {gpus} GPU(s); each task needs {need}",
            hint="Lower CLAIR_NUM_THREADS, or use --device cpu.",
        )
    return max(1, min(cpus // threads, gpus if gpu else cpus))


def _result(ray: Any, ref: Any) -> ModuleAudit:
    """A task's result; an error raised in the task is raised here as itself (a ClairError, or
    the ValueError of a module the audit cannot handle), not as Ray's wrapper."""
    try:
        with _sigterm_kept():
            return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, ClairError | ValueError):
            raise cause from None
        raise
    except ray.exceptions.RayError as exc:
        if type(exc).__name__ == "OutOfMemoryError":  # Ray's memory monitor: the CLI says "out of memory"
            raise
        # Its worker or node died (after Ray's retries), its result was lost, it was cancelled:
        # one line, not an internal error.
        raise ClairError(
            f"a Ray task stopped before finishing its module ({type(exc).__name__}: {_first_line(exc)})",
            hint="Run again; a worker killed for want of memory needs nodes with more memory.",
        ) from None


@contextlib.contextmanager
def _sigterm_kept() -> Iterator[None]:
    """Around a blocking Ray call: ``ray.get`` turns whatever a signal handler raises into a
    plain KeyboardInterrupt, so clair's SIGTERM (``Terminated``, exit 143) would end the run as a
    Ctrl-C (exit 130); a SIGTERM handled meanwhile is raised as ``Terminated`` again."""
    import threading

    from clair_cli.errors import Terminated

    original = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or not callable(original):
        yield
        return
    seen: list[int] = []

    def note(signum: int, frame: Any) -> None:
        seen.append(signum)
        original(signum, frame)

    signal.signal(signal.SIGTERM, note)
    try:
        yield
    except KeyboardInterrupt as exc:
        if seen and not isinstance(exc, Terminated):
            raise Terminated() from None
        raise
    finally:
        if signal.getsignal(signal.SIGTERM) is note:
            signal.signal(signal.SIGTERM, original)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def executor_fit(
    executor: RayExecutor | ProcessExecutor,
    auditor: ClairAuditor,
    pool: Pool,
    reference: list[int] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> ClairAuditor:
    """``auditor.fit`` over ``pool`` with the modules' audits run by ``executor`` (entered here)."""

    def refitting(_stage: str, done: int, total: int) -> None:
        if progress is not None:
            progress("refitting modules", done, total)

    with executor:
        auditor.fit_audits(
            executor.audits(pool, auditor, reference, progress), len(pool.adapters), reference, names=pool.names
        )
        while (plan := auditor.refit_plan())[0]:
            modules, without = plan
            auditor.refit(executor.audits(pool, auditor, reference, refitting, modules, without), without)
        return auditor


def usable_cpus() -> int:
    """The CPUs this process may use: those it may run on (its affinity), and no more than its
    container's CPU quota (cgroup v2 ``cpu.max`` or v1 CFS, :func:`clair_cli.io.resources.cpu_quota`)
    allows; at least one."""
    import os

    from clair_cli.io.resources import cpu_quota

    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        count = os.cpu_count() or 1
    quota = cpu_quota()
    return max(1, count if quota is None else min(count, quota))
