"""Experiments on a Ray cluster: the loop stays where it was started (ledger, git, proposer,
keep decisions, image builds in this host's DockerImageStore); each run goes to a node.

One Ray actor per parallel worker holds the resources of one slot (`worker_gpus` GPUs,
`worker_cpus` CPUs): Ray places the actors, accounts for the GPUs, and notices a node that dies.
On its node the actor runs this project's own DockerExecutor against that node's local engine,
with the node's GPU leases and NVML watchdog, so every host gives the same guarantees. A run
whose node dies mid-run, or hangs well past the run's deadline, comes back with reason `lost`
(the runner's engine runs it once more, on a live node: Ray restarts the actor there). Calls
that must reach every node (prepare, status, clean, images gc) go to one resource-free actor
pinned to each live node, so they reach nodes no worker was placed on.

Images move by content. With a registry, an image is pushed once and each node pulls it by
digest (layers it holds are not fetched again). Without one, the image's save archive minus
the layers the node's engine already holds (sandbox/transfer.py) travels through Ray's object
store. Before a run, the node checks that its data cache has the digest the image was built
for: every node must hold the same prepared data at the same path.
"""

from __future__ import annotations

import dataclasses
import io
import os
import queue
import shutil
import socket
import tarfile
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import docker.errors
import requests

from . import gpu, naming
from .backend import Backend, BackendSettings, Executor, RunningRun, SandboxError, SetupError, held_gpus
from .docker_backend import DockerExecutor, DockerImageStore, connect, owner_alive
from .fsafe import write_beneath
from .spec import EXPORT_FILES, REASON_INTERRUPTED, REASON_LOST, GpuAccess, Mount, RunResult, RunSpec
from .transfer import LayerNames, without_layers

PLACEMENT_TIMEOUT_S = 120.0
CONNECT_ATTEMPTS = 4
PORT_WAIT_S = 20.0         # a head just started opens its port within seconds; nothing there after this is an error
NODE_ANSWER_MARGIN_S = 120.0  # past a run's deadline (and again past its stop), a silent node is hung
RESTART_PATIENCE_S = 300.0  # an actor whose node died is restarted by Ray on a live node meanwhile
# The CUDA_DEVICE_ORDER under which CUDA numbers a node's GPUs as NVML does (by PCI bus).
PCI_ORDER = "PCI_BUS_ID"
NODE_CALL_TIMEOUT_S = 60.0  # a node's answer to a short call (where, running, cleanup); silent past it: left out
NODE_DIR_PREFIX = "autoresearch-node-"  # + the actor's pid: a node's scratch folder, swept once that pid is gone
_RAYLET_UUIDS = "start its raylet with CUDA_VISIBLE_DEVICES=<UUIDs> (as nvidia-smi -L prints them) and --num-gpus"


def _gone(ray) -> tuple[type[BaseException], ...]:
    """What Ray raises for an actor whose node died or that is restarting elsewhere."""
    return (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.ObjectLostError)


def _ray():
    try:
        import ray
    except ImportError:
        raise SandboxError("a cluster needs Ray: pip install 'autoresearch-runner[cluster]' on this host and every node") from None
    return ray


