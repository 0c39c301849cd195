"""``clair merge`` writes each merged module as it is computed (issue #24: a streaming merge).

The tensors file is written by :class:`clair_cli.io.safetensors_stream.SafetensorsStream`:
header room reserved from bounds, data appended, header last. These tests check that the file
is an ordinary safetensors file (safetensors, clair's own reader and PEFT load it), that a
streamed merge writes exactly the tensors the in-memory merge computes (every method, a
projection, ``--merge-rank``, ``--rescale norm``'s second pass), and that its peak memory does
not grow with the merged adapter's size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import lora_config, random_factors, write_adapter
from safetensors import safe_open
from safetensors.torch import load_file

from clair_cli import pipeline, publish
from clair_cli.errors import OutputError
from clair_cli.io.peft_writer import merged_tensors
from clair_cli.io.safetensors_file import read_header
from clair_cli.io.safetensors_stream import SafetensorsStream
from clair_cli.params import AuditParams, MergeOptions

ROOT = Path(__file__).parents[1]
SAMPLES = ROOT / "sample_adapters"


def test_a_streamed_file_is_an_ordinary_safetensors_file(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "m.lora_A.weight": torch.randn(3, 10, generator=g),
        "m.lora_B.weight": torch.randn(7, 3, generator=g),
        "conv.lora_A.weight": torch.randn(2, 4, 3, 3, generator=g),
    }
    largest = {"m.lora_A.weight": (300, 10), "m.lora_B.weight": (7, 300), "conv.lora_A.weight": (40, 4, 3, 3)}
    path = tmp_path / "x.safetensors"
    with SafetensorsStream(path, largest, {"format": "pt"}) as stream:
        for name in ("m.lora_B.weight", "conv.lora_A.weight", "m.lora_A.weight"):  # any order
            stream.add(name, tensors[name])
        stream.rewrite(["m.lora_B.weight"], lambda t: t * 0.5)
    loaded = load_file(str(path))
    assert set(loaded) == set(tensors)
    assert torch.equal(loaded["m.lora_B.weight"], tensors["m.lora_B.weight"] * 0.5)
    assert torch.equal(loaded["m.lora_A.weight"], tensors["m.lora_A.weight"])
    assert torch.equal(loaded["conv.lora_A.weight"], tensors["conv.lora_A.weight"])
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    infos, metadata = read_header(path)  # clair's own checks: contiguous data, no gap, no overlap
    assert metadata == {"format": "pt"} and infos["m.lora_A.weight"].shape == (3, 10)
    (n,) = [int.from_bytes(path.read_bytes()[:8], "little")]
    assert n % 8 == 0  # the data section starts aligned


@pytest.mark.parametrize(
    ("name", "tensor", "problem"),
    [
        ("other", torch.zeros(2, 2), "not a tensor this file was planned for"),
        ("a", torch.zeros(3, 5), "exceeds the planned"),
        ("a", torch.zeros(2, 2, 1), "exceeds the planned"),
    ],
)
def test_a_tensor_outside_the_plan_is_refused(tmp_path: Path, name: str, tensor: torch.Tensor, problem: str) -> None:
    with (
        pytest.raises(ValueError, match=problem),
        SafetensorsStream(tmp_path / "x.safetensors", {"a": (2, 4)}, {}) as s,
    ):
        s.add(name, tensor)


def test_a_planned_tensor_never_written_is_refused(tmp_path: Path) -> None:
    with (
        pytest.raises(ValueError, match="never written"),
        SafetensorsStream(tmp_path / "x.safetensors", {"a": (2, 4), "b": (1,)}, {}) as s,
    ):
        s.add("a", torch.zeros(2, 4))


def _streamed_and_in_memory(tmp_path: Path, method: str, options: MergeOptions, sources: list[str]):
    pool = pipeline.open_pool(sources, method=method)
    params = AuditParams()
    outcome = pipeline.audit(pool, params) if method == "clair" else None
    in_memory = pipeline.merge(pool, method, params, None, options, outcome)
    root = tmp_path / method
    with publish.merged_stream(root, pool, options) as sink:
        streamed = pipeline.merge(pool, method, params, None, options, outcome, sink=sink)
    expected = merged_tensors(pool.adapters[0].modules, {m: (r.A, r.B) for m, r in in_memory.modules.items()})
    return in_memory, streamed, expected, load_file(str(root / "adapter_model.safetensors"))


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("clair", MergeOptions()),
        ("clair", MergeOptions(rescale="norm")),
        ("clair", MergeOptions(project=True)),
        ("clair", MergeOptions(rank=6, rescale="norm")),
        ("mean", MergeOptions(rank=40)),  # more than the summed rank: the bound takes --merge-rank
        ("median", MergeOptions()),
        ("fedavg", MergeOptions()),
    ],
    ids=["clair", "rescale-norm", "project", "rank-6-rescaled", "mean-rank-40", "median", "fedavg"],
)
def test_streamed_merge_writes_exactly_what_the_in_memory_merge_computes(
    tmp_path: Path, method: str, options: MergeOptions
) -> None:
    in_memory, streamed, expected, written = _streamed_and_in_memory(tmp_path, method, options, [str(SAMPLES)])
    assert set(written) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(written[key], tensor), key
    assert streamed.streamed and not in_memory.streamed
    assert streamed.summary() == in_memory.summary()
    assert streamed.scale == in_memory.scale
    assert all(r.A.is_meta and r.B.is_meta for r in streamed.modules.values())  # nothing held
    if options.rescale == "norm":
        assert streamed.scale != 1.0


def test_a_non_finite_merged_module_is_refused_and_the_run_writes_nothing(tmp_path: Path) -> None:
    pool = pipeline.open_pool([str(SAMPLES)], method="mean")
    root = tmp_path / "out"
    sink = publish.merged_stream(root, pool)
    with pytest.raises(OutputError, match="NaN or Inf"), sink:
        name = pool.modules[0]
        spec = pool.adapters[0].modules[name]
        sink.put(name, torch.full((1, spec.d_in), float("inf")), torch.ones(spec.d_out, 1))


def _pool_of(tmp_path: Path, n_modules: int) -> Path:
    modules = {f"model.layers.{i}.self_attn.q_proj": (512, 512) for i in range(n_modules)}
    pool = tmp_path / f"pool{n_modules}"
    cfg = lora_config(r=64, lora_alpha=64, target_modules=["q_proj"])
    for k in range(4):
        write_adapter(pool / f"a{k}", random_factors(modules, r=64, seed=k, dtype=torch.bfloat16), cfg)
    return pool


PEAK_SCRIPT = """
import json, sys
from clair_cli import pipeline, publish
from clair_cli.params import AuditParams, MergeOptions
pool = pipeline.open_pool([sys.argv[1]], method="mean")
if sys.argv[2] == "stream":
    with publish.merged_stream(__import__("pathlib").Path(sys.argv[3]), pool) as sink:
        pipeline.merge(pool, "mean", AuditParams(), None, MergeOptions(), sink=sink)
