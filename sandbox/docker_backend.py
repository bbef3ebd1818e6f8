"""The Docker backend, through the Docker SDK: DockerImageStore (images on this host's engine)
and DockerExecutor (runs on it); open_docker pairs them on one connection.

Lifecycle, explicitly: create -> attach -> start -> our own deadline and watchdogs ->
reload() for State.OOMKilled / ExitCode -> remove(force=True) in `finally`.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import functools
import json
import os
import re
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from pathlib import Path
from typing import BinaryIO, Callable

import docker
import docker.errors
import docker.types
import requests.exceptions

from . import images, naming
from .backend import Backend, BackendSettings, Executor, ImageRecord, ImageStore, RunningRun, SandboxError
from .cgroups import memory_files
from .collect import COLLECT_TIMEOUT_S, TAR_OVERHEAD_BYTES, Refused, receive_regular_files, tar_command
from .gpu import NVIDIA_LIB_DIR
from .hooks.verify_protocol import COLLECTED_FILE
from .logcap import CappedLog
from .spec import (
    EXPORT_DIR,
    EXPORT_FILES,
    EXPORT_MARK,
    REASON_EXIT,
    REASON_INTERRUPTED,
    REASON_OOM,
    REASON_TIMEOUT,
    REASON_UNWATCHED,
    REASON_VRAM,
    RunResult,
    RunSpec,
)

ARCHIVES_KEPT = 64  # experiment archives a store keeps for shipping (each up to train.py's size cap)
POLL_S = 0.2  # watchdog period: memory, VRAM, deadline and stop requests
WAIT_ATTEMPTS = 30  # a container's wait that breaks is asked again, about a second apart
WATCH_BLIND_S = 10.0  # NVML failing this long stops a run whose VRAM the watchdog must bound
SECCOMP_PROFILE = json.dumps(json.loads(Path(__file__).with_name("seccomp").joinpath("default.json").read_text()),
                             separators=(",", ":"))

# Called with a container id; returns the MiB of VRAM its processes hold (NVML).
VramProbe = Callable[[str], float]


def connect() -> docker.DockerClient:
    """A client for the engine named by DOCKER_HOST (or the default socket).

    Raises:
        SandboxError: no engine answers, with what to do about it.
    """
    try:
        client = docker.from_env(timeout=300)
        client.ping()
        return client
    except docker.errors.DockerException as exc:
        raise SandboxError(
            f"no Docker engine answers ({exc.__class__.__name__}): start dockerd "
            "(or set DOCKER_HOST) and check that this user may use its socket"
        ) from None


def hardened_create_kwargs(spec: RunSpec, image_env: dict[str, str] | None = None) -> dict:
    """The container settings that enforce the sandbox contract. One place, every run.

    Args:
        image_env: the image's own ENV; `devices` GPU access puts the driver's library
            directory in front of its LD_LIBRARY_PATH.
    """
    lim = spec.limits
    kwargs = dict(
        image=spec.image,
        # The deadline holds without the runner: coreutils' timeout, below the init, ends the
        # command's whole process group (TERM, then KILL) after inner_deadline_s. A live runner
        # stops the run earlier (deadline_s) and records why.
        command=["timeout", "--kill-after", f"{lim.kill_grace_s:g}s", f"{lim.inner_deadline_s:g}s", *spec.command],
        name=spec.name,
        labels=dict(spec.labels),
        environment=dict(spec.env),
        user=spec.user,
        working_dir=spec.workdir,
        network_mode="bridge" if spec.network else "none",
        read_only=spec.read_only_root,
        # The engine mounts a tmpfs noexec unless told `exec`. /tmp must be executable: inductor
        # and Triton build shared objects there (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR) and
        # load them; nosuid and nodev keep it from granting anything. /out holds data only.
        tmpfs={
            "/tmp": f"rw,exec,nosuid,nodev,size={lim.tmp_size_bytes},mode=1777",
            "/out": f"rw,nosuid,nodev,noexec,size={lim.out_size_bytes},mode=1777",
        },
        mounts=[
            docker.types.Mount(target=m.target, source=str(m.source), type="bind", read_only=m.read_only)
            for m in spec.mounts
        ],
        cap_drop=["ALL"],
        # The engine's current default seccomp profile, shipped with the runner: older engines'
        # built-in one still allows io_uring (sandbox/seccomp/README.md).
        security_opt=["no-new-privileges:true", f"seccomp={SECCOMP_PROFILE}"],
        init=True,  # tini reaps zombies and forwards SIGTERM to the training process
        ipc_mode="private",
        pids_limit=lim.pids_limit,
        # nofile: pids x nofile is this run's share of the host's file table (fs.file-max);
        # core 0: on hosts whose core_pattern is a pipe, a core dump runs a handler as root.
        ulimits=[docker.types.Ulimit(name="nofile", soft=lim.nofile, hard=lim.nofile),
                 docker.types.Ulimit(name="core", soft=0, hard=0)],
        # docker-py would copy ~/.docker/config.json's proxies (credentials included) into the
        # environment: the environment is an allow-list, nothing else enters.
        use_config_proxy=False,
        mem_limit=lim.mem_limit_bytes,
        memswap_limit=lim.mem_limit_bytes,  # equal: no swap to hide a blow-up in
        # The engine's own copy of the output is tiny: our capped stream is the log of record,
        # and an unbounded json-file would let a print flood fill the engine's disk.
        log_config=docker.types.LogConfig(type="json-file", config={"max-size": "1m", "max-file": "1"}),
        stdin_open=False,
        tty=False,
        detach=True,
    )
    if not spec.network:
        # The engine copies the host's resolv.conf even into network "none"; hide it so the
        # code inside learns no resolver address either.
        kwargs["mounts"].append(docker.types.Mount(target="/etc/resolv.conf", source="/dev/null", type="bind", read_only=True))
    if lim.runtime:
        kwargs["runtime"] = lim.runtime
    if lim.cpus:
        kwargs["nano_cpus"] = int(lim.cpus * 1e9)
    if lim.cpuset:
        kwargs["cpuset_cpus"] = lim.cpuset
    # An engine whose default runtime is nvidia gives a container what NVIDIA_VISIBLE_DEVICES
    # names, and CUDA base images set it to `all`: it names exactly the leased GPUs when the
    # toolkit passes them, else `void` (no GPU, or the device nodes passed by hand below).
    toolkit = bool(spec.gpus) and spec.gpu_access.runtime != "devices"
    kwargs["environment"]["NVIDIA_VISIBLE_DEVICES"] = ",".join(spec.gpus) if toolkit else "void"
    if spec.gpus and spec.gpu_access.runtime == "devices":
        # No nvidia-container-toolkit: the leased GPUs' device nodes and the driver's
        # user-space libraries (read-only) are passed by hand, as the toolkit would.
        access = spec.gpu_access
        kwargs["devices"] = [f"{host}:{inside}:rwm" for host, inside in access.device_nodes]
        kwargs["mounts"] += [docker.types.Mount(target=inside, source=host, type="bind", read_only=True)
                             for host, inside in access.library_mounts]
        env = kwargs["environment"]
        env.update(access.env)
        image_ld = (image_env or {}).get("LD_LIBRARY_PATH", "")
        if NVIDIA_LIB_DIR not in image_ld.split(":"):
            env["LD_LIBRARY_PATH"] = ":".join(p for p in (NVIDIA_LIB_DIR, image_ld) if p)
    elif spec.gpus:
        kwargs["device_requests"] = [docker.types.DeviceRequest(device_ids=list(spec.gpus), capabilities=[["gpu"]])]
    return kwargs


def image_env(image) -> dict[str, str]:
    """An image's ENV as a dict."""
    return dict(e.split("=", 1) for e in (image.attrs.get("Config") or {}).get("Env") or [] if "=" in e)


