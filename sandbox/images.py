"""The four image layers, each named by what built it:

  base        a Debian root filesystem with python3 and torch, made without any registry
              (debootstrap + `docker import`), or an official CUDA PyTorch image on GPU hosts
  trainer     base + research dependencies + a non-root user, from Dockerfile.trainer
  sources     trainer + the repo's fixed files (prepare.py, data, ...), shared by a whole run
  experiment  sources + train.py at one commit (one small layer)

Content keys make builds idempotent: the same inputs never build twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import docker
import docker.errors

from . import __version__, naming
from .backend import BuiltImage, SandboxError  # noqa: F401  (BuiltImage: what builds return)

Progress = Callable[[str], None]
TRAINER_DOCKERFILE = Path(__file__).with_name("Dockerfile.trainer")
HOOKS_DIR = Path(__file__).with_name("hooks")  # the verified metric's export hook and verifier
CPU_BASE_ALIAS = f"{naming.REPO}/base:cpu"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"  # PyTorch's own index of its CPU builds
# A -devel image: torch.compile needs its compiler and headers (runtime images have neither).
CUDA_BASE_DEFAULT = "pytorch/pytorch:2.9.1-cuda12.8-cudnn9-devel"
RUNNER_UID = 10001
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # the engine colours a build step's stderr


class ImageBuildError(SandboxError):
    """An image could not be built; the message says which log or step to read.

    `log` holds the build's output lines when the engine ran a build.
    """

    def __init__(self, message: str, log: list[str] | None = None):
        super().__init__(message)
        self.log = log or []


def _quiet(_: str) -> None:
    pass


def _sha256(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()


def find_image(client: docker.DockerClient, ref: str):
    """The image called `ref`, or None."""
    try:
        return client.images.get(ref)
    except docker.errors.ImageNotFound:
        return None


# ---------------------------------------------------------------------------
# Base image without a registry
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseRecipe:
    """Everything that decides the content of a registry-less base image (its content key)."""

    suite: str = "bookworm"
    mirror: str = "http://deb.debian.org/debian"
    # gcc, g++ and the Python headers: torch.compile (inductor, Triton) builds C++ and C at run time.
    debs: tuple[str, ...] = ("python3", "python3-pip", "python-is-python3", "python3-dev", "gcc", "g++",
                             "libc6-dev", "ca-certificates", "procps")
    # The CPU build (+cpu): plain `torch` from PyPI brings several GB of CUDA wheels into a CPU image.
    python_packages: tuple[str, ...] = ("torch==2.13.0+cpu",)
    index_url: str | None = None
    extra_index_url: str | None = None  # where the +cpu build is, when no local wheel directory has it

    def key(self) -> str:
        return _sha256(json.dumps(dataclasses.asdict(self), sort_keys=True))


def build_base_image(
    client: docker.DockerClient,
    recipe: BaseRecipe = BaseRecipe(),
    ca_bundle: Path | None = None,
    find_links: Path | None = None,
    progress: Progress = _quiet,
    force: bool = False,
) -> str:
    """Build (or reuse) the CPU base image: debootstrap, pip install, `docker import`.

    Args:
        recipe: what goes into the image; its key names the image.
        ca_bundle: a CA bundle for pip inside the chroot, for TLS-intercepting proxies.
        find_links: a local directory of wheels (an air-gapped host's torch wheel).
        progress: called with one line per step.
        force: rebuild even if an image with this key exists.

    Returns:
        The image reference (also tagged as `autoresearch-runner/base:cpu`).

    Raises:
        ImageBuildError: not root, debootstrap missing, or a step failed (its output is in
            the message).
    """
    key = recipe.key()
    ref = naming.base_image_ref(key)
    existing = find_image(client, ref)
    if existing is not None and not force:
        progress(f"base image {ref} exists ({existing.short_id}); reusing it")
        existing.tag(CPU_BASE_ALIAS)
        return ref
    if os.geteuid() != 0:
        raise ImageBuildError("building the base image needs root (debootstrap and chroot): run it with sudo")
    if shutil.which("debootstrap") is None:
        raise ImageBuildError("debootstrap is missing: apt-get install -y debootstrap")
    if ca_bundle is not None and not ca_bundle.is_file():
        raise ImageBuildError(f"--ca-bundle {ca_bundle} is not a file")

    with tempfile.TemporaryDirectory(prefix="ar-base-", dir=os.environ.get("TMPDIR", "/var/tmp")) as tmp:
        root = Path(tmp) / "rootfs"
        t0 = time.monotonic()
        progress(f"debootstrap {recipe.suite} (minbase + {', '.join(recipe.debs)}) from {recipe.mirror}")
        _run_step(
            ["debootstrap", "--variant=minbase", f"--include={','.join(recipe.debs)}", recipe.suite, str(root), recipe.mirror],
            "debootstrap",
            progress,
        )
        progress(f"debootstrap done in {time.monotonic() - t0:.0f}s")

        if recipe.python_packages:
            t1 = time.monotonic()
            env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "PIP_NO_CACHE_DIR": "1"}
            pip = ["python3", "-m", "pip", "install", "--break-system-packages", "--no-cache-dir"]
            shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")
            if ca_bundle is not None:
                shutil.copy(ca_bundle, root / "tmp/runner-ca.pem")
                env["PIP_CERT"] = "/tmp/runner-ca.pem"
            if find_links is not None:
                shutil.copytree(find_links, root / "tmp/wheels")
                pip += ["--find-links", "/tmp/wheels"]
            if recipe.index_url:
                pip += ["--index-url", recipe.index_url]
            if recipe.extra_index_url:
                pip += ["--extra-index-url", recipe.extra_index_url]
            progress(f"pip install {' '.join(recipe.python_packages)} in the chroot")
            _run_step(["chroot", str(root), *pip, *recipe.python_packages], "pip install", progress, env=env)
            progress(f"pip done in {time.monotonic() - t1:.0f}s")

        for junk in ("tmp/wheels", "tmp/runner-ca.pem", "var/cache/apt/archives", "var/lib/apt/lists",
                     "usr/share/doc", "usr/share/man", "usr/share/locale"):
            target = root / junk
            if target.is_dir():
                shutil.rmtree(target)
                target.mkdir()
            elif target.exists():
                target.unlink()
        (root / "etc/resolv.conf").write_text("")  # the engine writes the real one per container

        progress("importing the root filesystem into Docker")
        labels = naming.managed_labels(naming.KIND_BASE, **{naming.L_KEY: key})
        labels["org.opencontainers.image.description"] = json.dumps(dataclasses.asdict(recipe), sort_keys=True)
        changes = [f"LABEL {k}={json.dumps(v)}" for k, v in labels.items()] + [
            'ENV PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"',
            "ENV LANG=C.UTF-8",
            "ENV PIP_BREAK_SYSTEM_PACKAGES=1",
            'CMD ["python3"]',
        ]
        tar = subprocess.Popen(["tar", "-C", str(root), "--numeric-owner", "-cf", "-", "."], stdout=subprocess.PIPE)
        repository, tag = ref.rsplit(":", 1)
        try:
            client.api.import_image(src=tar.stdout, stream_src=True, repository=repository, tag=tag, changes=changes)
        except docker.errors.APIError as exc:
            raise ImageBuildError(f"docker import failed: {exc}") from None
        finally:
            tar.stdout.close()
            tar.wait()
    image = client.images.get(ref)
    image.tag(CPU_BASE_ALIAS)
    progress(f"base image {ref} ({image.short_id}) ready in {time.monotonic() - t0:.0f}s")
    return ref


def _run_step(cmd: list[str], what: str, progress: Progress, env: dict | None = None) -> None:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    tail: list[str] = []
    for line in proc.stdout:
        line = line.rstrip()
        tail = (tail + [line])[-30:]
        if line.startswith(("I: Retrieving", "I: Installing", "I: Base system", "Successfully", "Collecting", "ERROR")):
            progress(f"  {line}")
    if proc.wait() != 0:
        raise ImageBuildError(f"{what} failed (exit {proc.returncode}):\n" + "\n".join(tail))


def resolve_base_image(client: docker.DockerClient, requested: str, want_gpu: bool) -> str:
    """Turn the configured base image ("auto" or a reference) into one present on this engine.

    Raises:
        ImageBuildError: the image is missing, with the command that makes it.
    """
    ref = requested
    if requested == "auto":
        ref = CUDA_BASE_DEFAULT if want_gpu else CPU_BASE_ALIAS
    if find_image(client, ref) is not None:
        return ref
    if ref == CPU_BASE_ALIAS:
        raise ImageBuildError("no base image: run `runner base-image build` once (no registry needed)")
    try:
        client.images.pull(ref)
        return ref
    except docker.errors.APIError:
        raise ImageBuildError(
            f"base image {ref} is not on this engine and cannot be pulled: "
            f"`docker load` it, or use `runner base-image build` and base_image: {CPU_BASE_ALIAS}"
        ) from None


# ---------------------------------------------------------------------------
# Trainer and experiment images (docker build through the SDK)
# ---------------------------------------------------------------------------


def _tar_context(files: dict[str, bytes], extra_tar: bytes | None = None,
                 executable: frozenset[str] | set[str] = frozenset()) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755 if name in executable else 0o644
            tar.addfile(info, io.BytesIO(data))
        if extra_tar:
            with tarfile.open(fileobj=io.BytesIO(extra_tar)) as src:
                for member in src.getmembers():
                    tar.addfile(member, src.extractfile(member) if member.isfile() else None)
    buf.seek(0)
    return buf


def _build(client, files: dict[str, bytes], ref: str, labels: dict, progress: Progress,
           buildargs: dict | None = None, extra_tar: bytes | None = None,
           executable: set[str] = frozenset()) -> BuiltImage:
    """docker build of `files` (+ `extra_tar`; `executable` names files that get mode 0755) as `ref`.

    Labels go into one LABEL instruction appended to the Dockerfile: the build API's `labels`
    argument adds a build step per label, which costs most of a small build's time.
    """
    label_line = " ".join(f"{k}={json.dumps(v)}" for k, v in sorted(labels.items()))
    files = {**files, "Dockerfile": files["Dockerfile"] + f"\nLABEL {label_line}\n".encode()}
    context = _tar_context(files, extra_tar, executable)
    t0 = time.monotonic()
    log: list[str] = []
    pending = ""  # a chunk of the stream can end mid-line
    try:
        for chunk in client.api.build(
            fileobj=context, custom_context=True, tag=ref, buildargs=buildargs or {},
            rm=True, forcerm=True, pull=False, decode=True,
        ):
            *lines, pending = (pending + chunk.get("stream", "")).split("\n")
            for line in map(str.rstrip, _ANSI.sub("", "\n".join(lines)).split("\n")):
                if line.strip():
                    log.append(line)
                    if line.startswith("Step "):
                        progress(f"  {line[:120]}" + (" ..." if len(line) > 120 else ""))
            if "error" in chunk:
                log += [line for line in _ANSI.sub("", pending).split("\n") if line.strip()]
                raise ImageBuildError(f"building {ref} failed: {chunk['error'].strip()}\n" + "\n".join(log[-20:]), log)
    except docker.errors.APIError as exc:
        raise ImageBuildError(f"building {ref} failed: {exc}") from None
    return BuiltImage(ref, client.images.get(ref).id, False, time.monotonic() - t0)


def _reuse(client: docker.DockerClient, ref: str, key: str) -> BuiltImage | None:
    """The image `ref` if it exists and was built from content `key`: content-keyed builds."""
    existing = find_image(client, ref)
    if existing is not None and existing.labels.get(naming.L_KEY) == key:
        return BuiltImage(ref, existing.id, True, 0.0)
    return None


def _require_base(client: docker.DockerClient, base_ref: str):
    base = find_image(client, base_ref)
    if base is None:
        raise ImageBuildError(f"base image {base_ref} is missing: run `runner base-image build`")
    return base


@dataclass(frozen=True)
class Dependencies:
    """The research repo's own dependencies, as the trainer image installs them.

    kind is one of DEPS_KINDS: `lock` (files pyproject.toml + uv.lock, installed exactly with
    `uv sync --frozen`), `pyproject` (pyproject.toml's [project] dependencies), `requirements`
    (requirements.txt), or `none`.
    """

    kind: str = "none"
    files: tuple[tuple[str, bytes], ...] = ()

    @property
    def source(self) -> str:
        """The file that names the dependencies (uv.lock for a lock): what errors point at."""
        return self.files[-1][0] if self.files else ""

    def key_parts(self) -> list[bytes]:
        return [self.kind.encode()] + [name.encode() + b"\0" + data for name, data in self.files]


DEPS_KINDS = ("lock", "pyproject", "requirements", "none")


def uv_binary() -> Path:
    """The uv executable of the runner's own environment (the `uv` package); it goes into
    trainer images, so the uv that installs a lock is the one the runner was installed with."""
    from uv import find_uv_bin

    return Path(find_uv_bin())


def ensure_trainer_image(
    client: docker.DockerClient,
    base_ref: str,
    deps: Dependencies = Dependencies(),
    ca_bundle: Path | None = None,
    progress: Progress = _quiet,
) -> BuiltImage:
    """Build the trainer image on `base_ref` unless one with the same content key exists.

    The key covers Dockerfile.trainer, the base image id, uv and the dependency files, so the
    trainer is built once per lock (or requirements) and rebuilt only when one of them changes.

    Raises:
        ImageBuildError: the base is missing, or the build failed; a dependency that cannot be
            installed is one line naming the package.
    """
    if deps.kind not in DEPS_KINDS:
        raise ValueError(f"unknown dependency kind {deps.kind!r}")
    base = _require_base(client, base_ref)
    dockerfile = TRAINER_DOCKERFILE.read_bytes()
    uv = uv_binary().read_bytes()
    hooks = {f"hooks/{p.name}": p.read_bytes() for p in sorted(HOOKS_DIR.glob("*.py"))}
    key = _sha256(dockerfile, base.id, hashlib.sha256(uv).hexdigest(), str(RUNNER_UID), *deps.key_parts(),
                  *(name.encode() + b"\0" + data for name, data in hooks.items()))
    ref = naming.trainer_image_ref(key)
    if reused := _reuse(client, ref, key):
        return reused
    progress(f"building trainer image {ref} on {base_ref} (dependencies: {deps.kind})")
    files = {
        "Dockerfile": dockerfile,
        "uv": uv,
        **hooks,
        "deps/kind": deps.kind.encode(),
        "deps/ca-bundle.crt": ca_bundle.read_bytes() if ca_bundle else b"",
        **{f"deps/{name}": data for name, data in deps.files},
    }
    labels = naming.managed_labels(naming.KIND_TRAINER, **{naming.L_KEY: key, naming.L_BASE: base.id})
    labels[naming.OCI_BASE_DIGEST] = base.id
    try:
        return _build(client, files, ref, labels, progress, executable={"uv"},
                      buildargs={"BASE_IMAGE": base_ref, "RUNNER_UID": str(RUNNER_UID)})
    except ImageBuildError as exc:
        if deps.kind == "none" or not exc.log:
            raise
        raise ImageBuildError(dependency_failure(deps.source, exc.log)) from None


_PINNED = re.compile(r"`?([A-Za-z0-9][\w.-]*)==v?([0-9][^\s`,]*[^\s`,.])")
_UNKNOWN = re.compile(r"Because `?([A-Za-z0-9][\w.-]*)`? was not found")
_CAUSE = ("cause:", "Caused by:", "╰─▶")
_ENGINE_LINES = ("Step ", "--->", "Removing intermediate container", "Running in")


def dependency_failure(source: str, log: list[str]) -> str:
    """One line out of uv's failure output: which package, and uv's own words for why.

    uv prints `error: <what>` (or `× <what>`), then `cause:` lines from the outermost to the
    root cause; the line keeps the first and the last of those.

    Args:
        source: the file that named the dependencies (uv.lock, requirements.txt, ...).
        log: the build's output lines.
    """
    lines = [line.strip() for line in log if not line.strip().startswith(_ENGINE_LINES)]
    start = next((i for i, line in enumerate(lines) if line.startswith(("error:", "×"))), None)
    if start is None:
        return f"installing {source} into the trainer image failed: {(lines or ['no output'])[-1]}"
    what = lines[start].removeprefix("error:").lstrip("× ").strip()
    causes = []
    for line in lines[start + 1:]:
        marker = next((m for m in _CAUSE if line.startswith(m)), None)
        if marker is None:
            break
        causes.append(line[len(marker):].strip())
    why = f"{what} ({causes[-1]})" if causes else what
    package = None
    for text in (what, *causes):
        if m := _PINNED.search(text):
            package = f"{m.group(1)}=={m.group(2)}"
            break
        if m := _UNKNOWN.search(text):
            package = m.group(1)
            break
    where = f" at {package}" if package else ""
    return f"installing {source} into the trainer image failed{where}: {why[:400]}"


def ensure_sources_image(client: docker.DockerClient, trainer: BuiltImage, fixed_tar: bytes) -> BuiltImage:
    """Trainer image + the fixed files of the repo (everything but train.py), keyed by content.

    Every experiment of a run shares this layer: the guard lets only train.py change.
    """
    key = _sha256(trainer.id, fixed_tar)
    ref = naming.sources_image_ref(key)
    if reused := _reuse(client, ref, key):
        return reused
    labels = naming.managed_labels(naming.KIND_SOURCES, **{naming.L_KEY: key, naming.L_TRAINER: trainer.id})
    dockerfile = f"FROM {trainer.ref}\nCOPY repo/ /repo/\n".encode()
    return _build(client, {"Dockerfile": dockerfile}, ref, labels, _quiet, extra_tar=fixed_tar)


def ensure_experiment_image(
    client: docker.DockerClient,
    ref: str,
    trainer: BuiltImage,
    sources: tuple[bytes, bytes],
    labels: dict[str, str],
) -> BuiltImage:
    """Trainer + the fixed sources (a shared layer) + train.py (this experiment's layer), as `ref`.

    Args:
        sources: (fixed_tar, editable_tar), entries under `repo/`, as ResearchRepo.snapshot_tars
            makes them.

    Reused when an image `ref` on the same trainer and commit exists: the same commit never
    builds twice. What an experiment adds on disk is its train.py layer. A new one is made by
    loading an archive (experiment_archive) rather than by a build: the few KiB that define it
    are what a cluster node loads too (BuiltImage.archive), so every engine holds the same image id.
    """
    existing = find_image(client, ref)
    commit = labels.get(naming.L_COMMIT)
    if (existing is not None and existing.labels.get(naming.L_TRAINER) == trainer.id
            and existing.labels.get(naming.L_COMMIT) == commit):
        return BuiltImage(ref, existing.id, True, 0.0)
    t0 = time.monotonic()  # the shared sources layer's build, if any, counts too
    fixed_tar, editable_tar = sources
    base = ensure_sources_image(client, trainer, fixed_tar)
    all_labels = dict(labels)
    all_labels[naming.L_TRAINER] = trainer.id
    all_labels[naming.L_SOURCES] = base.id
    all_labels[naming.OCI_REVISION] = commit or ""
    all_labels[naming.OCI_VERSION] = __version__
    image_id, archive = experiment_archive(client.api.inspect_image(base.id), client.api.history(base.id),
                                           editable_tar, all_labels, ref)
    try:
        load_archive(client, archive, image_id)
    except ImageBuildError:
        # An engine that will not load an archive without its parent's layer files (an image
        # store that wants every blob): the build, whose image no other engine can remake.
        dockerfile = f"FROM {base.ref}\nCOPY repo/ /repo/\n".encode()
        built = _build(client, {"Dockerfile": dockerfile}, ref, all_labels, _quiet, extra_tar=editable_tar)
        return dataclasses.replace(built, build_s=time.monotonic() - t0)
    return BuiltImage(ref, image_id, False, time.monotonic() - t0, parent_id=base.id, archive=archive)


def experiment_archive(parent: dict, parent_history: list[dict], editable_tar: bytes, labels: dict[str, str],
                       ref: str) -> tuple[str, bytes]:
    """A `docker load` archive of the image `parent` (an engine's inspect of it, and its history
    as the engine lists it) + one layer holding `editable_tar`'s files under /repo, with
    `labels` added and the name `ref`.

    It carries the new layer only: an engine loads it when it holds the parent's layers (the
    loader reads a layer's file only for a layer chain it lacks; see sandbox/transfer.py).
    Returns (image id, archive): the id is the sha256 of the config in it, on every engine.
    """
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.USTAR_FORMAT) as out, \
            tarfile.open(fileobj=io.BytesIO(editable_tar)) as src:
        top = tarfile.TarInfo("repo")  # as COPY repo/ /repo/ writes it: the folder, then its files
        top.type, top.mode, top.uname, top.gname = tarfile.DIRTYPE, 0o755, "root", "root"
        out.addfile(top)
        for member in src.getmembers():
            out.addfile(member, src.extractfile(member) if member.isfile() else None)
    layer_bytes = layer.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    container_config = dict(parent.get("Config") or {})
    container_config["Labels"] = {**(container_config.get("Labels") or {}), **labels}
    parent_layers = list((parent.get("RootFS") or {}).get("Layers") or [])
    config = {
        "architecture": parent.get("Architecture", "amd64"),
        "os": parent.get("Os", "linux"),
        **({"variant": parent["Variant"]} if parent.get("Variant") else {}),
        "config": container_config,
        "created": now,
        "history": _history(parent_history, len(parent_layers))
                   + [{"created": now, "created_by": f"autoresearch-runner {__version__}: COPY train.py /repo/"}],
        "rootfs": {"type": "layers", "diff_ids": parent_layers + [diff_id]},
    }
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    image_hex = hashlib.sha256(config_bytes).hexdigest()
    manifest = [{"Config": f"{image_hex}.json", "RepoTags": [ref],
                 "Layers": [f"{d.split(':', 1)[1]}/layer.tar" for d in parent_layers + [diff_id]]}]
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in ((f"{image_hex}.json", config_bytes), (manifest[0]["Layers"][-1], layer_bytes),
                           ("manifest.json", json.dumps(manifest).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return f"sha256:{image_hex}", archive.getvalue()


def _history(listed: list[dict], layers: int) -> list[dict]:
    """The parent's history in an image config's form, from the engine's listing of it (newest
    first). Each non-empty entry stands for one layer, in order; where the listing cannot be
    matched to the layers (an entry of 0 bytes may be a layer), one plain entry per layer."""
    entries = [{"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(h.get("Created") or 0)),
                "created_by": h.get("CreatedBy") or "", **({} if h.get("Size") else {"empty_layer": True})}
               for h in reversed(listed)]
    if sum(not e.get("empty_layer") for e in entries) == layers:
        return entries
    return [{"created_by": f"layer {i + 1} of {layers} of the sources image"} for i in range(layers)]


def load_archive(client: docker.DockerClient, archive: bytes, image_id: str) -> None:
    """`docker load` of an experiment_archive; the engine must then hold `image_id`.

    Raises:
        ImageBuildError: the engine refused it (it lacks the parent's layers), or made another id.
    """
    try:
        for message in client.api.load_image(archive):
            if isinstance(message, dict) and message.get("error"):
                raise ImageBuildError(f"loading image {image_id[:19]} failed: {message['error']}")
    except docker.errors.APIError as exc:
        raise ImageBuildError(f"loading image {image_id[:19]} failed: {exc.explanation or exc}") from None
    if find_image(client, image_id) is None:
        raise ImageBuildError(f"image {image_id[:19]} is not there after loading it")


# ---------------------------------------------------------------------------
# The runner's own image (Dockerfile.agent)
# ---------------------------------------------------------------------------

AGENT_FILES = ("Dockerfile.agent", "requirements-agent.lock", "pyproject.toml", "README.md")
AGENT_DIRS = ("runner", "sandbox", "examples")


def build_agent_image(
    client: docker.DockerClient,
    project_dir: Path,
    base_ref: str = CPU_BASE_ALIAS,
    ca_bundle: Path | None = None,
    progress: Progress = _quiet,
) -> BuiltImage:
    """Build the runner's image from a source checkout, unless one with the same content exists.

    Raises:
        ImageBuildError: not a source checkout, the base is missing, or the build failed.
    """
    project_dir = Path(project_dir)
    if not (project_dir / "Dockerfile.agent").is_file():
        raise ImageBuildError(f"{project_dir} has no Dockerfile.agent: build the agent image from a source checkout")
    base = _require_base(client, base_ref)
    files = {name: (project_dir / name).read_bytes() for name in AGENT_FILES}
    for d in AGENT_DIRS:
        for path in sorted((project_dir / d).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and not path.name.endswith(".pyc"):
                files[str(path.relative_to(project_dir))] = path.read_bytes()
    key = _sha256(base.id, *(f"{k}\0".encode() + v for k, v in sorted(files.items())))
    ref = naming.agent_image_ref(key)
    if reused := _reuse(client, ref, key):
        return reused
    progress(f"building agent image {ref} on {base_ref}")
    files["Dockerfile"] = files.pop("Dockerfile.agent")
    files["ca-bundle.crt"] = ca_bundle.read_bytes() if ca_bundle else b""
    labels = naming.managed_labels(naming.KIND_AGENT, **{naming.L_KEY: key, naming.L_BASE: base.id})
    built = _build(client, files, ref, labels, progress, buildargs={"BASE_IMAGE": base_ref})
    client.images.get(ref).tag(naming.AGENT_ALIAS)
    return built
