"""GPUs on a shared host through NVML: inventory, leases, and per-container VRAM.

A lease is an exclusive `flock` on a host-wide lock file per GPU: the kernel drops it when the
holding process dies, so a crashed runner never leaves a GPU reserved. Leases are also checked
against the GPUs held by running containers of any runner on this engine (by label).
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol

from .backend import SandboxError
from .cgroups import cgroup_of
from .spec import GpuAccess

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
    def minor_number(self, uuid: str) -> int: ...


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

    def minor_number(self, uuid: str) -> int:
        """N of /dev/nvidiaN for a GPU, or for the GPU a MIG device `uuid` is a slice of."""
        h = self.nv.nvmlDeviceGetHandleByUUID(uuid)
        if uuid.startswith("MIG-"):
            h = self.nv.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(h)
        return self.nv.nvmlDeviceGetMinorNumber(h)

    def process_vram_mb(self, uuid: str) -> dict[int, float]:
        """Host PID -> MiB of VRAM used on device `uuid`.

        Raises:
            SandboxError: NVML failed (the watchdog cannot enforce the ceiling without it).
        """
        if not self.ok:
            return {}
        try:
            h = self.nv.nvmlDeviceGetHandleByUUID(uuid)
            used = {}
            for p in self.nv.nvmlDeviceGetComputeRunningProcesses(h):
                # usedGpuMemory is None where the driver hides it (some vGPU / MIG setups).
                used[p.pid] = (p.usedGpuMemory or 0) / 2**20
            return used
        except self.nv.NVMLError as exc:
            raise SandboxError(f"NVML failed reading GPU {uuid} ({exc}): the VRAM watchdog cannot run; check the driver (nvidia-smi)") from None


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
    _open_lock_dir(lock_dir)
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


def _open_lock_dir(lock_dir: Path) -> None:
    """The host-wide lock directory, shared by every user's runners: world-writable and
    sticky like /tmp, whoever made it first.

    Raises:
        GpuError: it cannot be made or used, with what to do.
    """
    try:
        lock_dir.mkdir(parents=True, exist_ok=True)
        if lock_dir.stat().st_uid == os.getuid() and lock_dir.stat().st_mode & 0o7777 != 0o1777:
            os.chmod(lock_dir, 0o1777)
    except OSError as exc:
        raise GpuError(f"cannot use the GPU lock directory {lock_dir} ({exc.strerror}): its owner can "
                       f"`chmod 1777 {lock_dir}`, or set AUTORESEARCH_LOCK_DIR to a directory every user can write") from None
    if not os.access(lock_dir, os.W_OK | os.X_OK):
        raise GpuError(f"the GPU lock directory {lock_dir} is not writable by this user: its owner can "
                       f"`chmod 1777 {lock_dir}`, or set AUTORESEARCH_LOCK_DIR to a directory every user can write")


def _try_lock(path: Path):
    """An exclusive flock on `path` (made readable and writable for every user), or None if held.

    A lock file another user made may be read-only to us: flock works on a read-only descriptor.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        if os.fstat(fd).st_uid == os.getuid():
            os.fchmod(fd, 0o666)  # the umask took some bits; other users lease this GPU too
    except PermissionError:
        fd = os.open(path, os.O_RDONLY)
    f = os.fdopen(fd, "r+" if os.access(path, os.W_OK) else "r")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    if f.writable():
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
    return f


# ---------------------------------------------------------------------------
# How a container gets its GPUs: nvidia-container-toolkit, or the device nodes
# ---------------------------------------------------------------------------

GPU_RUNTIMES = ("auto", "toolkit", "devices")
# Where `devices` mounts the driver's libraries; PyTorch's CUDA images already have it on
# LD_LIBRARY_PATH (the toolkit's own convention), and the backend prepends it for others.
NVIDIA_LIB_DIR = "/usr/local/nvidia/lib64"
# The driver's user-space libraries the toolkit mounts for the compute and utility capabilities.
_DRIVER_LIB = re.compile(
    r"^lib(cuda|cudadebugger|nvidia-(ml|cfg|ptxjitcompiler|nvvm|gpucomp|allocator|opencl|pkcs11|pkcs11-openssl3))\.so(\.\d+)*$"
)
_CONTROL_NODES = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset")


