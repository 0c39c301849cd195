"""``--jobs N``: the audit's modules run in N worker processes of this machine, with results
identical to the one-process run, bit for bit; bad values, a failing module, a dead worker and
Ctrl-C are handled as in one process."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import MODULES, random_factors, report_without_times, side_by_side, write_adapter
from typer.testing import CliRunner

from benchmarks import poolgen
from clair_cli.cli import app
from clair_cli.errors import UsageError
from clair_cli.params import AuditParams

ROOT = Path(__file__).parents[1]
SAMPLES = ROOT / "sample_adapters"
# Adapter ranks sum to 12 x 16 = 192 > 128: the fast path, in float32 (thread-count sensitive).
SYNTHETIC = poolgen.PoolSpec(k=12, layers=2, hidden=256, rank=16, shared=4, bad=2, dtype="float32")


# The worker-process tests below need two CPUs at least (--jobs is capped at the usable CPUs);
# in this process the count is raised, so that the in-process runs always start workers.
needs_two_cpus = pytest.mark.skipif(
    __import__("clair_cli.executors", fromlist=["usable_cpus"]).usable_cpus() < 2, reason="needs 2 CPUs"
)


@pytest.fixture(autouse=True)
def _cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    from clair_cli import executors

    monkeypatch.setattr(executors, "usable_cpus", lambda: 4)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return poolgen.generate(SYNTHETIC, tmp_path_factory.mktemp("synthetic") / "pool")


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env={"NO_COLOR": "1", "COLUMNS": "120"})


_report = report_without_times


def _both(tmp_path: Path, *argv: str) -> tuple[Path, Path]:
    """Runs the command in this process and with ``--jobs 2``; ``{out}`` in argv is each run's directory."""
    one, two = side_by_side(tmp_path, argv, {"jobs1": ["--jobs", "1"], "jobs2": ["--jobs", "2"]})
    return one, two


def test_audit_report_is_identical(tmp_path: Path) -> None:
    one, two = _both(tmp_path, "audit", str(SAMPLES), "--json", "{out}/report.json", "--device", "cpu")
    assert _report(one / "report.json") == _report(two / "report.json")


def test_merge_is_identical_on_the_fast_path(synthetic: Path, tmp_path: Path) -> None:
    one, two = _both(
        tmp_path, "merge", str(synthetic), "--out", "{out}/merged", "--json", "{out}/report.json", "--device", "cpu"
    )
    report = _report(one / "report.json")
    assert any(m["solver"] == "fast" for m in report["modules"])  # float32, thread-count sensitive
    assert report == _report(two / "report.json")
    weights = "adapter_model.safetensors"
    assert (one / "merged" / weights).read_bytes() == (two / "merged" / weights).read_bytes()


def test_gate_report_is_identical(synthetic: Path, tmp_path: Path) -> None:
    names = sorted(p.name for p in synthetic.iterdir() if p.is_dir())
    refs = [a for n in names[:6] for a in ("--reference", str(synthetic / n))]
    candidates = [str(synthetic / n) for n in names[6:]]
    one, two = _both(tmp_path, "gate", *candidates, *refs, "--json", "{out}/report.json", "--device", "cpu")
    assert _report(one / "report.json") == _report(two / "report.json")


def test_library_run_on_two_threads_is_identical(synthetic: Path) -> None:
    """A library caller's thread count travels with the tasks: float32 on 2 threads, both ways."""
    import torch

    from clair_cli import pipeline

    pool = pipeline.open_pool([str(synthetic)])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        local = pipeline.audit(pool, AuditParams(device="cpu"))
        jobs = pipeline.audit(pool, AuditParams(device="cpu", jobs=2))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(local.auditor.inner_, jobs.auditor.inner_)
    for a, b in zip(local.auditor.module_results_, jobs.auditor.module_results_, strict=True):
        assert torch.equal(a.subspace, b.subspace) and torch.equal(a.off_subspace, b.off_subspace), a.name
    assert local.auditor.scores_ == jobs.auditor.scores_


