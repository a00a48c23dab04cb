"""The memory the kernel lets this worker hold: cgroup v2's `memory.max`, the lowest along its cgroup's path.

At that limit (systemd's MemoryMax, a container's memory limit) the kernel kills the worker, and /proc does
not say where it is; the memory alert compares resident memory with it. None where nothing limits the
worker, or where the unified (v2) hierarchy is not mounted: the alert then falls back to a fixed figure.
"""

from __future__ import annotations

from pathlib import Path

PROC_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def memory_limit_bytes(proc_cgroup: Path = PROC_CGROUP, root: Path = CGROUP_ROOT) -> int | None:
    """The lowest `memory.max` of this process's cgroup and its ancestors, in bytes; None when all say `max`.

    A parent's limit binds its children (a pod's limit over its container's), so every level is read. Read
    at each scrape: `systemctl set-property inspector MemoryMax=...` changes it on a running worker."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    relative = next((line[len("0::"):] for line in lines if line.startswith("0::")), None)
    if relative is None:  # cgroup v1 only
        return None
    folder = root / relative.strip().lstrip("/")
    limits = []
    while True:
        try:
            text = (folder / "memory.max").read_text().strip()
        except OSError:  # the root cgroup has none; a folder outside this mount namespace neither
            text = "max"
        if text.isdigit():
            limits.append(int(text))
        if folder == root or root not in folder.parents:
            break
        folder = folder.parent
    return min(limits) if limits else None