# Where drivers put their libraries when ld.so.cache does not list them (container-style hosts
# with the driver under /usr/local/nvidia, Debian's packaging), besides $LD_LIBRARY_PATH.
DRIVER_LIB_DIRS = ("/usr/local/nvidia/lib64", "/usr/lib/x86_64-linux-gnu/nvidia/current", "/usr/lib64/nvidia")


def driver_libraries(ldconfig_output: str, search_dirs: Iterable[str] = ()) -> dict[str, Path]:
    """name -> host file of the NVIDIA driver's libraries: the 64-bit ones `ldconfig -p` lists,
    else every matching name (sonames and their links) in `search_dirs`."""
    libs: dict[str, Path] = {}
    for line in ldconfig_output.splitlines():
        name, sep, path = line.strip().partition(" => ")
        if not sep:
            continue
        soname, _, flags = name.partition(" ")
        if _DRIVER_LIB.match(soname) and ("64" in flags) and soname not in libs:
            libs[soname] = Path(path.strip())
    if not any(name.startswith("libcuda.so") for name in libs):
        for folder in map(Path, search_dirs):
            if folder.is_dir():
                for entry in sorted(folder.iterdir()):
                    if _DRIVER_LIB.match(entry.name):
                        libs.setdefault(entry.name, entry)
    return libs


def _ldconfig() -> str:
    for exe in ("/sbin/ldconfig", "/usr/sbin/ldconfig", "ldconfig"):
        try:
            return subprocess.run([exe, "-p"], capture_output=True, text=True, timeout=30).stdout
        except OSError:
            continue
    return ""


def devices_access(uuids: Iterable[str], nvml: Nvml, dev: Path = Path("/dev"),
                   ldconfig_output: str | None = None) -> GpuAccess:
    """The device nodes and driver libraries for GPUs `uuids` without nvidia-container-toolkit.

    Only the leased GPUs' /dev/nvidiaN nodes are passed (plus the control nodes, and
    /dev/nvidia-caps for MIG slices), so a container cannot open another GPU.

    Raises:
        GpuError: a node or the driver's libraries are missing on this host.
    """
    uuids = list(uuids)
    nodes = [dev / n for n in _CONTROL_NODES if (dev / n).exists()]
    for minor in sorted({nvml.minor_number(u) for u in uuids}):
        node = dev / f"nvidia{minor}"
        if not node.exists():
            raise GpuError(f"{node} does not exist: load the NVIDIA driver, or use gpu_runtime: toolkit")
        nodes.append(node)
    if any(u.startswith("MIG-") for u in uuids) and (dev / "nvidia-caps").is_dir():
        nodes += sorted((dev / "nvidia-caps").iterdir())
    search = [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d] + list(DRIVER_LIB_DIRS)
    libs = driver_libraries(_ldconfig() if ldconfig_output is None else ldconfig_output, search)
    libs = {name: path for name, path in libs.items() if path.exists()}  # the cache can be stale
    if not any(name.startswith("libcuda.so") for name in libs):
        raise GpuError("gpu_runtime devices: ldconfig -p lists no libcuda.so of the NVIDIA driver on this host: "
                       "install the driver's user-space libraries, or nvidia-container-toolkit with gpu_runtime: toolkit")
    mounts = {f"{NVIDIA_LIB_DIR}/{name}": str(path.resolve()) for name, path in sorted(libs.items())}
    libcuda = next(path for name, path in sorted(libs.items()) if name.startswith("libcuda.so"))
    mounts.setdefault(f"{NVIDIA_LIB_DIR}/libcuda.so", str(libcuda.resolve()))  # what `-lcuda` (Triton) links
    env = {
        "CUDA_VISIBLE_DEVICES": ",".join(uuids),
        "TRITON_LIBCUDA_PATH": NVIDIA_LIB_DIR,  # Triton looks in `ldconfig -p`, which does not list it
    }
    return GpuAccess("devices", tuple((str(n), f"/dev/{n.relative_to(dev)}") for n in nodes),
                     tuple((source, target) for target, source in mounts.items()), env)
