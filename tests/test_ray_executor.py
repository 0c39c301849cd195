"""``--executor ray``: the audit's modules run as Ray tasks, with results identical to the local run.

Needs Ray (``pip install 'clair-lora[ray]'``; ``.venv-flower`` has it through
``flwr[simulation]``): skipped without it, except under ``make test``
(``CLAIR_REQUIRE_FLOWER=1``), where a missing Ray is an error. One local Ray cluster
(2 CPUs) serves the whole module; the commands run in this process and find it running.
The refusals (no Ray, an unreachable cluster) run in subprocesses.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import MODULES, random_factors, report_without_times, side_by_side, write_adapter
from typer.testing import CliRunner

from benchmarks import poolgen
from clair_cli.cli import app

SAMPLES = Path(__file__).parents[1] / "sample_adapters"
# Adapter ranks sum to 12 x 16 = 192 > 128: the fast path, in float32 (thread-count sensitive).
SYNTHETIC = poolgen.PoolSpec(k=12, layers=1, hidden=256, rank=16, shared=4, bad=2, dtype="float32")


def _ray_or_skip():
    try:
        import ray
    except ImportError:
        if os.environ.get("CLAIR_REQUIRE_FLOWER") == "1":
            pytest.fail("CLAIR_REQUIRE_FLOWER=1 but Ray is missing: pip install -e '.[ray]' (or '.[flower-sim]')")
        pytest.skip("Ray is not installed (pip install 'clair-lora[ray]')")
    return ray


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    ray = _ray_or_skip()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # Ray's notes on its own future defaults
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return poolgen.generate(SYNTHETIC, tmp_path_factory.mktemp("synthetic") / "pool")


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env={"NO_COLOR": "1", "COLUMNS": "120"})


_report = report_without_times


def _both(tmp_path: Path, *args: str) -> tuple[Path, Path]:
    """Run the command locally and on Ray, each writing into its own directory (``{out}`` in ``args``)."""
    local, ray = side_by_side(tmp_path, args, {"local": ["--executor", "local"], "ray": ["--executor", "ray"]})
    return local, ray


@pytest.mark.parametrize("which", ["samples", "synthetic"])
def test_audit_report_is_identical(cluster: None, synthetic: Path, tmp_path: Path, which: str) -> None:
    pool = SAMPLES if which == "samples" else synthetic
    local, ray = _both(tmp_path, "audit", str(pool), "--json", "{out}/report.json", "--device", "cpu")
    assert _report(local / "report.json") == _report(ray / "report.json")
    assert _report(ray / "report.json")["flagged"]


@pytest.mark.parametrize("which", ["samples", "synthetic"])
def test_merged_adapter_is_identical(cluster: None, synthetic: Path, tmp_path: Path, which: str) -> None:
    pool = SAMPLES if which == "samples" else synthetic
    local, ray = _both(
        tmp_path, "merge", str(pool), "--out", "{out}/merged", "--json", "{out}/report.json", "--device", "cpu"
    )
    assert _report(local / "report.json") == _report(ray / "report.json")
    weights = "adapter_model.safetensors"
    assert (local / "merged" / weights).read_bytes() == (ray / "merged" / weights).read_bytes()
    config = "adapter_config.json"
    assert (local / "merged" / config).read_text() == (ray / "merged" / config).read_text()


def test_gate_report_is_identical(cluster: None, synthetic: Path, tmp_path: Path) -> None:
    names = sorted(p.name for p in synthetic.iterdir() if p.is_dir())
    refs = [a for n in names[:6] for a in ("--reference", str(synthetic / n))]
    candidates = [str(synthetic / n) for n in names[6:]]
    local, ray = _both(tmp_path, "gate", *candidates, *refs, "--json", "{out}/report.json", "--device", "cpu")
    assert _report(local / "report.json") == _report(ray / "report.json")


def test_refine_is_identical(cluster: None, tmp_path: Path) -> None:
    local, ray = _both(tmp_path, "refine", str(SAMPLES), "--out", "{out}/refined", "--device", "cpu")
    written = sorted(p.relative_to(local) for p in (local / "refined").rglob("*.safetensors"))
    assert written
    assert written == sorted(p.relative_to(ray) for p in (ray / "refined").rglob("*.safetensors"))
    assert all((local / p).read_bytes() == (ray / p).read_bytes() for p in written)


def test_library_run_on_more_threads_is_identical(cluster: None, synthetic: Path) -> None:
    """A library caller's thread count travels with the tasks: float32 on 2 threads, both ways."""
    import torch

    from clair_cli import pipeline
    from clair_cli.params import AuditParams

    pool = pipeline.open_pool([str(synthetic)])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        local = pipeline.audit(pool, AuditParams(device="cpu"))
        ray = pipeline.audit(pool, AuditParams(device="cpu", executor="ray"))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(local.auditor.inner_, ray.auditor.inner_)
    for a, b in zip(local.auditor.module_results_, ray.auditor.module_results_, strict=True):
        assert torch.equal(a.subspace, b.subspace) and torch.equal(a.off_subspace, b.off_subspace), a.name
    assert local.auditor.scores_ == ray.auditor.scores_


def test_an_error_in_a_worker_is_the_local_error(cluster: None, tmp_path: Path) -> None:
    """A module that cannot be read fails on the worker that reads it; the driver reports the
    same one-line error (with its hint) as the local run, exit 2."""
    for k in range(6):
        tensors = random_factors(MODULES, seed=k)
        if k == 3:
            tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"][0, 0] = float("nan")
        write_adapter(tmp_path / "pool" / f"a{k}", tensors)
    outputs = []
    for executor in ("local", "ray"):
        result = invoke("audit", str(tmp_path / "pool"), "--executor", executor, "--device", "cpu")
        assert result.exit_code == 2, result.output
        assert "NaN" in result.output and "Traceback" not in result.output
        outputs.append(result.output)
    assert outputs[0] == outputs[1]