def test_an_error_in_a_worker_is_the_local_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A module that cannot be read fails in the worker that reads it; the command reports the same
    one-line error (with its hint, the path as given) as the one-process run, exit 2."""
    monkeypatch.chdir(tmp_path)
    for k in range(6):
        tensors = random_factors(MODULES, seed=k)
        if k == 3:
            tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"][0, 0] = float("nan")
        write_adapter(tmp_path / "pool" / f"a{k}", tensors)
    outputs = []
    for jobs in ("1", "2"):
        result = invoke("audit", "pool", "--jobs", jobs, "--device", "cpu")
        assert result.exit_code == 2, result.output
        assert "NaN" in result.output and "Traceback" not in result.output
        assert "Error: pool/a3/" in result.output
        outputs.append(result.output)
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("bad", ["0", "-1", "two", "1.5", "99999"])
def test_a_bad_jobs_value_is_a_usage_error(bad: str) -> None:
    result = invoke("audit", str(SAMPLES), "--jobs", bad)
    assert result.exit_code == 2
    assert f"--jobs {bad}" in result.output and "Traceback" not in result.output


def test_jobs_with_ray_is_a_usage_error() -> None:
    result = invoke("audit", str(SAMPLES), "--jobs", "2", "--executor", "ray")
    assert result.exit_code == 2
    assert "--jobs 2 with --executor ray" in result.output


def test_jobs_values() -> None:
    from clair_cli.pipeline import local_jobs

    assert AuditParams(jobs="3").jobs == 3 and AuditParams(jobs=" auto ").jobs == "auto"
    assert local_jobs("auto") == 4 and local_jobs(3) == 3
    assert local_jobs(9) == 4  # at most the CPUs at the driver's thread count
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert local_jobs(4) == 2 and local_jobs("auto") == 2
    finally:
        torch.set_num_threads(before)
    with pytest.raises(UsageError):
        AuditParams(jobs=True)


def _clair_process(*argv: str, prelude: str = "") -> subprocess.Popen:
    """``clair`` in its own session (signals go to the whole group, as a terminal sends them), with
    Ctrl-C handled as in a terminal."""
    script = (
        "import signal, sys\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        f"{prelude}"
        "from clair_cli.__main__ import run\n"
        f"sys.argv = ['clair', *{list(argv)!r}]\n"
        "run()\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        start_new_session=True,
        env={**os.environ, "NO_COLOR": "1"},
    )


@contextlib.contextmanager
def _running_audit(pool: Path) -> Iterator[subprocess.Popen]:
    """``clair audit POOL --jobs 2`` in its own session; whatever is left of its process group is
    killed on the way out."""
    proc = _clair_process("audit", str(pool), "--jobs", "2", "--device", "cpu", "-q", "--exit-zero")
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def _workers_of(proc: subprocess.Popen, count: int = 2, timeout: float = 120) -> list[int]:
    deadline = time.monotonic() + timeout
    workers: list[int] = []
    while time.monotonic() < deadline and proc.poll() is None:
        workers = [c for c in _children(proc.pid) if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()]
        if len(workers) >= count:
            return workers
        time.sleep(0.1)
    raise AssertionError(f"the workers did not start ({workers})")


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Modules that take a while (48 of them: more than a small open-file limit would allow
    results that hold a file each)."""
    spec = poolgen.PoolSpec(k=24, layers=12, hidden=384, rank=16, shared=4, bad=2, dtype="float32")
    return poolgen.generate(spec, tmp_path_factory.mktemp("big") / "pool")


