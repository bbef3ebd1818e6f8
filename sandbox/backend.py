"""The Sandbox contract, and the two halves of a backend: an Executor (runs, what runs now,
every-node calls) and an ImageStore (the images runs start from, on this host). Docker gives
both; Ray gives an executor over Docker nodes beside the local Docker store (a Kubernetes Job
tomorrow: one module and one EXECUTORS line). tests/test_conformance.py holds every executor
to the same promises.
"""

from __future__ import annotations

import abc
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable

from .spec import RunResult, RunSpec


class SandboxError(RuntimeError):
    """The harness failed (daemon down, image missing, API error). Never an experiment outcome."""


class SetupError(SandboxError):
    """The harness is set up wrong in a way that running again cannot mend (a node holds other
    data than this host): the loop stops with it at once instead of retrying the experiment."""


class Sandbox(abc.ABC):
    @abc.abstractmethod
    def run(self, spec: RunSpec, stop: threading.Event | None = None) -> RunResult:
        """Run `spec.command` in `spec.image`, isolated and held to `spec.limits`, and wait for it.

        Promises, whatever the code inside does:
          - no network unless `spec.network`; no capabilities; a non-root user; read-only root
            and image files; `/tmp` and `/out` bounded tmpfs; only `spec.env` of the host's
            environment;
          - the run ends by `spec.limits.deadline_s` (SIGTERM, then SIGKILL after
            `kill_grace_s`), or soon after `stop` is set;
          - output streams to `spec.log_path`, capped at `log_cap_bytes` plus a kept tail;
          - nothing the run started outlives this call: the container is removed.

        Args:
            spec: what to run and under which limits.
            stop: set it from another thread (a signal handler) to end the run early; the
                result then has reason "interrupted".

        Returns:
            RunResult. A non-zero exit, an OOM kill, a timeout are results, not errors.

        Raises:
            SandboxError: the backend could not run the spec at all (image missing, daemon
                unreachable, invalid limits).
        """

    @abc.abstractmethod
    def cleanup(self, tag: str | None = None, only_dead_owners: bool = True, owner: str | None = None) -> list[str]:
        """Remove this tool's leftover run containers (selected by label, never by name).

        Args:
            tag: only those of this run tag; None = every tag.
            only_dead_owners: keep containers whose runner process is still alive on this host.
            owner: only those this owner started, alive or not (a runner forced to stop now
                removes its own).

        Returns:
            Names of the containers removed.

        Raises:
            SandboxError: the backend is unreachable.
        """


@dataclass(frozen=True)
class ImageRecord:
    """An image as the runner sees it, whatever the backend stores it in."""

    ref: str            # the runner's own name for it (autoresearch-runner/<...>), else its id
    id: str
    labels: dict[str, str]
    created: str = ""   # when it was made, UTC, ISO 8601 to the second (sorts as it reads)
    size: int | None = None  # bytes of all its layers, where the store said


@dataclass(frozen=True)
class BuiltImage:
    """An image a build made or found (reused): what the runner runs experiments from."""

    ref: str
    id: str
    reused: bool
    build_s: float
    # An experiment image made here: the image it was made on, and the few-KiB archive that
    # makes it from that one on any engine holding it (images.experiment_archive); else empty.
    parent_id: str = ""
    archive: bytes = field(default=b"", repr=False)


@dataclass(frozen=True)
class RunningRun:
    """A run container alive on the backend now (any user's)."""

    labels: dict[str, str]
    started_at: str = ""


class Executor(Sandbox):
    """Where runs happen: the Sandbox contract, what is running now, and the calls that reach
    every host it runs on. Docker runs on one engine; Ray runs on a cluster's nodes, each with
    its own engine. Every engine, driver or network error comes out as SandboxError.

    A new executor is one module with a class like this and an opener (see EXECUTORS).
    """

    owner: str  # the label value that marks containers this process starts
    # Parallel runs it was opened for (a cluster's placed workers); None: one per GPU the caller
    # leases on this host, else 1 (the loop decides).
    slots: int | None = None
    # GPUs each of those runs holds on its node (a cluster's); 0: the caller's lease decides.
    gpus_per_slot: float = 0.0

    def run_on_every_node(self, spec: RunSpec) -> list[RunResult]:
        """Run `spec` once on every host this executor runs experiments on (trusted steps such
        as prepare.py, which every host's data cache needs); one host here."""
        return [self.run(spec)]

    @abc.abstractmethod
    def running(self, **labels: str) -> list[RunningRun]:
        """Run containers alive now on every host, every user's, whose labels match `labels`."""

    @abc.abstractmethod
    def gpu_runtime(self, requested: str) -> str:
        """`toolkit` or `devices` for a gpu_runtime setting (auto | toolkit | devices)."""

    @abc.abstractmethod
    def version(self) -> str:
        """The executor's own version (its engine's, a cluster's), for `runner doctor`."""

    def nodes(self) -> list[str]:
        """The hosts runs go to, one line each (`runner start` and `runner status` name them);
        empty for the local engine."""
        return []

    def release_images(self, image_ids: list[str]) -> int:
        """Remove the copies of these images the executor made on its hosts (a cluster's nodes
        hold what was shipped to them), after the image store removed its own. Returns how
        many copies were removed: none on the local engine, where the store's are the ones run."""
        return 0

    def close(self) -> None:
        """Give back what opening it took (a cluster's workers, their GPUs, their folders)."""