else:
    merged = pipeline.merge(pool, "mean", AuditParams(), None, MergeOptions())
# VmHWM: this address space's peak. (ru_maxrss survives exec: a child of a large pytest
# process would report its parent's size.)
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
print(json.dumps(int(hwm.split()[1]) * 1024))
"""


def _peak(pool: Path, mode: str, out: Path) -> int:
    # A low mmap threshold returns freed blocks to the system at once: the peak then measures what is
    # held, not what glibc's heap keeps after a free (its fragmentation varies from run to run).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(pool), mode, str(out)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        cwd=ROOT,
    )
    return int(json.loads(proc.stdout.strip().splitlines()[-1]))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_peak_memory_does_not_grow_with_the_merged_adapter(tmp_path: Path) -> None:
    """4 adapters of rank 64 on 512x512 modules: each merged module is rank 256, 1 MiB of
    float32. From 8 to 96 modules the merged adapter grows by 88 MiB; the in-memory merge's
    peak grows with it, the streamed merge's does not (bounds far from both, for a busy
    machine: peaks are measured, not times)."""
    small, large = _pool_of(tmp_path, 8), _pool_of(tmp_path, 96)
    grown = 88 * 2**20
    held = _peak(large, "memory", tmp_path / "m1") - _peak(small, "memory", tmp_path / "m0")
    streamed = _peak(large, "stream", tmp_path / "s1") - _peak(small, "stream", tmp_path / "s0")
    assert held > 0.8 * grown, (held, streamed)
    assert streamed < 0.25 * grown, (held, streamed)
    written = load_file(str(tmp_path / "s1" / "adapter_model.safetensors"))
    assert len(written) == 2 * 96 and written[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    ].shape == (
        256,
        512,
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_released_unless_the_environment_sets_the_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    from clair_cli.cli.allocator import release_freed_memory

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert release_freed_memory() is False
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    import ctypes

    try:
        ctypes.CDLL(None).mallopt  # noqa: B018 - glibc has it
    except AttributeError:
        pytest.skip("not glibc")
    assert release_freed_memory() is True


_HEAP_AFTER_RELEASE = """
import ctypes, sys
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
class Info(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]
libc.mallinfo2.restype = Info
from clair_cli.cli.allocator import release_freed_memory
block = libc.malloc(24 << 20)  # an audit's large temporary: glibc raises its thresholds to its size
ctypes.memset(block, 1, 24 << 20)
libc.free(block)
assert release_freed_memory()
chunks = [libc.malloc(512 << 10) for _ in range(80)]  # 40 MiB of a merge's smaller temporaries
for c in chunks:
    ctypes.memset(c, 1, 512 << 10)
for c in reversed(chunks):
    libc.free(c)
print(libc.mallinfo2().fordblks)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_leaves_once_released_whatever_the_audit_freed_before() -> None:
    """The audit's large frees raise glibc's trim threshold (to twice the block); releasing resets
    it, so the merge's freed temporaries do not stay on the heap (found by review: 40 MiB kept)."""
    import ctypes

    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("glibc without mallinfo2")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", _HEAP_AFTER_RELEASE], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) < 8 << 20


@pytest.mark.parametrize("command", ["audit", "merge", "refine"])
def test_only_the_writing_commands_fix_the_threshold_and_only_once_the_audit_is_done(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, command: str
) -> None:
    from typer.testing import CliRunner

    from clair_cli.cli import app
    from clair_cli.cli import merge as merge_cli

    events: list[str] = []
    audit = pipeline.audit
    monkeypatch.setattr(merge_cli, "release_freed_memory", lambda: events.append("release") or True)
    monkeypatch.setattr(pipeline, "audit", lambda *a, **k: events.append("audit") or audit(*a, **k))
    args = [command, str(SAMPLES), "--exit-zero", "-q"] + ([] if command == "audit" else ["--out", str(tmp_path / "o")])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert events == (["audit"] if command == "audit" else ["audit", "release"])
