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


# Test seams as much as settings: where the driver's device nodes and MIG capability minors are.
DEV_DIR = Path(os.environ.get("AUTORESEARCH_DEV_DIR", "/dev"))
MIG_MINORS = Path(os.environ.get("AUTORESEARCH_MIG_MINORS", "/proc/driver/nvidia-caps/mig-minors"))


@dataclass(frozen=True)
class GpuDevice:
    """One leasable GPU: a whole GPU, or a MIG slice of a GPU in MIG mode."""

    index: int                          # NVML index of the GPU (the parent's, for a slice)
    uuid: str                           # GPU-... or MIG-...
    name: str
    memory_mb: float
    minor: int = -1                     # N of /dev/nvidiaN (the parent's, for a slice); -1 unknown
    mig: tuple[int, int] | None = None  # (GPU instance id, compute instance id) of a MIG slice

    @property
    def label(self) -> str:
        return str(self.index) if self.mig is None else f"{self.index} (MIG slice {self.uuid})"


class Nvml(Protocol):
    """The slice of NVML we use; tests pass a fake with the same shape (or tests/fakenvml's
    pynvml under RealNvml)."""

    error: str | None  # why NVML could not start, else None

    def devices(self) -> list[GpuDevice]: ...
    def process_vram_mb(self, uuid: str) -> dict[int, float]: ...


class RealNvml:
    """nvidia-ml-py. A host with no driver (or no nvidia-ml-py) lists no devices and `error`
    says why; the watchdog's process_vram_mb raises on any NVML failure."""

    def __init__(self):
        self.error: str | None = None
        self.library_missing = False  # no NVML on this host at all: a plain CPU host
        try:
            import pynvml
        except ImportError:
            self.nv, self.error, self.library_missing = None, "nvidia-ml-py is not installed", True
            return
        self.nv = pynvml
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            self.error = f"NVML cannot start: {exc}"
            self.library_missing = getattr(exc, "value", None) == pynvml.NVML_ERROR_LIBRARY_NOT_FOUND

    @property
    def ok(self) -> bool:
        return self.error is None

    def devices(self) -> list[GpuDevice]:
        """Whole GPUs in NVML index (PCI) order; a GPU in MIG mode is listed as its slices."""
        if not self.ok:
            return []
        nv, out = self.nv, []
        for i in range(nv.nvmlDeviceGetCount()):
            h = nv.nvmlDeviceGetHandleByIndex(i)
            try:
                minor = nv.nvmlDeviceGetMinorNumber(h)
            except nv.NVMLError:
                minor = -1  # platforms without /dev/nvidiaN (WSL): `devices` access says so
            if not self._mig_enabled(h):
                out.append(self._device(i, h, minor))
                continue
            for j in range(nv.nvmlDeviceGetMaxMigDeviceCount(h)):
                try:
                    m = nv.nvmlDeviceGetMigDeviceHandleByIndex(h, j)
                except nv.NVMLError:
                    continue  # an empty slot
                out.append(self._device(i, m, minor, (nv.nvmlDeviceGetGpuInstanceId(m), nv.nvmlDeviceGetComputeInstanceId(m))))
        return out

    def _mig_enabled(self, h) -> bool:
        try:
            return self.nv.nvmlDeviceGetMigMode(h)[0] == self.nv.NVML_DEVICE_MIG_ENABLE
        except self.nv.NVMLError:
            return False  # not a MIG-capable GPU

    def _device(self, index: int, h, minor: int, mig: tuple[int, int] | None = None) -> GpuDevice:
        name, uuid = self.nv.nvmlDeviceGetName(h), self.nv.nvmlDeviceGetUUID(h)
        return GpuDevice(index=index, uuid=uuid.decode() if isinstance(uuid, bytes) else uuid,
                         name=name.decode() if isinstance(name, bytes) else name,
                         memory_mb=self.nv.nvmlDeviceGetMemoryInfo(h).total / 2**20, minor=minor, mig=mig)

    def process_vram_mb(self, uuid: str) -> dict[int, float]:
        """Host PID -> MiB of VRAM used on device `uuid` (a GPU or a MIG slice).

        Raises:
            SandboxError: NVML failed (the watchdog cannot enforce the ceiling without it).
        """
        if not self.ok:
            raise SandboxError(f"NVML is not available ({self.error}): the VRAM watchdog cannot run")
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
    cpu_reason: str = ""  # with no devices: why the runs go to the CPU, for the user to read
    cpu_expected: bool = False  # no devices because none were asked for, or the host has no NVML at all
    _locks: list = field(default_factory=list, repr=False)

    @classmethod
    def none(cls, cpu_reason: str = "", expected: bool = False) -> "GpuLease":
        return cls(cpu_reason=cpu_reason, cpu_expected=expected)

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


