"""GPUs on a shared host through NVML: inventory, leases, and per-container VRAM.

A lease is an exclusive `flock` on a host-wide lock file per GPU: the kernel drops it when the
holding process dies, so a crashed runner never leaves a GPU reserved. Leases are also checked
against the GPUs held by running containers of any runner on this engine (by label).
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol

from .cgroups import cgroup_of

LOCK_DIR = Path(os.environ.get("AUTORESEARCH_LOCK_DIR", "/tmp/autoresearch-runner-locks"))


class GpuError(ValueError):
    """A GPU request cannot be met; the message says what the host has."""


@dataclass(frozen=True)
class GpuDevice:
    index: int
    uuid: str
    name: str
    memory_mb: float


class Nvml(Protocol):
    """The slice of NVML we use; tests pass a fake with the same shape."""

    def devices(self) -> list[GpuDevice]: ...
    def process_vram_mb(self, uuid: str) -> dict[int, float]: ...


class RealNvml:
    """nvidia-ml-py. Every call tolerates a host with no driver (no devices)."""

    def __init__(self):
        import pynvml

        self.nv = pynvml
        try:
            pynvml.nvmlInit()
            self.ok = True
        except pynvml.NVMLError:
            self.ok = False

    def devices(self) -> list[GpuDevice]:
        if not self.ok:
            return []
        out = []
        for i in range(self.nv.nvmlDeviceGetCount()):
            h = self.nv.nvmlDeviceGetHandleByIndex(i)
            name = self.nv.nvmlDeviceGetName(h)
            out.append(GpuDevice(
                index=i,
                uuid=self.nv.nvmlDeviceGetUUID(h),
                name=name.decode() if isinstance(name, bytes) else name,
                memory_mb=self.nv.nvmlDeviceGetMemoryInfo(h).total / 2**20,
            ))
        return out

    def process_vram_mb(self, uuid: str) -> dict[int, float]:
        """Host PID -> MiB of VRAM used on device `uuid`."""
        if not self.ok:
            return {}
        h = self.nv.nvmlDeviceGetHandleByUUID(uuid)
        used = {}
        for p in self.nv.nvmlDeviceGetComputeRunningProcesses(h):
            # usedGpuMemory is None where the driver hides it (some vGPU / MIG setups).
            used[p.pid] = (p.usedGpuMemory or 0) / 2**20
        return used


def in_container(container_id: str, cgroup_reader: Callable[[int], str] = cgroup_of) -> Callable[[int], bool]:
    """A test of host PIDs: is this process in the container? Its cgroup path carries the
    container id (cgroup v1 and v2, cgroupfs and systemd drivers alike)."""
    return lambda pid: bool(container_id) and container_id in cgroup_reader(pid)


def vram_of(nvml: Nvml, uuids: Iterable[str], owns: Callable[[int], bool]) -> float:
    """MiB of VRAM held on devices `uuids` by the processes `owns` accepts (NVML reports host PIDs)."""
    return sum(mb for uuid in uuids for pid, mb in nvml.process_vram_mb(uuid).items() if owns(pid))


@dataclass
class GpuLease:
    """GPUs held by this runner until `release()` or process exit."""

    devices: tuple[str, ...] = ()
    model: str | None = None
    nvml: Nvml | None = None
    _locks: list = field(default_factory=list, repr=False)

    @classmethod
    def none(cls) -> "GpuLease":
        return cls()

    def vram_probe(self) -> Callable[[str], float] | None:
        """container id -> MiB of VRAM its processes hold on the leased GPUs; None without GPUs."""
        if not self.devices or self.nvml is None:
            return None
        nvml, devices = self.nvml, self.devices
        return lambda container_id: vram_of(nvml, devices, in_container(container_id))

    def release(self) -> None:
        for f in self._locks:
            f.close()  # closing the descriptor drops the flock
        self._locks.clear()


def parse_request(request: str) -> tuple[str, list[int] | int | None]:
    """Docker's --gpus grammar: 'none' | 'auto'/'all' | '4' (a count) | '0,2' or 'device=2' (indices).

    Raises:
        GpuError: anything else.
    """
    request = str(request).strip().lower()
    if request in ("none", "auto", "all"):
        return request, None
    if request.isdigit():
        return "count", int(request)
    spec = request.removeprefix("device=")
    parts = [p.strip() for p in spec.split(",")]
    if (spec != request or len(parts) > 1) and all(p.isdigit() for p in parts):
        return "indices", [int(p) for p in parts]
    raise GpuError(f"--gpus {request!r} is not understood: use none, all, a count like 4, or indices like 0,2 or device=2")


def acquire(request: str, nvml: Nvml | None = None, busy: set[str] | None = None, lock_dir: Path = LOCK_DIR) -> GpuLease:
    """Lease GPUs for one runner.

    Args:
        request: see parse_request. 'auto' and 'all' take every free GPU (none on a CPU host).
        nvml: the NVML view (a fake in tests).
        busy: UUIDs that running containers hold (from their labels).

    Raises:
        GpuError: the host lacks a requested GPU, or it is leased by another runner.
    """
    mode, arg = parse_request(request)
    if mode == "none":
        return GpuLease.none()
    nvml = nvml or RealNvml()
    devices = nvml.devices()
    busy = busy or set()
    if mode in ("auto", "all"):
        wanted = devices
    elif mode == "indices":
        by_index = {d.index: d for d in devices}
        missing = [i for i in arg if i not in by_index]
        if missing:
            have = ", ".join(str(d.index) for d in devices) or "none"
            raise GpuError(f"GPU {missing[0]} does not exist on this host (GPUs here: {have})")
        wanted = [by_index[i] for i in arg]
    else:
        if arg > len(devices):
            raise GpuError(f"asked for {arg} GPUs, this host has {len(devices)}")
        wanted = devices
    lock_dir.mkdir(parents=True, exist_ok=True)
    lease = GpuLease(nvml=nvml)
    held = []
    for d in wanted:
        if mode == "count" and len(held) == arg:
            break
        f = _try_lock(lock_dir / f"gpu-{d.uuid}.lock")
        if f is None or d.uuid in busy:
            if f is not None:
                f.close()
            if mode == "indices":
                lease.release()
                raise GpuError(f"GPU {d.index} ({d.uuid}) is leased by another runner on this host")
            continue
        lease._locks.append(f)
        held.append(d)
    if mode == "count" and len(held) < arg:
        lease.release()
        raise GpuError(f"asked for {arg} GPUs, only {len(held)} are free on this host")
    lease.devices = tuple(d.uuid for d in held)
    lease.model = held[0].name if held else None
    return lease


def _try_lock(path: Path):
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f
