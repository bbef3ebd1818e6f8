"""The RunSpecs of one research repo's runs, as plain data: an experiment's (or its verifier's)
and a trusted run's (prepare.py, the hub fetch). No engine in it: what only the backend knows
(the uids of running containers, how GPUs reach a container, the owner label) is handed in.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

from sandbox import naming
from sandbox.backend import RunningRun
from sandbox.spec import EXPORT_DIR, GpuAccess, Limits, Mount, RunSpec, expand_cpuset

from .config import DATA_MOUNT, HELDOUT_ENV, HELDOUT_MOUNT, HF_MOUNT, RunConfig

TRUSTED_TIME_BUDGET_S = 3600  # prepare.py and the hub fetch: one deadline, whatever the experiments' budget is


def experiment_env(cfg: RunConfig, limits: Limits, export: bool = False) -> dict[str, str]:
    """The whole environment an experiment gets beyond its image's ENV: an allow-list.

    Nothing is copied from the runner's own environment, so API keys and tokens never enter.
    """
    budget = limits.time_budget_s
    env = {
        "AUTORESEARCH_TIME_BUDGET": str(int(budget)) if float(budget).is_integer() else str(budget),
        # The run's uid has no passwd entry (one uid per run): getpass and friends read these.
        "USER": "runner",
        "LOGNAME": "runner",
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
        env["OMP_NUM_THREADS"] = str(len(expand_cpuset(limits.cpuset)))
    env["HF_HUB_CACHE"] = HF_MOUNT
    if export:  # arms the export hook (sandbox/hooks/sitecustomize.py); the runner then collects its files
        env["AUTORESEARCH_VERIFY_TARGET"] = cfg.verify_target
        env["AUTORESEARCH_VERIFY_DIR"] = EXPORT_DIR
    env.update(cfg.env)
    return env


def uids_in_use(running: Iterable[RunningRun]) -> set[int]:
    """The run uids that `running` containers hold (their uid label; 0 where none)."""
    return {int(r.labels.get(naming.L_UID, "0") or 0) for r in running}


class SpecFactory:
    """The RunSpecs of one repo's runs, from its config: labels, mounts, environment, limits.

    It reads no git and calls no backend; it looks only at whether the cache folders exist."""

    def __init__(self, cfg: RunConfig, repo_path: Path | None, owner: str):
        """`repo_path`: the research repo (logs must lie inside it), None for reruns of images.
        `owner`: the executor's owner label, which marks the containers this process starts."""
        self.cfg = cfg
        self.repo_path = repo_path
        self.owner = owner

    def mounts(self, writable: bool = False) -> tuple[Mount, ...]:
        """The data cache and the hub cache: read-only for experiments, writable for prepare.

        The hub cache is mounted when it exists (prepare creates it when it has repos to fetch).
        """
        mounts = [Mount(Path(self.cfg.data_dir), DATA_MOUNT, read_only=not writable)]
        if self.cfg.hf_cache and Path(self.cfg.hf_cache).is_dir():
            mounts.append(Mount(Path(self.cfg.hf_cache), HF_MOUNT, read_only=not writable))
        return tuple(mounts)

    def heldout(self, writable: bool) -> tuple[tuple[Mount, ...], dict[str, str]]:
        """verify_data as a mount and the variable that names it: writable for prepare (which
        fills it), read-only for the verifier and only once it holds something. Experiments
        never get it."""
        path = Path(self.cfg.verify_data).expanduser() if self.cfg.verify_data else None
        if path is None or not path.is_dir() or (not writable and not any(path.iterdir())):
            return (), {}
        return (Mount(path, HELDOUT_MOUNT, read_only=not writable),), {HELDOUT_ENV: HELDOUT_MOUNT}

    def run(self, image_ref: str, command: tuple[str, ...], tag: str, commit: str, iteration: int,
            devices: tuple[str, ...], limits: Limits, log_path: Path, *, uid: int, gpu_access: GpuAccess,
            mounts: tuple[Mount, ...] = (), collect_dir: Path | None = None, export: bool = False,
            env: dict[str, str] | None = None) -> RunSpec:
        """The RunSpec of one untrusted (or verifying) run: `uid` of its own (naming.run_uid of
        the uids in use), the allow-listed environment, the caches read-only, no network.

        Args:
            gpu_access: how `devices` reach the container (the engine's toolkit, or device nodes).
            mounts: more mounts, after the caches (the verifier's export and held-out data).
            export: the verification variables in the environment (the hook exports, the
                verifier reads the target).
            env: more variables, over the allow-listed ones.
        """
        return RunSpec(
            image=image_ref,
            command=command,
            user=f"{uid}:{uid}",
            limits=limits,
            log_path=log_path,
            log_root=self.repo_path,
            collect_dir=collect_dir,
            name=naming.container_name("run", tag, commit),
            labels=naming.managed_labels(
                naming.KIND_RUN,
                **{
                    naming.L_TAG: tag,
                    naming.L_COMMIT: commit,
                    naming.L_OWNER: self.owner,
                    naming.L_ITERATION: str(iteration),
                    naming.L_GPUS: ",".join(devices),
                    naming.L_REPO: str(self.repo_path) if self.repo_path else "",
                    naming.L_UID: str(uid),
                },
            ),
            env={**experiment_env(self.cfg, limits, export=export), **(env or {})},
            mounts=self.mounts() + mounts,
            gpus=devices,
            gpu_access=gpu_access,
        )

    def trusted(self, image_ref: str, command: tuple[str, ...], commit: str, limits: Limits, log_path: Path, *,
                user: str, hf_endpoint: str | None = None, heldout: bool = False) -> RunSpec:
        """The RunSpec of fixed, trusted code of the repo (prepare.py, the hub fetch): the network
        on, both caches writable, `user` (the invoking user's "uid:gid", so the files it writes
        belong to them), the experiments' memory, pids and /tmp limits with a deadline of its own.

        Args:
            hf_endpoint: a Hub mirror to use (HF_ENDPOINT); never a token.
            heldout: verify_data writable too, at $AUTORESEARCH_HELDOUT_DIR (prepare.py writes
                the held-out split there, laid out like the data cache).
        """
        env = {"HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": HF_MOUNT, "HF_HUB_DISABLE_PROGRESS_BARS": "1",
               "XDG_CACHE_HOME": "/tmp/.cache"}
        if hf_endpoint:
            env["HF_ENDPOINT"] = hf_endpoint
        heldout_mounts, heldout_env = self.heldout(writable=True) if heldout else ((), {})
        env.update(heldout_env)
        return RunSpec(
            image=image_ref,
            command=command,
            limits=Limits(time_budget_s=TRUSTED_TIME_BUDGET_S, timeout_factor=1.0, mem_limit_bytes=limits.mem_limit_bytes,
                          pids_limit=limits.pids_limit, tmp_size_bytes=limits.tmp_size_bytes),
            log_path=log_path,
            log_root=self.repo_path,
            name=naming.container_name("prepare", "prepare", commit),
            labels=naming.managed_labels(naming.KIND_PREPARE, **{naming.L_OWNER: self.owner, naming.L_COMMIT: commit}),
            env=env,
            mounts=self.mounts(writable=True) + heldout_mounts,
            user=user,
            network=True,
        )