class _CgroupMemory:
    """Samples a container's memory from the host's cgroup files (see sandbox.cgroups).

    Where they are not visible (a runner in its own PID namespace), `sample()` returns None
    and the watchdog falls back to the Docker stats API.
    """

    def __init__(self, pid: int):
        self.files = memory_files(pid) if pid else []

    def sample(self) -> int | None:
        for f in self.files:
            try:
                return int(f.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
        return None


def _engine_errors(what: str):
    """Turn the Docker SDK's and HTTP errors of a backend method into SandboxError: the facade
    lets nothing of the engine's client through."""

    def wrap(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
                raise SandboxError(f"Docker engine error {what}: {exc}") from None
        return wrapper

    return wrap


def engine_version(client: docker.DockerClient) -> str:
    v = client.version()
    return f"Docker engine {v.get('Version')} (API {v.get('ApiVersion')})"


def _our_name(tags, image_id: str) -> str:
    """The runner's own name among an image's tags (autoresearch-runner/...), else its id."""
    return next((t for t in tags if t.startswith(naming.REPO + "/")), image_id)


def _record(image) -> ImageRecord:
    """An image as the engine inspects it (docker.models.images.Image)."""
    ref = _our_name(image.tags, image.id)
    created = image.attrs.get("Created", "")  # RFC 3339 with nanoseconds: to the second, as listed
    return ImageRecord(ref, image.id, dict(image.labels or {}), created and created[:19] + "Z", image.attrs.get("Size"))


def _listed(summary: dict) -> ImageRecord:
    """An image as the engine lists it (GET /images/json): the same record without inspecting it."""
    ref = _our_name(summary.get("RepoTags") or (), summary["Id"])
    created = datetime.datetime.fromtimestamp(summary.get("Created", 0), datetime.timezone.utc)
    return ImageRecord(ref, summary["Id"], dict(summary.get("Labels") or {}), created.strftime("%Y-%m-%dT%H:%M:%SZ"),
                       summary.get("Size"))


def open_docker(settings: BackendSettings, vram_probe: VramProbe | None = None, runs: bool = True) -> Backend:
    """The local engine (DOCKER_HOST, else the default socket) as store and executor."""
    client = connect()
    return Backend(DockerImageStore(client), DockerExecutor(client, vram_probe=vram_probe))


class DockerImageStore(ImageStore):
    """The images on a local (or DOCKER_HOST) Docker engine."""

    def __init__(self, client: docker.DockerClient | None = None):
        self.client = client or connect()
        # id -> (parent id, archive) of the experiment images made here lately: what moves one
        # to another engine holding its parent (sandbox/ray_backend.py _Shipper)
        self._archives: collections.OrderedDict[str, tuple[str, bytes]] = collections.OrderedDict()
        self._sizes: dict[str, int] = {}  # image id -> Size (_size)

    def archive_of(self, image_id: str) -> tuple[str, bytes] | None:
        """(parent id, the docker-load archive that makes `image_id` on top of it) for an
        experiment image this store made lately, else None."""
        return self._archives.get(image_id)

    # --- images ------------------------------------------------------------------------

    @_engine_errors("resolving the base image")
    def resolve_base(self, requested: str, want_gpu: bool) -> ImageRecord:
        ref = images.resolve_base_image(self.client, requested, want_gpu)
        # the name it was found by, which trainer builds use in FROM (a CUDA image has no runner name)
        return dataclasses.replace(_record(self.client.images.get(ref)), ref=ref)

    @_engine_errors("building the trainer image")
    def ensure_trainer(self, base: ImageRecord, deps, ca_bundle, progress) -> images.BuiltImage:
        return images.ensure_trainer_image(self.client, base.ref, deps, ca_bundle, progress=progress)

    @_engine_errors("building an experiment image")
    def ensure_experiment(self, ref, trainer, sources, labels) -> images.BuiltImage:
        built = images.ensure_experiment_image(self.client, ref, trainer, sources, labels)
        if built.archive:
            self._archives[built.id] = (built.parent_id, built.archive)
            while len(self._archives) > ARCHIVES_KEPT:
                self._archives.popitem(last=False)
        return built

    @_engine_errors("looking up an image")
    def image(self, ref: str) -> ImageRecord | None:
        found = images.find_image(self.client, ref)
        return None if found is None else _record(found)

    @_engine_errors("listing images")
    def images(self, kind: str, **labels: str) -> list[ImageRecord]:
        # One request: the engine's list has names, labels, sizes and times (the SDK's
        # images.list inspects every image again: a minute on an engine holding thousands).
        return [_listed(s) for s in self.client.api.images(filters=naming.managed_filter(kind, **labels))]

    @_engine_errors("reading an image's size")
    def added_bytes(self, image_id: str, below_id: str, size: int | None = None) -> int | None:
        # An image's Size is that of all its layers: what it adds is the difference (its history
        # need not link to the image below: experiment images are loaded, not built on it).
        if size is None:
            try:
                size = self.client.api.inspect_image(image_id)["Size"]
            except docker.errors.ImageNotFound:
                return None
        below = self._size(below_id) if below_id else None
        if below is not None:
            return max(0, size - below)
        total = 0  # the image below is gone (removed, or never here: an imported image): its history
        try:
            history = self.client.api.history(image_id)
        except docker.errors.ImageNotFound:
            return None
        for layer in history:
            if layer.get("Id") == below_id:
                break
            total += layer.get("Size", 0)
        return total

    def _size(self, image_id: str) -> int | None:
        """An image's Size, looked up once: an image id names its content, so its size never
        changes (the experiments of a night share the one sources image below them)."""
        if image_id not in self._sizes:
            found = images.find_image(self.client, image_id)
            if found is None:
                return None
            self._sizes[image_id] = found.attrs.get("Size", 0)
        return self._sizes[image_id]

    @_engine_errors("naming an image")
    def tag_image(self, image_id: str, ref: str) -> None:
        repository, tag = ref.rsplit(":", 1)
        self.client.images.get(image_id).tag(repository, tag)

    @_engine_errors("removing an image")
    def remove_image(self, ref: str) -> None:
        try:
            self.client.images.remove(ref, noprune=False)
        except docker.errors.ImageNotFound:
            pass  # already gone: the goal is met

    @_engine_errors("removing images")
    def remove_images(self, image_ids: list[str]) -> int:
        """Remove these images (by id, whatever their names) where no running container uses
        them; returns how many were removed."""
        removed = 0
        for image_id in image_ids:
            try:
                self.client.images.remove(image_id, force=True, noprune=False)
                removed += 1
            except docker.errors.ImageNotFound:
                continue
            except docker.errors.APIError as exc:
                if exc.status_code != 409:  # 409: a container still uses it; the next gc takes it
                    raise
        return removed

    @_engine_errors("saving an image")
    def save_image(self, image_id: str, out: BinaryIO) -> None:
        for chunk in self.client.images.get(image_id).save(named=True):
            out.write(chunk)

    @_engine_errors("loading images")
    def load_images(self, src: BinaryIO) -> list[ImageRecord]:
        return [_record(i) for i in self.client.images.load(src)]

    @_engine_errors("building the base image")
    def build_base_image(self, recipe, ca_bundle, find_links, progress, force: bool = False) -> str:
        return images.build_base_image(self.client, recipe, ca_bundle=ca_bundle, find_links=find_links,
                                       progress=progress, force=force)

    @_engine_errors("building the agent image")
    def build_agent_image(self, project_dir, base_ref: str, ca_bundle, progress) -> images.BuiltImage:
        return images.build_agent_image(self.client, project_dir, base_ref, ca_bundle, progress=progress)

    @_engine_errors("asking for its version")
    def version(self) -> str:
        return engine_version(self.client)


class DockerExecutor(Executor):
    """Runs on a local (or DOCKER_HOST) Docker engine."""

    def __init__(self, client: docker.DockerClient | None = None, vram_probe: VramProbe | None = None):
        """
        Raises:
            SandboxError: GPUs are to be watched (`vram_probe`) from a runner container that does
                not share the host's PID namespace: NVML names processes by host PID, and without
                it the watchdog would see none of them and enforce nothing.
        """
        self.client = client or connect()
        self.vram_probe = vram_probe
        self.owner = runner_owner(self.client)
        if vram_probe is not None and self.owner.startswith("container:"):
            me = self.client.containers.get(self.owner.split(":", 1)[1])
            if (me.attrs.get("HostConfig") or {}).get("PidMode") != "host":
                raise SandboxError("the VRAM watchdog maps GPU processes by host PID, which this runner's container "
                                   "cannot see: run it with --pid host (see the README's docker run)")

    # --- what runs now -----------------------------------------------------------------

    @_engine_errors("listing running experiments")
    def running(self, **labels: str) -> list[RunningRun]:
        return [RunningRun(dict(c.labels), c.attrs["State"].get("StartedAt", ""))
                for c in self.client.containers.list(filters=naming.managed_filter(naming.KIND_RUN, **labels))]

    @_engine_errors("asking for its version")
    def version(self) -> str:
        return engine_version(self.client)

    @_engine_errors("asking for its runtimes")
    def gpu_runtime(self, requested: str) -> str:
        """`toolkit` or `devices` for a gpu_runtime setting; auto = toolkit where the engine has
        the `nvidia` runtime (nvidia-container-toolkit), else the device nodes.

        Raises:
            SandboxError: the engine cannot be asked.
        """
        if requested != "auto":
            return requested
        return "toolkit" if "nvidia" in (self.client.info().get("Runtimes") or {}) else "devices"

    @_engine_errors("during a run")
    def run(self, spec: RunSpec, stop: threading.Event | None = None) -> RunResult:
        lim = spec.limits
        stop = stop or threading.Event()
        try:
            image = self.client.images.get(spec.image)
        except docker.errors.ImageNotFound:
            raise SandboxError(f"image {spec.image} is not on this engine: build it first (runner run builds it)") from None
        except docker.errors.APIError as exc:
            raise SandboxError(f"Docker engine error looking up {spec.image}: {exc}") from None

        log = CappedLog(spec.log_path, lim.log_cap_bytes, lim.log_tail_bytes, root=spec.log_root)
        container = None
        try:
            try:
                container = self.client.containers.create(**hardened_create_kwargs(spec, image_env(image)))
                # Attach before start so not one byte of output is missed.
                stream = container.attach(stdout=True, stderr=True, stream=True, logs=True)
                container.start()
            except docker.errors.APIError as exc:
                raise SandboxError(f"could not start container {spec.name}: {exc.explanation or exc}") from None
            started = time.monotonic()

            marked = threading.Event()  # the export hook printed its marker: collect its files
            reader = threading.Thread(target=self._pump, args=(stream, log, marked), daemon=True)
            reader.start()
            exited = threading.Event()
            exit_status: dict = {}
            waiter = threading.Thread(target=self._wait, args=(container, exit_status, exited), daemon=True)
            waiter.start()

            reason, peak_mem, peak_vram, collected = self._watch(container, spec, started, exited, stop, marked)
            wall_s = time.monotonic() - started
            # The stream can trail the exit by seconds after a flood; the summary is at its end.
            reader.join(timeout=60)

            if "error" in exit_status:
                raise SandboxError(f"lost track of {spec.name}: the engine's wait failed ({exit_status['error']}); log: {spec.log_path}")
            container.reload()
            state = container.attrs["State"]
            exit_code = state.get("ExitCode", exit_status.get("StatusCode"))
            if not reason and state.get("OOMKilled"):
                reason = REASON_OOM
                # OOMKilled is the kernel saying usage reached the ceiling. A blow-up can get there
                # and be gone (with its cgroup) between two samples, so the ceiling is the peak.
                peak_mem = max(peak_mem or 0, lim.mem_limit_bytes)
            if not reason and exit_code != 0:
                reason = REASON_EXIT
            return RunResult(
                exit_code=exit_code,
                reason=reason,
                wall_s=round(wall_s, 3),
                log_path=spec.log_path,
                output_tail=log.tail().decode("utf-8", errors="replace"),
                log_bytes=log.total_bytes,
                log_truncated=log.truncated,
                peak_mem_bytes=peak_mem,
                peak_vram_mb=peak_vram,
                image_id=image.id,
                container_name=spec.name,
                container_id=container.id,
                collected=collected,
            )
        except docker.errors.APIError as exc:
            raise SandboxError(f"Docker engine error during {spec.name}: {exc}; log: {spec.log_path}") from None
        finally:
            log.close()
            if container is not None:
                try:
                    container.remove(force=True, v=True)  # anonymous volumes go with it
                except docker.errors.NotFound:
                    pass

    @staticmethod
    def _pump(stream, log: CappedLog, marked: threading.Event) -> None:
        mark, carry = EXPORT_MARK.encode(), b""
        try:
            for chunk in stream:
                log.write(chunk)
                if not marked.is_set():
                    if mark in carry + chunk:
                        marked.set()
                    carry = (carry + chunk)[-len(mark):]
        except Exception:  # the stream ends with the container; a broken pipe is that end too
            pass

    def _collect(self, container, spec: RunSpec) -> bool:
        """Copy the export hook's files out of the running container's /out tmpfs (the archive
        API cannot see tmpfs mounts; an exec in the container can), then tell the hook, which
        waits at exit, that it may go. Returns whether every file came, each a regular file:
        the stream is hostile, capped at what /out holds and cut at COLLECT_TIMEOUT_S
        (sandbox.collect).

        Raises:
            UnsafePathError: a link on the way to spec.collect_dir.
        """
        api = self.client.api
        try:
            exec_id = api.exec_create(container.id, tar_command(EXPORT_DIR, EXPORT_FILES), stdout=True, stderr=False,
                                      user=spec.user)["Id"]
            stream = api.exec_start(exec_id, stream=True)
        except docker.errors.APIError:
            return False  # it exited meanwhile: nothing to verify
        # A tar stopped from inside, or a trickle, would block the read for ever: closing the
        # stream from a timer ends it, and the read below sees an early end.
        cut = threading.Timer(COLLECT_TIMEOUT_S, stream.close)
        cut.daemon = True
        cut.start()
        try:
            receive_regular_files(stream, EXPORT_FILES, spec.collect_dir, spec.log_root,
                                  spec.limits.out_size_bytes + TAR_OVERHEAD_BYTES)
        except Refused:
            return False
        finally:
            cut.cancel()
            try:
                stream.close()  # abandons the exec: a tar still sending gets a broken pipe
            except OSError:
                pass  # the timer closed it first
        try:
            container.exec_run(["touch", f"{EXPORT_DIR}/{COLLECTED_FILE}"], user=spec.user)
        except docker.errors.APIError:
            pass  # it exited meanwhile: the files came all the same
        return True

    @staticmethod
    def _wait(container, status: dict, exited: threading.Event) -> None:
        """Set `exited` when the container's process has exited. A wait whose connection breaks
        is not an exit: the container is asked again, and if the engine cannot say, `status`
        gets an "error" (the run is a harness failure, never judged on a running container)."""
        failures = 0
        try:
            while True:
                try:
                    status.update(container.wait())
                    return
                except Exception as exc:
                    failures += 1
                    try:
                        container.reload()
                        if not container.attrs["State"].get("Running"):
                            return
                    except Exception as lookup:
                        exc = lookup
                    if failures >= WAIT_ATTEMPTS:
                        status["error"] = f"{type(exc).__name__}: {exc}"
                        return
                    time.sleep(1.0)
        finally:
            exited.set()

    def _watch(self, container, spec: RunSpec, started: float, exited: threading.Event, stop: threading.Event,
               marked: threading.Event):
        """Poll until the process exits, the deadline passes, VRAM overflows or `stop` is set;
        collect the export hook's files when it says they are ready (spec.collect_dir).

        Returns (reason, peak_mem_bytes, peak_vram_mb, collected); reason is "" when the process
        exited on its own.
        """
        collected = False
        collecting: Future | None = None
        lim = spec.limits
        container.reload()
        memory = _CgroupMemory(container.attrs["State"].get("Pid") or 0)
        peak_mem: int | None = None
        peak_vram: float | None = None
        last_stats = 0.0
        blind_since: float | None = None
        reason = ""
        while not exited.wait(POLL_S):
            now = time.monotonic()
            if spec.collect_dir is not None and marked.is_set() and collecting is None:
                # In a thread of its own: a hostile stream must not hold up the watchdogs below.
                pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="collect")
                collecting = pool.submit(self._collect, container, spec)
                pool.shutdown(wait=False)
            used = memory.sample()
            if used is None and now - last_stats > 1.0:
                last_stats = now
                used = self._stats_memory(container)
            if used is not None:
                peak_mem = max(peak_mem or 0, used)
            if self.vram_probe:
                vram = self._sample_vram(container.id)
                if vram is not None:
                    blind_since = None
                    peak_vram = max(peak_vram or 0.0, vram)
                elif now - (blind_since := blind_since or now) > WATCH_BLIND_S and lim.vram_limit_gb:
                    # A failed NVML read is retried; one that lasts stops a run with a ceiling
                    # (not the night: the next run gets its own watchdog).
                    reason = REASON_UNWATCHED
                    self._terminate(container, lim.kill_grace_s, exited)
                    break
                if vram is not None and lim.vram_limit_gb and vram > lim.vram_limit_gb * 1024:
                    reason = REASON_VRAM
                    try:
                        container.kill(signal="SIGKILL")
                    except docker.errors.APIError as exc:
                        if exc.status_code not in (404, 409):  # it exited between the sample and the kill
                            raise
                    break
            if stop.is_set():
                reason = REASON_INTERRUPTED
                self._terminate(container, lim.kill_grace_s, exited)
                break
            if now - started > lim.deadline_s:
                reason = REASON_TIMEOUT
                self._terminate(container, lim.kill_grace_s, exited)
                break
        exited.wait(lim.kill_grace_s + 5)
        if collecting is not None:
            try:
                # The run has ended, which ends the stream; the collection's own cut bounds it anyway.
                collected = collecting.result(timeout=COLLECT_TIMEOUT_S + 5)
            except FuturesTimeout:
                collected = False  # a stream the SDK could not cut: removing the container ends it
        final = memory.sample()
        if final is not None:
            peak_mem = max(peak_mem or 0, final)
        return reason, peak_mem, peak_vram, collected

    def _sample_vram(self, container_id: str) -> float | None:
        """MiB of VRAM the container holds on its GPUs, or None where NVML failed this time."""
        try:
            return self.vram_probe(container_id)
        except SandboxError:
            return None

    @staticmethod
    def _terminate(container, grace_s: float, exited: threading.Event) -> None:
        """SIGTERM (tini forwards it), then SIGKILL if the process ignores it for `grace_s`."""
        try:
            container.kill(signal="SIGTERM")
            if not exited.wait(grace_s):
                container.kill(signal="SIGKILL")
        except docker.errors.APIError:
            pass  # it exited between our check and the signal

    @staticmethod
    def _stats_memory(container) -> int | None:
        try:
            stats = container.stats(stream=False, one_shot=True)
            mem = stats.get("memory_stats") or {}
            return mem.get("max_usage") or mem.get("usage")
        except (docker.errors.APIError, ValueError):
            return None

    @_engine_errors("during cleanup")
    def cleanup(self, tag: str | None = None, only_dead_owners: bool = True, owner: str | None = None) -> list[str]:
        removed = []
        for c in self._leftovers(tag, owner):
            if owner is None and only_dead_owners and owner_alive(self.client, c.labels.get(naming.L_OWNER, "")):
                continue
            try:
                c.remove(force=True, v=True)
            except docker.errors.NotFound:
                continue  # removed meanwhile (its own run, or another cleanup): the goal is met
            except docker.errors.APIError as exc:
                if exc.status_code != 409:  # 409: its removal is already in progress
                    raise
            removed.append(c.name)
        return removed

    @_engine_errors("listing leftover containers")
    def owners(self, tag: str | None = None) -> set[str]:
        """The owners (naming.owner) of this user's run and prepare containers here, alive or not."""
        return {c.labels.get(naming.L_OWNER, "") for c in self._leftovers(tag, None)}

    def _leftovers(self, tag: str | None, owner: str | None) -> list:
        # Only this user's containers: on a shared host, another user's leftovers are theirs.
        labels = {naming.L_USER: str(os.getuid())}
        if tag:
            labels[naming.L_TAG] = tag
        if owner:
            labels[naming.L_OWNER] = owner
        return [c for kind in (naming.KIND_RUN, naming.KIND_PREPARE)
                for c in self.client.containers.list(all=True, filters=naming.managed_filter(kind, **labels))]

def runner_owner(client: docker.DockerClient) -> str:
    """The owner label for containers this process starts.

    A runner inside a container of this engine is named by that container, whose liveness the
    engine can answer; Docker gives a container its short id as hostname, which is how we
    recognise it.
    """
    host = socket.gethostname()
    if re.fullmatch(r"[0-9a-f]{12}", host):
        try:
            me = client.containers.get(host)
            if me.id.startswith(host) and me.status == "running":
                return naming.owner(me.id)
        except docker.errors.APIError:
            pass
    return naming.owner()


def owner_alive(client: docker.DockerClient, owner: str) -> bool:
    """True unless `owner` (see naming.owner) is known to be gone.

    A runner in a container is alive while that container runs. A runner on this host is alive
    while its PID is. A runner on another host sharing this engine cannot be checked from
    here, so it counts as alive: we never remove what we cannot prove abandoned.
    """
    if owner.startswith("container:"):
        try:
            return client.containers.get(owner.split(":", 1)[1]).status == "running"
        except docker.errors.NotFound:
            return False
    host, _, pid = owner.rpartition(":")
    if not pid.isdigit():
        return False
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