class NodeWorker:
    """The Ray actor of one slot, on its node: the node's engine, its GPUs (exactly those behind
    the GPU ids Ray gave it: see ray_gpu_uuids), its data."""

    def __init__(self, gpu_runtime: str, data_target: str, data_check):
        ray = _ray()
        self.gpu_ids = tuple(ray.get_gpu_ids())
        client = connect()
        self.lease = gpu.GpuLease.none()
        if self.gpu_ids:
            nvml = gpu.RealNvml()
            uuids = ray_gpu_uuids(self.gpu_ids, nvml.devices(), os.environ, nvml.error)
            # Exactly the GPUs Ray accounts to this actor: one another runner holds (by its lock,
            # or a running container's label) is an error, never a reason to take another GPU.
            # Other runners on this host then see them as taken, and the watchdog samples them.
            self.lease = gpu.acquire(",".join(uuids), nvml=nvml, busy=held_gpus(DockerExecutor(client)))
        self.executor = DockerExecutor(client, vram_probe=self.lease.vram_probe())
        self.store = DockerImageStore(client)  # what was shipped here
        self.access = GpuAccess()
        if self.gpu_ids:
            runtime = self.executor.gpu_runtime(gpu_runtime)
            self.access = GpuAccess("toolkit") if runtime == "toolkit" else gpu.devices_access(
                self.lease.devices, self.lease.nvml or gpu.RealNvml())
        self.data_target, self.data_check = data_target, data_check
        _sweep_node_dirs(Path(tempfile.gettempdir()))
        self.root = Path(tempfile.mkdtemp(prefix=f"{NODE_DIR_PREFIX}{os.getpid()}-"))
        self.stops: dict[str, threading.Event] = {}
        self.node = {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(),
                     "host": socket.gethostname(), "engine": self.executor.version()}

    def where(self) -> dict:
        return self.node

    def close(self) -> None:
        """Before the actor ends: its scratch folder goes (the next actor on this host sweeps
        it if this one is killed first), its GPU leases are given back."""
        shutil.rmtree(self.root, ignore_errors=True)
        self.lease.release()

    def has_image(self, image_id: str) -> bool:
        return self.store.image(image_id) is not None

    def layers(self) -> list[str]:
        """The diff IDs of every layer this node's engine holds."""
        return sorted({layer for image in self.store.client.images.list(all=True)
                       for layer in (image.attrs.get("RootFS") or {}).get("Layers") or []})

    def load(self, chunks: list, image_id: str) -> None:
        ray = _ray()
        for message in self.store.client.api.load_image(ray.get(ref) for ref in chunks):
            if isinstance(message, dict) and message.get("error"):
                raise SandboxError(f"node {self.node['ip']}: loading {image_id[:19]} failed: {message['error']}")
        self._expect(image_id)

    def pull(self, reference: str, image_id: str, names: list[str]) -> None:
        image = self.store.client.images.pull(reference)
        for name in names:
            repo, _, tag = name.rpartition(":")
            image.tag(repo, tag)
        self._expect(image_id)

    def _expect(self, image_id: str) -> None:
        if not self.has_image(image_id):
            raise SandboxError(f"node {self.node['ip']}: image {image_id[:19]} is not there after the transfer")

    def running(self, labels: dict) -> list[RunningRun]:
        return self.executor.running(**labels)

    def cleanup(self, tag, owner) -> list[str]:
        return self.executor.cleanup(tag=tag, owner=owner)

    def owners(self, tag) -> set[str]:
        return self.executor.owners(tag)

    def remove_images(self, image_ids: list[str]) -> int:
        return self.store.remove_images(image_ids)

    def stop(self, key: str) -> None:
        if key in self.stops:
            self.stops[key].set()

    def run(self, spec: RunSpec, files: dict[str, bytes], key: str, data_digest: str):
        """Run `spec` here. `files`: tar archives for the mounts whose source is on the runner's
        host (the verifier's exported model), by target. Returns (RunResult, log bytes, {name:
        bytes} of the collected export files)."""
        work = Path(tempfile.mkdtemp(dir=self.root))
        self.stops[key] = stop = threading.Event()
        try:
            self._check_data(spec, data_digest)
            mounts = []
            for m in spec.mounts:
                if not m.read_only and m.target not in files:
                    Path(m.source).mkdir(parents=True, exist_ok=True)  # prepare's caches, on this node
                if m.target in files:
                    local = work / f"mount{len(mounts)}"
                    local.mkdir()
                    with tarfile.open(fileobj=io.BytesIO(files[m.target])) as tar:
                        tar.extractall(local, filter="data")
                    m = Mount(local, m.target, m.read_only)
                mounts.append(m)
            labels = {**spec.labels, naming.L_GPUS: ",".join(self.lease.devices)}
            here = dataclasses.replace(spec, log_path=work / "run.log", log_root=work, mounts=tuple(mounts),
                                       collect_dir=work / "collect" if spec.collect_dir else None,
                                       gpus=self.lease.devices, gpu_access=self.access, labels=labels)
            result = self.executor.run(here, stop)
            log = here.log_path.read_bytes() if here.log_path.exists() else b""
            collected = {name: (here.collect_dir / name).read_bytes() for name in EXPORT_FILES
                         if result.collected and (here.collect_dir / name).is_file()}
            return dataclasses.replace(result, node=_node_name(self.node)), log, collected
        finally:
            self.stops.pop(key, None)
            shutil.rmtree(work, ignore_errors=True)

    def _check_data(self, spec: RunSpec, expected: str) -> None:
        data = _source_of(spec, self.data_target)
        if not expected or data is None or self.data_check is None:
            return
        try:
            found = self.data_check(data)
        except (OSError, ValueError) as exc:
            found = f"unreadable ({exc})"
        if found != expected:
            raise SetupError(f"node {self.node['ip']} ({self.node['host']}) holds other data in {data} "
                             f"(digest {found[:12]}, the image was built for {expected[:12]}): "
                             f"run `runner prepare --cluster` so every node has the same data")


