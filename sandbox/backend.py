"""The Sandbox contract. Backends (Docker, Ray over Docker nodes; a Kubernetes Job tomorrow)
only implement it. tests/test_conformance.py holds the backends listed in its BACKENDS to the
same promises: today the Docker one; the Ray backend is tested by tests/test_cluster.py.
"""

from __future__ import annotations

import abc
import threading
from dataclasses import dataclass
from typing import BinaryIO

from .spec import RunResult, RunSpec


class SandboxError(RuntimeError):
    """The harness failed (daemon down, image missing, API error). Never an experiment outcome."""


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
    created: str = ""


@dataclass(frozen=True)
class BuiltImage:
    """An image a build made or found (reused): what the runner runs experiments from."""

    ref: str
    id: str
    reused: bool
    build_s: float


@dataclass(frozen=True)
class RunningRun:
    """A run container alive on the backend now (any user's)."""

    labels: dict[str, str]
    started_at: str = ""


class Backend(Sandbox):
    """Everything the runner asks of an execution backend: runs (Sandbox), the images they run
    in, and what is running now. `runner/` talks to nothing else; every engine, HTTP or driver
    error comes out of these methods as SandboxError.
    """

    owner: str  # the label value that marks containers this process starts

    def run_on_every_node(self, spec: RunSpec) -> list[RunResult]:
        """Run `spec` once on every host this backend runs experiments on (trusted steps such
        as prepare.py, which every host's data cache needs); one host here."""
        return [self.run(spec)]

    @abc.abstractmethod
    def gpu_runtime(self, requested: str) -> str:
        """`toolkit` or `devices` for a gpu_runtime setting (auto | toolkit | devices)."""

    @abc.abstractmethod
    def resolve_base(self, requested: str, want_gpu: bool) -> ImageRecord:
        """The base image ("auto" or a reference) present on this backend.

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
    def added_bytes(self, image_id: str, below_id: str) -> int:
        """Bytes of the layers between `image_id` and the image `below_id` it was built on."""

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
    def running(self, **labels: str) -> list[RunningRun]:
        """Run containers alive now, every user's, whose labels match `labels`."""

    @abc.abstractmethod
    def build_base_image(self, recipe, ca_bundle, find_links, progress, force: bool = False) -> str:
        """Make the registry-less CPU base image (images.BaseRecipe); returns its reference."""

    @abc.abstractmethod
    def build_agent_image(self, project_dir, base_ref: str, ca_bundle, progress) -> BuiltImage:
        """The runner's own image from a source checkout (Dockerfile.agent)."""

    @abc.abstractmethod
    def version(self) -> str:
        """The backend's own version, for `runner doctor`."""


def held_gpus(backend: Backend) -> set[str]:
    """GPUs that running experiments of any runner on this backend hold (by label)."""
    from . import naming

    return {d for r in backend.running() for d in r.labels.get(naming.L_GPUS, "").split(",") if d}


# Backends by name (runner.yaml `backend:`): a module:class path, imported when chosen, so a
# host without one backend's client library can still use another.
BACKENDS = {"docker": "sandbox.docker_backend:DockerSandbox", "ray": "sandbox.ray_backend:RayBackend"}


def open_backend(name: str = "docker", **kwargs) -> Backend:
    """The backend called `name`, connected.

    Raises:
        SandboxError: no such backend, or it cannot be reached.
    """
    import importlib

    if name not in BACKENDS:
        raise SandboxError(f"unknown backend {name!r}: use one of {', '.join(sorted(BACKENDS))}")
    module, _, cls = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), cls)(**kwargs)
