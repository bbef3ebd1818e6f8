"""What one sandboxed run is asked to do (RunSpec, Limits) and what it reports back (RunResult).

Plain frozen data: the runner builds a RunSpec, a Sandbox backend turns it into a RunResult.
Nothing here talks to Docker.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

GiB = 1024**3
MiB = 1024**2
INNER_DEADLINE_MARGIN_S = 15.0  # how much later than the host's deadline a run ends itself

# The export hook of the verified metric: its marker line, where it writes in the run's /out
# tmpfs, and what the runner collects (one definition, shared with the hook and the verifier).
from .hooks.verify_protocol import EXPORT_DIR, EXPORT_FILES, EXPORT_MARK  # noqa: E402,F401

# Why a run ended; RunResult.reason carries one of these (or "" for a clean exit).
REASON_EXIT = "exit_code"        # the process exited non-zero
REASON_OOM = "oom"               # the kernel OOM-killed it at the container memory ceiling
REASON_TIMEOUT = "timeout"       # the host deadline passed
REASON_VRAM = "vram"             # the NVML watchdog saw it above the VRAM ceiling
REASON_UNWATCHED = "unwatched"   # NVML failed for WATCH_BLIND_S: a ceiling nobody can enforce stops the run
REASON_INTERRUPTED = "interrupted"  # the runner was asked to stop (Ctrl-C, SIGTERM)
REASON_LOST = "lost"             # the node running it died (cluster backends): retried once elsewhere


@dataclass(frozen=True)
class Limits:
    """Every ceiling a run is held to. All overridable from runner.yaml."""

    time_budget_s: float = 300.0        # training time the research code is promised
    timeout_factor: float = 2.0         # deadline = factor x budget + startup grace
    startup_grace_s: float = 60.0       # imports, data loading, evaluation after training
    kill_grace_s: float = 10.0          # SIGTERM -> SIGKILL
    mem_limit_bytes: int = 16 * GiB     # RAM, and RAM + swap (no swap)
    cpus: float | None = None           # CPU quota in cores; None = no quota
    cpuset: str | None = None           # pin to these host CPUs ("0-3"); None = any
    pids_limit: int = 512               # processes + threads
    tmp_size_bytes: int = 1 * GiB       # /tmp tmpfs
    out_size_bytes: int = 256 * MiB     # /out tmpfs
    log_cap_bytes: int = 8 * MiB        # host log file: this much of the head, plus the tail
    log_tail_bytes: int = 1 * MiB       # tail of the output always kept (holds the summary)
    vram_limit_gb: float | None = None  # NVML watchdog ceiling; None = whole device
    nofile: int = 1024                  # open files per process (pids x nofile bounds the host file table share)
    runtime: str | None = None          # OCI runtime of the engine (runsc for gVisor, kata); None = its default
    wall_limit_s: float | None = None   # a tighter deadline, measured (the baseline's wall time + overtime); None = none

    @property
    def deadline_s(self) -> float:
        """Seconds from container start until the host stops the run: factor x budget + grace,
        or the measured wall limit where one is set and tighter."""
        deadline = self.timeout_factor * self.time_budget_s + self.startup_grace_s
        return deadline if self.wall_limit_s is None else min(deadline, self.wall_limit_s)

    @property
    def inner_deadline_s(self) -> float:
        """When the run stops itself, with no runner watching (killed, or its host lost): later
        than the host's deadline and its kill grace, so a live runner always acts first. From the
        budget, never the measured wall limit: the run can read this one (its parent's argv), and
        a train.py that knew exactly when the host stops it could train until just before."""
        return self.timeout_factor * self.time_budget_s + self.startup_grace_s + self.kill_grace_s + INNER_DEADLINE_MARGIN_S

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def expand_cpuset(cpuset: str) -> list[int]:
    """The CPUs a cpuset string names ("0-3,6": [0, 1, 2, 3, 6])."""
    cpus: list[int] = []
    for part in cpuset.strip().split(","):
        lo, _, hi = part.partition("-")
        cpus += list(range(int(lo), int(hi or lo) + 1))
    return cpus


def confined_cpuset(online: Path = Path("/sys/devices/system/cpu/online")) -> str | None:
    """This process's CPUs as a cpuset string when it may use fewer than the host has online
    (started under taskset, or in a Slurm or cgroup cpuset); None when it may use them all, or
    when the host does not say which are online.

    A container is started by the Docker daemon, outside the allocation of whoever asked for it:
    without a cpuset it runs on every CPU of the host."""
    mine = sorted(os.sched_getaffinity(0))
    try:
        host = set(expand_cpuset(online.read_text()))
    except (OSError, ValueError):
        return None
    return ",".join(map(str, mine)) if host - set(mine) else None

@dataclass(frozen=True)
class Mount:
    """A host directory bind-mounted into the container."""

    source: Path
    target: str
    read_only: bool = True


@dataclass(frozen=True)
class GpuAccess:
    """What a container needs to reach its GPUs, beyond its RunSpec.gpus (see sandbox.gpu).

    runtime "toolkit": the engine's nvidia-container-toolkit does it (a device request).
    runtime "devices": the device nodes (host path, container path) and the driver's libraries
    (host file, container path) are passed by hand, with `env` added to the run's environment.
    """

    runtime: str = "toolkit"
    device_nodes: tuple[tuple[str, str], ...] = ()
    library_mounts: tuple[tuple[str, str], ...] = ()
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RunSpec:
    """One run of `command` in `image`, held to `limits`.

    `env` is the complete environment the process sees beyond the image's own ENV: the
    runner builds it from an allow-list, the backend adds nothing of the host's.
    """

    image: str
    command: tuple[str, ...]
    limits: Limits
    log_path: Path
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    mounts: tuple[Mount, ...] = ()
    gpus: tuple[str, ...] = ()          # device ids or UUIDs; empty = no GPU
    gpu_access: GpuAccess = field(default_factory=GpuAccess)  # how those GPUs reach the container
    workdir: str = "/repo"
    user: str = "10001:10001"
    network: bool = False               # True only for trusted code (runner prepare)
    log_root: Path | None = None        # a trusted directory above log_path (the repo): no links below it are followed
    collect_dir: Path | None = None     # where the export hook's files go (below log_root); None = not collected
    read_only_root: bool = True


@dataclass(frozen=True)
class RunResult:
    """What happened. An experiment outcome, never a harness failure (those raise)."""

    exit_code: int | None
    reason: str                 # "" or one of the REASON_* constants
    wall_s: float               # container start -> process exit (or kill)
    log_path: Path
    output_tail: str            # the last `log_tail_bytes` of output; holds the summary block
    log_bytes: int              # everything the process printed
    log_truncated: bool         # the host log file holds only head + tail
    peak_mem_bytes: int | None  # container memory high-water mark, None if unmeasurable
    peak_vram_mb: float | None  # NVML high-water mark over the container's processes
    image_id: str
    container_name: str
    container_id: str = ""
    collected: bool = False     # the export hook's files are in spec.collect_dir
    node: str = ""              # where it ran, on a cluster backend ("" = this host)
    transfer_bytes: int = 0     # image bytes moved to that node for this run (cluster backends)

    def tail_lines(self, n: int = 50) -> str:
        """The last `n` lines of output, for crash reports."""
        return "\n".join(self.output_tail.splitlines()[-n:])
