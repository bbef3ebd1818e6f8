"""GPU leases of cluster workers: each worker leases exactly the GPUs behind the ids Ray gave
it, however its raylet numbers them.

The mapping is a pure function, tested first without Ray. Then one Ray cluster on this machine
(tests/cluster.py), with nodes that declare GPUs (`ray start --num-gpus 2` needs none) on fake
GPU hosts (tests/gpuhost.py: tests/fakenvml's pynvml, stand-in device nodes, a lock directory
each), one per way a raylet numbers its GPUs: as CUDA does by default, under
CUDA_VISIBLE_DEVICES=<indices> (with CUDA_DEVICE_ORDER=PCI_BUS_ID on a node of mixed models),
and under CUDA_VISIBLE_DEVICES=<UUIDs>.
"""

from __future__ import annotations

import fcntl
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
from cluster import RayCluster
from gpuhost import FakeGpuHost

from runner.config import ConfigError, load_config
from sandbox import gpu, ray_backend
from sandbox.backend import BackendSettings, SandboxError
from sandbox.gpu import GpuDevice, GpuError

H100, L4 = "Fake H100", "Fake L4"


def _devices(*names: str, mig: dict[int, int] | None = None) -> list[GpuDevice]:
    """GPUs in NVML (PCI) order, UUID GPU-i; `mig` {GPU index: slices}: that GPU is in MIG mode."""
    out = []
    for i, name in enumerate(names):
        if i in (mig or {}):
            out += [GpuDevice(i, f"MIG-{i}-{j}", f"{name} MIG 1g.10gb", 9856.0, i, (j + 1, 0)) for j in range(mig[i])]
        else:
            out.append(GpuDevice(i, f"GPU-{i}", name, 81559.0, i))
    return out


# --- the mapping, without Ray ---------------------------------------------------------------

@pytest.mark.parametrize("ids, names, env, expected", [
    ([0], (H100, H100), {}, ("GPU-0",)),              # id 0 is GPU 0, not "no GPU"
    ([1], (H100, H100), {}, ("GPU-1",)),              # id 1 is GPU 1, not "any one free GPU"
    ([3, 2], (H100,) * 4, {}, ("GPU-2", "GPU-3")),    # two ids, two GPUs, in NVML order
    (["3", "1"], (H100,) * 4, {}, ("GPU-1", "GPU-3")),  # a raylet under CUDA_VISIBLE_DEVICES=3,1
    (["GPU-2", "GPU-0"], (H100, L4, L4), {}, ("GPU-0", "GPU-2")),  # ... =<UUIDs>: any models
    ([1], (H100, L4), {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}, ("GPU-1",)),
])
def test_ray_ids_are_the_gpus_behind_them(ids, names, env, expected):
    assert ray_backend.ray_gpu_uuids(ids, _devices(*names), env) == expected


def test_a_mig_slice_is_named_by_its_uuid():
    devices = _devices(H100, H100, mig={1: 2})
    assert ray_backend.ray_gpu_uuids(["MIG-1-1"], devices, {}) == ("MIG-1-1",)
    with pytest.raises(GpuError, match="MIG mode .* CUDA_VISIBLE_DEVICES=<UUIDs>"):
        ray_backend.ray_gpu_uuids([0], devices, {})


@pytest.mark.parametrize("ids, names, env, error", [
    # CUDA's default order on mixed models is fastest first, which NVML cannot reproduce
    ([0], (L4, H100), {}, "mixed models .* CUDA_DEVICE_ORDER=PCI_BUS_ID, or with CUDA_VISIBLE_DEVICES=<UUIDs>"),
    ([0], (L4, H100), {"CUDA_DEVICE_ORDER": "FASTEST_FIRST"}, "CUDA_DEVICE_ORDER=PCI_BUS_ID"),
    ([2], (H100, H100), {}, "not on this node, where NVML lists 2 GPU"),
    (["GPU-9"], (H100, H100), {}, "GPU-9 .* is no GPU or MIG slice NVML lists"),
    (["GPU-8932f937"], (H100,), {}, "is no GPU or MIG slice"),  # CUDA's UUID prefixes: not guessed at
    (["0", "GPU-0"], (H100,), {}, "name one GPU twice"),
    (["abc"], (H100,), {}, "neither an index nor a GPU-/MIG- UUID"),
])
def test_ray_ids_that_name_no_certain_gpu_are_refused(ids, names, env, error):
    with pytest.raises(GpuError, match=error):
        ray_backend.ray_gpu_uuids(ids, _devices(*names), env)


