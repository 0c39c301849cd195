"""What the machine has left: the memory this process can still take. Stdlib only."""

from __future__ import annotations

from pathlib import Path


def available_memory() -> int | None:
    """Bytes this process can still take: MemAvailable, capped by a cgroup v2 limit (None: unknown)."""
    found: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        cgroup = Path("/sys/fs/cgroup")
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            used = int((cgroup / "memory.current").read_text())
            # The cgroup's page cache counts as used but is given back on demand.
            stat = dict(line.split() for line in (cgroup / "memory.stat").read_text().splitlines() if " " in line)
            found.append(int(limit) - used + int(stat.get("inactive_file", 0)))
    except (OSError, ValueError):
        pass
    return min(found) if found else None
