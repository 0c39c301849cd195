"""examples/flower-app through Flower's own runtime: ``flwr run`` on a local simulation.

As a user runs it: a local SuperLink in simulation mode (the one ``flwr run`` starts by
itself, started here so that it stops with the test), then ``flwr run examples/flower-app
--stream`` with 8 simulated SuperNodes on Ray. The app must run every round, and clair must
flag the boosting client in each. Needs ``clair-lora[flower,flower-sim]`` (Ray): skipped
without them, except under ``make test`` (``CLAIR_REQUIRE_FLOWER=1``), where they are
installed and a missing one is an error. About 1.5 min on 2 busy cores.

Offline: runtime dependency installation (``uv sync`` of the app's dependencies) is off,
so the app runs in this environment, where clair_cli is the checkout's.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

# Looked up, not imported: the run happens in Flower's own processes.
_MISSING = [m for m in ("flwr", "ray") if importlib.util.find_spec(m) is None]
if _MISSING:
    if os.environ.get("CLAIR_REQUIRE_FLOWER") == "1":
        raise ImportError(
            f"CLAIR_REQUIRE_FLOWER=1 but {', '.join(_MISSING)} missing: pip install -e '.[flower,flower-sim]'"
        )
    pytest.skip(f"needs {', '.join(_MISSING)}: pip install 'clair-lora[flower,flower-sim]'", allow_module_level=True)

pytestmark = pytest.mark.slow

APP = Path(__file__).resolve().parents[1] / "examples" / "flower-app"
BIN = Path(sys.executable).parent
SUPERNODES = 8
STARTUP_S = 180  # a SuperLink's start on a loaded machine
RUN_S = 600  # the whole run: about 90 s on 2 busy cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


@pytest.fixture
def superlink(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A local simulation SuperLink on free ports, with its own FLWR_HOME; the environment
    for ``flwr run`` to find it. Stopped after the test (its SuperExec and simulation
    processes watch its pid and exit with it)."""
    for tool in ("flwr", "flower-superlink", "flower-superexec", "flwr-simulation"):
        if not (BIN / tool).exists():
            if os.environ.get("CLAIR_REQUIRE_FLOWER") == "1":
                pytest.fail(f"{BIN / tool} is missing")
            pytest.skip(f"{tool} is not installed next to {sys.executable}")
    http_port = _free_port()
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(tmp_path / "flwr-home"),
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http_port),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_DISABLE_UPDATE_CHECK="1",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # the SuperLink starts flower-superexec by name
    )
    log = (tmp_path / "superlink.log").open("wb")
    # The command `flwr run` runs for a local SuperLink (flwr/cli/local_superlink.py), in memory,
    # less the deprecated --control-api-address (the Control API is on --port's HTTP server).
    proc = subprocess.Popen(
        [
            str(BIN / "flower-superlink"),
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--host",
            "127.0.0.1",
            "--port",
            str(http_port),
            "--disable-runtime-dependency-installation",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + STARTUP_S
        while not _healthy(http_port):
            if proc.poll() is not None:
                pytest.fail(f"flower-superlink exited with {proc.returncode}:\n{_tail(tmp_path / 'superlink.log')}")
            if time.monotonic() > deadline:
                pytest.fail(f"flower-superlink not up within {STARTUP_S} s:\n{_tail(tmp_path / 'superlink.log')}")
            time.sleep(0.5)
        yield env
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        log.close()


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def test_flwr_run_flags_the_booster_every_round(superlink: dict[str, str], tmp_path: Path) -> None:
    config = tomllib.loads((APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    rounds = int(config["num-server-rounds"])
    out = tmp_path / "out"
    cmd = [
        str(BIN / "flwr"),
        "run",
        str(APP),
        "--stream",
        "--federation-config",
        f"num-supernodes={SUPERNODES} client-resources-num-cpus=1 init-args-num-cpus=1",
        "--run-config",
        f"out-dir='{out}'",
    ]
    run = subprocess.run(cmd, env=superlink, cwd=tmp_path, capture_output=True, text=True, timeout=RUN_S, check=False)
    log = run.stdout + run.stderr
    why = f"flwr run exited with {run.returncode}:\n{log[-6000:]}\nSuperLink:\n{_tail(tmp_path / 'superlink.log')}"
    assert run.returncode == 0, why
    assert (out / "summary.json").exists(), why
    summary = json.loads((out / "summary.json").read_text())

    attackers = [n for n, p in summary["partitions"].items() if p["attacker"]]
    assert len(summary["partitions"]) == SUPERNODES and len(attackers) == 1, summary["partitions"]
    history = summary["history"]
    assert [h["round"] for h in history] == list(range(1, rounds + 1)), "a round was not aggregated"
    for h in history:
        assert len(h["clients"]) == SUPERNODES and h["fallback"] is None, h
        assert set(attackers) <= set(h["flagged"]), h  # the booster, every round
        assert len(h["flagged"]) < SUPERNODES // 2, h  # and the round still has a majority
    reports = sorted(p.name for p in (out / "audits").glob("round-*.json"))
    assert reports == [f"round-{r:03d}.json" for r in range(1, rounds + 1)]
    accuracy = summary["accuracy"]
    assert accuracy[str(rounds)] > accuracy["0"] + 0.1, accuracy  # the collaborators' LoRA learns
    assert f"CLAIR round {rounds}" in log and "FLAGGED" in log, log[-3000:]
