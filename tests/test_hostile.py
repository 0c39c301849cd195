"""Hostile and broken inputs through the real CLI, each case in its own process and test.

Every case is a pool (or options) that ``clair merge`` is asked to merge. Each must end
with exit code 2, an ``Error:`` line that names the file (or source) and the problem, no
traceback, nothing written (no output, no temporary directory left beside it), nothing
changed or removed among the case's own files, within its own time and memory limits.

Each case is its own test: it builds its files, runs one process and is judged alone, so a
slow or failing case fails only itself. Two cases run at a time (the next one starts while
this one is judged). A case's peak memory is that process's own (``wait4``'s rusage for
that one child), not the largest of every child the test process ever had.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import torch
from helpers import MODULES, LocalServer, lora_config, random_factors, run_measured, write_adapter
from test_bad_inputs import CASES as ADAPTER_CASES

TIME_LIMIT_S = 120  # per case, on a loaded machine; a sound run takes a few seconds
MEMORY_LIMIT = 1536 * 2**20  # peak resident memory of the case's own process
KEY = "base_model.model.model.layers.0.self_attn.q_proj"


@dataclass
class Case:
    build: Callable[[Path], list[str]]  # writes the case under a directory, returns the CLI arguments
    expected: str  # in the error line
    names: str  # in the error line: the file or source at fault
    env: dict[str, str] = field(default_factory=dict)  # "{hub}" becomes the fake Hub's URL
    command: str = "merge"
    usage: bool = False  # a Typer usage error: its own format, judged on the whole of stderr


def _good_pool(root: Path, n: int = 5) -> None:
    for k in range(n):
        write_adapter(root / f"good_{k}", random_factors(MODULES, seed=k))


def _pool_with(build_bad: Callable[[Path], None]) -> Callable[[Path], list[str]]:
    def build(d: Path) -> list[str]:
        _good_pool(d)
        build_bad(d / "bad")
        return [str(d)]

    return build


def _alone(build_bad: Callable[[Path], None]) -> Callable[[Path], list[str]]:
    def build(d: Path) -> list[str]:
        build_bad(d / "bad")
        return [str(d / "bad")]

    return build


def _with(build: Callable[[Path], list[str]], *extra: str) -> Callable[[Path], list[str]]:
    """``build``'s arguments plus ``extra``, where ``{d}`` is the case directory."""
    return lambda d: [*build(d), *(e.format(d=d) for e in extra)]


def _symlink_to_a_device(d: Path) -> list[str]:
    # A link is read as what it names, which must be a regular file: never /dev/zero.
    _good_pool(d / "pool")
    write_adapter(d / "elsewhere")
    evil = d / "pool" / "evil"
    evil.mkdir()
    shutil.copy(d / "elsewhere" / "adapter_config.json", evil / "adapter_config.json")
    (evil / "adapter_model.safetensors").symlink_to("/dev/zero")
    return [str(d / "pool")]


def _two_base_models(d: Path) -> list[str]:
    _good_pool(d)
    write_adapter(d / "other_base", config=lora_config(base_model_name_or_path="other/model"))
    return [str(d)]


def _duplicate_names(d: Path) -> list[str]:
    _good_pool(d / "a")
    write_adapter(d / "b" / "good_0", random_factors(MODULES, seed=9))
    return [str(d / "a" / f"good_{k}") for k in range(5)] + [str(d / "b" / "good_0")]


def _too_few(d: Path) -> list[str]:
    _good_pool(d, 3)
    return [str(d)]


def _untrained(d: Path, seed: int = 7) -> None:
    t = random_factors(MODULES, seed=seed)
    write_adapter(d, {k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in t.items()})


def _all_untrained(d: Path) -> list[str]:
    # One untrained adapter is flagged as a free rider (tests/test_hostile_outputs.py); a pool
    # of nothing but untrained ones spans no subspace at all.
    for k in range(5):
        _untrained(d / f"zero_{k}", seed=k)
    return [str(d)]


def _nan_weights(d: Path) -> None:
    t = random_factors(MODULES, seed=7)
    t[f"{KEY}.lora_B.weight"][3, 1] = float("nan")
    write_adapter(d, t)


def _hub(spec: str, *extra: str) -> Callable[[Path], list[str]]:
    return lambda d: [spec, *extra]


# --- class 1: writes outside the intended place -------------------------------------------


def _pool(d: Path) -> list[str]:
    _good_pool(d / "pool")
    return [str(d / "pool")]


