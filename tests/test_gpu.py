"""GPU leases and the VRAM watchdog, driven through a fake NVML device layer (no GPU here).

The watchdog test runs a real container: the fake NVML reports the container's real host PID
as a GPU process, and the watchdog must map it to the container through its cgroup and kill it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sandbox import gpu, naming
from sandbox.gpu import GpuDevice, GpuError

REPO_ROOT = Path(__file__).resolve().parent.parent

DEVICES = [GpuDevice(i, uuid, "Fake H100", 81559.0, minor=i) for i, uuid in enumerate(("GPU-aaaa", "GPU-bbbb", "GPU-cccc"))]


class FakeNvml:
    """The Nvml protocol in memory, for lease logic (tests/test_gpu_host.py drives the real
    RealNvml through tests/fakenvml's pynvml)."""

    error = None

    def __init__(self, devices=DEVICES, processes=None):
        self._devices = devices
        self.processes = processes or {}   # uuid -> {pid: MiB}

    def devices(self):
        return list(self._devices)

    def process_vram_mb(self, uuid):
        return dict(self.processes.get(uuid, {}))


@pytest.mark.parametrize("text,parsed", [
    ("none", ("none", None)), ("all", ("all", None)), ("4", ("count", 4)),
    ("0,2", ("indices", [0, 2])), ("device=2", ("indices", [2])),
])
def test_gpu_request_grammar(text, parsed):
    assert gpu.parse_request(text) == parsed


def test_bad_gpu_requests_are_one_clear_error(tmp_path):
    with pytest.raises(GpuError, match="GPU 7 does not exist on this host"):
        gpu.acquire("0,7", FakeNvml(), lock_dir=tmp_path)
    with pytest.raises(GpuError, match="asked for 4 GPUs, this host has 3"):
        gpu.acquire("4", FakeNvml(), lock_dir=tmp_path)
    with pytest.raises(GpuError, match="not understood"):
        gpu.acquire("gpu0", FakeNvml(), lock_dir=tmp_path)


def test_two_runners_never_share_a_gpu(tmp_path):
    first = gpu.acquire("0,2", FakeNvml(), lock_dir=tmp_path)
    assert first.devices == ("GPU-aaaa", "GPU-cccc") and first.model == "Fake H100"
    with pytest.raises(GpuError, match="GPU 0 .* is leased by another runner"):
        gpu.acquire("device=0", FakeNvml(), lock_dir=tmp_path)
    with pytest.raises(GpuError, match="GPU 0 .* is leased by another runner on this host: --gpus auto takes the free ones"):
        gpu.acquire("all", FakeNvml(), lock_dir=tmp_path)
    second = gpu.acquire("auto", FakeNvml(), lock_dir=tmp_path)
    assert second.devices == ("GPU-bbbb",)
    with pytest.raises(GpuError, match="only 0 are free"):
        gpu.acquire("1", FakeNvml(), lock_dir=tmp_path)
    with pytest.raises(GpuError, match="all 3 GPUs of this host are leased by other runners"):
        gpu.acquire("auto", FakeNvml(), lock_dir=tmp_path)  # never a silent night on the CPU
    first.release()
    assert gpu.acquire("2", FakeNvml(), lock_dir=tmp_path).devices == ("GPU-aaaa", "GPU-cccc")


def test_a_gpu_held_by_a_running_container_is_not_leased(tmp_path):
    lease = gpu.acquire("auto", FakeNvml(), busy={"GPU-bbbb"}, lock_dir=tmp_path)
    assert lease.devices == ("GPU-aaaa", "GPU-cccc")


def test_a_lease_vanishes_when_its_process_dies(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.getcwd()!r})
        from pathlib import Path
        from sandbox import gpu
        from tests.test_gpu import FakeNvml
        lease = gpu.acquire("device=1", FakeNvml(), lock_dir=Path({str(tmp_path)!r}))
        print("held", flush=True)
        time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(GpuError, match="leased by another runner"):
        gpu.acquire("device=1", FakeNvml(), lock_dir=tmp_path)
    holder.kill()
    holder.wait()
    assert gpu.acquire("device=1", FakeNvml(), lock_dir=tmp_path).devices == ("GPU-bbbb",)