def open_ray(settings: BackendSettings, vram_probe=None, runs: bool = True) -> Backend:
    """This host's Docker engine as the image store, the cluster at `settings.address` as the
    executor. `vram_probe` is this host's and unused: every node watches its runs with its own."""
    if not settings.address:
        raise SandboxError("backend: ray needs the cluster's address: set cluster: HOST:PORT in runner.yaml "
                           "(or pass --cluster)")
    store = DockerImageStore(connect())
    return Backend(store, RayExecutor(settings, store, runs=runs))


class RayExecutor(Executor):
    """Runs on a Ray cluster's nodes, each on its own engine; images come from this host's store
    (`client`'s engine) and are shipped by content (_Shipper)."""

    def __init__(self, settings: BackendSettings, store: DockerImageStore, runs: bool = True):
        """
        Args:
            settings: the cluster's address and the workers' shape.
            store: this host's images (shipped to the nodes from there); its engine is where
                the loop's own containers (if any) run.
            runs: False: connect only to look at and clean what runs (no workers placed).

        Raises:
            SandboxError: no cluster answers, or it cannot place the workers.
        """
        worker_gpus = settings.worker_gpus
        if worker_gpus is not None and not (worker_gpus >= 0 and float(worker_gpus).is_integer()):
            raise SandboxError(f"cluster_worker_gpus must be a whole number of GPUs, got {worker_gpus:g}: "
                               "a worker leases its GPUs exclusively, so two workers never share one")
        client = store.client
        self.local = DockerExecutor(client)  # this host: its leftovers, and the owner label runs carry
        self.owner = self.local.owner
        self.client = client
        self.settings = settings
        ray = _ray()
        address = settings.address
        _wait_for_port(address)
        for attempt in range(CONNECT_ATTEMPTS):
            if ray.is_initialized():
                break
            try:
                ray.init(address=address, logging_level="ERROR", log_to_driver=False)
            except Exception as exc:  # ConnectionError, gRPC errors: one line, what to do
                if attempt + 1 == CONNECT_ATTEMPTS:
                    raise SandboxError(f"no Ray cluster answers at {address} ({type(exc).__name__}): start it with "
                                       "`ray start --head` and pass its address") from None
                time.sleep(5)  # a head just started takes seconds to open its Ray Client port
        self.shipper = _Shipper(store, settings.registry)
        self._pinned: list | None = None  # one resource-free actor per live node, made when first needed
        total_gpus = ray.cluster_resources().get("GPU", 0)
        self.gpus_per_slot = (1.0 if total_gpus else 0.0) if worker_gpus is None else float(worker_gpus)
        self.workers: list = []
        self._free: queue.Queue = queue.Queue()
        if runs:
            self._place_workers(settings, total_gpus)
        self.slots = len(self.workers) if runs else None

    def _place_workers(self, settings: BackendSettings, total_gpus: float) -> None:
        ray = _ray()
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        count = settings.workers or (int(total_gpus // self.gpus_per_slot) if self.gpus_per_slot else len(nodes))
        actor = ray.remote(NodeWorker).options(num_cpus=settings.worker_cpus, num_gpus=self.gpus_per_slot,
                                               max_restarts=-1, max_task_retries=0, max_concurrency=8)
        self.workers = [actor.remote(settings.gpu_runtime, settings.data_target, settings.data_check)
                        for _ in range(max(1, count))]
        try:
            ray.get([w.where.remote() for w in self.workers], timeout=PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise SandboxError(f"the cluster at {settings.address} cannot place {count} worker(s) of {self.gpus_per_slot:g} "
                               f"GPU(s) and {settings.worker_cpus:g} CPU(s): set workers, cluster_worker_gpus or "
                               "cluster_worker_cpus") from None
        except ray.exceptions.RayActorError as exc:  # its __init__ failed on the node: no engine, no NVML, its GPU taken
            self.close()
            why = str(getattr(exc, "cause", None) or exc).strip().splitlines()[-1]
            raise SandboxError(f"a cluster worker could not start on its node: {why}") from None
        for w in self.workers:
            self._free.put(w)

    def close(self) -> None:
        """End every actor of this executor: placed workers hold their GPUs, and leases, till
        then; each removes its scratch folder first."""
        ray = _ray()
        actors = self.workers + (self._pinned or [])
        closing = [a.close.remote() for a in actors]
        ray.wait(closing, num_returns=len(closing), timeout=30)
        for a in actors:
            ray.kill(a)
        self.workers, self._pinned = [], []

    # --- runs --------------------------------------------------------------------------

    def run(self, spec: RunSpec, stop: threading.Event | None = None) -> RunResult:
        worker = None
        while worker is None:  # every worker busy: wait for one, or for the stop
            if stop is not None and stop.is_set():
                return self._interrupted(spec)
            try:
                worker = self._free.get(timeout=0.5)
            except queue.Empty:
                continue
        try:
            return self._run_with(worker, spec, stop)
        finally:
            self._free.put(worker)

    @staticmethod
    def _interrupted(spec: RunSpec) -> RunResult:
        """A run stopped before a worker was free: it never started."""
        return RunResult(exit_code=None, reason=REASON_INTERRUPTED, wall_s=0.0, log_path=spec.log_path, output_tail="",
                         log_bytes=0, log_truncated=False, peak_mem_bytes=None, peak_vram_mb=None, image_id="",
                         container_name=spec.name)

    def run_on_every_node(self, spec: RunSpec) -> list[RunResult]:
        """`spec` once on each node the workers are on, one after the other; each node's log
        beside spec.log_path, named after the node."""
        results = []
        for worker, where in self._each("where", pinned=True):
            name = f"{where['host']}-{where['node_id'][:8]}"
            log = spec.log_path.with_name(f"{spec.log_path.stem}.{name}{spec.log_path.suffix}")
            results.append(self._run_with(worker, dataclasses.replace(spec, log_path=log), None))
        return results

    def _run_with(self, worker, spec: RunSpec, stop: threading.Event | None) -> RunResult:
        ray = _ray()
        t0, node = time.monotonic(), None
        try:
            node = self._where(worker)
            image_id, moved = self.shipper.ship(worker, node, spec.image)
            spec = dataclasses.replace(spec, image=image_id)  # by content on the node
            files = {m.target: _tar_folder(m.source) for m in spec.mounts if _below(m.source, spec.log_root)}
            key = uuid.uuid4().hex
            ref = worker.run.remote(spec, files, key, self._data_digest(spec))
            # The node's own watchdog ends the run at its deadline; a node that does not answer
            # well after that is hung, which the driver treats as lost (run once more elsewhere).
            deadline = time.monotonic() + spec.limits.deadline_s + spec.limits.kill_grace_s + NODE_ANSWER_MARGIN_S
            stopped_at = None
            while not ray.wait([ref], timeout=0.5)[0]:
                now = time.monotonic()
                if stopped_at is None and ((stop is not None and stop.is_set()) or now > deadline):
                    worker.stop.remote(key)
                    stopped_at = now
                if stopped_at is not None and now - stopped_at > spec.limits.kill_grace_s + NODE_ANSWER_MARGIN_S:
                    ray.cancel(ref, force=True)
                    raise TimeoutError(f"node {_node_name(node)} did not answer "
                                       f"{spec.limits.kill_grace_s + NODE_ANSWER_MARGIN_S:g} s after its run was stopped")
            result, log, collected = ray.get(ref)
        except _gone(ray) + (ray.exceptions.GetTimeoutError, TimeoutError) as exc:
            return self._lost(spec, t0, exc, node)
        except ray.exceptions.RayTaskError as exc:  # the node's harness failed (its data, its engine)
            cause = getattr(exc, "cause", None)
            if isinstance(cause, SandboxError):  # as the node raised it (a SetupError stays one)
                raise cause from None
            raise SandboxError(str(exc).strip().splitlines()[-1]) from None
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:  # shipping, on this host
            raise SandboxError(f"Docker engine error shipping {spec.image} to its node: {exc}") from None
        write_beneath(spec.log_path, spec.log_root, log)
        for name, data in collected.items():
            write_beneath(spec.collect_dir / name, spec.log_root, data)
        return dataclasses.replace(result, log_path=spec.log_path, transfer_bytes=moved)

    def _lost(self, spec: RunSpec, t0: float, exc: BaseException, node: dict | None) -> RunResult:
        line = f"[runner] the node running this experiment was lost: {type(exc).__name__}\n"
        write_beneath(spec.log_path, spec.log_root, line.encode())
        return RunResult(exit_code=None, reason=REASON_LOST, wall_s=round(time.monotonic() - t0, 3),
                         log_path=spec.log_path, output_tail=line, log_bytes=len(line), log_truncated=False,
                         peak_mem_bytes=None, peak_vram_mb=None, image_id="", container_name=spec.name,
                         node=_node_name(node) if node else "")

    def _data_digest(self, spec: RunSpec) -> str:
        """The digest of the data this host has at the data mount's path: every node must match it."""
        check = self.settings.data_check
        data = _source_of(spec, self.settings.data_target)
        return check(data) if data is not None and check is not None else ""

    # --- what runs where ---------------------------------------------------------------

    def _where(self, worker) -> dict:
        """Where `worker` is, waiting while Ray restarts it after its node died."""
        ray = _ray()
        deadline = time.monotonic() + RESTART_PATIENCE_S
        while True:
            try:
                return ray.get(worker.where.remote(), timeout=RESTART_PATIENCE_S)
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def _pinned_actors(self) -> list:
        """One actor on each live node (no CPUs, no GPUs reserved: it only asks the node's engine)."""
        ray = _ray()
        if self._pinned is None:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            actor = ray.remote(NodeWorker)
            self._pinned = [actor.options(num_cpus=0, num_gpus=0, max_concurrency=8, scheduling_strategy=
                                          NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                            .remote(self.settings.gpu_runtime, self.settings.data_target, self.settings.data_check)
                            for n in ray.nodes() if n.get("Alive")]
        return self._pinned

    def _each(self, method: str, *args, pinned: bool = False) -> list[tuple]:
        """(actor, answer) of every worker (or, `pinned`, every node's actor) that answers
        `method`; one whose node is gone (or that is being restarted) is left out."""
        return _ask(self._pinned_actors() if pinned else self.workers, method, *args)

    def running(self, **labels: str) -> list[RunningRun]:
        found = {}
        for batch in [runs for _, runs in self._each("running", labels, pinned=True)] + [self.local.running(**labels)]:
            for r in batch:
                found[(r.labels.get(naming.L_OWNER), r.labels.get(naming.L_UID), r.started_at)] = r
        return list(found.values())

    def cleanup(self, tag: str | None = None, only_dead_owners: bool = True, owner: str | None = None) -> list[str]:
        """This host's leftovers, then every node's: the runs a node holds carry this host's
        owner labels, whose liveness only this host can tell."""
        removed = self.local.cleanup(tag, only_dead_owners, owner)
        if owner:
            owners = {owner}
        else:
            owners = set().union(*[o for _, o in self._each("owners", tag, pinned=True)])
            if only_dead_owners:
                owners = {o for o in owners if not owner_alive(self.client, o)}
        for o in sorted(owners):
            for _, names in self._each("cleanup", tag, o, pinned=True):
                removed += names
        return removed

    def release_images(self, image_ids: list[str]) -> int:
        """The shipped copies on every node. Call it after the store removed its own: a node
        whose engine is this host's then finds nothing left to remove (engine ids cannot tell
        two engines apart: Docker derives them from a key file that engines on a host share)."""
        return sum(count for _, count in self._each("remove_images", image_ids, pinned=True))

    def nodes(self) -> list[str]:
        """Where the workers are (or, opened without workers, every live node)."""
        wheres = [where for _, where in self._each("where", pinned=not self.workers)]
        return sorted({f"{w['host']} ({w['ip']})" for w in wheres})

    def gpu_runtime(self, requested: str) -> str:
        """This host's engine's; each node decides its own for the runs it holds (NodeWorker)."""
        return self.local.gpu_runtime(requested)

    def version(self) -> str:
        ray = _ray()
        return f"Ray {ray.__version__} cluster at {self.settings.address} ({len(self.nodes())} node(s))"


class _Shipper:
    """Moves images from this host's store to a node's engine, by content: through a registry
    (pushed once, pulled by digest) or Ray's object store: an experiment the store made as its
    few-KiB archive over a parent the node holds, else the save archive minus the layers the
    node holds."""

    def __init__(self, store: DockerImageStore, registry: str | None):
        self.store, self.client, self.registry = store, store.client, registry
        self._names = LayerNames()
        self._pushed: dict[str, str] = {}     # image id -> registry reference by digest
        self._node_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def ship(self, worker, node: dict, image_ref: str) -> tuple[str, int]:
        """Make `image_ref` (on this host's engine) present on `node`'s engine, by content;
        returns its id and the bytes that went through the object store for it."""
        ray = _ray()
        try:
            image = self.client.images.get(image_ref)
        except docker.errors.ImageNotFound:
            raise SandboxError(f"image {image_ref} is not on this engine: build it first (runner run builds it)") from None
        with self._lock:
            lock = self._node_locks.setdefault(node["node_id"], threading.Lock())
        with lock:
            if ray.get(worker.has_image.remote(image.id)):
                return image.id, 0
            if self.registry:
                ray.get(worker.pull.remote(self._push(image), image.id, list(image.tags)))
                return image.id, 0
            made_here = self.store.archive_of(image.id)
            if made_here is None:
                return image.id, self._send_saved(worker, image)
            # An experiment made here: its parent (the sources image) moves once per node, then
            # each experiment is its few-KiB archive, which makes the same image id there.
            parent_id, archive = made_here
            size = 0 if ray.get(worker.has_image.remote(parent_id)) else self._send_saved(worker, self.client.images.get(parent_id))
            try:
                ray.get(worker.load.remote([ray.put(archive)], image.id))
            except ray.exceptions.RayTaskError:  # the node's engine wants every layer's file: the save archive
                return image.id, size + len(archive) + self._send_saved(worker, image)
        return image.id, size + len(archive)

    def _send_saved(self, worker, image) -> int:
        """The engine's save archive of `image`, less the layers the node holds; its bytes."""
        ray = _ray()
        have = set(ray.get(worker.layers.remote()))
        refs, size = [], 0
        for chunk in without_layers(image.save(chunk_size=1 << 20, named=bool(image.tags)), have, self._names):
            if chunk:
                refs.append(ray.put(chunk))
                size += len(chunk)
        ray.get(worker.load.remote(refs, image.id))
        return size

    def _push(self, image) -> str:
        """Push once; returns `registry/name@sha256:...`, what nodes pull."""
        if image.id in self._pushed:
            return self._pushed[image.id]
        name = (image.tags[0].rpartition(":")[0] if image.tags else "autoresearch-runner/image")
        repo, tag = f"{self.registry}/{name}", image.id.split(":")[1][:20]
        image.tag(repo, tag)
        digest = None
        for message in self.client.images.push(repo, tag=tag, stream=True, decode=True):
            if message.get("error"):
                raise SandboxError(f"pushing {repo}:{tag} to {self.registry} failed: {message['error']}")
            digest = (message.get("aux") or {}).get("Digest") or digest
        if not digest:
            raise SandboxError(f"pushing {repo}:{tag} to {self.registry} gave no digest")
        self._pushed[image.id] = f"{repo}@{digest}"
        return self._pushed[image.id]

def _ask(actors: list, method: str, *args) -> list[tuple]:
    """(actor, answer) of each of `actors` that answers `method` within a minute."""
    ray = _ray()
    refs = [(a, getattr(a, method).remote(*args)) for a in actors]
    answers = []
    for actor, ref in refs:
        try:
            answers.append((actor, ray.get(ref, timeout=NODE_CALL_TIMEOUT_S)))
        except _gone(ray) + (ray.exceptions.GetTimeoutError,):
            continue
    return answers


def _sweep_node_dirs(tmp: Path) -> None:
    """Remove the scratch folders of this host's node actors that are gone (killed before close)."""
    for folder in tmp.glob(f"{NODE_DIR_PREFIX}*"):
        pid = folder.name[len(NODE_DIR_PREFIX):].partition("-")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:
            continue  # another user's actor, alive


def _wait_for_port(address: str, wait_s: float | None = None) -> None:
    """Wait until something listens at the cluster's address: ray.init spends half a minute per
    try on a port where nothing does, a wrong --cluster would take minutes to say so.

    Raises:
        SandboxError: nothing listens there within PORT_WAIT_S.
    """
    host, _, port = address.removeprefix("ray://").rpartition(":")
    host = host.strip("[]")
    deadline = time.monotonic() + (PORT_WAIT_S if wait_s is None else wait_s)
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
            return
        except (OSError, ValueError) as exc:
            if time.monotonic() > deadline:
                raise SandboxError(f"no Ray cluster answers at {address} ({exc.__class__.__name__}: nothing listens "
                                   "there): start it with `ray start --head` and pass its address") from None
            time.sleep(0.5)


def ray_gpu_uuids(ray_ids: Iterable[int | str], devices: Sequence[gpu.GpuDevice], env: Mapping[str, str],
                  nvml_error: str | None = None) -> tuple[str, ...]:
    """The NVML UUIDs of the GPUs behind an actor's Ray GPU ids, in NVML's order.

    Ray numbers a node's GPUs as CUDA does: an id is a CUDA index, or, on a raylet started under
    CUDA_VISIBLE_DEVICES, one entry of it (an index or a UUID, as a string). NVML numbers GPUs
    by PCI bus. CUDA does too under CUDA_DEVICE_ORDER=PCI_BUS_ID, and by default (fastest first)
    on a node whose GPUs are all one model, since it breaks ties by PCI bus; on a node of mixed
    models its default order is a ranking NVML cannot reproduce.

    Args:
        ray_ids: ray.get_gpu_ids() in the actor.
        devices: the node's GPUs and MIG slices, as Nvml.devices() lists them.
        env: the actor's environment, which is its raylet's (CUDA_DEVICE_ORDER).
        nvml_error: why NVML lists nothing, where it cannot start.

    Raises:
        GpuError: an id names no device NVML lists here, two ids name one, or an index cannot be
            told apart (mixed models without CUDA_DEVICE_ORDER=PCI_BUS_ID, GPUs in MIG mode); the
            message says how to start the raylet.
    """
    ray_ids = list(ray_ids)
    by_uuid = {d.uuid: d for d in devices}
    whole = [d for d in devices if d.mig is None]  # NVML index order
    found = []
    for raw in ray_ids:
        text = str(raw).strip()
        if text in by_uuid:
            found.append(by_uuid[text])
            continue
        if text.startswith(("GPU-", "MIG-")):
            raise gpu.GpuError(f"Ray's GPU {text} (its raylet's CUDA_VISIBLE_DEVICES) is no GPU or MIG slice NVML lists "
                               f"on this node ({', '.join(by_uuid) or nvml_error or 'none'}); a GPU in MIG mode is "
                               "named by its slices' MIG- UUIDs")
        if not text.isdigit():
            raise gpu.GpuError(f"Ray's GPU id {text!r} is neither an index nor a GPU-/MIG- UUID: {_RAYLET_UUIDS}")
        if not devices:
            raise gpu.GpuError(f"Ray gave this worker GPU {text}, but NVML lists no GPU on this node "
                               f"({nvml_error or 'none listed'}): check the driver (nvidia-smi), or start the raylet "
                               "with --num-gpus 0 to run on the CPU")
        if len(whole) < len(devices):
            raise gpu.GpuError(f"Ray's GPU {text} is a CUDA index, and CUDA numbers a node with GPUs in MIG mode unlike "
                               f"NVML: {_RAYLET_UUIDS} (MIG- UUIDs for the slices)")
        if int(text) >= len(whole):
            raise gpu.GpuError(f"Ray's GPU {text} is not on this node, where NVML lists {len(whole)} GPU(s): "
                               f"start its raylet with --num-gpus {len(whole)} or fewer")
        models = sorted({d.name for d in whole})
        if len(models) > 1 and env.get("CUDA_DEVICE_ORDER", "").strip() != PCI_ORDER:
            raise gpu.GpuError(f"Ray's GPU {text} is a CUDA index, and on this node of mixed models ({', '.join(models)}) "
                               f"CUDA numbers GPUs fastest first, NVML by PCI bus: start its raylet with "
                               f"CUDA_DEVICE_ORDER={PCI_ORDER}, or with CUDA_VISIBLE_DEVICES=<UUIDs> (as nvidia-smi -L "
                               "prints them)")
        found.append(whole[int(text)])
    if len({d.uuid for d in found}) < len(found):
        raise gpu.GpuError(f"Ray's GPU ids {', '.join(map(str, ray_ids))} name one GPU twice: {_RAYLET_UUIDS}")
    order = {d.uuid: i for i, d in enumerate(devices)}
    return tuple(sorted((d.uuid for d in found), key=order.__getitem__))


def _node_name(node: dict) -> str:
    """How run records name a node: its host and the start of its Ray node id."""
    return f"{node['host']}/{node['node_id'][:8]}"


def _source_of(spec: RunSpec, target: str) -> Path | None:
    """The host path mounted at `target` (the data cache), if any."""
    return next((m.source for m in spec.mounts if m.target == target), None)


def _below(path: Path, root: Path | None) -> bool:
    if root is None:
        return False
    try:
        Path(path).relative_to(root)
        return True
    except ValueError:
        return False


def _tar_folder(folder: Path) -> bytes:
    """The regular files of `folder` (no links followed) as a tar archive."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.is_file(follow_symlinks=False):
                tar.add(entry.path, arcname=entry.name, recursive=False)
    return buffer.getvalue()
