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

import socket
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

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
    return ray


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Refuse, within ``timeout`` seconds, a ``ray://HOST:PORT`` that accepts no connection
    (Ray Client itself retries for much longer)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise UsageError(f"--executor {address}: cannot reach the Ray cluster ({reason})") from None


def audit_one(
    pool: Pool, auditor: ClairAuditor, reference: list[int] | None, threads: int, without: frozenset[int] = frozenset()
) -> ModuleAudit:
    """A worker's task: read the pool's one module where it runs and audit it on ``threads`` threads
    (``without``: as :meth:`~clair_cli.core.audit.ClairAuditor.audit_module`'s)."""
    from contextlib import ExitStack

    import torch

    from clair_cli.pipeline import module_input

    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    idx = list(range(len(pool.adapters)))
    with ExitStack() as stack:
        readers = [stack.enter_context(a.reader()) for a in pool.adapters]
        given = module_input(pool, pool.modules[0], idx, readers, auditor.dtype, str(auditor.device))
    return auditor.audit_module(given, reference, without)


def versions() -> tuple[str, str]:
    """clair's and torch's versions where this runs (a worker's must be the driver's)."""
    import torch

    from clair_cli import __version__

    return __version__, torch.__version__


def module_pool(pool: Pool, module: str) -> Pool:
    """The pool as one task needs it: its adapters with one module (:meth:`Adapter.for_module`)."""
    from clair_cli.results import Pool

    return Pool([a.for_module(module) for a in pool.adapters], [module], base_model=pool.base_model)


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
        self._check_workers(ray)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._started:
            _ray().shutdown()

    @staticmethod
    def _check_workers(ray: Any) -> None:
        """Refuse a cluster whose workers run another clair or torch (results would differ)."""
        try:
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
        gpu = str(auditor.device).startswith("cuda")
        task = ray.remote(audit_one).options(num_cpus=threads, num_gpus=1 if gpu else 0)
        auditor = auditor.unfitted()  # a refit's second round: not the first one's state
        if gpu:  # Ray shows each task its own GPU as the first one
            auditor.device = "cuda"
        shared = ray.put(auditor)
        window = IN_FLIGHT_PER_WORKER * _workers(ray, threads, gpu)
        names = _names(pool, modules)
        yield from _in_order(
            (task.remote(module_pool(pool, n), shared, reference, threads, without) for n in names),
            lambda ref: _result(ray, ref),
            window,
            len(names),
            progress,
        )


class ProcessExecutor:
    """Runs modules' audits in ``jobs`` worker processes on this machine, gathered in module order.

    The tasks are :class:`RayExecutor`'s (:func:`audit_one`: each reads its module's factors
    itself and audits it on the driver's thread count), so the results are the local run's, bit
    for bit. Workers start fresh (``spawn``: none of the driver's threads, locks or open files is
    inherited), ignore Ctrl-C (the driver handles it and stops them) and stay for the whole
    audit, a refit's second round included. A caller's script that uses this must guard its
    entry point (``if __name__ == "__main__":``), as for any spawned process pool.
    """

    def __init__(self, jobs: int) -> None:
        if jobs < 1:
            raise ValueError(f"jobs must be at least 1, got {jobs}")
        self.jobs = jobs
        self._pool: Any = None

    def __enter__(self) -> ProcessExecutor:
        import multiprocessing
        import signal
        from concurrent.futures import ProcessPoolExecutor

        self._pool = ProcessPoolExecutor(
            self.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_ignore_interrupts
        )
        # Start every worker now, with Ctrl-C blocked so that they inherit it blocked: one that
        # landed while a worker imports torch would print that worker's traceback. A Ctrl-C
        # pressed meanwhile reaches the driver once the workers have started.
        blocked = hasattr(signal, "pthread_sigmask")
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if blocked else None
        try:
            for _ in range(self.jobs):  # each submission starts a worker while none is idle
                self._pool.submit(int)
        finally:
            if old is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        pool, self._pool = self._pool, None
        if exc_type is None:
            pool.shutdown(wait=True)
            return
        # Interrupted or failed: drop what is queued and stop the workers now rather than
        # after their current module.
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.kill()
        for process in processes:
            process.join(timeout=5)

    def audits(
        self,
        pool: Pool,
        auditor: ClairAuditor,
        reference: list[int] | None = None,
        progress: Callable[[str, int, int], None] | None = None,
        modules: list[str] | None = None,
        without: frozenset[int] = frozenset(),
    ) -> Iterator[ModuleAudit]:
        """As :meth:`RayExecutor.audits`, on this machine's worker processes."""
        import torch

        if self._pool is None:
            raise RuntimeError("ProcessExecutor.audits outside its with block")
        threads = torch.get_num_threads()
        unfitted = auditor.unfitted()  # a refit's second round: not the first one's state
        names = _names(pool, modules)
        yield from _in_order(
            (self._pool.submit(audit_one, module_pool(pool, n), unfitted, reference, threads, without) for n in names),
            _process_result,
            IN_FLIGHT_PER_WORKER * self.jobs,
            len(names),
            progress,
        )


def _ignore_interrupts() -> None:
    """A worker's start: Ctrl-C reaches the terminal's whole process group, and the driver alone
    handles it (it stops the workers), so a worker prints no traceback of its own."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _process_result(future: Any) -> ModuleAudit:
    """A worker's result; a worker that died (killed, out of memory) is one line, not a traceback."""
    from concurrent.futures.process import BrokenProcessPool

    try:
        return future.result()
    except BrokenProcessPool:
        raise ClairError(
            "a worker process of --jobs stopped before finishing its module (killed, or out of memory?)",
            hint="Run again with fewer --jobs, or without --jobs.",
        ) from None


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
    like Ctrl-C) is put back: ``ray.init`` replaces it with one that exits at once.
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
        raise UsageError(f"--executor {address}: cannot connect to Ray ({_first_line(exc)})") from None
    finally:
        ray_log.setLevel(level)
        if main and handler is not None:
            signal.signal(signal.SIGTERM, handler)


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
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, ClairError | ValueError):
            raise cause from None
        raise


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
    with executor:
        auditor.fit_audits(
            executor.audits(pool, auditor, reference, progress), len(pool.adapters), reference, names=pool.names
        )
        while (plan := auditor.refit_plan())[0]:
            modules, without = plan
            auditor.refit(executor.audits(pool, auditor, reference, modules=modules, without=without), without)
        return auditor


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the system says, else all)."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)