_UUID = re.compile(r"(GPU|MIG)-[0-9A-Za-z-]+")


def parse_request(request: str) -> tuple[str, list[int] | list[str] | int | None]:
    """Docker's --gpus grammar: 'none' | 'auto' | 'all' | '4' (a count) | '0,2' or 'device=2'
    (NVML indices) | 'GPU-...,MIG-...' or 'device=MIG-...' (UUIDs, as nvidia-smi -L prints them).

    Raises:
        GpuError: anything else.
    """
    text = str(request).strip()
    word = text.lower()
    if word in ("none", "auto", "all"):
        return word, None
    if word.isdigit():
        return "count", int(word)
    spec = text.removeprefix("device=")
    parts = [p.strip() for p in spec.split(",")]
    if (spec != text or len(parts) > 1) and all(p.isdigit() for p in parts):
        return "indices", [int(p) for p in parts]
    if all(_UUID.fullmatch(p) for p in parts):
        return "uuids", parts
    raise GpuError(f"--gpus {text!r} is not understood: use none, auto, all, a count like 4, indices like 0,2 "
                   "or device=2, or UUIDs like GPU-... or MIG-... (nvidia-smi -L lists them)")


def cpu_host_reason(nvml: Nvml, dev: Path) -> str:
    """Why NVML lists no GPU, when that means a CPU host.

    Raises:
        GpuError: NVML cannot start on a host that has the driver's device nodes: the GPUs are
            there and unusable, which must not turn into a night on the CPU.
    """
    if nvml.error and (dev / "nvidiactl").exists():
        raise GpuError(f"{nvml.error}, yet {dev / 'nvidiactl'} exists: this host has NVIDIA GPUs the runner cannot see; "
                       "check the driver (nvidia-smi), or pass --gpus none to run on the CPU")
    return nvml.error or "NVML lists no GPU on this host"


