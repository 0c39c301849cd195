"""What the machine has left: the memory this process can still take and the CPUs it may use
within its container's limits. Stdlib only.

Limits are read from the process's own control groups (``/proc/self/cgroup``), cgroup v2 or
v1, at its own group and every group above it up to the mount (a limit anywhere above applies
too). A container with its own cgroup namespace sees its group as ``/``; one without sees a
path outside its mount, and then the mount's own files are its limits.
"""

from __future__ import annotations

import math
from pathlib import Path

PROC = Path("/proc")
CGROUP = Path("/sys/fs/cgroup")
V1_UNLIMITED = 2**62  # cgroup v1 reports "no limit" as a page-rounded 2**63 - 1


def available_memory(proc: Path = PROC, cgroup: Path = CGROUP) -> int | None:
    """Bytes this process can still take: MemAvailable, capped by its cgroup v2 or v1 memory
    limits less their use (page cache that would be given back counts as free); None: unknown."""
    found: list[int] = []
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for directory in _groups(proc, cgroup, "memory"):
        found.extend(_memory_left(directory))
    return min(found) if found else None


def cpu_quota(proc: Path = PROC, cgroup: Path = CGROUP) -> int | None:
    """The CPUs the process's cgroup v2 ``cpu.max`` or v1 CFS quota allows, rounded up (None:
    no quota)."""
    found: list[int] = []
    for directory in _groups(proc, cgroup, "cpu"):
        try:
            quota, period = (directory / "cpu.max").read_text().split()[:2]
            if quota != "max":
                found.append(math.ceil(int(quota) / int(period)))
            continue
        except (OSError, ValueError):
            pass
        try:
            quota_us = int((directory / "cpu.cfs_quota_us").read_text())
            if quota_us > 0:
                found.append(math.ceil(quota_us / int((directory / "cpu.cfs_period_us").read_text())))
        except (OSError, ValueError, ZeroDivisionError):
            pass
    return max(1, min(found)) if found else None


def _memory_left(directory: Path) -> list[int]:
    """What one group's limit leaves (v2 ``memory.max``, v1 ``memory.limit_in_bytes``), or nothing."""
    for limit_file, used_file, inactive in (
        ("memory.max", "memory.current", ("inactive_file",)),
        ("memory.limit_in_bytes", "memory.usage_in_bytes", ("total_inactive_file", "inactive_file")),
    ):
        try:
            limit = (directory / limit_file).read_text().strip()
        except OSError:
            continue
        try:
            if limit == "max" or int(limit) >= V1_UNLIMITED:
                return []
            used = int((directory / used_file).read_text())
            stat = _stat(directory / "memory.stat")
            # The group's page cache counts as used but is given back on demand.
            cache = next((stat[key] for key in inactive if key in stat), 0)
            return [max(0, int(limit) - used + cache)]
        except (OSError, ValueError):
            return []
    return []


def _stat(path: Path) -> dict[str, int]:
    stat = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            stat[key] = int(value)
    return stat


def _groups(proc: Path, cgroup: Path, controller: str) -> list[Path]:
    """The directories of the process's ``controller`` group and of the groups above it, that
    exist: cgroup v2 (the unified hierarchy, also under ``unified`` on hybrid hosts) and v1."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        lines = []
    v2_path, v1_path = "/", "/"
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and not controllers:
            v2_path = path
        elif controller in controllers.split(","):
            v1_path = path
    mounts = [(cgroup, v2_path), (cgroup / "unified", v2_path), (cgroup / controller, v1_path)]
    found: list[Path] = []
    for mount, path in mounts:
        if not mount.is_dir():
            continue
        names = [name for name in path.strip().split("/") if name not in ("", ".", "..")]
        for depth in range(len(names), -1, -1):
            directory = mount.joinpath(*names[:depth])
            if directory.is_dir() and directory not in found:
                found.append(directory)
    return found