class ImageStore(abc.ABC):
    """The images runs start from, on the host the runner is on: built, named, listed, saved
    and loaded there. An executor whose hosts are elsewhere moves them itself, by content."""

    @abc.abstractmethod
    def resolve_base(self, requested: str, want_gpu: bool) -> ImageRecord:
        """The base image ("auto" or a reference) present in the store.

        Raises:
            SandboxError: it is missing, with the command that makes it.
        """

    @abc.abstractmethod
    def ensure_trainer(self, base: ImageRecord, deps, ca_bundle, progress) -> BuiltImage:
        """The trainer image on `base` with the repo's dependencies (images.Dependencies), built
        once per content."""

    @abc.abstractmethod
    def ensure_experiment(self, ref: str, trainer: BuiltImage, sources: tuple[bytes, bytes],
                          labels: dict[str, str]) -> BuiltImage:
        """The image of one commit: trainer + fixed sources + train.py, reused when it exists."""

    @abc.abstractmethod
    def image(self, ref: str) -> ImageRecord | None:
        """The image called `ref` (a name or an id), or None."""

    @abc.abstractmethod
    def images(self, kind: str, **labels: str) -> list[ImageRecord]:
        """The runner's images of `kind` (naming.KIND_*) whose labels match `labels`."""

    @abc.abstractmethod
    def added_bytes(self, image_id: str, below_id: str, size: int | None = None) -> int | None:
        """Bytes of the layers between `image_id` and the image `below_id` it was built on; None
        when `image_id` is gone (removed since it was listed: another runner's gc, another user).
        `size`: the image's own, where a listing gave it (ImageRecord.size)."""

    @abc.abstractmethod
    def tag_image(self, image_id: str, ref: str) -> None:
        """Give the image `image_id` the name `ref`."""

    @abc.abstractmethod
    def remove_image(self, ref: str) -> None:
        """Remove an image (its tag, and its layers no other image uses)."""

    @abc.abstractmethod
    def save_image(self, image_id: str, out: BinaryIO) -> None:
        """Write the image, with its names, to `out` (the engine's save format)."""

    @abc.abstractmethod
    def load_images(self, src: BinaryIO) -> list[ImageRecord]:
        """Load images saved by save_image; returns what was loaded."""

    @abc.abstractmethod
    def build_base_image(self, recipe, ca_bundle, find_links, progress, force: bool = False) -> str:
        """Make the registry-less CPU base image (images.BaseRecipe); returns its reference."""

    @abc.abstractmethod
    def build_agent_image(self, project_dir, base_ref: str, ca_bundle, progress) -> BuiltImage:
        """The runner's own image from a source checkout (Dockerfile.agent)."""

    @abc.abstractmethod
    def version(self) -> str:
        """The store's engine version, for `runner doctor`."""


@dataclass(frozen=True)
class Backend:
    """What the runner is given to work with: the image store on this host and the executor
    runs go to. `runner/` talks to nothing else."""

    store: ImageStore
    executor: Executor

    def close(self) -> None:
        self.executor.close()


@dataclass(frozen=True)
class BackendSettings:
    """Which executor to open, and how (runner.yaml's backend:, cluster: and cluster_* keys)."""

    executor: str = "docker"          # a key of EXECUTORS
    address: str | None = None        # the cluster's (ray): HOST:PORT or ray://HOST:PORT
    workers: int | None = None        # parallel runs on the cluster; None: one per GPU, else one per node
    worker_gpus: float | None = None  # GPUs per cluster worker; None: 1 on a cluster with GPUs, else 0
    worker_cpus: float = 1.0          # CPUs Ray reserves per cluster worker
    registry: str | None = None       # HOST:PORT of a registry that moves images to nodes
    gpu_runtime: str = "auto"         # auto | toolkit | devices, on every host
    data_target: str = ""             # the data mount's target: nodes check they hold the same data
    data_check: Callable[[Path], str] | None = None  # the digest of a data folder (runner.data.data_digest)


def held_gpus(executor: Executor) -> set[str]:
    """GPUs that running experiments of any runner on this executor hold (by label)."""
    from . import naming

    return {d for r in executor.running() for d in r.labels.get(naming.L_GPUS, "").split(",") if d}


# Executors by name (runner.yaml `backend:`, or `ray` where `cluster:` is set): a module:function
# path, imported when chosen so a host without one executor's client library can use another.
# The function opens a Backend: (settings, vram_probe, runs) -> Backend; `runs` False opens it
# only to look at and clean what runs (runner status, clean, images gc), which places no workers.
EXECUTORS = {"docker": "sandbox.docker_backend:open_docker", "ray": "sandbox.ray_backend:open_ray"}


def open_backend(settings: BackendSettings = BackendSettings(), vram_probe=None, runs: bool = True) -> Backend:
    """The image store on this host and the executor `settings` name, connected.

    Args:
        settings: which executor, and its options.
        vram_probe: samples a container's VRAM on this host (gpu.GpuLease.vram_probe), for the
            watchdog of the local engine's runs; a cluster's nodes use their own.
        runs: False to open it only for what runs now (no cluster workers placed).

    Raises:
        SandboxError: no such executor, or it cannot be reached.
    """
    import importlib

    if settings.executor not in EXECUTORS:
        raise SandboxError(f"unknown backend {settings.executor!r}: use one of {', '.join(sorted(EXECUTORS))}")
    module, _, opener = EXECUTORS[settings.executor].partition(":")
    return getattr(importlib.import_module(module), opener)(settings, vram_probe=vram_probe, runs=runs)
