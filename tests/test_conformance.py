"""The sandbox contract (the promises in sandbox/backend.py's Sandbox.run) as one suite that every
executor must pass: the local Docker engine's, and a Ray cluster's (one node, on the tests'
engine, so the containers it starts are visible here).

A new executor joins by adding itself to EXECUTORS; the tests speak only the Sandbox interface.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import docker
import pytest

from sandbox import images, naming
from sandbox.backend import Sandbox, SandboxError
from sandbox.spec import Limits, RunSpec

pytestmark = pytest.mark.docker


@contextlib.contextmanager
def _docker(client):
    from sandbox.docker_backend import DockerExecutor

    yield DockerExecutor(client)


@contextlib.contextmanager
def _ray(client):
    import ray
    from cluster import RayCluster

    from sandbox.backend import BackendSettings
    from sandbox.docker_backend import DockerImageStore
    from sandbox.ray_backend import RayExecutor

    root = Path(tempfile.mkdtemp(prefix="ar-conf-", dir="/tmp"))  # Ray's socket paths must stay short
    cluster = RayCluster(root)
    try:
        cluster.start_head()
        executor = RayExecutor(BackendSettings("ray", cluster.client_address, workers=1), DockerImageStore(client))
        try:
            yield executor
        finally:
            executor.close()
            ray.shutdown()
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


EXECUTORS = {"docker": _docker, "ray": _ray}


@pytest.fixture(params=sorted(EXECUTORS), scope="module")
def backend(request, docker_client) -> tuple[Sandbox, str]:
    image = images.ensure_trainer_image(docker_client, images.CPU_BASE_ALIAS)
    with EXECUTORS[request.param](docker_client) as executor:
        yield executor, image.ref


LIMITS = Limits(time_budget_s=1, timeout_factor=1, startup_grace_s=3, kill_grace_s=1,
                mem_limit_bytes=256 * 1024**2, pids_limit=32, tmp_size_bytes=8 * 1024**2,
                out_size_bytes=8 * 1024**2, log_cap_bytes=64 * 1024, log_tail_bytes=16 * 1024)


def spec(tmp_path, image, code: str, **overrides) -> RunSpec:
    fields = dict(image=image, command=("python", "-c", code), limits=LIMITS, log_path=tmp_path / "run.log",
                  name=naming.container_name("run", "conformance", "0" * 8),
                  labels=naming.managed_labels(naming.KIND_RUN, **{naming.L_TAG: "conformance", naming.L_OWNER: naming.owner()}),
                  workdir="/tmp")
    fields.update(overrides)
    return RunSpec(**fields)


def test_exit_code_and_output_are_reported(backend, tmp_path):
    sandbox, image = backend
    r = sandbox.run(spec(tmp_path, image, "print('hello'); raise SystemExit(7)"))
    assert r.exit_code == 7 and r.reason == "exit_code"
    assert "hello" in r.output_tail and "hello" in r.log_path.read_text()


def test_deadline_ends_the_run(backend, tmp_path):
    sandbox, image = backend
    t0 = time.monotonic()
    r = sandbox.run(spec(tmp_path, image, "import time; time.sleep(100)"))
    assert r.reason == "timeout" and time.monotonic() - t0 < LIMITS.deadline_s + LIMITS.kill_grace_s + 5


def test_stop_request_interrupts(backend, tmp_path):
    sandbox, image = backend
    stop = threading.Event()
    threading.Timer(1.0, stop.set).start()
    r = sandbox.run(spec(tmp_path, image, "import time; time.sleep(100)", limits=Limits(time_budget_s=60)), stop)
    assert r.reason == "interrupted" and r.wall_s < 10


def test_isolation_holds(backend, tmp_path):
    sandbox, image = backend
    os.environ["CONFORMANCE_HOST_SECRET"] = "leak"
    try:
        r = sandbox.run(spec(tmp_path, image, (
            "import os, socket\n"
            "assert os.listdir('/sys/class/net') == ['lo'], os.listdir('/sys/class/net')\n"
            "assert 'CONFORMANCE_HOST_SECRET' not in os.environ\n"
            "assert os.environ.get('ALLOWED') == 'yes'\n"
            "assert os.getuid() != 0\n"
            "for path in ('/etc/x', '/usr/x'):\n"
            "    try:\n"
            "        open(path, 'w'); raise SystemExit('wrote ' + path)\n"
            "    except OSError:\n"
            "        pass\n"
            "open('/tmp/ok', 'w').write('ok')\n"
            "print('isolated')\n"), env={"ALLOWED": "yes"}))
    finally:
        del os.environ["CONFORMANCE_HOST_SECRET"]
    assert r.exit_code == 0, r.output_tail
    assert "isolated" in r.output_tail


def test_memory_ceiling_is_an_oom(backend, tmp_path):
    sandbox, image = backend
    r = sandbox.run(spec(tmp_path, image, "x = []\nwhile True: x.append(bytearray(16 << 20))"))
    # the kernel's OOM kill is at the ceiling: that is the peak reported (see DockerSandbox.run)
    assert r.reason == "oom" and r.peak_mem_bytes == LIMITS.mem_limit_bytes


def test_peak_memory_is_measured_not_assumed(backend, tmp_path):
    """A run that holds 60% of the ceiling for a second and exits cleanly: its peak is a
    measurement (of the cgroup's high-water mark), between what it held and the ceiling."""
    sandbox, image = backend
    held = int(LIMITS.mem_limit_bytes * 0.6)
    r = sandbox.run(spec(tmp_path, image, f"import time\nx = bytearray({held})\nx[::4096] = b'1' * len(x[::4096])\n"
                                          "time.sleep(1.5)\nprint('held')"))
    assert r.exit_code == 0 and r.reason == "", r.output_tail
    assert held <= r.peak_mem_bytes < LIMITS.mem_limit_bytes


def test_pids_and_scratch_are_bounded(backend, tmp_path):
    sandbox, image = backend
    r = sandbox.run(spec(tmp_path, image, (
        "import os, errno\n"
        "try:\n"
        "    open('/tmp/f', 'wb').write(b'x' * (16 << 20))\n"
        "except OSError as e:\n"
        "    assert e.errno == errno.ENOSPC\n"
        "else:\n"
        "    raise SystemExit('tmp not bounded')\n"
        "kids = 0\n"
        "try:\n"
        "    while True:\n"
        "        if os.fork() == 0:\n"
        "            import time; time.sleep(30); os._exit(0)\n"
        "        kids += 1\n"
        "except OSError:\n"
        "    print('kids', kids)\n")))
    assert r.exit_code == 0, r.output_tail
    assert int(r.output_tail.split("kids")[1].split()[0]) < LIMITS.pids_limit


def test_log_is_capped_but_the_tail_kept(backend, tmp_path):
    sandbox, image = backend
    # 2.6 MB of output through the engine (and Ray): seconds on a loaded host, so a deadline of
    # its own; what is tested is the cap, not the deadline (a 4 s one timed it out in a CI run).
    r = sandbox.run(spec(tmp_path, image, "import sys\nfor i in range(200000): print('line', i)\nprint('THE END')",
                         limits=dataclasses.replace(LIMITS, startup_grace_s=60)))
    assert r.exit_code == 0 and r.log_truncated, r
    assert r.log_path.stat().st_size <= LIMITS.log_cap_bytes + LIMITS.log_tail_bytes + 200
    assert r.output_tail.rstrip().endswith("THE END")


def test_nothing_outlives_the_run(backend, tmp_path, docker_client):
    sandbox, image = backend
    s = spec(tmp_path, image, "print('bye')")
    sandbox.run(s)
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(s.name)


def test_missing_image_is_a_harness_error(backend, tmp_path):
    sandbox, _ = backend
    with pytest.raises(SandboxError, match="not on this engine"):
        sandbox.run(spec(tmp_path, "autoresearch-runner/none:missing", "pass"))


def test_cleanup_removes_only_our_dead_runners_containers(backend, docker_client):
    sandbox, image = backend
    host = naming.owner().rsplit(":", 1)[0]

    def make(name, owner, labels=True):
        return docker_client.containers.create(
            image, ["sleep", "60"], name=naming.container_name("run", "conformance", name),
            labels=naming.managed_labels(naming.KIND_RUN, **{naming.L_TAG: "conformance", naming.L_OWNER: owner}) if labels else {})

    agent = make("agent000", naming.owner())           # stands in for a containerised runner
    agent.start()
    made = {
        "dead_process": make("dead0000", f"{host}:999999999"),
        "live_process": make("live0000", naming.owner()),
        "live_agent": make("agentkid", naming.owner(agent.id)),
        "dead_agent": make("deadkid0", naming.owner("f" * 64)),
        "other_host": make("remote00", "another-host:1"),
        "foreign": make("foreign0", "", labels=False),
    }
    try:
        removed = sandbox.cleanup(tag="conformance")
        assert sorted(removed) == sorted([made["dead_process"].name, made["dead_agent"].name])
        names = [c.name for c in docker_client.containers.list(all=True)]
        for key in ("live_process", "live_agent", "other_host", "foreign"):
            assert made[key].name in names, key
    finally:
        for c in (agent, *made.values()):
            try:
                c.remove(force=True)
            except docker.errors.NotFound:
                pass


def test_cpu_quota_and_cpuset_apply(backend, tmp_path):
    sandbox, image = backend
    r = sandbox.run(spec(tmp_path, image, (
        "import os\n"
        "quota = None\n"
        "for path in ('/sys/fs/cgroup/cpu.max', '/sys/fs/cgroup/cpu/cpu.cfs_quota_us', '/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us'):\n"
        "    if os.path.exists(path):\n"
        "        quota = open(path).read().split()[0]\n"
        "        break\n"
        "print('QUOTA', quota, 'CPUS', sorted(os.sched_getaffinity(0)))\n"),
        limits=dataclasses.replace(LIMITS, cpus=0.5, cpuset="0")))
    assert r.exit_code == 0, r.output_tail
    assert "QUOTA 50000 CPUS [0]" in r.output_tail