def test_gpus_ray_counts_where_nvml_lists_none_are_an_error_not_the_cpu():
    with pytest.raises(GpuError, match=r"NVML lists no GPU on this node \(NVML cannot start: Driver Not Loaded\)"):
        ray_backend.ray_gpu_uuids([0], [], {}, "NVML cannot start: Driver Not Loaded")


def test_fractional_worker_gpus_are_refused(tmp_path):
    """A lease is exclusive: half a GPU per worker would give two workers one lease."""
    (tmp_path / "runner.yaml").write_text("cluster: 127.0.0.1:6379\ncluster_worker_gpus: 0.5\n")
    with pytest.raises(ConfigError, match="cluster_worker_gpus must be a whole number of GPUs, got 0.5"):
        load_config(tmp_path)
    (tmp_path / "runner.yaml").write_text("cluster: 127.0.0.1:6379\ncluster_worker_gpus: 2\n")
    assert load_config(tmp_path).cluster_worker_gpus == 2
    # refused before any engine or cluster is asked
    with pytest.raises(SandboxError, match="whole number of GPUs, got 1.5"):
        ray_backend.RayExecutor(BackendSettings("ray", "127.0.0.1:1", worker_gpus=1.5), store=object())


# --- real Ray nodes on fake GPU hosts --------------------------------------------------------

def _host(root: Path, names: tuple[str, ...], run: str) -> FakeGpuHost:
    """A fake GPU host of GPUs `names`, with UUIDs of this test run only (leases are checked
    against the GPU labels of every running container on the engine, other runs' included)."""
    root.mkdir(parents=True)
    host = FakeGpuHost(root, gpus=2)
    host.machine["devices"] = [{"uuid": f"GPU-{run}-{root.name}-{i}", "name": name, "memory_mb": 81559.0, "minor": i}
                               for i, name in enumerate(names)]
    host.write()
    for i in range(2, len(names)):
        host.node(f"nvidia{i}")
    return host