def acquire(request: str, nvml: Nvml | None = None, busy: set[str] | None = None, lock_dir: Path = LOCK_DIR,
            dev: Path | None = None) -> GpuLease:
    """Lease GPUs for one runner.

    Args:
        request: see parse_request. 'auto' takes every free GPU, and runs on the CPU (saying
            why in `cpu_reason`) only on a host without GPUs; 'all' takes every GPU of the host.
        nvml: the NVML view (a fake in tests).
        busy: UUIDs that running containers hold (from their labels).

    Raises:
        GpuError: the host lacks a requested GPU, or it is leased by another runner, or
            'auto' finds GPUs but none free, or NVML cannot start where GPUs are.
    """
    mode, arg = parse_request(request)
    if mode == "none" or (mode == "count" and arg == 0):
        return GpuLease.none(f"--gpus {request}", expected=True)
    nvml = nvml or RealNvml()
    devices = nvml.devices()
    busy = busy or set()
    if not devices:
        why = cpu_host_reason(nvml, dev or DEV_DIR)
        if mode == "auto":
            return GpuLease.none(why, expected=getattr(nvml, "library_missing", False))
        if mode == "all":
            raise GpuError(f"--gpus all asks for every GPU of this host, and it has none ({why}): pass --gpus none to run on the CPU")
    if mode == "indices":
        indices = {d.index for d in devices}
        missing = [i for i in arg if i not in indices]
        if missing:
            have = ", ".join(str(i) for i in sorted(indices))
            raise GpuError(f"GPU {missing[0]} does not exist on this host (GPUs here: {have})")
        wanted = [d for i in arg for d in devices if d.index == i]  # a GPU in MIG mode: its slices
    elif mode == "uuids":
        by_uuid = {d.uuid: d for d in devices}
        missing = [u for u in arg if u not in by_uuid]
        if missing:
            raise GpuError(f"no GPU or MIG slice {missing[0]} on this host (here: {', '.join(by_uuid) or 'none'}); "
                           "a GPU in MIG mode is leased by its slices' MIG- UUIDs")
        wanted = [by_uuid[u] for u in arg]
    elif mode == "count" and arg > len(devices):
        raise GpuError(f"asked for {arg} GPUs, this host has {len(devices)}")
    else:
        wanted = devices
    strict = mode in ("indices", "uuids", "all")  # every one of `wanted`, or nothing
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
            if strict:
                lease.release()
                raise GpuError(f"GPU {d.label} ({d.uuid}) is leased by another runner on this host"
                               + (": --gpus auto takes the free ones" if mode == "all" else ""))
            continue
        lease._locks.append(f)
        held.append(d)
    if mode == "count" and len(held) < arg:
        lease.release()
        raise GpuError(f"asked for {arg} GPUs, only {len(held)} are free on this host")
    if not held:
        raise GpuError(f"all {len(devices)} GPUs of this host are leased by other runners (`runner status` shows them): "
                       "wait for one, or pass --gpus none to run on the CPU")
    lease.devices = tuple(d.uuid for d in held)
    lease.model = held[0].name
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
# CUDA needs the control node and the unified-memory node; the others are opened when present.
_CONTROL_NODES = ("nvidiactl", "nvidia-uvm")
_OPTIONAL_NODES = ("nvidia-uvm-tools", "nvidia-modeset")


# Where drivers put their libraries when ld.so.cache does not list them (container-style hosts
# with the driver under /usr/local/nvidia, Debian's packaging), besides $LD_LIBRARY_PATH.
DRIVER_LIB_DIRS = ("/usr/local/nvidia/lib64", "/usr/lib/x86_64-linux-gnu/nvidia/current", "/usr/lib64/nvidia")


def _is_elf64(path: Path) -> bool:
    """A 64-bit ELF object (EI_CLASS 2): driver directories hold 32-bit builds of the same names."""
    try:
        with open(path, "rb") as f:
            head = f.read(5)
    except OSError:
        return False
    return head[:4] == b"\x7fELF" and head[4:5] == b"\x02"


def driver_libraries(ldconfig_output: str, search_dirs: Iterable[str] = ()) -> dict[str, Path]:
    """name -> host file of the NVIDIA driver's 64-bit libraries: those `ldconfig -p` lists,
    else every matching name (sonames and their links) in the first of `search_dirs` that holds
    a 64-bit libcuda."""
    libs: dict[str, Path] = {}
    for line in ldconfig_output.splitlines():
        name, sep, path = line.strip().partition(" => ")
        if not sep:
            continue
        soname, _, flags = name.partition(" ")
        if _DRIVER_LIB.match(soname) and ("64" in flags) and soname not in libs:
            libs[soname] = Path(path.strip())
    if any(name.startswith("libcuda.so") for name in libs):
        return libs
    for folder in map(Path, search_dirs):
        if not folder.is_dir():
            continue
        found = {e.name: e for e in sorted(folder.iterdir()) if _DRIVER_LIB.match(e.name) and _is_elf64(e)}
        if any(name.startswith("libcuda.so") for name in found):
            return found  # one driver's directory: never a mix of two installs
    return libs


def mig_cap_minors(text: str) -> dict[str, int]:
    """/proc/driver/nvidia-caps/mig-minors: capability path ("gpu0/gi1/ci0/access") -> minor
    of its /dev/nvidia-caps/nvidia-capN node."""
    out = {}
    for line in text.splitlines():
        name, _, minor = line.strip().rpartition(" ")
        if name and minor.isdigit():
            out[name] = int(minor)
    return out


def _ldconfig() -> str:
    for exe in ("/sbin/ldconfig", "/usr/sbin/ldconfig", "ldconfig"):
        try:
            return subprocess.run([exe, "-p"], capture_output=True, text=True, timeout=30).stdout
        except OSError:
            continue
    return ""