def test_vram_is_summed_over_the_container_processes_only():
    nvml = FakeNvml(processes={"GPU-aaaa": {10: 1000.0, 11: 500.0, 12: 7000.0}, "GPU-cccc": {10: 250.0}})
    cgroups = {10: "12:memory:/docker/abc123\n", 11: "0::/system.slice/docker-abc123.scope\n", 12: "0::/docker/other\n"}
    owns = gpu.in_container("abc123", cgroup_reader=lambda pid: cgroups.get(pid, ""))
    assert gpu.vram_of(nvml, ["GPU-aaaa", "GPU-cccc"], owns) == 1750.0


@pytest.mark.docker
def test_watchdog_kills_a_container_above_the_vram_ceiling(tmp_path, docker_client):
    """A real container; the fake NVML says its (real) host PID holds 5 GiB on a leased GPU."""
    from sandbox.docker_backend import DockerExecutor
    from sandbox.images import CPU_BASE_ALIAS, ensure_trainer_image
    from sandbox.spec import Limits, RunSpec

    image = ensure_trainer_image(docker_client, CPU_BASE_ALIAS)

    class GpuProcessOfContainer(FakeNvml):
        def process_vram_mb(self, uuid):
            if uuid != "GPU-aaaa":
                return {}
            running = docker_client.containers.list(filters=naming.managed_filter(naming.KIND_RUN, **{naming.L_TAG: "vramtest"}))
            return {c.attrs["State"]["Pid"]: 5120.0 for c in running} | {1: 99999.0}  # pid 1 is not in it

    lease = gpu.GpuLease(devices=("GPU-aaaa",), model="Fake H100", nvml=GpuProcessOfContainer())
    sandbox = DockerExecutor(docker_client, vram_probe=lease.vram_probe())
    spec = RunSpec(image=image.ref, command=("python", "-c", "import time; time.sleep(60)"),
                   limits=Limits(time_budget_s=30, vram_limit_gb=4.0), log_path=tmp_path / "log",
                   name=naming.container_name("run", "vramtest", "0" * 8), workdir="/tmp",
                   labels=naming.managed_labels(naming.KIND_RUN, **{naming.L_TAG: "vramtest", naming.L_OWNER: naming.owner()}))
    result = sandbox.run(spec)
    assert result.reason == "vram" and result.peak_vram_mb == 5120.0 and result.wall_s < 10
    from runner.summary import judge, memory_gb
    assert judge(result).status == "crash" and memory_gb(result) == 5.0


def test_slots_split_gpus_and_cpus():
    from runner.config import ConfigError
    from runner.engine import make_slots

    assert [s.devices for s in make_slots(("a", "b", "c", "d"), 2)] == [("a", "b"), ("c", "d")]
    assert [s.devices for s in make_slots(("a", "b"), None)] == [("a",), ("b",)]
    assert [s.cpuset for s in make_slots((), 2, cpus=[0, 1, 2, 3])] == ["0,1", "2,3"]
    assert make_slots((), None)[0].cpuset is None
    # every leased GPU works: 3 over 2 workers is 2 + 1, not 1 + 1 and one idle
    assert [s.devices for s in make_slots(("a", "b", "c"), 2)] == [("a", "b"), ("c",)]
    # limits.cpuset bounds the CPUs the workers split
    from runner.engine import cpuset_cpus
    assert [s.cpuset for s in make_slots((), 2, cpus=cpuset_cpus("4-7"))] == ["4,5", "6,7"]
    assert make_slots((), None, cpus=cpuset_cpus("2-3"))[0].cpuset == "2,3"
    with pytest.raises(ConfigError, match="needs 3 GPUs"):
        make_slots(("a", "b"), 3)


# --- GPUs without nvidia-container-toolkit: device nodes and the driver's libraries -------------

LDCONFIG = """\
1234 libs found in cache `/etc/ld.so.cache'
\tlibnvidia-ml.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1
\tlibnvidia-ml.so.1 (libc6) => /usr/lib/i386-linux-gnu/libnvidia-ml.so.1
\tlibcuda.so.1 (libc6,x86-64) => {libcuda}
\tlibcudart.so.12 (libc6,x86-64) => /usr/local/cuda/lib64/libcudart.so.12
\tlibnvidia-ptxjitcompiler.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libnvidia-ptxjitcompiler.so.1
\tlibm.so.6 (libc6,x86-64) => /lib/x86_64-linux-gnu/libm.so.6
"""