def _gone(pids: list[int], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not any(_alive(p) for p in pids)


@needs_two_cpus
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux's /proc")
def test_a_killed_worker_is_one_line_and_the_others_stop(big: Path) -> None:
    with _running_audit(big) as proc:
        workers = _workers_of(proc)
        time.sleep(2)
        os.kill(workers[0], signal.SIGKILL)
        _out, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the audit finished before the kill (a very fast machine)")
    assert proc.returncode == 2, err
    assert "worker process of --jobs stopped before finishing its module (killed by SIGKILL" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2, err
    assert _gone(workers)


@needs_two_cpus
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux's /proc")
def test_workers_end_with_a_killed_driver(big: Path) -> None:
    with _running_audit(big) as proc:
        workers = _workers_of(proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
        assert _gone(workers, timeout=30), "workers outlived their driver"


@needs_two_cpus
def test_results_hold_no_open_files(big: Path, tmp_path: Path) -> None:
    """Results cross the pipes by value: 48 modules under a limit of 64 open files, and the same
    report as one process (relative paths in it, and in errors, read as given)."""
    reports = []
    for jobs in ("1", "2"):
        out = tmp_path / f"jobs{jobs}.json"
        proc = _clair_process(
            "audit",
            os.path.relpath(big, ROOT),
            "--jobs",
            jobs,
            "--json",
            str(out),
            "-q",
            "--exit-zero",
            prelude="import resource\nresource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))\n",
        )
        _out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        reports.append(_report(out))
    assert reports[0] == reports[1]


def test_an_in_memory_pool_is_left_as_it_was(synthetic: Path) -> None:
    """The Flower path: a pool of the caller's tensors audited with workers gives the one-process
    result, and the caller's tensors are not moved into shared memory."""
    from benchmarks.attacks import read_factors
    from clair_cli import pipeline

    factors = {p.name: read_factors(p) for p in sorted(synthetic.iterdir()) if p.is_dir()}
    pool = pipeline.pool_from_factors(factors)
    one = pipeline.audit(pool, AuditParams(device="cpu"))
    two = pipeline.audit(pool, AuditParams(device="cpu", jobs=2))
    assert one.auditor.scores_ == two.auditor.scores_ and one.auditor.flagged_ == two.auditor.flagged_
    assert not any(t.is_shared() for m in factors.values() for (A, B, _s) in m.values() for t in (A, B))


def test_the_float32_matmul_precision_travels_with_the_tasks(synthetic: Path) -> None:
    import torch

    from clair_cli import pipeline

    pool = pipeline.open_pool([str(synthetic)])
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        one = pipeline.audit(pool, AuditParams(device="cpu"))
        two = pipeline.audit(pool, AuditParams(device="cpu", jobs=2))
    finally:
        torch.set_float32_matmul_precision(before)
    assert one.auditor.scores_ == two.auditor.scores_


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(c) for c in text]
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


@needs_two_cpus
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux's /proc")
@pytest.mark.parametrize("when", ["starting", "working"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_the_group_stops_the_workers(big: Path, when: str, sig: signal.Signals) -> None:
    """Ctrl-C (or SIGTERM) to the terminal's process group ends the command with its exit code and
    one line, whether the workers are still starting or at work: no worker prints anything (no
    traceback, no resource warning), and none is left running."""
    with _running_audit(big) as proc:
        workers = _workers_of(proc, count=1 if when == "starting" else 2)
        if when == "working":
            time.sleep(3)
        os.killpg(proc.pid, sig)
        _out, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the audit finished before the signal (a very fast machine)")
    code = 130 if sig == signal.SIGINT else 143
    assert proc.returncode == code, (proc.returncode, err)
    assert err.strip() == "Interrupted: no output was written.", err
    children = [c for c in workers if _alive(c)]
    assert _gone(children)


def test_the_memory_check_counts_every_worker(synthetic: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each worker works on one module at a time: N workers need N modules' memory."""
    from clair_cli import pipeline

    pool = pipeline.open_pool([str(synthetic)])
    need, _module = pipeline.audit_memory(pool)
    monkeypatch.setattr(pipeline, "available_memory", lambda: int(need / 0.8 * 1.5))
    pipeline.check_audit_memory(pool, jobs=1)  # fits once
    with pytest.raises(UsageError, match="in each of 2 worker processes") as refused:
        pipeline.check_audit_memory(pool, jobs=2)
    assert "fewer --jobs" in (refused.value.hint or "")


def test_auto_takes_no_more_workers_than_memory_holds(synthetic: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from clair_cli import executors, pipeline

    pool = pipeline.open_pool([str(synthetic)])
    need, _module = pipeline.audit_memory(pool)
    each = need + pipeline.WORKER_BASE_BYTES
    monkeypatch.setattr(executors, "usable_cpus", lambda: 16)
    monkeypatch.setattr(pipeline, "available_memory", lambda: int(3.5 * each / 0.8))
    assert pipeline.local_jobs("auto", pool) == 3
    assert pipeline.local_jobs("auto") == 16  # without the pool: the CPUs alone
    assert pipeline.local_jobs(8, pool) == 8  # a number given is kept (the memory check judges it)
    monkeypatch.setattr(pipeline, "available_memory", lambda: each // 4)
    assert pipeline.local_jobs("auto", pool) == 1
    monkeypatch.setattr(pipeline, "available_memory", lambda: None)  # unknown: the CPUs
    assert pipeline.local_jobs("auto", pool) == 16


def test_a_worker_dead_before_its_task_is_one_line(synthetic: Path) -> None:
    """A worker killed while idle (between the audit and a refit round, say): the next task sent
    to it ends the run with the one-line error, not a broken pipe."""
    from clair_cli import pipeline
    from clair_cli.core.audit import ClairAuditor
    from clair_cli.errors import ClairError
    from clair_cli.executors import ProcessExecutor

    pool = pipeline.open_pool([str(synthetic)])
    with ProcessExecutor(2) as executor:
        process = executor._workers[1][0]
        os.kill(process.pid, signal.SIGKILL)
        process.join(timeout=30)
        with pytest.raises(ClairError, match="killed by SIGKILL"):
            list(executor.audits(pool, ClairAuditor()))


def test_module_errors_come_in_module_order(tmp_path: Path) -> None:
    """Two modules that cannot be read: the error is the first one's in module order, as in one
    process, whichever worker fails first."""
    for k in range(6):
        tensors = random_factors(MODULES, seed=k)
        if k == 5:
            tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"][0, 0] = float("nan")
        if k == 0:
            tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"][0, 0] = float("inf")
        write_adapter(tmp_path / "pool" / f"a{k}", tensors)
    outputs = [invoke("audit", str(tmp_path / "pool"), "--jobs", jobs).output for jobs in ("1", "2")]
    assert "a5" in outputs[0] and outputs[0] == outputs[1]


def test_a_view_of_a_larger_tensor_travels_alone() -> None:
    """In-memory factors that are views of one flat buffer: a task carries its module's factors,
    not the buffer."""
    import pickle

    import torch

    from clair_cli import pipeline
    from clair_cli.executors import module_pool

    flat = torch.randn(8 * 2 * 64 * 4 + 10**6)
    factors = {}
    for k in range(8):
        base = k * 2 * 64 * 4
        A = flat[base : base + 256].view(4, 64)
        B = flat[base + 256 : base + 512].view(64, 4)
        factors[f"c{k}"] = {"model.layers.0.self_attn.q_proj": (A, B, 2.0)}
    pool = pipeline.pool_from_factors(factors)
    size = len(pickle.dumps(module_pool(pool, pool.modules[0], absolute=False)))
    assert size < 200_000, size


def test_a_worker_error_carries_the_worker_traceback(tmp_path: Path) -> None:
    """An error raised in a worker is raised in the driver as itself, with the worker's own
    traceback as its cause (what ``CLAIR_DEBUG=1`` shows; the driver's alone would end at the pipe)."""
    from clair_cli import pipeline
    from clair_cli.core.audit import ClairAuditor
    from clair_cli.errors import ClairError
    from clair_cli.executors import ProcessExecutor, RemoteTraceback

    for k in range(6):
        tensors = random_factors(MODULES, seed=k)
        if k == 2:
            tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"][0, 0] = float("nan")
        write_adapter(tmp_path / "pool" / f"a{k}", tensors)
    pool = pipeline.open_pool([str(tmp_path / "pool")])
    with ProcessExecutor(2) as executor, pytest.raises(ClairError, match="NaN") as raised:
        list(executor.audits(pool, ClairAuditor()))
    cause = raised.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "Traceback (most recent call last)" in cause.trace and "audit_one" in cause.trace
