"""The GPU paths through the real NVML wrapper and the real CLI, on a GPU host made of stand-ins
(tests/gpuhost.py: a fake pynvml, device nodes that behave as /dev/null, a stand-in driver
library, and NVML's process table filled with the containers' real host PIDs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import docker
import pytest
from conftest import VALUE_SUMMARY, make_repo, runner_cli
from gpuhost import FakeGpuHost, ProcessTable

from sandbox import gpu, naming
from sandbox.gpu import GpuError

# Reports which GPU nodes, libraries and variables the container was given.
GPU_TRAIN = """import json, os, time
VALUE = 2.0
SLEEP_S = 2
time.sleep(SLEEP_S)
print("GPUFACTS " + json.dumps({
    "nodes": sorted(n for n in os.listdir("/dev") if n.startswith("nvidia")),
    "libcuda": os.path.exists("/usr/local/nvidia/lib64/libcuda.so.1"),
    "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "nvidia": os.environ.get("NVIDIA_VISIBLE_DEVICES")}))
""" + VALUE_SUMMARY

RUNNER_YAML = "base_image: autoresearch-runner/base:cpu\ngpu_runtime: devices\nverify: off\n"


@pytest.fixture
def host(tmp_path, monkeypatch) -> FakeGpuHost:
    h = FakeGpuHost(tmp_path / "host")
    h.install(monkeypatch)
    return h


def _facts(log: str) -> dict:
    return json.loads(next(line for line in log.splitlines() if line.startswith("GPUFACTS "))[9:])


def _events(repo: Path, tag: str) -> list[dict]:
    return [json.loads(line) for line in (repo / f".autoresearch/{tag}/events.jsonl").read_text().splitlines()]


# --- NVML, leases and device access (no engine) ----------------------------------------------


def _mig_host(tmp_path, monkeypatch, gpus: int, uuids: tuple[str, str]) -> FakeGpuHost:
    """A host whose last GPU is in MIG mode with two slices (GPU instances 1 and 2)."""
    h = FakeGpuHost(tmp_path / "host", gpus=gpus)
    h.machine["devices"][-1]["mig"] = [{"uuid": uuid, "gi": gi, "ci": 0, "memory_mb": 9856} for gi, uuid in enumerate(uuids, 1)]
    h.write()
    h.install(monkeypatch)
    return h


def test_real_nvml_lists_gpus_and_mig_slices(tmp_path, monkeypatch):
    h = _mig_host(tmp_path, monkeypatch, 2, ("MIG-aaaa-1", "MIG-aaaa-2"))
    devices = gpu.RealNvml().devices()
    assert [(d.index, d.uuid, d.minor, d.mig) for d in devices] == [
        (0, h.uuids[0], 0, None), (1, "MIG-aaaa-1", 1, (1, 0)), (1, "MIG-aaaa-2", 1, (2, 0))]
    # a MIG UUID keeps its case and leases that slice; index 1 leases the GPU's slices
    assert gpu.parse_request("MIG-aaaa-2") == ("uuids", ["MIG-aaaa-2"])
    lease = gpu.acquire("device=MIG-aaaa-2", lock_dir=h.locks)
    assert lease.devices == ("MIG-aaaa-2",)
    with pytest.raises(GpuError, match="MIG slice MIG-aaaa-2.* is leased by another runner"):
        gpu.acquire("device=1", lock_dir=h.locks)
    lease.release()
    assert gpu.acquire("device=1", lock_dir=h.locks).devices == ("MIG-aaaa-1", "MIG-aaaa-2")


def test_mig_devices_access_passes_only_the_slices_own_capabilities(tmp_path, monkeypatch):
    h = _mig_host(tmp_path, monkeypatch, 1, ("MIG-s1", "MIG-s2"))
    minors = tmp_path / "mig-minors"
    minors.write_text("config 1\nmonitor 2\ngpu0/gi1/access 12\ngpu0/gi1/ci0/access 13\n"
                      "gpu0/gi2/access 21\ngpu0/gi2/ci0/access 22\n")
    for n in (1, 2, 12, 13, 21, 22):
        h.node(f"nvidia-caps/nvidia-cap{n}")
    access = gpu.devices_access(["MIG-s2"], gpu.RealNvml(), dev=h.dev, mig_minors=minors, ldconfig_output="")
    assert [inside for _, inside in access.device_nodes] == [
        "/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia0", "/dev/nvidia-caps/nvidia-cap21", "/dev/nvidia-caps/nvidia-cap22"]
    assert access.env["CUDA_VISIBLE_DEVICES"] == "MIG-s2"


def test_missing_uvm_node_is_an_error_not_a_container_without_cuda(host):
    (host.dev / "nvidia-uvm").unlink()
    with pytest.raises(GpuError, match="nvidia-uvm does not exist.*nvidia-modprobe -u -c=0"):
        gpu.devices_access([host.uuids[0]], gpu.RealNvml(), dev=host.dev, ldconfig_output="")


def test_a_32_bit_libcuda_first_on_the_search_path_is_skipped(tmp_path):
    from test_gpu import ELF32, ELF64

    lib32, lib64 = tmp_path / "nvidia/lib", tmp_path / "nvidia/lib64"
    for folder, head in ((lib32, ELF32), (lib64, ELF64)):
        folder.mkdir(parents=True)
        (folder / "libcuda.so.1").write_bytes(head)
        (folder / "libnvidia-ml.so.1").write_bytes(head)
    libs = gpu.driver_libraries("", [str(lib32), str(lib64)])
    assert libs == {"libcuda.so.1": lib64 / "libcuda.so.1", "libnvidia-ml.so.1": lib64 / "libnvidia-ml.so.1"}


def test_auto_says_why_it_runs_on_the_cpu_and_never_hides_a_broken_driver(tmp_path, monkeypatch):
    h = FakeGpuHost(tmp_path / "host")
    h.install(monkeypatch)
    h.machine["fail"] = {"nvmlInit": "DRIVER_NOT_LOADED"}
    h.write()
    # driver nodes present, NVML down: the GPUs are there and unusable
    with pytest.raises(GpuError, match="NVML cannot start: Driver Not Loaded, yet .*nvidiactl exists"):
        gpu.acquire("auto", lock_dir=h.locks, dev=h.dev)
    # a host without the driver: the CPU, and the lease says why
    lease = gpu.acquire("auto", lock_dir=h.locks, dev=tmp_path / "empty-dev")
    assert lease.devices == () and "Driver Not Loaded" in lease.cpu_reason and not lease.cpu_expected  # said
    h.machine["fail"] = {"nvmlInit": "LIBRARY_NOT_FOUND"}  # no NVIDIA library at all: a plain CPU host
    h.write()
    assert gpu.acquire("auto", lock_dir=h.locks, dev=tmp_path / "empty-dev").cpu_expected
    h.machine["fail"] = {"nvmlInit": "DRIVER_NOT_LOADED"}
    h.write()
    with pytest.raises(GpuError, match=r"--gpus all asks for every GPU of this host, and it has none \(NVML cannot start: Driver Not Loaded\): pass --gpus none"):
        gpu.acquire("all", lock_dir=h.locks, dev=tmp_path / "empty-dev")


def test_container_settings_name_exactly_the_leased_gpus():
    """NVIDIA_VISIBLE_DEVICES decides what an engine whose default runtime is nvidia gives: the
    leased GPUs through the toolkit, `void` for no GPU and for device nodes passed by hand."""
    from sandbox.docker_backend import hardened_create_kwargs
    from sandbox.spec import GpuAccess, Limits, RunSpec

    base = dict(image="x", command=("true",), limits=Limits(time_budget_s=5), log_path=Path("/tmp/x.log"), name="n")
    cpu = hardened_create_kwargs(RunSpec(**base))
    assert cpu["environment"]["NVIDIA_VISIBLE_DEVICES"] == "void" and "device_requests" not in cpu
    toolkit = hardened_create_kwargs(RunSpec(**base, gpus=("GPU-b", "MIG-c"), gpu_access=GpuAccess("toolkit")))
    [request] = toolkit["device_requests"]
    assert request["DeviceIDs"] == ["GPU-b", "MIG-c"] and request["Capabilities"] == [["gpu"]]
    assert toolkit["environment"]["NVIDIA_VISIBLE_DEVICES"] == "GPU-b,MIG-c"
    nodes = hardened_create_kwargs(RunSpec(**base, gpus=("GPU-b",), gpu_access=GpuAccess(
        "devices", (("/dev/nvidia1", "/dev/nvidia1"),), (), {"CUDA_VISIBLE_DEVICES": "GPU-b"})))
    assert nodes["environment"]["NVIDIA_VISIBLE_DEVICES"] == "void" and "device_requests" not in nodes
    assert nodes["devices"] == ["/dev/nvidia1:/dev/nvidia1:rwm"]


# --- the watchdog on the real engine ---------------------------------------------------------


@pytest.mark.docker
@pytest.mark.parametrize("ceiling", [None, 4.0])
def test_nvml_failing_mid_run_stops_only_a_run_with_a_ceiling(host, tmp_path, docker_client, monkeypatch, ceiling):
    """A transient NVML error is retried; one that lasts ends the run it cannot bound (reason
    `unwatched`), never the runner."""
    from sandbox import docker_backend
    from sandbox.docker_backend import DockerExecutor
    from sandbox.images import CPU_BASE_ALIAS, ensure_trainer_image
    from sandbox.spec import Limits, RunSpec

    monkeypatch.setattr(docker_backend, "WATCH_BLIND_S", 1.0)
    host.machine["fail"] = {"nvmlDeviceGetComputeRunningProcesses": "GPU_IS_LOST"}
    host.write()
    lease = gpu.GpuLease(devices=(host.uuids[0],), model="Fake H100", nvml=gpu.RealNvml())
    spec = RunSpec(image=ensure_trainer_image(docker_client, CPU_BASE_ALIAS).ref,
                   command=("python", "-c", "import time; time.sleep(4)"),
                   limits=Limits(time_budget_s=30, vram_limit_gb=ceiling), log_path=tmp_path / "log",
                   name=naming.container_name("run", "blindtest", "0" * 8), workdir="/tmp",
                   labels=naming.managed_labels(naming.KIND_RUN, **{naming.L_TAG: "blindtest", naming.L_OWNER: naming.owner()}))
    result = DockerExecutor(docker_client, vram_probe=lease.vram_probe()).run(spec)
    if ceiling is None:
        assert result.reason == "" and result.exit_code == 0
    else:
        assert result.reason == "unwatched" and result.wall_s < 4


# --- the CLI on a host with two (stand-in) GPUs ----------------------------------------------


def _gpu_repo(tmp_path) -> Path:
    return make_repo(tmp_path / "repo", GPU_TRAIN, extra={"runner.yaml": RUNNER_YAML})


@pytest.mark.docker
def test_a_night_on_two_gpus_through_the_cli(host, tmp_path, data_dir, docker_client):
    """`runner start --gpus 0,1 --workers 2`: each worker's container gets its own GPU's node
    and no other; the default ceiling is twice the baseline's NVML peak; an experiment above it
    is killed; `runner status` names the GPUs whole; a resumed night keeps the ceiling."""
    repo = _gpu_repo(tmp_path)
    mib = lambda labels: 1000.0 if labels.get(naming.L_ITERATION) == "0" else 5000.0  # noqa: E731
    with ProcessTable(host, docker_client, "g2", mib) as table:
        night = subprocess.Popen([sys.executable, "-m", "runner", "start", "--repo", str(repo), "--data-dir", str(data_dir),
                                  "--tag", "g2", "--gpus", "0,1", "--workers", "2", "--budget", "10",
                                  "--proposer", "offline", "--max-experiments", "2"],
                                 env={**os.environ, **host.env()}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not docker_client.containers.list(filters=naming.managed_filter(naming.KIND_RUN, **{naming.L_TAG: "g2"})):
            assert night.poll() is None and time.monotonic() < deadline, night.communicate()
            time.sleep(0.2)
        status = runner_cli("status", "--tag", "g2", env=host.env())
        out, err = night.communicate(timeout=300)
    assert night.returncode == 0, err
    assert status.returncode == 0 and host.uuids[0] in status.stdout, status.stdout  # whole, not cut

    events = _events(repo, "g2")
    runs = [e for e in events if e["event"] == "experiment"]
    baseline = runs[0]["run"]
    assert baseline["peak_vram_mb"] == 1000.0
    assert [e["gb"] for e in events if e["event"] == "vram_ceiling"] == [pytest.approx(2 * 1000 / 1024)]
    assert {r["run"]["reason"] for r in runs[1:]} == {"vram"}          # 5000 MiB > the 1.95 GiB ceiling
    gpus_of = {r["iteration"]: r["run"]["log"] for r in runs}
    facts = {i: _facts(Path(log).read_text()) for i, log in gpus_of.items() if "GPUFACTS" in Path(log).read_text()}
    assert facts[0]["nodes"] == ["nvidia-uvm", "nvidia0", "nvidiactl"] and facts[0]["cuda"] == host.uuids[0]
    assert facts[0]["nvidia"] == "void" and facts[0]["libcuda"]
    # the two experiments ran side by side, one on each GPU
    gpus = {labels[naming.L_ITERATION]: labels[naming.L_GPUS] for labels in table.seen.values()}
    assert gpus["0"] == host.uuids[0] and sorted([gpus["1"], gpus["2"]]) == sorted(host.uuids)

    # resumed: the ceiling the baseline set still holds (no new baseline, no new ceiling)
    with ProcessTable(host, docker_client, "g2", mib):
        r = runner_cli("start", "--repo", str(repo), "--data-dir", str(data_dir), "--tag", "g2", "--resume", "--gpus", "1",
                       "--budget", "10", "--proposer", "offline", "--max-experiments", "1", env=host.env())
    assert r.returncode == 0, r.stderr
    events = _events(repo, "g2")
    later = [e for e in events if e["event"] == "experiment"][len(runs):]
    assert later and all(e["run"]["limits"]["vram_limit_gb"] == pytest.approx(1.953, abs=1e-3) for e in later)
    assert len([e for e in events if e["event"] == "vram_ceiling"]) == 1


@pytest.mark.docker
def test_zero_free_gpus_is_an_error_and_a_cpu_night_says_so(host, tmp_path, data_dir):
    repo = _gpu_repo(tmp_path)
    held = gpu.acquire("all", lock_dir=host.locks)  # another runner holds both
    try:
        r = runner_cli("run", "--repo", str(repo), "--data-dir", str(data_dir), "--gpus", "auto", env=host.env())
    finally:
        held.release()
    assert r.returncode != 0 and "all 2 GPUs of this host are leased by other runners" in r.stderr
    assert "Traceback" not in r.stderr

    cpu_host = {**host.env(), "FAKE_NVML_FILE": str(tmp_path / "absent.json"), "AUTORESEARCH_DEV_DIR": str(tmp_path)}
    r = runner_cli("run", "--repo", str(repo), "--data-dir", str(data_dir), "--budget", "3", "--json", env=cpu_host)
    assert r.returncode == 0, r.stderr
    assert "no GPU leased (NVML cannot start: Driver Not Loaded): experiments run on the CPU" in r.stderr


@pytest.mark.docker
def test_a_blind_watchdog_stops_the_night_at_the_baseline(host, tmp_path, data_dir):
    """NVML never shows the baseline's processes (a runner in its own PID namespace): the
    ceiling could never fire, so the night does not start."""
    repo = _gpu_repo(tmp_path)
    r = runner_cli("start", "--repo", str(repo), "--data-dir", str(data_dir), "--tag", "blind", "--gpus", "device=0",
                   "--budget", "3", "--proposer", "offline", "--max-experiments", "1", env=host.env())
    assert r.returncode != 0
    assert "the VRAM watchdog saw no GPU memory of the baseline's processes" in r.stderr


@pytest.mark.docker
def test_doctor_checks_the_gpus_devices_and_the_configured_base_image(host, tmp_path):
    repo = make_repo(tmp_path / "repo", GPU_TRAIN, extra={"runner.yaml": "base_image: example.invalid/base:1\ngpu_runtime: devices\n"})
    r = runner_cli("doctor", "--repo", str(repo), env=host.env())
    assert f"[ok] GPU 0: Fake H100 80 GiB {host.uuids[0]}" in r.stdout
    assert "[ok] GPU access: devices (gpu_runtime: devices): 4 device nodes and the driver's libraries" in r.stdout
    assert "[FAIL] base image example.invalid/base:1 (base_image: example.invalid/base:1)" in r.stdout
    (host.dev / "nvidia-uvm").unlink()
    r = runner_cli("doctor", "--repo", str(repo), env=host.env())
    assert "[FAIL] GPU access: devices (gpu_runtime: devices) -> " in r.stdout and "nvidia-modprobe" in r.stdout
    assert r.returncode != 0