ELF64 = b"\x7fELF\x02\x01\x01" + bytes(57)   # the start of a 64-bit ELF object
ELF32 = b"\x7fELF\x01\x01\x01" + bytes(45)


def _fake_driver(tmp_path):
    """A /dev with GPU nodes 0-2 (char devices that behave as /dev/null) and a libcuda file."""
    dev = tmp_path / "dev"
    dev.mkdir()
    for name in ("nvidiactl", "nvidia-uvm", "nvidia0", "nvidia1", "nvidia2"):
        os.mknod(dev / name, 0o666 | 0o020000, os.makedev(1, 3))
        os.chmod(dev / name, 0o666)
    libcuda = tmp_path / "libcuda.so.580.1"
    libcuda.write_text("fake driver library\n")
    return dev, LDCONFIG.format(libcuda=libcuda)


def test_driver_libraries_are_the_drivers_64_bit_ones():
    libs = gpu.driver_libraries(LDCONFIG.format(libcuda="/usr/lib/x86_64-linux-gnu/libcuda.so.1"))
    assert set(libs) == {"libnvidia-ml.so.1", "libcuda.so.1", "libnvidia-ptxjitcompiler.so.1"}
    assert str(libs["libnvidia-ml.so.1"]).startswith("/usr/lib/x86_64")


def test_driver_libraries_found_in_the_drivers_folder_when_ldconfig_has_none(tmp_path):
    for name in ("libcuda.so.580.95", "libnvidia-ml.so.580.95", "libcudart.so.12"):
        (tmp_path / name).write_bytes(ELF64)
    (tmp_path / "libcuda.so.1").symlink_to("libcuda.so.580.95")
    libs = gpu.driver_libraries("", [str(tmp_path / "absent"), str(tmp_path)])
    assert set(libs) == {"libcuda.so.580.95", "libcuda.so.1", "libnvidia-ml.so.580.95"}


def test_devices_access_passes_only_the_leased_gpus(tmp_path):
    dev, ldconfig = _fake_driver(tmp_path)
    access = gpu.devices_access(("GPU-cccc",), FakeNvml(), dev=dev, ldconfig_output=ldconfig)
    assert access.runtime == "devices"
    assert [inside for _, inside in access.device_nodes] == ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia2"]
    targets = {inside for _, inside in access.library_mounts}
    assert {f"{gpu.NVIDIA_LIB_DIR}/libcuda.so.1", f"{gpu.NVIDIA_LIB_DIR}/libcuda.so"} <= targets
    assert access.env["CUDA_VISIBLE_DEVICES"] == "GPU-cccc"
    with pytest.raises(GpuError, match="no 64-bit libcuda.so"):
        gpu.devices_access(("GPU-aaaa",), FakeNvml(), dev=dev, ldconfig_output="")
    with pytest.raises(GpuError, match="nvidia7 does not exist"):
        gpu.devices_access(("GPU-x",), FakeNvml([GpuDevice(7, "GPU-x", "Fake", 1.0, minor=7)]), dev=dev, ldconfig_output=ldconfig)


@pytest.mark.docker
def test_devices_runtime_gives_a_hardened_container_the_nodes_and_libraries(tmp_path, docker_client):
    """The real engine, no toolkit: the leased GPU's node and the driver's library reach a
    uid-10001, cap-drop-ALL container; the other GPUs' nodes do not; the library is read-only."""
    from sandbox.docker_backend import DockerExecutor
    from sandbox.images import CPU_BASE_ALIAS, ensure_trainer_image
    from sandbox.spec import Limits, RunSpec

    dev, ldconfig = _fake_driver(tmp_path)
    access = gpu.devices_access(("GPU-bbbb",), FakeNvml(), dev=dev, ldconfig_output=ldconfig)
    image = ensure_trainer_image(docker_client, CPU_BASE_ALIAS)
    probe = textwrap.dedent(f"""\
        import json, os, stat
        lib = "{gpu.NVIDIA_LIB_DIR}/libcuda.so.1"
        def writable(p):
            try:
                open(p, "a").close(); return True
            except OSError:
                return False
        print("FACTS " + json.dumps({{
            "nodes": sorted(n for n in os.listdir("/dev") if n.startswith("nvidia")),
            "char": stat.S_ISCHR(os.stat("/dev/nvidia1").st_mode),
            "open_rw": os.open("/dev/nvidia1", os.O_RDWR) >= 0,
            "lib": open(lib).read(), "lib_writable": writable(lib),
            "ld": os.environ.get("LD_LIBRARY_PATH"), "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "uid": os.getuid()}}))
        """)
    spec = RunSpec(image=image.ref, command=("python", "-c", probe), limits=Limits(time_budget_s=10),
                   log_path=tmp_path / "log", name=naming.container_name("run", "devtest", "0" * 8),
                   labels=naming.managed_labels(naming.KIND_RUN, **{naming.L_TAG: "devtest", naming.L_OWNER: naming.owner()}),
                   gpus=("GPU-bbbb",), gpu_access=access)
    result = DockerExecutor(docker_client).run(spec)
    assert result.exit_code == 0, result.output_tail
    facts = json.loads(next(l for l in result.output_tail.splitlines() if l.startswith("FACTS "))[6:])
    assert facts["nodes"] == ["nvidia-uvm", "nvidia1", "nvidiactl"]
    assert facts["char"] and facts["open_rw"] and facts["uid"] == 10001
    assert facts["lib"] == "fake driver library\n" and facts["lib_writable"] is False
    assert facts["ld"].split(":")[0] == gpu.NVIDIA_LIB_DIR and facts["cuda"] == "GPU-bbbb"


@pytest.mark.docker
def test_auto_runtime_uses_device_nodes_on_an_engine_without_the_toolkit(tmp_path, engine_for):
    from conftest import MINI_PREPARE, make_repo

    repo = make_repo(tmp_path / "repo", "print('x')\n", MINI_PREPARE)
    engine = engine_for(repo)
    assert engine.executor.gpu_runtime("auto") == "devices"  # this engine has no nvidia runtime
    assert engine_for(repo, gpu_runtime="toolkit").gpu_access(("GPU-aaaa",)).runtime == "toolkit"
    engine.gpus = gpu.GpuLease(devices=("GPU-aaaa",), nvml=FakeNvml())
    with pytest.raises(GpuError, match="nvidiactl does not exist, and CUDA cannot start without it.*gpu_runtime: toolkit"):
        engine.gpu_access(("GPU-aaaa",))  # this host has no driver: its /dev has no NVIDIA nodes


def test_users_share_the_lock_directory_whoever_made_it(tmp_path):
    """Two users on one host: the second must lease a free GPU and be refused a held one, not
    get a PermissionError traceback because the first made the lock directory."""
    import shutil
    import tempfile

    python = shutil.which("python3", path="/usr/bin:/bin")  # one another user can run (not a venv under /root)
    if os.getuid() != 0 or python is None:
        pytest.skip("needs root to act as a second user, and a system python3")
    shared = Path(tempfile.mkdtemp(prefix="ar-locks-", dir="/tmp"))
    shared.chmod(0o755)
    lock_dir = shared / "locks"
    first = gpu.acquire("device=0", FakeNvml(), lock_dir=lock_dir)  # root makes the directory
    assert lock_dir.stat().st_mode & 0o7777 == 0o1777
    other_user = textwrap.dedent(f"""\
        import sys
        sys.path[:0] = [{str(REPO_ROOT)!r}]
        from pathlib import Path
        from sandbox import gpu
        class FakeNvml:
            error = None
            def devices(self):
                return [gpu.GpuDevice(0, "GPU-aaaa", "Fake", 1.0), gpu.GpuDevice(1, "GPU-bbbb", "Fake", 1.0)]
        lease = gpu.acquire("device=1", FakeNvml(), lock_dir=Path({str(lock_dir)!r}))
        print("leased", lease.devices)
        try:
            gpu.acquire("device=0", FakeNvml(), lock_dir=Path({str(lock_dir)!r}))
        except gpu.GpuError as exc:
            print("refused", exc)
        """)
    try:
        r = subprocess.run([python, "-c", other_user], capture_output=True, text=True, timeout=60,
                           user=65534, group=65534, cwd="/", env={"PATH": "/usr/bin:/bin"})
    finally:
        first.release()
        shutil.rmtree(shared)
    assert r.returncode == 0, r.stderr
    assert "leased ('GPU-bbbb',)" in r.stdout
    assert "refused GPU 0 (GPU-aaaa) is leased by another runner" in r.stdout