@pytest.fixture(scope="module")
def gpu_cluster():
    """(RayCluster, {FAKE_NVML_FILE: (host, {Ray's id as text: the UUID it must lease})}): a
    head of 2 GPUs under CUDA's default order, a node of 4 GPUs of two models under
    CUDA_VISIBLE_DEVICES=3,1 and CUDA_DEVICE_ORDER=PCI_BUS_ID, and a node of 4 under
    CUDA_VISIBLE_DEVICES=<the UUIDs of GPUs 2 and 0>; each declares 2 GPUs."""
    import ray

    root = Path(tempfile.mkdtemp(prefix="ar-gpucl-", dir="/tmp"))  # Ray's socket paths must stay short
    run = uuid.uuid4().hex[:8]
    plain = _host(root / "a", (H100, H100), run)
    numbers = _host(root / "b", (H100, H100, L4, L4), run)
    uuids = _host(root / "c", (H100,) * 4, run)
    expected = {
        plain.file: {"0": plain.uuids[0], "1": plain.uuids[1]},
        numbers.file: {"3": numbers.uuids[3], "1": numbers.uuids[1]},
        uuids.file: {uuids.uuids[2]: uuids.uuids[2], uuids.uuids[0]: uuids.uuids[0]},
    }
    cluster = RayCluster(root / "ray")
    try:
        with pytest.MonkeyPatch.context() as mp:
            for name in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER"):  # a GPU host's own: not the nodes'
                mp.delenv(name, raising=False)
            gpus = ("--num-gpus=2", "--object-store-memory=100000000")  # no objects move here
            cluster.start_head(env=plain.env(), args=gpus)
            cluster.add_node(None, "numbers", args=gpus, env={
                **numbers.env(), "CUDA_VISIBLE_DEVICES": "3,1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
            cluster.add_node(None, "uuids", args=gpus, env={
                **uuids.env(), "CUDA_VISIBLE_DEVICES": f"{uuids.uuids[2]},{uuids.uuids[0]}"})
        yield cluster, {str(f): (h, expected[f]) for f, h in ((h.file, h) for h in (plain, numbers, uuids))}
    finally:
        ray.shutdown()
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def _lease_of(worker) -> dict:
    """What a worker holds: Ray's ids, its host (by fake NVML file), its lease, its containers' CUDA_VISIBLE_DEVICES."""
    import ray

    def ask(self):
        import os

        import ray

        return {"ids": sorted(str(i) for i in ray.get_gpu_ids()), "host": os.environ["FAKE_NVML_FILE"],
                "lease": list(self.lease.devices), "visible": self.access.env.get("CUDA_VISIBLE_DEVICES")}

    return ray.get(worker.__ray_call__.remote(ask), timeout=60)


def _wait_unleased(hosts: dict, timeout_s: float = 30) -> None:
    """Until no process holds a lease on the hosts' GPUs: a killed worker's process, which
    holds its locks, may outlive the moment Ray hands its GPUs to the next worker."""
    deadline = time.monotonic() + timeout_s
    for host, _ in hosts.values():
        for path in host.locks.glob("gpu-*.lock"):
            with open(path) as f:
                while True:
                    try:
                        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        assert time.monotonic() < deadline, f"{path} is still locked"
                        time.sleep(0.1)


@contextmanager
def _backend(cluster: RayCluster, hosts: dict, **options):
    """A RayExecutor on the cluster (leases of its workers: see _lease_of); after, it is closed:
    its workers are gone and their leases with them."""
    try:
        executor = _executor(cluster, **options)
        try:
            yield [_lease_of(w) for w in executor.workers]
        finally:
            executor.close()
    finally:
        _wait_unleased(hosts)


def _executor(cluster: RayCluster, **options) -> ray_backend.RayExecutor:
    from sandbox.docker_backend import DockerImageStore

    return ray_backend.RayExecutor(BackendSettings("ray", cluster.client_address, gpu_runtime="devices", **options),
                                   store=DockerImageStore())


@pytest.mark.docker
@pytest.mark.parametrize("worker_gpus", [1, 2])
def test_each_worker_leases_the_gpus_behind_its_ray_ids(gpu_cluster, worker_gpus):
    cluster, hosts = gpu_cluster
    with _backend(cluster, hosts, worker_gpus=worker_gpus) as leases:
        assert len(leases) == 6 // worker_gpus  # every GPU the cluster declares, used
        for lease in leases:
            _, behind = hosts[lease["host"]]
            assert len(lease["ids"]) == worker_gpus, lease
            assert sorted(lease["lease"]) == sorted(behind[i] for i in lease["ids"]), lease
            assert lease["visible"] == ",".join(lease["lease"]), lease  # what its containers get
        held = sorted(u for lease in leases for u in lease["lease"])
        assert held == sorted(u for _, behind in hosts.values() for u in behind.values())  # none twice


@pytest.mark.docker
def test_a_gpu_leased_elsewhere_is_an_error_never_another_gpu(gpu_cluster):
    """Another runner holds the GPU behind Ray's id 0 on the head: the worker given it cannot
    start, and the backend says so (and leaves no worker holding GPUs behind)."""
    cluster, hosts = gpu_cluster
    head, behind = next(h for h in hosts.values() if "0" in h[1])
    taken = behind["0"]

    class Listed:
        error = None

        def devices(self):
            return [GpuDevice(0, taken, H100, 81559.0, 0)]

    other = gpu.acquire(taken, nvml=Listed(), lock_dir=head.locks)
    try:
        leased = f"could not start on its node: .*GPU 0 \\({taken}\\) is leased by another runner"
        with pytest.raises(SandboxError, match=leased):
            _executor(cluster, worker_gpus=1)
    finally:
        other.release()
    _wait_unleased(hosts)  # the workers the backend killed, gone
    with _backend(cluster, hosts, worker_gpus=1) as leases:  # freed, and nothing left over holds the others
        assert taken in {u for lease in leases for u in lease["lease"]}


def test_a_wrong_cluster_address_is_one_clear_error_in_seconds(monkeypatch):
    """Nothing listens at the address: said at once (after a short wait for a head that is just
    starting), not after ray.init's half a minute per try."""
    import socket
    import time

    from sandbox import ray_backend
    from sandbox.backend import SandboxError

    with socket.socket() as s:  # a port on this machine where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(SandboxError, match=f"no Ray cluster answers at ray://127.0.0.1:{port} .*nothing listens"):
        ray_backend._wait_for_port(f"ray://127.0.0.1:{port}", wait_s=1.0)
    assert time.monotonic() - t0 < 5


def test_a_run_waiting_for_a_busy_cluster_stops_when_asked(tmp_path):
    """Every worker busy and the loop asked to stop: the run returns `interrupted` at once
    instead of blocking on a free worker for ever."""
    import queue
    import threading

    from sandbox.ray_backend import RayExecutor
    from sandbox.spec import Limits, RunSpec

    backend = RayExecutor.__new__(RayExecutor)
    backend._free = queue.Queue()  # no free worker
    stop = threading.Event()
    stop.set()
    spec = RunSpec(image="x", command=("true",), limits=Limits(time_budget_s=5), log_path=tmp_path / "log", name="n")
    result = backend.run(spec, stop)
    assert result.reason == "interrupted" and result.exit_code is None
