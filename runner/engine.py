"""One experiment from commit to Outcome: images, limits, the sandboxed run, the judgement.
Shared by `runner run`, the loop, rerun and prepare.

`Engine` is the facade the CLI and the loop use; the pieces it holds do one job each: the
RunSpecs (runner/specs.py, plain data), the verifier (runner/verifier.py), the trusted runs of
prepare.py and the hub fetch (runner/trusted.py). Whether a lost run runs again is
policy.rerun_lost.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from sandbox import images, naming
from sandbox.backend import Backend, SandboxError, open_backend
from sandbox.gpu import GpuLease, RealNvml, devices_access
from sandbox.hooks.seeds import SEED_ENV
from sandbox.spec import GpuAccess, Limits, Mount, RunResult, RunSpec, expand_cpuset

from . import hub
from .config import DATA_MOUNT, ConfigError, LimitsConfig, RunConfig
from .data import check_data_dir, data_digest
from .deps import resolve_dependencies
from .policy import rerun_lost
from .records import RunRecord
from .repo import ResearchRepo, read_time_budget
from .specs import SpecFactory, uids_in_use
from .summary import REASON_HUB_OFFLINE, Outcome, OutcomeStatus, judge, memory_gb
from .trusted import TrustedRuns
from .verifier import Verifier


@dataclass(frozen=True)
class Slot:
    """What one parallel worker runs on: its GPUs and its host CPUs."""

    name: str
    devices: tuple[str, ...] = ()
    cpuset: str | None = None


@dataclass(frozen=True)
class ExperimentRun:
    commit: str
    image: images.BuiltImage
    result: RunResult
    outcome: Outcome
    memory_gb: float
    total_s: float       # commit -> outcome, all of it
    limits: Limits
    verify_s: float = 0.0  # the verifier's container, when it ran
    verify_phases: dict | None = None  # where the verifier's own time went, as it reported it
    lost: RunResult | None = None  # a first try whose node died (cluster backends); `result` is the second
    seed: int = 0  # the runner's offset to every seed train.py set (AUTORESEARCH_SEED)

    @property
    def overhead_s(self) -> float:
        """Runner time outside the container's life: image build, create/remove, judging."""
        return round(max(self.total_s - self.result.wall_s, 0.0), 3)

    @property
    def training_share(self) -> float | None:
        """Training seconds / this container's wall seconds: how much of one run trained (the
        night's duty cycle is policy.duty_cycle, over the night's wall time)."""
        m = self.outcome.metrics
        if not m or not m.training_seconds or not self.result.wall_s:
            return None
        return round(min(m.training_seconds / self.result.wall_s, 1.0), 4)

    def record(self) -> RunRecord:
        """What the ledger keeps of this run (and `runner run --json` prints)."""
        m = self.outcome.metrics
        return RunRecord(
            status=self.outcome.status,
            reason=self.outcome.reason,
            detail=self.outcome.detail,
            val_bpb=self.outcome.val_bpb if self.outcome.status == OutcomeStatus.OK else None,
            verdict=self.outcome.verdict,
            self_reported_val_bpb=self.outcome.self_reported,
            heldout_val_bpb=self.outcome.heldout_bpb,
            margin_bpb=self.outcome.margin_bpb,
            verify_s=self.verify_s,
            verify_phases=self.verify_phases,
            memory_gb=self.memory_gb,
            commit=self.commit,
            image=self.image.ref,
            image_id=self.result.image_id,
            node=self.result.node,
            image_transfer_bytes=self.result.transfer_bytes,
            image_reused=self.image.reused,
            image_build_s=round(self.image.build_s, 3),
            exit_code=self.result.exit_code,
            wall_s=self.result.wall_s,
            total_s=round(self.total_s, 3),
            overhead_s=self.overhead_s,
            training_seconds=m.training_seconds if m else None,
            peak_mem_bytes=self.result.peak_mem_bytes,
            peak_vram_mb=self.result.peak_vram_mb,
            training_share=self.training_share,
            log=str(self.result.log_path),
            log_bytes=self.result.log_bytes,
            log_truncated=self.result.log_truncated,
            limits=self.limits.to_dict(),
            seed=self.seed,
        )

    def to_dict(self) -> dict:
        """`record()` as JSON data."""
        return self.record().to_json()


