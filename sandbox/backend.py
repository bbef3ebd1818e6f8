"""The Sandbox contract. Backends (Docker today, a Kubernetes Job tomorrow) only implement it;
tests/test_conformance.py holds every backend to the same promises.
"""

from __future__ import annotations

import abc
import threading

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
