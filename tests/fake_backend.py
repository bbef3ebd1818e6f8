"""A Backend with no engine behind it, for testing the loop's decisions without Docker.

Images are the snapshots the Engine hands it (kept in memory); a run extracts one into a
temporary directory and runs its command there as a plain local process, with the spec's
environment and deadline. It isolates nothing: it is a test double for the orchestration, never a
sandbox (tests/test_conformance.py holds real backends to the sandbox contract).
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

from sandbox.backend import Backend, Executor, ImageRecord, ImageStore, SandboxError
from sandbox.images import BuiltImage
from sandbox.spec import REASON_EXIT, REASON_INTERRUPTED, REASON_TIMEOUT, RunResult, RunSpec


class FakeBackend(ImageStore, Executor):
    def __init__(self, fail_on_run: int | None = None, crash_runs: set[int] = frozenset(), fail_from: int | None = None,
                 failure: type[SandboxError] = SandboxError):
        """`fail_on_run`: the n-th run (1-based) raises `failure`, as an engine hiccup would;
        `fail_from`: that run and every later one do, as a dead engine would.
        `crash_runs`: those runs exit 1 whatever they run (a flaky node, an OOM of bad luck)."""
        self.owner = f"fake:{os.getpid()}"
        self.snapshots: dict[str, tuple[bytes, bytes]] = {}
        self.records: dict[str, ImageRecord] = {}
        self.runs: list[RunSpec] = []
        self.fail_on_run, self.fail_from, self.failure = fail_on_run, fail_from, failure
        self.crash_runs = set(crash_runs)

    def pair(self) -> Backend:
        """This fake as both halves of a Backend (what Engine takes)."""
        return Backend(self, self)

    def gpu_runtime(self, requested: str) -> str:
        return "devices" if requested == "auto" else requested

    def resolve_base(self, requested: str, want_gpu: bool) -> ImageRecord:
        return ImageRecord("fake/base:1", "sha256:base", {})

    def ensure_trainer(self, base, deps, ca_bundle, progress) -> BuiltImage:
        return BuiltImage("fake/trainer:1", "sha256:trainer", True, 0.0)

    def ensure_experiment(self, ref, trainer, sources, labels) -> BuiltImage:
        image_id = "sha256:" + hashlib.sha256(sources[0] + sources[1]).hexdigest()
        self.snapshots[ref] = sources
        self.records[ref] = ImageRecord(ref, image_id, dict(labels))
        return BuiltImage(ref, image_id, False, 0.0)

    def image(self, ref):
        return self.records.get(ref)

    def images(self, kind, **labels):
        return [r for r in self.records.values() if all(r.labels.get(k) == v for k, v in labels.items())]

    def added_bytes(self, image_id, below_id, size=None):
        return 0

    def tag_image(self, image_id, ref):
        self.records[ref] = next(r for r in self.records.values() if r.id == image_id)

    def remove_image(self, ref):
        self.records.pop(ref, None)

    def save_image(self, image_id, out):
        raise SandboxError("the fake backend cannot save images")

    def load_images(self, src):
        raise SandboxError("the fake backend cannot load images")

    def running(self, **labels):
        return []

    def build_base_image(self, recipe, ca_bundle, find_links, progress, force=False):
        return "fake/base:1"

    def build_agent_image(self, project_dir, base_ref, ca_bundle, progress):
        raise SandboxError("the fake backend has no agent image")

    def version(self) -> str:
        return "fake backend"

    def cleanup(self, tag=None, only_dead_owners=True, owner=None):
        return []

    def run(self, spec: RunSpec, stop: threading.Event | None = None) -> RunResult:
        self.runs.append(spec)
        if len(self.runs) == self.fail_on_run or (self.fail_from is not None and len(self.runs) >= self.fail_from):
            raise self.failure("the fake engine went away")
        stop = stop or threading.Event()
        with tempfile.TemporaryDirectory() as tmp:
            for blob in self.snapshots[spec.image]:
                with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
                    tar.extractall(tmp, filter="data")
            workdir = Path(tmp) / "repo"
            for p in workdir.rglob("*"):
                p.chmod(0o755 if p.is_dir() else 0o644)
            command = [sys.executable if spec.command[0] == "python" else spec.command[0], *spec.command[1:]]
            if len(self.runs) in self.crash_runs:
                command = [sys.executable, "-c", "raise SystemExit('crashed by the fake backend')"]
            t0 = time.monotonic()
            proc = subprocess.Popen(command, cwd=workdir, env={"PATH": os.environ["PATH"], **spec.env},
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            reason = ""
            while proc.poll() is None:
                if stop.is_set():
                    reason = REASON_INTERRUPTED
                elif time.monotonic() - t0 > spec.limits.deadline_s:
                    reason = REASON_TIMEOUT
                if reason:
                    proc.kill()
                    break
                time.sleep(0.05)
            output = proc.communicate()[0]
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        spec.log_path.write_bytes(output)
        if not reason and proc.returncode != 0:
            reason = REASON_EXIT
        return RunResult(exit_code=proc.returncode, reason=reason, wall_s=round(time.monotonic() - t0, 3),
                         log_path=spec.log_path, output_tail=output.decode(errors="replace"),
                         log_bytes=len(output), log_truncated=False, peak_mem_bytes=None, peak_vram_mb=None,
                         image_id=self.records[spec.image].id, container_name=spec.name)