def devices_access(uuids: Iterable[str], nvml: Nvml, dev: Path | None = None, ldconfig_output: str | None = None,
                   mig_minors: Path | None = None) -> GpuAccess:
    """The device nodes and driver libraries for GPUs `uuids` without nvidia-container-toolkit.

    Only the leased GPUs' /dev/nvidiaN nodes are passed (plus the control nodes), and for a MIG
    slice only the capability nodes of its own GPU and compute instance: a container cannot
    open another GPU or another slice.

    Raises:
        GpuError: a node or the driver's libraries are missing on this host.
    """
    dev = dev or DEV_DIR
    by_uuid = {d.uuid: d for d in nvml.devices()}
    wanted = []
    for u in uuids:
        if u not in by_uuid:
            raise GpuError(f"GPU {u} is not on this host any more (NVML: {nvml.error or 'not listed'})")
        wanted.append(by_uuid[u])
    nodes = []
    for name in _CONTROL_NODES:
        if not (dev / name).exists():
            raise GpuError(f"{dev / name} does not exist, and CUDA cannot start without it: run `nvidia-modprobe -u -c=0` "
                           "(or nvidia-smi once) as root, or use gpu_runtime: toolkit")
        nodes.append(dev / name)
    nodes += [dev / name for name in _OPTIONAL_NODES if (dev / name).exists()]
    for minor in sorted({d.minor for d in wanted}):
        node = dev / f"nvidia{minor}"
        if minor < 0 or not node.exists():
            raise GpuError(f"{node if minor >= 0 else 'the /dev/nvidiaN node of ' + wanted[0].uuid} does not exist: "
                           "load the NVIDIA driver, or use gpu_runtime: toolkit")
        nodes.append(node)
    slices = [d for d in wanted if d.mig is not None]
    if slices:
        path = mig_minors or MIG_MINORS
        try:
            caps = mig_cap_minors(path.read_text())
        except OSError as exc:
            raise GpuError(f"MIG slices need {path} ({exc.strerror}): use gpu_runtime: toolkit") from None
        for d in slices:
            gi, ci = d.mig
            for cap in (f"gpu{d.minor}/gi{gi}/access", f"gpu{d.minor}/gi{gi}/ci{ci}/access"):
                node = dev / "nvidia-caps" / f"nvidia-cap{caps.get(cap, -1)}"
                if cap not in caps or not node.exists():
                    raise GpuError(f"MIG slice {d.uuid}: no device node for {cap} ({node}): "
                                   "run `nvidia-modprobe -f /proc/driver/nvidia/capabilities/mig/config`, or use gpu_runtime: toolkit")
                nodes.append(node)
    search = [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d] + list(DRIVER_LIB_DIRS)
    libs = driver_libraries(_ldconfig() if ldconfig_output is None else ldconfig_output, search)
    libs = {name: path for name, path in libs.items() if path.exists()}  # the cache can be stale
    if not any(name.startswith("libcuda.so") for name in libs):
        raise GpuError("gpu_runtime devices: no 64-bit libcuda.so of the NVIDIA driver in `ldconfig -p` or $LD_LIBRARY_PATH: "
                       "install the driver's user-space libraries, or nvidia-container-toolkit with gpu_runtime: toolkit")
    mounts = {f"{NVIDIA_LIB_DIR}/{name}": str(path.resolve()) for name, path in sorted(libs.items())}
    libcuda = next(path for name, path in sorted(libs.items()) if name.startswith("libcuda.so"))
    mounts.setdefault(f"{NVIDIA_LIB_DIR}/libcuda.so", str(libcuda.resolve()))  # what `-lcuda` (Triton) links
    env = {
        "CUDA_VISIBLE_DEVICES": ",".join(d.uuid for d in wanted),
        "TRITON_LIBCUDA_PATH": NVIDIA_LIB_DIR,  # Triton looks in `ldconfig -p`, which does not list it
    }
    return GpuAccess("devices", tuple((str(n), f"/dev/{n.relative_to(dev)}") for n in nodes),
                     tuple((source, target) for target, source in mounts.items()), env)