def _clair(*args: str, prelude: str = "", timeout: float = 120) -> subprocess.CompletedProcess[str]:
    code = f"import sys\n{prelude}from clair_cli.cli import main\nsys.argv = ['clair', *sys.argv[1:]]\nmain()\n"
    env = {**os.environ, "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, env=env)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def remote() -> Iterator[str]:
    """A second Ray cluster, started by ``ray start --head`` in its own session and temporary
    directory (so no other ``ray.init`` finds it): the address of its Ray Client server."""
    import shutil
    import signal
    import socket
    import tempfile
    import time

    _ray_or_skip()
    ray_cli = Path(sys.executable).with_name("ray")
    if not ray_cli.exists():
        pytest.skip("no ray command beside this Python")
    temp, port = tempfile.mkdtemp(prefix="clair-ray-"), _free_port()
    argv = [str(ray_cli), "start", "--head", "--block", "--num-cpus=1", "--include-dashboard=false"]
    argv += [f"--temp-dir={temp}", f"--port={_free_port()}", f"--ray-client-server-port={port}"]
    head = subprocess.Popen(
        [*argv, "--disable-usage-stats"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 180  # a loaded machine starts Ray slowly
        while True:
            assert head.poll() is None, "ray start --head exited"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the Ray head did not start within 180 s"
                time.sleep(1)
        address = f"ray://127.0.0.1:{port}"
        # The client server listens before the cluster behind it can serve a client: on a loaded
        # machine a first connection then fails ("Initialization failure from server"). Wait until
        # a client gets through.
        probe_code = f"import ray; ray.init({address!r}, logging_level='error'); ray.shutdown()"
        while True:
            try:
                probe = subprocess.run([sys.executable, "-c", probe_code], capture_output=True, text=True, timeout=120)
                if probe.returncode == 0:
                    break
                why = probe.stderr[-2000:]
            except subprocess.TimeoutExpired:
                why = "a client still waiting after 120 s"
            assert time.monotonic() < deadline, f"no Ray client got through within 180 s:\n{why}"
            time.sleep(2)
        yield address
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_a_remote_cluster_through_ray_client(remote: str, tmp_path: Path) -> None:
    """``--executor ray://HOST:PORT`` (in a fresh process: this one's Ray would be used instead)."""
    result = invoke("audit", str(SAMPLES), "--json", str(tmp_path / "local.json"), "--exit-zero", "--quiet")
    assert result.exit_code == 0, result.output
    argv = ("audit", str(SAMPLES), "--executor", remote, "--json", str(tmp_path / "ray.json"), "--exit-zero")
    proc = _clair(*argv, timeout=600)
    if proc.returncode == 2 and "Initialization failure from server" in proc.stderr:
        proc = _clair(*argv, timeout=600)  # the cluster's per-client server did not start in time under load: once more
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr  # no notes from Ray
    assert _report(tmp_path / "local.json") == _report(tmp_path / "ray.json")


def test_without_ray_says_how_to_install_it() -> None:
    proc = _clair("audit", str(SAMPLES), "--executor", "ray", prelude="sys.modules['ray'] = None\n")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'clair-lora[ray]'" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_unreachable_cluster_is_one_line(tmp_path: Path) -> None:
    _ray_or_skip()
    proc = _clair("audit", str(SAMPLES), "--executor", f"ray://127.0.0.1:{_free_port()}")  # nothing listens
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the Ray cluster" in lines[0], proc.stderr


@pytest.mark.parametrize("bad", ["dask", "ray://nohost", "ray://host:port", "ray:/x:1"])
def test_a_bad_executor_is_a_usage_error(bad: str) -> None:
    result = invoke("audit", str(SAMPLES), "--executor", bad)
    assert result.exit_code == 2, result.output
    assert "expected local, ray or ray://HOST:PORT" in result.output


def test_a_task_carries_one_module_of_each_adapter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What a worker receives (no Ray needed): one module, the file by absolute path (its working
    # directory is not the driver's), or that module's factors alone for an in-memory adapter;
    # each reads the same factors as the whole adapter, which is left as it was.
    import torch

    from clair_cli import pipeline
    from clair_cli.executors import module_pool

    monkeypatch.chdir(SAMPLES.parent)
    on_disk = pipeline.open_pool([SAMPLES.name])  # a relative source
    g = torch.Generator().manual_seed(0)
    factors = {f"m{i}": (torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g), 1.0) for i in range(3)}
    in_memory = pipeline.pool_from_factors({name: factors for name in "abcde"})
    for pool in (on_disk, in_memory):
        adapters, module = pool.adapters, pool.modules[1]
        slim = module_pool(pool, module)
        assert slim.modules == [module]
        for whole, part in zip(adapters, slim.adapters, strict=True):
            assert list(part.modules) == [module] and part.notes == [] and part.extras == {}
            assert len(whole.modules) > 1  # the original keeps every module
            if pool is on_disk:
                assert part.ref.weights_file.is_absolute() and part.ref.weights_file.samefile(whole.ref.weights_file)
            else:
                assert set(part._tensors) == {whole.modules[module].a_key, whole.modules[module].b_key}
            with whole.reader() as r_whole, part.reader() as r_part:
                a, b = whole.read_module(r_whole, module), part.read_module(r_part, module)
            assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
