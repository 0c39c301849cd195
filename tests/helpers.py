"""Builders for tiny adapters on disk, shared by the tests."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

BASE = "clair-test/tiny-base"

# The first safetensors release whose save_file writes (and load_file reads) these dtypes. clair reads
# them from the declared safetensors>=0.4 on (its reader does not go through safetensors for them);
# only a test that makes such a file with safetensors needs the newer release.
SAFETENSORS_WRITES = {
    torch.float8_e4m3fn: "0.4.2",
    torch.float8_e5m2: "0.4.2",
    torch.uint16: "0.6.1",
    torch.uint32: "0.6.1",
    torch.uint64: "0.6.1",
}


def skip_unless_safetensors_writes(dtype: torch.dtype) -> None:
    """Skip the calling test where the installed safetensors cannot write ``dtype``."""
    from importlib.metadata import version

    import pytest
    from packaging.version import Version

    need, have = SAFETENSORS_WRITES.get(dtype), version("safetensors")
    if need is not None and Version(have) < Version(need):
        pytest.skip(f"safetensors {have} cannot write {dtype} (safetensors {need} can)")


def peft_at_least(version: str) -> bool:
    """Whether the installed PEFT is ``version`` or later (a development build of it counts)."""
    from packaging.version import Version
    from peft import __version__

    return Version(Version(__version__).base_version) >= Version(version)


def lora_config(**overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "peft_type": "LORA",
        "base_model_name_or_path": BASE,
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"],
        "fan_in_fan_out": False,
        "use_rslora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    cfg.update(overrides)
    return cfg


def random_factors(
    modules: dict[str, tuple[int, int]], r: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """PEFT-style tensors for ``{module: (d_out, d_in)}``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (d_out, d_in) in modules.items():
        out[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, d_in, generator=g).to(dtype)
        out[f"base_model.model.{name}.lora_B.weight"] = torch.randn(d_out, r, generator=g).to(dtype)
    return out


MODULES = {
    "model.layers.0.self_attn.q_proj": (16, 12),
    "model.layers.0.self_attn.v_proj": (16, 12),
    "model.layers.1.self_attn.q_proj": (16, 12),
    "model.layers.1.self_attn.v_proj": (16, 12),
}


def write_adapter(
    directory: Path,
    tensors: dict[str, torch.Tensor] | None = None,
    config: dict[str, Any] | str | bytes | None = None,
    seed: int = 0,
) -> Path:
    """Write adapter_config.json and adapter_model.safetensors; ``config`` may be raw text."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(
        tensors if tensors is not None else random_factors(MODULES, seed=seed), directory / "adapter_model.safetensors"
    )
    cfg = lora_config() if config is None else config
    if isinstance(cfg, dict):
        cfg = json.dumps(cfg)
    path = directory / "adapter_config.json"
    path.write_bytes(cfg if isinstance(cfg, bytes) else cfg.encode())
    return directory


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the real ``clair`` console entry point in a subprocess; the ``--json`` and
    ``--sarif`` outputs of a run that exits 0 or 1 are checked against their schemas."""
    import os

    from report_check import check_cli_outputs

    full_env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "120", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "clair_cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )
    check_cli_outputs(args, proc.returncode, proc.stdout)
    return proc


def invoke_cli(*args: str, columns: int = 120) -> subprocess.CompletedProcess[str]:
    """:func:`run_cli` in this process (Typer's CliRunner), for tests of what a command reads, decides
    or writes rather than of the process itself (start-up, signals, streams, the environment read at
    import): a subprocess spends about 2 s starting Python and torch. The reports it writes are
    checked against their schemas by ``tests/conftest.py``, ``--json -`` here."""
    from report_check import check_cli_outputs
    from typer.testing import CliRunner

    from clair_cli.cli import app

    result = CliRunner().invoke(app, list(args), env={"NO_COLOR": "1", "COLUMNS": str(columns)})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a test's own failure, not a command's exit
    proc = subprocess.CompletedProcess(["clair", *args], result.exit_code, result.stdout, result.stderr)
    check_cli_outputs(args, proc.returncode, proc.stdout)
    return proc


