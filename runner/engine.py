"""One experiment from commit to Outcome: images, the RunSpec (allow-listed env, read-only
data), the sandboxed run, the judgement. Shared by `runner run`, the loop, rerun and prepare.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from sandbox import images, naming
from sandbox.docker_backend import DockerSandbox, connect
from sandbox.gpu import GpuLease
from sandbox.spec import Limits, Mount, RunResult, RunSpec

from .config import DATA_MOUNT, HF_MOUNT, RunConfig
from .data import check_data_dir, data_digest
from .repo import ResearchRepo, read_time_budget
from .summary import Outcome, judge, memory_gb


@dataclass(frozen=True)
class ExperimentRun:
    commit: str
    image: images.BuiltImage
    result: RunResult
    outcome: Outcome
    memory_gb: float
    total_s: float       # commit -> outcome, all of it
    limits: Limits

    @property
    def overhead_s(self) -> float:
        """Runner time outside the container's life: image build, create/remove, judging."""
        return round(max(self.total_s - self.result.wall_s, 0.0), 3)

    def to_dict(self) -> dict:
        m = self.outcome.metrics
        return {
            "status": self.outcome.status,
            "reason": self.outcome.reason,
            "val_bpb": self.outcome.val_bpb if self.outcome.status == "ok" else None,
            "memory_gb": self.memory_gb,
            "commit": self.commit,
            "image": self.image.ref,
            "image_id": self.result.image_id,
            "image_reused": self.image.reused,
            "exit_code": self.result.exit_code,
            "wall_s": self.result.wall_s,
            "total_s": round(self.total_s, 3),
            "overhead_s": self.overhead_s,
            "training_seconds": m.training_seconds if m else None,
            "peak_mem_bytes": self.result.peak_mem_bytes,
            "peak_vram_mb": self.result.peak_vram_mb,
            "log": str(self.result.log_path),
            "log_bytes": self.result.log_bytes,
            "log_truncated": self.result.log_truncated,
            "limits": self.limits.to_dict(),
        }


def experiment_env(cfg: RunConfig, limits: Limits) -> dict[str, str]:
    """The whole environment an experiment gets beyond its image's ENV: an allow-list.

    Nothing is copied from the runner's own environment, so API keys and tokens never enter.
    """
    budget = limits.time_budget_s
    env = {
        "AUTORESEARCH_TIME_BUDGET": str(int(budget)) if float(budget).is_integer() else str(budget),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        # Writable caches live on the /tmp tmpfs: the rest of the filesystem is read-only.
        "XDG_CACHE_HOME": "/tmp/.cache",
        "TORCHINDUCTOR_CACHE_DIR": "/tmp/torchinductor",
        "TRITON_CACHE_DIR": "/tmp/triton",
        "MPLCONFIGDIR": "/tmp/matplotlib",
    }
    if limits.cpus:
        env["OMP_NUM_THREADS"] = str(max(1, math.floor(limits.cpus)))
    elif limits.cpuset:
        env["OMP_NUM_THREADS"] = str(len(_expand_cpuset(limits.cpuset)))
    if cfg.hf_cache:
        env["HF_HOME"] = HF_MOUNT
    env.update(cfg.env)
    return env


def _expand_cpuset(cpuset: str) -> list[int]:
    cpus: list[int] = []
    for part in cpuset.split(","):
        lo, _, hi = part.partition("-")
        cpus += list(range(int(lo), int(hi or lo) + 1))
    return cpus