def make_slots(devices: tuple[str, ...], workers: int | None, cpus: list[int] | None = None) -> list[Slot]:
    """One slot per parallel worker.

    With GPUs, every leased device goes to a worker: split as evenly as they go, the first
    workers taking one more when they do not divide (default: one worker per GPU). On a CPU
    host, the CPUs (`cpus`: limits.cpuset's, else this process's) are split into one cpuset
    per worker (default: one worker, pinned to `cpus` only when they were given).

    Raises:
        ConfigError: more workers than GPUs or CPUs to give them.
    """
    if devices:
        n = workers or len(devices)
        if n > len(devices):
            raise ConfigError(f"--workers {n} needs {n} GPUs, {len(devices)} are leased: lower --workers or add --gpus")
        return [Slot(f"gpu{i}", devices=tuple(part)) for i, part in enumerate(_split(list(devices), n))]
    n = workers or 1
    if n == 1:
        return [Slot("cpu", cpuset=None if cpus is None else ",".join(map(str, sorted(cpus))))]
    cpus = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
    if n > len(cpus):
        raise ConfigError(f"--workers {n} needs {n} CPUs, {'limits.cpuset gives' if cpus else 'this host has'} {len(cpus)}")
    return [Slot(f"cpu{i}", cpuset=",".join(map(str, part))) for i, part in enumerate(_split(cpus, n))]


FILE_TABLE_SHARE = 0.25   # of fs.file-max that all workers' pids x nofile may claim together
MEMORY_SHARE = 0.9        # of the host's MemTotal that all workers' memory ceilings may claim together
MIN_NOFILE = 256          # below this, a default nofile is not lowered to fit: the settings must change