# Runs a command and writes its exit code and peak resident memory (wait4) to a file descriptor.
_SPAWNER = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
os.write(int(sys.argv[1]), f"{os.waitstatus_to_exitcode(status)} {usage.ru_maxrss}".encode())
"""


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # already ended
        os.killpg(pgid, 9)


def run_measured(argv: list[str], limit_s: float, **popen: Any) -> tuple[int, int]:
    """Run ``python -m clair_cli ARGV`` (``popen``: stdout, stderr, stdin, env, cwd), killed after
    ``limit_s`` seconds; its exit code and its own peak resident memory in bytes (wait4).

    The command is started by a small Python process, not by the test process: a child's peak
    memory as wait4 reports it includes the high-water mark of the memory it was forked from
    (Linux carries it over fork and exec), which for a test process that has run hundreds of
    tests can be more than a gigabyte, whatever the command itself used."""
    read, write = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", _SPAWNER, str(write), sys.executable, "-m", "clair_cli", *argv],
            pass_fds=(write,),
            start_new_session=True,  # one process group: a timeout kills the command too
            **popen,
        )
        os.close(write)
        write = -1
        timer = threading.Timer(limit_s, _kill_group, (proc.pid,))
        timer.start()
        try:
            proc.wait()
            reported = os.read(read, 100).decode().split()
        finally:
            timer.cancel()
    finally:
        os.close(read)
        if write >= 0:
            os.close(write)
    if len(reported) != 2:  # killed before the command ended
        return proc.returncode, 0
    return int(reported[0]), int(reported[1]) * 1024


class LocalServer:
    """An HTTP server on a free port of 127.0.0.1, answering from daemon threads (fake Hubs)."""

    def start(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def report_without_times(path: Path) -> dict[str, Any]:
    """A JSON report without what changes from run to run (its timings and time stamp)."""
    report = json.loads(path.read_text())
    report.pop("timing_s", None)
    report.pop("generated_at", None)
    return report


def side_by_side(tmp_path: Path, args: Sequence[str], variants: dict[str, Sequence[str]]) -> list[Path]:
    """Run the command (through Typer's runner, in this process) once per variant, each with the
    variant's extra options and writing into its own directory (``{out}`` in ``args``)."""
    from typer.testing import CliRunner

    from clair_cli.cli import app

    outs = []
    for name, extra in variants.items():
        out = tmp_path / name
        out.mkdir()
        argv = [a.replace("{out}", str(out)) for a in args]
        result = CliRunner().invoke(
            app, [*argv, *extra, "--exit-zero", "--quiet"], env={"NO_COLOR": "1", "COLUMNS": "120"}
        )
        assert result.exit_code == 0, result.output
        outs.append(out)
    return outs


def bare_signals(n_adapters: int, **fields: Any):
    """A :class:`~clair_cli.core.rules.PoolSignals` of ``n_adapters`` with no modules, unit norms and
    no duplicates, and ``fields`` (a rule's inputs) as given: for one rule run alone on a ``Pass``."""
    from clair_cli.core.rules import PoolSignals

    base: dict[str, Any] = dict(
        shares={}, members={}, structured={}, sq_norms=torch.ones(n_adapters, dtype=torch.float64), duplicates=[]
    )
    return PoolSignals(n_adapters=n_adapters, **{**base, **fields})


def tiny_llama(hidden: int = 16) -> torch.nn.Module:
    """A two-layer Llama of width ``hidden`` built from its config (no download), seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=32,
        hidden_size=hidden,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    return LlamaForCausalLM(cfg).eval()


def train_replies(contents: dict[int, Any]) -> list[Any]:
    """Flower replies of round 1's ``train`` queries: node ``n`` answers with ``contents[n]`` (a
    RecordDict or a Flower ``Error``), each message with an id of its own."""
    from flwr.app import Message, RecordDict

    replies = []
    for node, content in contents.items():
        query = Message(RecordDict(), node, "train", group_id="1")
        query.metadata.__dict__["_message_id"] = f"q{node}"
        reply = Message(content, reply_to=query)
        reply.metadata.__dict__["_message_id"] = f"r{node}"
        replies.append(reply)
    return replies


def transformer_lora_deltas(mixin: type, transformer: torch.nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """What diffusers' LoRA loader ``mixin`` (a transformer pipeline's, e.g. ``Flux2LoraLoaderMixin``) adds to
    each layer of ``transformer`` when it loads the file ``path``, by module."""
    from peft.tuners.lora import LoraLayer

    class Pipe(mixin):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            self.transformer = transformer
            self.hf_device_map = None

        @property
        def components(self) -> dict[str, torch.nn.Module]:
            return {"transformer": self.transformer}

    pipe = Pipe()
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    return {
        name: module.get_delta_weight(adapter).detach()
        for name, module in pipe.transformer.named_modules()
        if isinstance(module, LoraLayer)
        for adapter in module.lora_A
    }
