"""The memory and CPU limits read from a process's own control groups (cgroup v2 and v1), on
fake ``/proc`` and ``/sys/fs/cgroup`` trees."""

from __future__ import annotations

from pathlib import Path

from clair_cli.io.resources import V1_UNLIMITED, available_memory, cpu_quota

GIB = 2**30


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _machine(tmp_path: Path, cgroup_lines: str, files: dict[str, str], available_gib: int = 20) -> tuple[Path, Path]:
    proc, cgroup = tmp_path / "proc", tmp_path / "cgroup"
    _write(
        proc,
        {"meminfo": f"MemTotal: 99 kB\nMemAvailable: {available_gib * GIB // 1024} kB\n", "self/cgroup": cgroup_lines},
    )
    cgroup.mkdir()
    _write(cgroup, files)
    return proc, cgroup


def test_no_cgroup_limit_leaves_meminfo(tmp_path):
    proc, cgroup = _machine(tmp_path, "0::/\n", {"memory.max": "max\n", "memory.current": "5\n"})
    assert available_memory(proc, cgroup) == 20 * GIB
    assert cpu_quota(proc, cgroup) is None


def test_v2_limit_at_the_namespace_root(tmp_path):
    proc, cgroup = _machine(
        tmp_path,
        "0::/\n",
        {
            "memory.max": f"{4 * GIB}\n",
            "memory.current": f"{GIB}\n",
            "memory.stat": f"anon 5\ninactive_file {GIB // 2}\n",
            "cpu.max": "150000 100000\n",
        },
    )
    assert available_memory(proc, cgroup) == 3 * GIB + GIB // 2
    assert cpu_quota(proc, cgroup) == 2


def test_v2_limit_of_the_process_group_and_of_a_parent(tmp_path):
    """A systemd host: the limit is on the process's own slice, or on one above it."""
    proc, cgroup = _machine(
        tmp_path,
        "0::/user.slice/job.scope\n",
        {
            "memory.max": "max\n",
            "user.slice/memory.max": f"{2 * GIB}\n",
            "user.slice/memory.current": f"{GIB}\n",
            "user.slice/memory.stat": "inactive_file 0\n",
            "user.slice/job.scope/memory.max": f"{8 * GIB}\n",
            "user.slice/job.scope/memory.current": "0\n",
            "user.slice/job.scope/memory.stat": "inactive_file 0\n",
            "user.slice/job.scope/cpu.max": "max 100000\n",
            "user.slice/cpu.max": "300000 100000\n",
        },
    )
    assert available_memory(proc, cgroup) == GIB  # the parent's limit is the tighter one
    assert cpu_quota(proc, cgroup) == 3


def test_v1_limits(tmp_path):
    """cgroup v1: the memory and cpu controllers mounted apart, the process's group named in
    ``/proc/self/cgroup`` (here a path without a cgroup namespace)."""
    proc, cgroup = _machine(
        tmp_path,
        "4:memory:/docker/abc\n2:cpu,cpuacct:/docker/abc\n0::/\n",
        {
            "memory/memory.limit_in_bytes": f"{V1_UNLIMITED * 2 - 4096}\n",
            "memory/docker/abc/memory.limit_in_bytes": f"{6 * GIB}\n",
            "memory/docker/abc/memory.usage_in_bytes": f"{2 * GIB}\n",
            "memory/docker/abc/memory.stat": f"inactive_file 7\ntotal_inactive_file {GIB}\n",
            "cpu/docker/abc/cpu.cfs_quota_us": "250000\n",
            "cpu/docker/abc/cpu.cfs_period_us": "100000\n",
        },
    )
    assert available_memory(proc, cgroup) == 5 * GIB
    assert cpu_quota(proc, cgroup) == 3


def test_v1_path_outside_the_mount_reads_the_mount(tmp_path):
    """A container without its own cgroup namespace sees the host's path for its group, which
    its mount does not hold: the mount's own files are its limits."""
    proc, cgroup = _machine(
        tmp_path,
        "4:memory:/docker/abc\n",
        {
            "memory/memory.limit_in_bytes": f"{GIB}\n",
            "memory/memory.usage_in_bytes": f"{GIB // 4}\n",
            "memory/memory.stat": "total_inactive_file 0\n",
            "cpu/cpu.cfs_quota_us": "-1\n",
            "cpu/cpu.cfs_period_us": "100000\n",
        },
    )
    assert available_memory(proc, cgroup) == GIB - GIB // 4
    assert cpu_quota(proc, cgroup) is None


def test_unreadable_or_garbled_files_are_no_limit(tmp_path):
    proc, cgroup = _machine(
        tmp_path,
        "garbage\n0::/\n",
        {"memory.max": "lots\n", "memory.current": "1\n", "cpu.max": "x y\n"},
    )
    assert available_memory(proc, cgroup) == 20 * GIB
    assert cpu_quota(proc, cgroup) is None
    assert available_memory(tmp_path / "none", tmp_path / "none") is None
