"""Hostile inputs, the input side (issue #25: classes 2, 3 and the input parts of 7).

Every file clair reads goes through one bounded reader: regular files only once symlinks are
resolved (FIFOs, devices and directories refused without reading), size limits, headers
parsed without the data, one deadline per hub source. Each case runs the real CLI in its own
process. A refusal is exit 2 with one ``Error:`` line naming the file and the problem (and at
most one hint line), no traceback and nothing written; a layout users expect to work (a Hugging
Face cache snapshot, a pool of links) is read. No timing here is tight: bounds are minutes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import torch
from helpers import MODULES, LocalServer, lora_config, random_factors, run_measured, write_adapter
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]  # this checkout's clair_cli, not an installed one
LIMIT_S = 300  # per process, on a loaded machine; each takes seconds
KEY = "base_model.model.model.layers.0.self_attn.q_proj"
SHA = "c" * 40


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str
    wall: float
    peak: int  # bytes: the child's own peak resident memory

    @property
    def first(self) -> str:
        lines = self.stderr.strip().splitlines()
        return lines[0] if lines else ""


def clair(*args: str, env: dict[str, str] | None = None, stdin: str | None = None, cwd: Path | None = None) -> Run:
    """Run ``python -m clair_cli ARGS`` and measure its own peak memory (wait4)."""
    full = {**os.environ, "NO_COLOR": "1", "COLUMNS": "400", "HF_HUB_DISABLE_TELEMETRY": "1", **(env or {})}
    full["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(tempfile.TemporaryFile("w+"))
        err = stack.enter_context(tempfile.TemporaryFile("w+"))
        src = stack.enter_context(open(stdin, "rb")) if stdin else subprocess.DEVNULL
        code, peak = run_measured(list(args), LIMIT_S, stdout=out, stderr=err, stdin=src, env=full, cwd=cwd)
        out.seek(0)
        err.seek(0)
        return Run(code, out.read(), err.read(), time.perf_counter() - start, peak)


def refused(run: Run, *names: str) -> None:
    """Exit 2, one clear line naming ``names``, at most one hint, no traceback."""
    assert run.code == 2, (run.code, run.stdout[-1000:], run.stderr[-2000:])
    assert "Traceback" not in run.stdout + run.stderr
    lines = run.stderr.strip().splitlines()
    assert lines and lines[0].startswith("Error: "), lines
    assert len(lines) <= 2, lines
    for name in names:
        assert name in lines[0], (name, lines[0])


def pool(root: Path, n: int = 5) -> Path:
    for k in range(n):
        write_adapter(root / f"client_{k:02d}", random_factors(MODULES, seed=k))
    return root


# --- class 2: every input is a bounded regular file -----------------------------------------


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda d: os.mkfifo(d / "list.txt"), "is a FIFO"),
        (lambda d: (d / "list.txt").symlink_to("/dev/zero"), "is a device"),
        (lambda d: (d / "list.txt").mkdir(), "is a directory"),
        (lambda d: os.truncate(_touch(d / "list.txt"), 9 * 2**20), "more than the 8192 KiB"),
        (lambda d: (d / "list.txt").symlink_to(d / "list.txt"), "symlink loop"),
        (lambda d: (d / "list.txt").write_bytes(b"client_00\n\x00\x00\n"), "NUL byte"),
    ],
    ids=["fifo", "dev-zero", "directory", "9-MiB-sparse", "self-link", "nul-bytes"],
)
def test_list_file_is_a_bounded_regular_file(tmp_path: Path, make: Callable[[Path], object], expected: str) -> None:
    pool(tmp_path, 1)
    make(tmp_path)
    run = clair("inspect", f"@{tmp_path / 'list.txt'}")
    refused(run, expected, "list.txt")


def _touch(path: Path) -> Path:
    path.touch()
    return path


def test_at_dev_zero_ends_quickly_in_bounded_memory() -> None:
    run = clair("inspect", "@/dev/zero")
    refused(run, "/dev/zero", "is a device")
    assert run.peak < 1536 * 2**20


def test_stdin_from_dev_zero_is_bounded() -> None:
    run = clair("inspect", "-", stdin="/dev/zero")
    refused(run, "stdin", "longer than 8 MiB")
    assert run.peak < 1536 * 2**20


@pytest.mark.parametrize(
    "name, target, expected",
    [
        ("adapter_model.safetensors", "/dev/zero", "is a device"),
        ("adapter_config.json", "fifo", "is a FIFO"),
        ("adapter_model.safetensors", "self", "symlink loop"),
        ("adapter_model.safetensors", "gone", "dangling symlink"),
    ],
)
def test_links_in_an_adapter_resolve_to_regular_files(tmp_path: Path, name: str, target: str, expected: str) -> None:
    bad = write_adapter(tmp_path / "pool" / "bad")
    pool(tmp_path / "pool")
    (bad / name).unlink()
    if target == "fifo":
        os.mkfifo(tmp_path / "fifo")
        (bad / name).symlink_to(tmp_path / "fifo")
    elif target == "self":
        (bad / name).symlink_to(bad / name)
    elif target == "gone":
        (bad / name).symlink_to(tmp_path / "gone")
    else:
        (bad / name).symlink_to(target)
    out = tmp_path / "out"
    run = clair("merge", str(tmp_path / "pool"), "--out", str(out))
    refused(run, expected, "bad")
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith("out")] == []


def _sparse_adapter(d: Path, d_in: int = 100_000_000, r: int = 8) -> Path:
    """A header claiming a 3.2 GB lora_A (all zeros: a sparse file of that size)."""
    d.mkdir(parents=True)
    a_bytes, b_bytes = r * d_in * 4, 16 * r * 4
    header = {
        f"{KEY}.lora_A.weight": {"dtype": "F32", "shape": [r, d_in], "data_offsets": [0, a_bytes]},
        f"{KEY}.lora_B.weight": {"dtype": "F32", "shape": [16, r], "data_offsets": [a_bytes, a_bytes + b_bytes]},
    }
    raw = json.dumps(header).encode()
    f = d / "adapter_model.safetensors"
    f.write_bytes(struct.pack("<Q", len(raw)) + raw)
    os.truncate(f, 8 + len(raw) + a_bytes + b_bytes)
    (d / "adapter_config.json").write_text(json.dumps(lora_config(r=r)))
    return d


def test_inspect_of_a_huge_sparse_tensor_reads_in_bounded_memory(tmp_path: Path) -> None:
    d = _sparse_adapter(tmp_path / "sparse")
    run = clair("inspect", str(d), "--json", "-")
    assert run.code == 0, run.stderr[-2000:]
    (rec,) = json.loads(run.stdout)["adapters"]
    assert rec["modules"][0]["d_in"] == 100_000_000
    assert "every module's update is zero" in " ".join(rec["notes"])
    assert run.peak < 1536 * 2**20, f"peak {run.peak >> 20} MiB for a 3.2 GB tensor"


def _many_modules(d: Path, n: int) -> None:
    mods = {f"model.layers.{i}.mlp.up_proj": (2, 2) for i in range(n)}
    write_adapter(d, random_factors(mods, r=1), lora_config(r=1))


def test_more_modules_than_the_limit_are_refused_before_reading(tmp_path: Path) -> None:
    _many_modules(tmp_path / "wide", 10_000)
    run = clair("inspect", str(tmp_path / "wide"))
    refused(run, "wide", "10000 LoRA modules, more than --max-modules 4096")
    run = clair("inspect", str(tmp_path / "wide"), "--max-modules", "9999")
    refused(run, "more than --max-modules 9999")


def test_the_module_limit_can_be_raised(tmp_path: Path) -> None:
    _many_modules(tmp_path / "wide", 5000)
    run = clair("inspect", str(tmp_path / "wide"), "--max-modules", "5000", "--json", "-")
    assert run.code == 0, run.stderr[-2000:]
    assert json.loads(run.stdout)["adapters"][0]["n_modules"] == 5000


class TrickleHub(LocalServer):
    """A fake Hub that answers headers at once, then a body byte every ``delay`` seconds."""

    def __init__(self, files: dict[str, bytes], delay: float) -> None:
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _answer(self, body: bool) -> None:
                data = files.get(self.path.split("?")[0].rsplit("/", 1)[-1], b"")
                self.send_response(200)
                self.send_header("X-Repo-Commit", SHA)
                self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    with contextlib.suppress(OSError):
                        for byte in data:
                            self.wfile.write(bytes([byte]))
                            self.wfile.flush()
                            time.sleep(delay)

            def do_HEAD(self) -> None:  # noqa: N802
                self._answer(False)

            def do_GET(self) -> None:  # noqa: N802
                self._answer(True)

        self.start(Handler)


@pytest.fixture(scope="module")
def trickle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrickleHub]:
    src = write_adapter(tmp_path_factory.mktemp("trickle") / "a")
    hub = TrickleHub({n: (src / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}, 1.0)
    yield hub
    hub.close()


def _hub_env(url: str, home: Path, timeout: str) -> dict[str, str]:
    return {"HF_ENDPOINT": url, "HF_HOME": str(home), "HF_HUB_DISABLE_XET": "1", "CLAIR_HUB_TIMEOUT": timeout}


def test_a_trickling_hub_ends_at_the_deadline(trickle: TrickleHub, tmp_path: Path) -> None:
    run = clair("inspect", "evil/trickle", env=_hub_env(trickle.url, tmp_path / "home", "2"))
    refused(run, "evil/trickle", "did not finish within 2 s")
    assert run.wall < 120, run.wall  # a byte a second: the whole adapter would take minutes


@pytest.mark.parametrize("value", ["inf", "nan", "0", "-5", "soon"])
def test_hub_timeout_must_be_positive_and_finite(trickle: TrickleHub, tmp_path: Path, value: str) -> None:
    run = clair("inspect", "evil/trickle", env=_hub_env(trickle.url, tmp_path / "home", value))
    refused(run, f"CLAIR_HUB_TIMEOUT={value!r}", "expected a number of seconds")


def test_the_download_thread_stops_after_the_deadline(
    trickle: TrickleHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # In a long-lived process (a federated server), an abandoned download must not trickle on.
    code = (
        "import sys, threading, time\n"
        "from clair_cli.errors import HubError\n"
        "from clair_cli.io import hub\n"
        "try:\n"
        "    hub.fetch('evil/trickle')\n"
        "except HubError as exc:\n"
        "    print(exc.message, flush=True)\n"
        "end = time.monotonic() + 60\n"
        "while time.monotonic() < end and any(t.name == 'clair-hub-download' for t in threading.enumerate()):\n"
        "    time.sleep(0.2)\n"
        "print('alive' if any(t.name == 'clair-hub-download' for t in threading.enumerate()) else 'stopped')\n"
    )
    env = {**os.environ, **_hub_env(trickle.url, tmp_path / "home", "2"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=LIMIT_S)
    lines = proc.stdout.strip().splitlines()
    assert lines[0].endswith("did not finish within 2 s"), proc.stdout + proc.stderr
    assert lines[-1] == "stopped"


def test_hf_home_in_a_symlink_loop(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    env = {"HF_HOME": str(tmp_path / "a"), "HF_HUB_OFFLINE": "1"}
    refused(clair("inspect", "owner/name", env=env), "symlink loop", "HF_")
    pool(tmp_path / "pool")
    refused(clair("merge", str(tmp_path / "pool"), "--out", str(tmp_path / "out"), env=env), "symlink loop")
    assert not (tmp_path / "out").exists()


def test_home_in_a_symlink_loop(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    pool(tmp_path / "pool")
    run = clair("merge", str(tmp_path / "pool"), "--out", str(tmp_path / "out"), env={"HOME": str(tmp_path / "a")})
    refused(run, "HOME=", "symlink loop")
    assert not (tmp_path / "out").exists()


# --- class 3: nothing read or dropped silently -----------------------------------------------


def test_checkpoints_inside_an_adapter_are_refused_with_a_list(tmp_path: Path) -> None:
    pool(tmp_path / "pool")
    write_adapter(tmp_path / "pool" / "client_01" / "checkpoint-100", seed=20)
    write_adapter(tmp_path / "pool" / "client_01" / "checkpoint-200", seed=21)
    out = tmp_path / "out"
    run = clair("merge", str(tmp_path / "pool"), "--out", str(out))
    refused(run, "client_01", "2 more adapters below it (checkpoint-100, checkpoint-200)", "training run")
    assert "client_01/checkpoint-200" in run.stderr  # the hint names what to give instead
    assert not out.exists()


def test_an_adapter_saved_with_a_second_one_is_refused_as_what_it_may_be(tmp_path: Path) -> None:
    """PEFT's save_pretrained of a model with two adapters writes the second in a subfolder of its
    name: not 'states of one training run' alone (a review)."""
    pool(tmp_path / "pool")
    write_adapter(tmp_path / "pool" / "client_01" / "other", seed=20)
    run = clair("inspect", str(tmp_path / "pool"))
    refused(run, "client_01", "1 more adapter below it (other)", "adapters saved together from one model")


def test_sibling_checkpoints_are_refused_and_one_is_read_by_path(tmp_path: Path) -> None:
    pool(tmp_path / "pool", 4)
    write_adapter(tmp_path / "pool" / "client_09" / "checkpoint-100", seed=20)
    write_adapter(tmp_path / "pool" / "client_09" / "checkpoint-1000", seed=21)
    run = clair("inspect", str(tmp_path / "pool"))
    refused(run, "adapters cannot be read", "client_09", "2 training checkpoints (checkpoint-100, checkpoint-1000)")
    assert "client_00" in run.stdout + run.stderr  # the other rows are still shown
    # One checkpoint per client is one state: read, named by its path.
    (tmp_path / "pool" / "client_09" / "checkpoint-100" / "adapter_model.safetensors").unlink()
    (tmp_path / "pool" / "client_09" / "checkpoint-100" / "adapter_config.json").unlink()
    run = clair("inspect", str(tmp_path / "pool"), "--json", "-")
    assert run.code == 0, run.stderr
    names = [a["name"] for a in json.loads(run.stdout)["adapters"]]
    assert names == ["client_00", "client_01", "client_02", "client_03", "client_09/checkpoint-1000"]


def test_inspect_json_has_a_row_for_a_broken_member(tmp_path: Path) -> None:
    pool(tmp_path / "pool", 2)
    bad = write_adapter(tmp_path / "pool" / "broken")
    (bad / "adapter_model.safetensors").write_bytes(b"\x00" * 3)
    report = tmp_path / "report.json"
    run = clair("inspect", str(tmp_path / "pool"), "--json", str(report))
    refused(run, "1 of 3 adapters cannot be read", "broken")
    rows = {a["name"]: a for a in json.loads(report.read_text())["adapters"]}
    assert sorted(rows) == ["broken", "client_00", "client_01"]
    assert "too short for a safetensors header" in rows["broken"]["error"]
    assert "error" not in rows["client_00"]


def test_default_adapter_name_keys_with_lora_alpha(tmp_path: Path) -> None:
    t = {k.replace(".weight", ".default.weight"): v for k, v in random_factors(MODULES, r=4).items()}
    t.update({k.replace(".weight", ".default.weight"): v for k, v in random_factors({"m.up": (8, 6)}, r=2).items()})
    save_file(t, tmp_path / "x.safetensors")
    run = clair("inspect", str(tmp_path / "x.safetensors"), "--lora-alpha", "8", "--json", "-")
    assert run.code == 0, run.stderr
    (rec,) = json.loads(run.stdout)["adapters"]
    assert rec["ranks"] == [2, 4] and rec["n_modules"] == 5
    assert "config gives" not in run.stderr


def test_both_factor_kinds_for_one_module_are_refused(tmp_path: Path) -> None:
    t = random_factors(MODULES)
    t[f"{KEY}.lora_embedding_A"] = torch.randn(4, 12)
    t[f"{KEY}.lora_embedding_B"] = torch.randn(16, 4)
    write_adapter(tmp_path / "both", t)
    for command in ("inspect", "gate"):
        args = [str(tmp_path / "both")] + (["--reference", str(pool(tmp_path / "ref"))] if command == "gate" else [])
        refused(clair(command, *args), "both", "both lora_A/lora_B and lora_embedding_A/lora_embedding_B")


def test_base_layer_biases_are_not_called_modules_to_save(tmp_path: Path) -> None:
    t = random_factors(MODULES)
    t[f"{KEY}.base_layer.bias"] = torch.randn(16)
    t["base_model.model.model.layers.1.self_attn.q_proj.bias"] = torch.randn(16)
    write_adapter(tmp_path / "biased", t, lora_config(bias="all"))
    run = clair("inspect", str(tmp_path / "biased"), "--json", "-")
    assert run.code == 0, run.stderr
    notes = " ".join(json.loads(run.stdout)["adapters"][0]["notes"])
    assert "2 bias tensors of the base layers" in notes and "modules_to_save" not in notes


# --- symlinks and the Hugging Face cache ----------------------------------------------------


def _snapshot(home: Path, repo: str, sub: str | None = None) -> Path:
    """The layout a hub download leaves: snapshot files are links into ../../blobs."""
    root = home / "hub" / ("models--" + repo.replace("/", "--"))
    src = write_adapter(home.parent / "src", seed=3)
    snap = root / "snapshots" / SHA / (sub or "")
    snap.mkdir(parents=True)
    (root / "blobs").mkdir(exist_ok=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        data = (src / name).read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / name).symlink_to(os.path.relpath(blob, snap))
    return snap


@pytest.mark.parametrize("sub", [None, "round_3"])
def test_a_hub_cache_snapshot_is_read_and_named_by_its_repo(tmp_path: Path, sub: str | None) -> None:
    snap = _snapshot(tmp_path / "home", "owner/lora", sub)
    run = clair("inspect", str(snap), "--json", "-", env={"HF_HOME": str(tmp_path / "home")})  # the cache in use
    assert run.code == 0, run.stderr
    (rec,) = json.loads(run.stdout)["adapters"]
    assert rec["name"] == "owner/lora" + (f"/{sub}" if sub else "") + "@" + SHA[:12]
    assert rec["revision"] == SHA and rec["hub"]["repo_id"] == "owner/lora" and rec["hub"]["commit"] == SHA


def test_symlinked_adapter_folder_inside_a_pool_is_read(tmp_path: Path) -> None:
    pool(tmp_path / "pool", 2)
    write_adapter(tmp_path / "elsewhere" / "linked", seed=30)
    (tmp_path / "pool" / "linked").symlink_to(tmp_path / "elsewhere" / "linked", target_is_directory=True)
    run = clair("inspect", str(tmp_path / "pool"), "--json", "-")
    assert run.code == 0, run.stderr
    assert [a["name"] for a in json.loads(run.stdout)["adapters"]] == ["client_00", "client_01", "linked"]


def test_two_links_to_one_adapter_are_refused(tmp_path: Path) -> None:
    pool(tmp_path / "pool")
    (tmp_path / "pool" / "again").symlink_to(tmp_path / "pool" / "client_02", target_is_directory=True)
    refused(clair("merge", str(tmp_path / "pool"), "--out", str(tmp_path / "out")), "again", "client_02")
    assert not (tmp_path / "out").exists()


def test_a_directory_loop_inside_a_pool_is_refused(tmp_path: Path) -> None:
    pool(tmp_path / "pool")
    (tmp_path / "pool" / "sub").mkdir()
    (tmp_path / "pool" / "sub" / "up").symlink_to(tmp_path / "pool", target_is_directory=True)
    refused(clair("merge", str(tmp_path / "pool"), "--out", str(tmp_path / "out")), "sub/up", "symlink loop")


@dataclass
class PathCase:
    build: Callable[[Path], str]
    expected: list[str] = field(default_factory=list)


PATH_CASES = {
    "longer than the OS allows": PathCase(lambda d: str(d / ("x" * 300)), ["path too long", "xxx"]),
    "nested too long": PathCase(lambda d: str(d / "/".join(["y" * 250] * 20)), ["path too long"]),
    "symlink loop": PathCase(lambda d: _loop(d), ["loop_a", "symlink loop"]),
    "through a symlink loop": PathCase(lambda d: _loop(d) + "/adapter", ["loop_a", "symlink loop"]),
    "dangling symlink": PathCase(lambda d: _dangling(d), ["dangling", "dangling symlink"]),
    "NUL byte in a listed path": PathCase(lambda d: _nul_list(d), ["NUL byte"]),
}


def _loop(d: Path) -> str:
    (d / "loop_a").symlink_to(d / "loop_b")
    (d / "loop_b").symlink_to(d / "loop_a")
    return str(d / "loop_a")


def _dangling(d: Path) -> str:
    (d / "dangling").symlink_to(d / "nowhere")
    return str(d / "dangling")


def _nul_list(d: Path) -> str:
    (d / "list.txt").write_bytes(b"a\x00b\n")
    return f"@{d / 'list.txt'}"


@pytest.mark.parametrize("case", list(PATH_CASES))
def test_source_paths_the_os_refuses_are_one_line_errors(tmp_path: Path, case: str) -> None:
    c = PATH_CASES[case]
    refused(clair("inspect", c.build(tmp_path)), *c.expected)