class Engine:
    """Holds the Docker connection, the trainer image and the config for one research repo."""

    def __init__(self, cfg: RunConfig, repo: ResearchRepo | None, gpus: GpuLease | None = None, progress=print):
        """`repo` may be None for reruns of existing images, which need no sources."""
        self.cfg = cfg
        self.repo = repo
        self.client = connect()
        self.gpus = gpus or GpuLease.none()
        self.sandbox = DockerSandbox(self.client, vram_probe=self.gpus.vram_probe())
        self.progress = progress
        self._trainer: images.BuiltImage | None = None

    # --- images ----------------------------------------------------------------------

    def trainer(self) -> images.BuiltImage:
        if self._trainer is None:
            base = images.resolve_base_image(self.client, self.cfg.base_image, want_gpu=bool(self.gpus.devices))
            requirements = self.repo.read(self.cfg.requirements) if self.cfg.requirements else ""
            self._trainer = images.ensure_trainer_image(
                self.client, base, requirements, self.cfg.ca_bundle, progress=self.progress
            )
        return self._trainer

    def time_budget_s(self) -> float:
        if self.cfg.budget_s:
            return float(self.cfg.budget_s)
        budget = read_time_budget(self.repo.read("prepare.py"))
        return budget if budget else 300.0

    def limits(self) -> Limits:
        return self.cfg.sandbox_limits(self.time_budget_s())

    def experiment_image(self, commit: str, tag: str, limits: Limits, digest: str) -> images.BuiltImage:
        labels = naming.managed_labels(
            naming.KIND_EXPERIMENT,
            **{
                naming.L_TAG: tag,
                naming.L_COMMIT: commit,
                naming.L_DATA: digest,
                naming.L_LIMITS: json.dumps(limits.to_dict(), sort_keys=True),
                naming.L_GPU_MODEL: self.gpus.model or "",
                naming.L_BASE: self.client.images.get(self.trainer().ref).labels.get(naming.L_BASE, ""),
            },
        )
        return images.ensure_experiment_image(
            self.client, naming.experiment_image_ref(tag, commit), self.trainer(), self.repo.snapshot_tars(commit), labels
        )

    # --- runs ------------------------------------------------------------------------

    def mounts(self, data_writable: bool = False) -> tuple[Mount, ...]:
        mounts = [Mount(Path(self.cfg.data_dir), DATA_MOUNT, read_only=not data_writable)]
        if self.cfg.hf_cache:
            mounts.append(Mount(Path(self.cfg.hf_cache), HF_MOUNT, read_only=True))
        return tuple(mounts)

    def run_commit(
        self,
        commit: str,
        tag: str,
        log_path: Path,
        iteration: int = 0,
        stop: threading.Event | None = None,
        limits: Limits | None = None,
        image_ref: str | None = None,
    ) -> ExperimentRun:
        """Build (or reuse) the image of `commit` and run it in the sandbox.

        Args:
            image_ref: run this existing image instead of building one (reruns).

        Raises:
            DataError: the data cache is not prepared.
            SandboxError: the harness failed (daemon, image build).
        """
        t0 = time.monotonic()
        check_data_dir(self.cfg.data_dir)
        limits = limits or self.limits()
        digest = data_digest(self.cfg.data_dir)
        if image_ref is None:
            built = self.experiment_image(commit, tag, limits, digest)
        else:
            built = images.BuiltImage(image_ref, self.client.images.get(image_ref).id, True, 0.0)
        spec = RunSpec(
            image=built.ref,
            command=self.cfg.command,
            limits=limits,
            log_path=log_path,
            name=naming.container_name("run", tag, commit),
            labels=naming.managed_labels(
                naming.KIND_RUN,
                **{
                    naming.L_TAG: tag,
                    naming.L_COMMIT: commit,
                    naming.L_OWNER: naming.owner(),
                    naming.L_ITERATION: str(iteration),
                    naming.L_GPUS: ",".join(self.gpus.devices),
                },
            ),
            env=experiment_env(self.cfg, limits),
            mounts=self.mounts(),
            gpus=self.gpus.devices,
        )
        result = self.sandbox.run(spec, stop)
        outcome = judge(result)
        return ExperimentRun(commit, built, result, outcome, memory_gb(result), time.monotonic() - t0, limits)

    def prepare_data(self, log_path: Path) -> RunResult:
        """Run the repo's own prepare.py (fixed, trusted code) with the data cache writable.

        It runs as the invoking user so the files it writes belong to them, with the network
        on because real prepare scripts download their data.
        """
        head = self.repo.head().sha
        limits = self.limits()
        built = self.experiment_image(head, "prepare", limits, "")
        Path(self.cfg.data_dir).mkdir(parents=True, exist_ok=True)
        spec = RunSpec(
            image=built.ref,
            command=("python", "prepare.py"),
            limits=Limits(time_budget_s=3600, timeout_factor=1.0, mem_limit_bytes=limits.mem_limit_bytes,
                          pids_limit=limits.pids_limit, tmp_size_bytes=limits.tmp_size_bytes),
            log_path=log_path,
            name=naming.container_name("prepare", "prepare", head),
            labels=naming.managed_labels(naming.KIND_PREPARE, **{naming.L_OWNER: naming.owner(), naming.L_COMMIT: head}),
            env={"HF_HUB_OFFLINE": "0", "XDG_CACHE_HOME": "/tmp/.cache"},
            mounts=self.mounts(data_writable=True),
            user=f"{os.getuid()}:{os.getgid()}",
            network=True,
        )
        return self.sandbox.run(spec)
