"""Red-team fixtures: tight limits, and the check that the host is unchanged after an attack."""

from __future__ import annotations

import hashlib
import io
import os
import secrets
import tarfile

import pytest
from conftest import make_repo

from sandbox import naming
from sandbox.cgroups import cgroup_of

# Tight, so each attack hits its wall in seconds.
LIMITS = dict(budget_s=2, memory_gb=0.5, pids=64, tmp_mb=16, out_mb=16, log_cap_mb=1, log_tail_mb=1,
              startup_grace_s=4, kill_grace_s=2)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _processes_of(container_id: str) -> list[str]:
    """Host PIDs still in the container's cgroup (other tests' containers do not count)."""
    return [pid for pid in filter(str.isdigit, os.listdir("/proc")) if container_id in cgroup_of(int(pid))]


@pytest.fixture
def attack(tmp_path, engine_for, docker_client):
    """Run a hostile train.py; assert the host is unchanged; return the ExperimentRun."""

    def run(train_py: str, **overrides):
        repo = make_repo(tmp_path / "repo", train_py)
        prepare_digest = _sha((repo / "prepare.py").read_bytes())
        engine = engine_for(repo, **{**LIMITS, **overrides})
        tag = f"redteam-{secrets.token_hex(3)}"  # its own: attacks of other tests may be running beside it
        run = engine.run_commit(engine.repo.head().sha, tag, repo / ".autoresearch" / "run.log")

        # The evaluation code, on the host and in the image, is byte for byte what it was.
        assert _sha((repo / "prepare.py").read_bytes()) == prepare_digest
        c = docker_client.containers.create(run.image.ref, command=["true"])
        try:
            stream, _ = c.get_archive("/repo/prepare.py")
            with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
                assert _sha(tar.extractfile("prepare.py").read()) == prepare_digest
        finally:
            c.remove(force=True)
        # Nothing of the run is left: no container, no process that was in it.
        leftovers = docker_client.containers.list(all=True, filters=naming.managed_filter(naming.KIND_RUN, **{naming.L_TAG: tag}))
        assert leftovers == []
        assert run.result.container_id and _processes_of(run.result.container_id) == []
        # The host log stays within its cap (head + kept tail + a marker line).
        lim = run.limits
        assert run.result.log_path.stat().st_size <= lim.log_cap_bytes + lim.log_tail_bytes + 200
        return run

    return run

