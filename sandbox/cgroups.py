"""Reading a host process's cgroup: which container it belongs to, and where its memory
figures are (cgroup v1 and v2). Works where the runner shares the host's PID namespace."""

from __future__ import annotations

from pathlib import Path


def cgroup_of(pid: int) -> str:
    """The cgroup lines of host process `pid` ('' if it is gone): they name its container."""
    try:
        return Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return ""


def memory_files(pid: int) -> list[Path]:
    """Files holding the memory high-water mark (if the kernel keeps one) then current usage,
    for the cgroup of `pid`; [] when they cannot be found."""
    for line in cgroup_of(pid).splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "memory":  # v1
            base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            return [base / "memory.max_usage_in_bytes", base / "memory.usage_in_bytes"]
        if controllers == "":  # v2 unified
            base = Path("/sys/fs/cgroup") / path.lstrip("/")
            if (base / "memory.current").exists():
                return [base / "memory.peak", base / "memory.current"]
    return []