def _outer_pool(d: Path) -> list[str]:
    _good_pool(d / "outer" / "pool")
    return [str(d / "outer" / "pool"), "--out", str(d / "outer"), "--force"]


def _report_onto(kind: str) -> Callable[[Path], list[str]]:
    def build(d: Path) -> list[str]:
        args = _pool(d)
        target = d / "report.json"
        if kind == "symlink":
            (d / "victim.txt").write_text("keep me")
            target.symlink_to(d / "victim.txt")
        elif kind == "fifo":
            os.mkfifo(target)
        elif kind == "input":
            target = d / "pool" / "good_1" / "adapter_config.json"
        return [*args, "--json", str(target)]

    return build


# --- class 2: bounded time and memory -------------------------------------------------------


def _raw_header(d: Path, header: dict, data: bytes = b"") -> None:
    write_adapter(d)
    raw = json.dumps(header).encode()
    (d / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _big_header(d: Path) -> None:
    # 17 MiB of zero-size tensors: over the header cap.
    entry = {"dtype": "F32", "shape": [0, 4], "data_offsets": [0, 0]}
    n = 17 * 2**20 // len(json.dumps({"x" * 24: entry}))
    _raw_header(d, {f"t{i:023d}": entry for i in range(n)})


def _many_tensors(d: Path) -> None:
    entry = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
    _raw_header(d, {f"t{i}": entry for i in range(100_001)})


def _high_rank(d: Path) -> None:
    r = 1100
    write_adapter(d, random_factors({"model.layers.0.self_attn.q_proj": (16, 12)}, r=r), lora_config(r=r))


def _regex_bomb(d: Path) -> None:
    write_adapter(d, config=lora_config(rank_pattern={"(a|aa)+$": 4, "(x+x+)+y": 4}))


def _fifo_for(name: str) -> Callable[[Path], None]:
    def build(d: Path) -> None:
        write_adapter(d)
        (d / name).unlink()
        os.mkfifo(d / name)

    return build


def _zero_by_huge(d: Path) -> None:
    _raw_header(d, {f"{KEY}.lora_A.weight": {"dtype": "F32", "shape": [0, 2**64], "data_offsets": [0, 0]}})


# --- class 3: nothing lost silently --------------------------------------------------------


def _extra_tensor(suffix: str, shape: tuple[int, ...]) -> Callable[[Path], None]:
    def build(d: Path) -> None:
        t = random_factors(MODULES, seed=11)
        t[suffix] = torch.randn(*shape)
        write_adapter(d, t)

    return build


def _two_spellings(d: Path) -> None:
    t = random_factors(MODULES, seed=12)
    t[f"{KEY.removeprefix('base_model.model.')}.lora_A.weight"] = t[f"{KEY}.lora_A.weight"].clone()
    write_adapter(d, t)


def _two_adapter_names(d: Path) -> None:
    t = random_factors(MODULES, seed=13)
    t[f"{KEY}.lora_B.other.weight"] = t[f"{KEY}.lora_B.weight"].clone()
    write_adapter(d, t)


def _double_prefix(d: Path) -> None:
    t = random_factors(MODULES, seed=14)
    write_adapter(d, {"base_model.model." + k: v for k, v in t.items()})


def _symlinked_member(d: Path) -> list[str]:
    # A linked adapter folder is read; a second link to the same folder would read it twice.
    _good_pool(d / "pool")
    write_adapter(d / "outside" / "linked", random_factors(MODULES, seed=15))
    (d / "pool" / "linked").symlink_to(d / "outside" / "linked", target_is_directory=True)
    (d / "pool" / "linked_again").symlink_to(d / "outside" / "linked", target_is_directory=True)
    return [str(d / "pool")]


def _overflowing(d: Path) -> None:
    t = random_factors(MODULES, seed=16)
    t[f"{KEY}.lora_B.weight"] *= 1e30
    t[f"{KEY}.lora_A.weight"] *= 1e30
    write_adapter(d, t)


# --- class 4: exit 2, never a traceback ----------------------------------------------------


def _deep_config(d: Path) -> None:
    write_adapter(d, config='{"r": ' + "[" * 200_000 + "]" * 200_000 + ', "lora_alpha": 8}')


def _long_int_config(d: Path) -> None:
    write_adapter(d, config='{"r": ' + "7" * 5000 + ', "lora_alpha": 8}')


def _deep_header(d: Path) -> None:
    write_adapter(d)
    raw = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    (d / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)


def _deep_dirs(d: Path) -> list[str]:
    _good_pool(d / "pool")
    fd = os.open(d / "pool", os.O_RDONLY)
    try:
        for _ in range(200):  # relative to a directory descriptor: no chdir in a threaded test process
            os.mkdir("d", dir_fd=fd)
            nxt = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nxt
    finally:
        os.close(fd)
    return [str(d / "pool")]


# --- class 5: injection and hygiene ---------------------------------------------------------


def _escape_name(d: Path) -> list[str]:
    _good_pool(d)
    _nan_weights(d / "bad\x1b[31m\nname")
    return [str(d)]


OFFLINE = {"HF_HUB_OFFLINE": "1"}
HUB = {"HF_ENDPOINT": "{hub}", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1"}
CASES: dict[str, Case] = {
    **{
        name: Case(_alone(build) if name in ("missing path", "empty directory") else _pool_with(build), expected, "bad")
        for name, (build, expected) in ADAPTER_CASES.items()
    },
    "symlink to a device in an adapter": Case(_symlink_to_a_device, "is a device", "evil"),
    "adapters of two base models": Case(_two_base_models, "different base models", "other_base"),
    "duplicate adapter names": Case(_duplicate_names, "both named 'good_0'", "good_0"),
    "fewer adapters than clair needs": Case(_too_few, "clair needs at least 5 adapters, got 3", "adapters"),
    "a pool of all-zero (untrained) adapters": Case(_all_untrained, "every adapter's update is zero", "module"),
    "hub id with ../ in the path": Case(_hub("hf://owner/name/../../etc"), "must be a relative path", "etc", OFFLINE),
    "hub id with a backslash": Case(_hub("hf://owner/name/a\\b"), "must be a relative path", "a\\b", OFFLINE),
    "hub --subfolder absolute": Case(
        _hub("owner/name", "--subfolder", "/etc"), "must be a relative path", "/etc", OFFLINE
    ),
    "hub --subfolder ../": Case(_hub("owner/name", "--subfolder", "../x"), "must be a relative path", "../x", OFFLINE),
    # class 1
    "--out is an input adapter, with --force": Case(
        _with(_pool, "--out", "{d}/pool/good_2", "--force"), "lies inside the input", "good_2"
    ),
    "--out contains the pool, with --force": Case(_outer_pool, "contains or lies inside the input", "outer"),
    "--out is the current directory": Case(_with(_pool, "--out", "."), "current or home directory", "--out ."),
    "--json onto a symlink": Case(_report_onto("symlink"), "is a symlink", "report.json"),
    "--json onto a FIFO": Case(_report_onto("fifo"), "is a FIFO", "report.json"),
    "--json onto an input file": Case(_report_onto("input"), "is one of the inputs", "adapter_config.json"),
    "hub revision with ..": Case(_hub("hf://owner/lora@../../x"), "not a branch, tag or commit", "../../x", HUB),
    "hub revision with a newline": Case(_hub("owner/lora@main\nx"), "not a branch, tag or commit", "main\\nx", HUB),
    "hub ETag with ../": Case(_hub("evil/etag"), "invalid ETag", "evil/etag", HUB),
    "hub commit id with ../": Case(_hub("evil/commit"), "invalid commit id", "evil/commit", HUB),
    # class 2
    "safetensors header over 16 MiB": Case(_pool_with(_big_header), "exceeds clair's limit", "bad"),
    "more than 100,000 tensors": Case(_pool_with(_many_tensors), "clair accepts at most 100000", "bad"),
    "rank over --max-rank": Case(_pool_with(_high_rank), "exceeds --max-rank 1024", "bad"),
    "rank_pattern with catastrophic backtracking": Case(_pool_with(_regex_bomb), "rank_pattern key", "bad"),
    "FIFO in place of the weights": Case(_pool_with(_fifo_for("adapter_model.safetensors")), "is a FIFO", "bad"),
    "FIFO in place of the config": Case(_pool_with(_fifo_for("adapter_config.json")), "is a FIFO", "bad"),
    "zero-by-2**64 tensor": Case(_pool_with(_zero_by_huge), "invalid shape", "bad"),
    "hub that trickles bytes": Case(
        _hub("evil/trickle"), "did not finish within 3 s", "evil/trickle", {**HUB, "CLAIR_HUB_TIMEOUT": "3"}
    ),
    "more adapters than --max-adapters": Case(
        _with(_pool, "--max-adapters", "4"), "5 adapters in", "more than --max-adapters 4"
    ),
    # class 3
    "DoRA magnitudes in a merge": Case(
        _pool_with(_extra_tensor(f"{KEY}.lora_magnitude_vector", (16,))), "DoRA magnitude vectors", "bad"
    ),
    "LoRA biases in a merge": Case(_pool_with(_extra_tensor(f"{KEY}.lora_B.bias", (16,))), "LoRA biases", "bad"),
    "a classifier head (modules_to_save) in a merge": Case(
        _pool_with(_extra_tensor("base_model.model.score.weight", (2, 16))), "modules_to_save", "bad"
    ),
    "one tensor under two key spellings": Case(_pool_with(_two_spellings), "two lora_A tensors", "bad"),
    "two adapter names in one file": Case(_pool_with(_two_adapter_names), "carries the adapter name 'other'", "bad"),
    "keys prefixed twice": Case(_pool_with(_double_prefix), "prefix 'base_model.model.' twice", "bad"),
    "two links to one adapter inside a pool": Case(_symlinked_member, "again", "linked_again"),
    "values that overflow the update": Case(_pool_with(_overflowing), "make its update overflow", "bad"),
    # class 4
    "config nested 200,000 deep": Case(_pool_with(_deep_config), "nested too deeply", "bad"),
    "config with a 5,000-digit integer": Case(_pool_with(_long_int_config), "cannot be parsed", "bad"),
    "safetensors header nested 100,000 deep": Case(_pool_with(_deep_header), "nested too deeply", "bad"),
    "200-deep directories": Case(_deep_dirs, "more than 32 directory levels", "pool"),
    "invalid hub id": Case(_hub("hf://own er/na me"), "not a valid Hugging Face repo id", "own er", OFFLINE),
    "hub answering non-HTTP bytes": Case(_hub("evil/garbage"), "not valid HTTP", "evil/garbage", HUB),
    "hub redirect loop": Case(_hub("evil/loop"), "not valid HTTP", "evil/loop", HUB),
    "--seed 2**70": Case(_with(_pool, "--seed", str(2**70)), "--seed", "2**32-1"),
    # class 5
    "escape codes and newline in a name": Case(_escape_name, "contains NaN or Inf", "bad\\x1b[31m\\n"),
    "hub 500 without retry noise": Case(_hub("evil/500"), "the Hub could not serve", "evil/500", HUB),
}


class EvilHub(LocalServer):
    """A fake Hub on 127.0.0.1 whose answers are hostile, one behaviour per repo id."""

    def __init__(self, adapter: dict[str, bytes]) -> None:  # noqa: C901 - one branch per hostile behaviour
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, data: bytes, etag: str, commit: str) -> None:
                self.send_response(200)
                self.send_header("X-Repo-Commit", commit)
                self.send_header("ETag", etag)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()

            def _answer(self, body: bool) -> None:
                parts = self.path.split("?")[0].strip("/").split("/")
                repo, name = "/".join(parts[:2]), parts[-1]
                data = adapter.get(name, b"")
                good = '"' + hashlib.sha256(data).hexdigest() + '"'
                if repo == "evil/etag":
                    self._send(data, '"../../../../escaped"', "a" * 40)
                elif repo == "evil/commit":
                    self._send(data, good, "../../../../escaped")
                elif repo == "evil/garbage":
                    self.wfile.write(b"\x00\x01 this is not HTTP\r\n\r\n")
                    return
                elif repo == "evil/loop":
                    self.send_response(302)
                    self.send_header("Location", self.path)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                elif repo == "evil/500":
                    self.send_response(500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                elif repo == "evil/trickle":
                    self._send(data, good, "a" * 40)
                    if body:
                        for byte in data:
                            self.wfile.write(bytes([byte]))
                            self.wfile.flush()
                            time.sleep(0.5)
                    return
                else:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "RepoNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if body:
                    self.wfile.write(data)

            def do_HEAD(self) -> None:  # noqa: N802
                self._answer(body=False)

            def do_GET(self) -> None:  # noqa: N802
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self._answer(body=True)

        self.start(Handler)


@dataclass
class Outcome:
    code: int | None
    stdout: str
    stderr: str
    wall: float
    peak: int  # bytes, this process's own peak resident memory
    out_parent: Path
    changed: list[str]


def _snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry below ``root`` (not the hub cache) by type, size and mtime; nothing is opened."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here == root:
            dirnames[:] = [n for n in dirnames if n != "home"]
        for name in dirnames + filenames:
            st = os.lstat(here / name)
            snap[str((here / name).relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return snap


def _run_case(case: Case, d: Path, hub_url: str) -> Outcome:
    """Build one case and run it in its own process, killed at TIME_LIMIT_S."""
    d.mkdir()
    args = case.build(d)
    out_parent = d.parent / (d.name + "-out")
    out_parent.mkdir()
    if "--out" not in args:
        args = [*args, "--out", str(out_parent / "merged")]
    env = {
        **os.environ,
        "NO_COLOR": "1",
        "COLUMNS": "400",
        "HF_HOME": str(d / "home"),
        # The process runs in the case's directory: import this checkout's clair_cli, not
        # whichever one the environment has installed (a worktree shares its venv).
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH")) if p
        ),
        **{k: v.format(hub=hub_url) for k, v in case.env.items()},
    }
    before = _snapshot(d)
    start = time.perf_counter()
    with open(d.parent / (d.name + ".stdout"), "w+") as out, open(d.parent / (d.name + ".stderr"), "w+") as err:
        code, peak = run_measured([case.command, *args], TIME_LIMIT_S, stdout=out, stderr=err, env=env, cwd=d)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    wall = time.perf_counter() - start
    after = _snapshot(d)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    return Outcome(code, stdout, stderr, wall, peak, out_parent, changed)


class Runner:
    """Runs cases on demand, two at a time: asking for one also starts the next."""

    def __init__(self, root: Path, hub_url: str) -> None:
        self.root = root
        self.hub_url = hub_url
        self.pool = ThreadPoolExecutor(max_workers=2)
        self.futures: dict[str, Future[Outcome]] = {}

    def _submit(self, name: str) -> None:
        if name not in self.futures:
            d = self.root / f"case{list(CASES).index(name):02d}"
            self.futures[name] = self.pool.submit(_run_case, CASES[name], d, self.hub_url)

    def outcome(self, name: str) -> Outcome:
        names = list(CASES)
        i = names.index(name)
        for n in names[i : i + 2]:
            self._submit(n)
        return self.futures[name].result()  # a build error is this case's failure only


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runner]:
    src = tmp_path_factory.mktemp("hub-src")
    write_adapter(src / "a")
    hub = EvilHub({n: (src / "a" / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")})
    r = Runner(tmp_path_factory.mktemp("hostile"), hub.url)
    yield r
    r.pool.shutdown(wait=True, cancel_futures=True)
    hub.close()


def test_the_table_covers_every_class_of_the_issue() -> None:
    assert len(CASES) >= 69


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input_exits_2_with_one_clear_line_and_writes_nothing(case: str, runner: Runner) -> None:
    o = runner.outcome(case)
    c = CASES[case]
    assert o.code == 2, (o.code, o.stdout, o.stderr[-2000:])
    assert "Traceback" not in o.stdout + o.stderr
    assert "\x1b" not in o.stderr, "control characters reach the terminal raw"
    lines = o.stderr.strip().splitlines()
    if c.usage:
        assert c.expected in o.stderr and c.names in o.stderr
    else:
        assert lines[0].startswith("Error: "), lines
        assert c.expected in lines[0], lines[0]
        assert c.names in lines[0], lines[0]
        assert len(lines) <= 2  # the message, and at most one line of hint
    assert list(o.out_parent.iterdir()) == [], "nothing may be written on bad input"
    assert o.changed == [], f"the case's own files changed: {o.changed[:5]}"
    assert o.wall < TIME_LIMIT_S, f"took {o.wall:.0f} s"
    assert o.peak < MEMORY_LIMIT, f"peak memory {o.peak >> 20} MiB"


def test_json_report_is_not_written_either(tmp_path: Path) -> None:
    _good_pool(tmp_path / "pool")
    _nan_weights(tmp_path / "pool" / "bad")
    report = tmp_path / "audit.json"
    proc = subprocess.run(
        [sys.executable, "-m", "clair_cli", "audit", str(tmp_path / "pool"), "--json", str(report)],
        capture_output=True,
        text=True,
        timeout=TIME_LIMIT_S,
    )
    assert proc.returncode == 2 and not report.exists()


def test_sigterm_removes_the_temporary_directory_and_exits_143(tmp_path: Path) -> None:
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "import clair_cli.cli as cli\n"
        "from clair_cli.io.writers import AtomicDir\n"
        "def fake_main():\n"
        "    with AtomicDir(Path(sys.argv[1])) as tmp:\n"
        "        (tmp / 'partial').write_text('x')\n"
        "        print('ready', flush=True)\n"
        "        time.sleep(120)\n"
        "cli.main = fake_main\n"
        "from clair_cli.__main__ import run\n"
        "run()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=TIME_LIMIT_S)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []
