"""A real Ray cluster on this machine, for the cluster tests: a head and a second node, each
with a Docker engine of its own (the head uses the tests' daemon; the second node a second
dockerd with its own socket, data root, exec root and bridge), so images really move between
engines; and a registry. Everything binds 127.0.0.1 or a unix socket and is stopped by the PIDs
started here.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

# Loopback only: every Ray process gets tests/ray_loopback on its PYTHONPATH (see there).
_LOOPBACK = str(Path(__file__).with_name("ray_loopback"))
_RAY = str(Path(sys.executable).with_name("ray"))
DRIVER_ENV = {"PYTHONPATH": _LOOPBACK}  # for a runner process that joins the cluster
# Quick failure detection: a killed raylet is declared dead in seconds, not half a minute.
_RAY_ENV = {"PYTHONPATH": _LOOPBACK, "RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
                "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(process: subprocess.Popen, grace: float = 20) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# The second engine's data root outlives the session, as the first engine's does (where the CPU
# base is made once): the base loaded into it stays for the next session (a save -> load of 1.3 GB,
# ~45 s on this project's 2-core host). A session that cannot have it (another holds its lock)
# gets a data root of its own.
ENGINE2_DATA = Path(os.environ.get("AUTORESEARCH_TEST_ENGINE2_DATA", "/var/cache/autoresearch-runner-tests/engine2"))


@contextmanager
def _data_root(root: Path):
    """ENGINE2_DATA, locked for this session, else a fresh folder under `root`."""
    import fcntl

    try:
        ENGINE2_DATA.mkdir(parents=True, exist_ok=True)
        lock = open(ENGINE2_DATA.parent / f"{ENGINE2_DATA.name}.lock", "w")
    except OSError:
        yield root / "data"
        return
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        yield root / "data"
        return
    try:
        yield ENGINE2_DATA
    finally:
        lock.close()


def provision(engine, source, ref: str) -> None:
    """`engine` holding `ref` (an image of engine `source`) and nothing else of an earlier session
    (containers, other images): loaded from `source` (copy_image) unless it is there already."""
    import contextlib

    import docker.errors

    wanted = source.images.get(ref)
    for container in engine.containers.list(all=True):
        container.remove(force=True)
    held = False
    for image in engine.images.list():
        if image.id == wanted.id:
            held = True
        else:
            with contextlib.suppress(docker.errors.ImageNotFound):  # gone with an image removed before it
                engine.images.remove(image.id, force=True)
    if held:
        engine.images.get(wanted.id).tag(*ref.rsplit(":", 1))
    else:
        copy_image(source, engine, ref)


@contextmanager
def second_engine(root: Path):
    """A second dockerd (its data root: ENGINE2_DATA where this session may have it); yields its
    DOCKER_HOST. It gets a bridge of its own (made here, removed after): a daemon told `--bridge
    none` deletes the host's docker0 at start, which would take the first daemon's network with
    it. It shares the host's loopback, so it pulls from a registry on 127.0.0.1."""
    root.mkdir(parents=True, exist_ok=True)
    with _data_root(root) as data:
        with _dockerd(root, data) as host:
            yield host


@contextmanager
def _dockerd(root: Path, data: Path):
    import random

    sock = root / "docker.sock"
    bridge = f"arbr{os.getpid() % 100000}"
    subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True)
    subprocess.run(["ip", "addr", "add", f"172.31.{random.randrange(2, 250)}.1/24", "dev", bridge], check=True)
    log = open(root / "dockerd.log", "wb")
    process = subprocess.Popen(
        ["dockerd", "--host", f"unix://{sock}", "--data-root", str(data), "--exec-root", str(root / "exec"),
         "--pidfile", str(root / "docker.pid"), "--bridge", bridge, "--iptables=false", "--ip-masq=false",
         "--containerd-namespace", f"ar-{root.name}", "--containerd-plugins-namespace", f"ar-{root.name}-p"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        import docker

        for _ in range(120):
            try:
                docker.DockerClient(base_url=f"unix://{sock}").ping()
                break
            except Exception:
                if process.poll() is not None:
                    raise RuntimeError(f"the second dockerd exited: {(root / 'dockerd.log').read_text()[-2000:]}")
                time.sleep(0.5)
        else:
            raise RuntimeError("the second dockerd did not answer in 60 s")
        yield f"unix://{sock}"
    finally:
        _stop(process, 30)
        log.close()
        subprocess.run(["ip", "link", "delete", bridge], check=False)
        shutil.rmtree(root / "exec", ignore_errors=True)


def copy_image(source, target, ref: str) -> None:
    """`ref` from engine `source` onto engine `target` as `docker save | docker load` moves it:
    a node whose admin loaded the base image (36 s for the 1.3 GB CPU base on the tests' 2-core
    host; the same chain through a Ray Client connection took ~95 s)."""
    target.images.load(source.images.get(ref).save(chunk_size=1 << 20, named=True))


# Parts of the CPU base image that a repo needing no torch never uses: its Python packages
# (torch, sympy), the compilers and headers (torch.compile's), documentation.
_NOT_FOR_PLAIN_PYTHON = ("usr/local/lib/python3.11/dist-packages/", "usr/lib/gcc", "usr/libexec/gcc", "usr/include/",
                         "usr/share/doc/", "usr/share/locale/", "usr/share/man/")


def python_only_image(client) -> str:
    """The CPU base image's root filesystem without what only torch needs (_NOT_FOR_PLAIN_PYTHON):
    python3 in ~270 MB instead of 1.3 GB, for cluster tests whose repos need no torch (a registry
    push is a gzip of every layer). Made once per base image (its id names it); its reference."""
    import io
    import tarfile

    from sandbox.images import CPU_BASE_ALIAS, find_image
    from sandbox.transfer import ChunkReader

    base = client.images.get(CPU_BASE_ALIAS)
    ref = f"autoresearch-runner-test/python-only:{base.id.split(':')[1][:12]}"
    if find_image(client, ref) is not None:
        return ref

    box = client.containers.create(base.id, "true")
    try:
        with tempfile.NamedTemporaryFile(suffix=".tar") as out:
            exported = io.BufferedReader(ChunkReader(box.export(chunk_size=1 << 20)), 1 << 20)
            with tarfile.open(fileobj=exported, mode="r|") as src, tarfile.open(fileobj=out, mode="w|") as dst:
                for member in src:
                    if not member.name.startswith(_NOT_FOR_PLAIN_PYTHON):
                        dst.addfile(member, src.extractfile(member) if member.isfile() else None)
            out.flush()
            repository, tag = ref.split(":")
            client.api.import_image_from_file(out.name, repository=repository, tag=tag, changes=[
                f"ENV {e}" for e in base.attrs["Config"]["Env"]] + ['CMD ["python3"]'])
    finally:
        box.remove()
    return ref


@contextmanager
def registry(root: Path):
    """Debian's docker-registry on 127.0.0.1 (storage under `root`); yields HOST:PORT."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = root / "config.yml"
    config.write_text(f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
                      f"http:\n  addr: 127.0.0.1:{port}\n")
    log = open(root / "registry.log", "wb")
    process = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(60):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.25)
        yield f"127.0.0.1:{port}"
    finally:
        _stop(process)
        log.close()


class RayCluster:
    """`ray start --block` processes: the head (this machine's engine) and one node per extra
    engine."""

    def __init__(self, root: Path):
        self.root = root
        self.port, self.client_port = free_port(), free_port()
        self.processes: list[subprocess.Popen] = []

    @property
    def address(self) -> str:
        """The GCS address: a runner given it joins the cluster as a driver (it must be on a node)."""
        return f"127.0.0.1:{self.port}"

    @property
    def client_address(self) -> str:
        """The Ray Client address (ray://): a runner given it needs only to reach the head."""
        return f"ray://127.0.0.1:{self.client_port}"

    def _start(self, args: list[str], env: dict, name: str, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "wb")
        p = subprocess.Popen([*prefix, _RAY, "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                              "--object-store-memory=2000000000", *args],
                             env={**os.environ, **_RAY_ENV, **env, "PYTHONPATH": _pythonpath(env)}, stdout=log,
                             stderr=subprocess.STDOUT,
                             start_new_session=True)
        self.processes.append(p)
        return p

    def start_head(self, docker_host: str | None = None, env: dict | None = None, args: tuple[str, ...] = ()) -> None:
        """`env`: more of the head's environment (a PYTHONPATH given comes before
        tests/ray_loopback); `args`: more `ray start` options (--num-gpus)."""
        self.root.mkdir(parents=True, exist_ok=True)
        env = {**({"DOCKER_HOST": docker_host} if docker_host else {}), **(env or {})}
        self._start(["--head", f"--port={self.port}", f"--ray-client-server-port={self.client_port}",
                     "--include-dashboard=false", f"--temp-dir={self.root / 'tmp'}",
                     f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}", *args], env, "head")
        self.wait_nodes(1)
        self._wait_client()

    def _wait_client(self, timeout: float = 60) -> None:
        """The Ray Client proxy comes up after the node: a client that arrives first is refused."""
        import ray

        deadline = time.monotonic() + timeout
        while True:
            try:
                ray.init(self.client_address, logging_level="ERROR")
                ray.shutdown()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def add_node(self, docker_host: str | None, name: str = "node2", overlay: tuple[Path, Path] | None = None,
                 env: dict | None = None, args: tuple[str, ...] = ()) -> subprocess.Popen:
        """A node whose runs go to `docker_host` (None: this process's engine). `overlay`
        (source, target): in the node's own mount namespace, `target` shows `source` (a host
        whose data differs). `env` and `args`: as for start_head."""
        prefix = ()
        if overlay:
            prefix = ("unshare", "--mount", "--propagation", "private", "sh", "-c",
                      'mount --bind "$1" "$2" && shift 2 && exec "$@"', "sh", str(overlay[0]), str(overlay[1]))
        env = {**({"DOCKER_HOST": docker_host} if docker_host else {}), **(env or {})}
        p = self._start([f"--address=127.0.0.1:{self.port}", f"--dashboard-agent-listen-port={free_port()}",
                         f"--metrics-export-port={free_port()}", *args], env, name, prefix)
        self.wait_nodes(len(self.processes))
        return p

    def alive_nodes(self) -> int:
        r = subprocess.run([_RAY, "status", f"--address=127.0.0.1:{self.port}"],
                           capture_output=True, text=True, env={**os.environ, **_RAY_ENV})
        if r.returncode != 0:
            return 0
        active = r.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
        return sum(1 for line in active.splitlines() if line.strip().startswith("1 node_"))

    def wait_nodes(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.alive_nodes() < n:
            if time.monotonic() > deadline:
                logs = "\n".join((self.root / f).read_text()[-1500:] for f in os.listdir(self.root) if f.endswith(".log"))
                raise RuntimeError(f"the Ray cluster has fewer than {n} nodes after {timeout:.0f} s:\n{logs}")
            time.sleep(1)

    def kill_raylet(self, process: subprocess.Popen) -> int:
        """SIGKILL the raylet that `process` (a `ray start --block` of ours) started; its PID."""
        raylet = next(pid for pid in _descendants(process.pid) if Path(f"/proc/{pid}/comm").read_text().strip() == "raylet")
        os.kill(raylet, signal.SIGKILL)
        return raylet

    def stop(self) -> None:
        for p in reversed(self.processes):
            _stop(p)



def _pythonpath(env: dict) -> str:
    """A node's PYTHONPATH: `env`'s (a fake pynvml first), then the loopback patch, always."""
    return os.pathsep.join(filter(None, [env.get("PYTHONPATH"), _LOOPBACK]))


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