def _host_figures(proc: Path) -> tuple[int, int]:
    """(fs.file-max, MemTotal in bytes) of this host; 0 where unreadable."""
    try:
        file_max = int((proc / "sys/fs/file-max").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        file_max = 0
    try:
        meminfo = dict(line.split(":", 1) for line in (proc / "meminfo").read_text().splitlines() if ":" in line)
        mem_total = int(meminfo["MemTotal"].split()[0]) * 1024
    except (OSError, ValueError, KeyError, IndexError):
        mem_total = 0
    return file_max, mem_total


def fit_to_host(cfg: RunConfig, workers: int, proc: Path = Path("/proc")) -> tuple[RunConfig, str | None]:
    """The config with limits that cannot exhaust the host over all parallel workers: the
    global file table (ENFILE for every process, dockerd's included) or its memory (a global
    OOM kill picks any process, the runner and dockerd included). A nofile or memory ceiling
    left at its default is lowered to fit, and the returned line says so; limits set in
    runner.yaml that do not fit are refused.

    Raises:
        ConfigError: with the numbers and what to lower.
    """
    file_max, mem_total = _host_figures(proc)
    lim, default, said = cfg.limits, LimitsConfig(), []
    files_budget = int(FILE_TABLE_SHARE * file_max) if file_max else 0
    if files_budget and lim.pids * lim.nofile * workers > files_budget:
        fitted_nofile = files_budget // (lim.pids * workers)
        if lim.nofile != default.nofile or lim.pids != default.pids or fitted_nofile < MIN_NOFILE:
            raise ConfigError(f"limits.pids x limits.nofile x workers = {lim.pids * lim.nofile * workers:,} open files, "
                              f"over a quarter of this host's fs.file-max ({file_max:,}): lower limits.nofile or "
                              f"limits.pids, or run fewer workers")
        said.append(f"limits.nofile {lim.nofile} -> {fitted_nofile}")
        lim = dataclasses.replace(lim, nofile=fitted_nofile)
    memory_budget_gb = MEMORY_SHARE * mem_total / 2**30
    if mem_total and lim.memory_gb * workers > memory_budget_gb:
        if lim.memory_gb != default.memory_gb:
            raise ConfigError(f"limits.memory_gb x workers = {lim.memory_gb * workers:.1f} GiB, over 90% of this host's "
                              f"{mem_total / 2**30:.1f} GiB: lower limits.memory_gb or run fewer workers")
        fitted_gb = round(memory_budget_gb / workers, 1)
        said.append(f"limits.memory_gb {lim.memory_gb:g} -> {fitted_gb:g}")
        lim = dataclasses.replace(lim, memory_gb=fitted_gb)
    if not said:
        return cfg, None
    return dataclasses.replace(cfg, limits=lim), (f"fitted to this host ({workers} worker(s), {mem_total / 2**30:.1f} GiB, "
                                                  f"fs.file-max {file_max:,}): {', '.join(said)}")


def _split(items: list, n: int) -> list[list]:
    """`items` in n contiguous parts whose sizes differ by at most one."""
    per, extra = divmod(len(items), n)
    parts, start = [], 0
    for i in range(n):
        end = start + per + (1 if i < extra else 0)
        parts.append(items[start:end])
        start = end
    return parts


def cpuset_cpus(cpuset: str | None) -> list[int] | None:
    """The CPUs of a cpuset string ("0-3,6"), or None for no cpuset."""
    return None if not cpuset else expand_cpuset(cpuset)


class Engine:
    """The runner's side of the runs of one research repo: the backend it opened (or was given),
    the trainer image, the limits and the GPU access; the RunSpecs (`specs`), the verifier
    (`verifier`) and the trusted runs (`trusted`) are pieces it holds."""

    def __init__(self, cfg: RunConfig, repo: ResearchRepo | None, gpus: GpuLease | None = None, progress=print,
                 backend: Backend | None = None):
        """`repo` may be None for reruns of existing images, which need no sources. `backend`:
        the image store and executor to use (tests inject one); default what runner.yaml names."""
        self.cfg = cfg
        self.repo = repo
        self.gpus = gpus or GpuLease.none()
        self.backend = backend or open_backend(cfg.backend_settings(DATA_MOUNT, data_digest),
                                               vram_probe=self.gpus.vram_probe())
        self.store, self.executor = self.backend.store, self.backend.executor
        self.progress = progress
        self._trainer: images.BuiltImage | None = None
        self._base_id = ""  # set with the trainer
        self._time_budget_s: float | None = None
        self.vram_ceiling_gb: float | None = None  # set by the loop from the baseline's peak
        self.wall_limit_s: float | None = None     # set by the loop from the baseline's wall time
        self._gpu_access: dict[tuple[str, ...], GpuAccess] = {}
        self.specs = SpecFactory(cfg, repo.path if repo else None, self.executor.owner)
        self.verifier = Verifier(self)
        self.trusted = TrustedRuns(self)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.backend.close()  # a cluster's workers, their GPU leases and scratch folders

    # --- images ----------------------------------------------------------------------

    def trainer(self) -> images.BuiltImage:
        if self._trainer is None:
            # a cluster's nodes may have the GPUs this host lacks
            want_gpu = bool(self.gpus.devices) or bool(self.executor.gpus_per_slot)
            base = self.store.resolve_base(self.cfg.base_image, want_gpu=want_gpu)
            deps = resolve_dependencies(self.repo.committed_text, self.cfg.dependencies)
            self._trainer = self.store.ensure_trainer(base, deps, self.cfg.ca_bundle, self.progress)
            self._base_id = base.id
        return self._trainer

    def time_budget_s(self) -> float:
        """The training budget: --budget, else prepare.py's TIME_BUDGET, read once (prepare.py
        is fixed for a night; GitPython is not thread-safe, and workers ask for this)."""
        if self.cfg.budget_s:
            return float(self.cfg.budget_s)
        if self._time_budget_s is None:
            budget = read_time_budget(self.repo.committed_text("prepare.py"))
            self._time_budget_s = budget if budget else 300.0
        return self._time_budget_s

    def limits(self) -> Limits:
        limits = self.cfg.sandbox_limits(self.time_budget_s())
        if limits.vram_limit_gb is None and self.vram_ceiling_gb:
            limits = dataclasses.replace(limits, vram_limit_gb=round(self.vram_ceiling_gb, 3))
        if self.wall_limit_s is not None:
            limits = dataclasses.replace(limits, wall_limit_s=round(self.wall_limit_s, 1))
        return limits

    def experiment_image(self, commit: str, tag: str, limits: Limits, digest: str,
                         kind: str = naming.KIND_EXPERIMENT, sources: tuple[bytes, bytes] | None = None) -> images.BuiltImage:
        """The image of `commit`: an experiment's, or (kind KIND_PREPARE) the one prepare runs in,
        which reruns, `runner images` and gc never mistake for an experiment.

        Args:
            sources: the commit's snapshot_tars, when the caller read them already (git is not
                thread-safe: the loop reads them under its lock and builds outside it).
        """
        trainer = self.trainer()  # first: it also resolves the base image id labelled below
        labels = naming.managed_labels(
            kind,
            **{
                naming.L_TAG: tag,
                naming.L_COMMIT: commit,
                naming.L_DATA: digest,
                naming.L_LIMITS: json.dumps(limits.to_dict(), sort_keys=True),
                naming.L_GPU_MODEL: self.gpus.model or "",
                naming.L_BASE: self._base_id,
            },
        )
        return self.store.ensure_experiment(
            naming.experiment_image_ref(tag, commit), trainer, sources or self.repo.snapshot_tars(commit), labels
        )

    # --- runs ------------------------------------------------------------------------

    def devices(self, slot: Slot | None) -> tuple[str, ...]:
        """The GPUs a run gets: its worker's slot, or this engine's whole lease."""
        return self.gpus.devices if slot is None else slot.devices

    def gpu_access(self, devices: tuple[str, ...]) -> GpuAccess:
        """How `devices` reach a container: the engine's toolkit, or device nodes + driver libraries.

        Raises:
            GpuError: `devices` mode on a host whose driver nodes or libraries are missing.
        """
        if not devices:
            return GpuAccess()
        if devices not in self._gpu_access:
            runtime = self.executor.gpu_runtime(self.cfg.gpu_runtime)
            self._gpu_access[devices] = (GpuAccess("toolkit") if runtime == "toolkit"
                                         else devices_access(devices, self.gpus.nvml or RealNvml()))
        return self._gpu_access[devices]

    def mounts(self, writable: bool = False) -> tuple[Mount, ...]:
        """The data cache and the hub cache (SpecFactory.mounts)."""
        return self.specs.mounts(writable)

    def hub_refs(self, rev: str = "HEAD") -> list[hub.HubRef]:
        """The Hub repos train.py and prepare.py (as committed at `rev`) name, plus hf_prefetch."""
        sources = {name: self.repo.committed_text(name, rev) for name in hub.SOURCES}
        return hub.wanted_refs(sources, self.cfg.hf_prefetch)

    def run_commit(
        self,
        commit: str,
        tag: str,
        log_path: Path,
        iteration: int = 0,
        stop: threading.Event | None = None,
        limits: Limits | None = None,
        image: images.BuiltImage | str | None = None,
        slot: Slot | None = None,
        export: bool | None = None,
        seed: int = 0,
    ) -> ExperimentRun:
        """Run `commit` in the sandbox, building its image unless `image` is given.

        Args:
            image: a BuiltImage already built for `commit`, or the reference of an existing
                image to run as it is (reruns); None builds it (which reads git).
            slot: the devices and CPUs of one parallel worker; None = this engine's lease.
            export: arm the export hook and collect the model for `verify` (default: unless
                verify is off).
            seed: the offset the image's hook adds to every seed train.py sets (0: none;
                sandbox/hooks/seeds.py).

        Raises:
            DataError: the data cache is not prepared.
            SandboxError: the harness failed (daemon, image build).
        """
        t0 = time.monotonic()
        check_data_dir(self.cfg.data_dir)
        limits = limits or self.limits()
        devices = self.devices(slot)
        if slot is not None and slot.cpuset:
            limits = dataclasses.replace(limits, cpuset=slot.cpuset)
        if image is None:
            built = self.experiment_image(commit, tag, limits, data_digest(self.cfg.data_dir))
        elif isinstance(image, str):
            found = self.store.image(image)
            if found is None:
                raise SandboxError(f"image {image} is not on this engine: `runner images` lists them, `runner import` brings one")
            built = images.BuiltImage(image, found.id, True, 0.0)
        else:
            built = image
        export = self.cfg.verify != "off" if export is None else export
        collect_dir = log_path.with_suffix(".verify") if export else None
        result, lost = self.run_spec(lambda: self.spec(built.ref, self.cfg.command, tag, commit, iteration, devices, limits,
                                                       log_path, collect_dir=collect_dir, export=export,
                                                       env={SEED_ENV: str(seed)}), stop)
        outcome = judge(result)
        if outcome.reason == REASON_HUB_OFFLINE and self.repo is not None:
            outcome = dataclasses.replace(outcome, detail=hub.missing_detail(self.hub_refs(commit), self.cfg.hf_cache))
        return ExperimentRun(commit, built, result, outcome, memory_gb(result), time.monotonic() - t0, limits, lost=lost,
                             seed=seed)

    def spec(self, image_ref: str, command: tuple[str, ...], tag: str, commit: str, iteration: int,
              devices: tuple[str, ...], limits: Limits, log_path: Path, mounts: tuple[Mount, ...] = (),
              collect_dir: Path | None = None, export: bool = False, env: dict[str, str] | None = None) -> RunSpec:
        """The RunSpec of one untrusted (or verifying) run (SpecFactory.run), with a uid that no
        running container holds and the way `devices` reach it. `export`: the verification
        variables in the environment (the hook exports, the verifier reads the target).

        Raises:
            GpuError: see gpu_access.
        """
        uid = naming.run_uid(uids_in_use(self.executor.running()))
        return self.specs.run(image_ref, command, tag, commit, iteration, devices, limits, log_path, uid=uid,
                              gpu_access=self.gpu_access(devices), mounts=mounts, collect_dir=collect_dir,
                              export=export, env=env)

    def verify(self, run: ExperimentRun, tag: str, iteration: int = 0, stop: threading.Event | None = None,
               slot: Slot | None = None) -> ExperimentRun:
        """`run` with the verdict of trusted code on its exported model (runner/verifier.py).

        Raises:
            SandboxError: the harness failed.
        """
        return self.verifier.verify(run, tag, iteration, stop, slot)

    def run_spec(self, make_spec, stop: threading.Event | None) -> tuple[RunResult, RunResult | None]:
        """executor.run of `make_spec()`, once more (a fresh spec: its own name and uid) when the
        node running it died (a cluster backend; Ray restarts the worker on a live node).
        Returns (the result, the lost run or None)."""
        spec = make_spec()
        result = self.executor.run(spec, stop)
        if not rerun_lost(result.reason, stopped=stop is not None and stop.is_set()):
            return result, None
        print(f"{spec.name} lost with its node: running it once more", file=sys.stderr)
        return self.executor.run(make_spec(), stop), result

    def prepare_data(self, log_path: Path) -> RunResult:
        """The repo's own prepare.py, then the held-out files (TrustedRuns.prepare_data).

        Raises:
            HeldoutError: a held-out file could not be made (runner/heldout.py).
        """
        return self.trusted.prepare_data(log_path)

    def fetch_hub(self, log_path: Path) -> tuple[RunResult | None, hub.FetchReport]:
        """The Hub repos the code names (and hf_prefetch), into the hub cache (TrustedRuns.fetch_hub).

        Returns:
            (the fetch run, or None when there was nothing to fetch; what it fetched and what failed)
        """
        return self.trusted.fetch_hub(log_path)
