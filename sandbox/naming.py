"""Names and labels of every Docker resource the runner creates. The only place they are spelled.

Cleanup selects by label, never by a part of a name: another tool's container called
"autoresearch-something" is not ours to remove.
"""

from __future__ import annotations

import os
import re
import secrets
import socket

from . import __version__

REPO = "autoresearch-runner"
LABEL = "io.autoresearch-runner"

L_MANAGED = f"{LABEL}.managed"          # "true" on everything we create
L_KIND = f"{LABEL}.kind"                # one of the KIND_* values below
L_TAG = f"{LABEL}.tag"                  # the run tag (autoresearch/<tag>)
L_COMMIT = f"{LABEL}.commit"            # full commit sha of the experiment
L_KEY = f"{LABEL}.key"                  # content key an image was built from
L_OWNER = f"{LABEL}.owner"              # host:pid of the runner that started a container
L_USER = f"{LABEL}.user"                # uid of the runner's user
L_GPUS = f"{LABEL}.gpus"                # device ids a container holds
L_ITERATION = f"{LABEL}.iteration"
L_TRAINER = f"{LABEL}.trainer-image"    # trainer image id an experiment image sits on
L_BASE = f"{LABEL}.base-image"
L_SOURCES = f"{LABEL}.sources-image"    # the shared fixed-sources image an experiment sits on
L_DATA = f"{LABEL}.data-manifest"       # sha256 of the data manifest the run saw
L_LIMITS = f"{LABEL}.limits"            # JSON of the Limits the experiment ran under
L_RUNNER_VERSION = f"{LABEL}.runner-version"
L_GPU_MODEL = f"{LABEL}.gpu-model"
L_REPO = f"{LABEL}.repo"                # host path of the research repo (runner status reads its ledger)
L_UID = f"{LABEL}.uid"                  # the host uid a run's processes have (one per run, see run_uid)

OCI_REVISION = "org.opencontainers.image.revision"
OCI_BASE_DIGEST = "org.opencontainers.image.base.digest"
OCI_VERSION = "org.opencontainers.image.version"

KIND_BASE = "base"
KIND_TRAINER = "trainer"
KIND_SOURCES = "sources"
KIND_AGENT = "agent"
KIND_EXPERIMENT = "experiment"
KIND_RUN = "run"          # a container running an experiment
KIND_PREPARE = "prepare"  # a container running the repo's prepare.py, and the image it runs in

# Experiment images are autoresearch-runner/<tag>:<commit>; these repositories are the layers'.
PREPARE_TAG = "prepare"   # prepare images are autoresearch-runner/prepare:<commit>
RESERVED_TAGS = ("base", "trainer", "sources", "agent", PREPARE_TAG)
_TAG_OK = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


class TagError(ValueError):
    """A run tag that cannot name a branch and an image repository."""


def check_tag(tag: str) -> str:
    """Return `tag` if it can name a branch and an image repository, else raise TagError."""
    if not _TAG_OK.match(tag):
        raise TagError(
            f"tag {tag!r} is not usable: use 1-64 characters of lowercase letters, digits, '.', '_' or '-'"
        )
    if tag in RESERVED_TAGS:
        raise TagError(f"tag {tag!r} is reserved for the runner's own images ({', '.join(RESERVED_TAGS)}): pick another")
    return tag


def base_image_ref(key: str) -> str:
    return f"{REPO}/base:cpu-{key[:12]}"


def trainer_image_ref(key: str) -> str:
    return f"{REPO}/trainer:{key[:12]}"


AGENT_ALIAS = f"{REPO}/agent:latest"


def agent_image_ref(key: str) -> str:
    return f"{REPO}/agent:{key[:12]}"


def sources_image_ref(key: str) -> str:
    return f"{REPO}/sources:{key[:12]}"


def experiment_image_ref(tag: str, commit: str) -> str:
    return f"{REPO}/{tag}:{commit[:12]}"


def owner(container_id: str | None = None) -> str:
    """Who started a container: `host:pid` for a runner process, or `container:<id>` for a
    runner that itself runs in a container of the same engine (see docker_backend.runner_owner)."""
    if container_id:
        return f"container:{container_id}"
    return f"{socket.gethostname()}:{os.getpid()}"


def container_name(kind: str, tag: str, commit: str) -> str:
    """Predictable prefix for a person reading `docker ps`, random suffix so names never clash."""
    return f"ar-{kind}-{tag}-{commit[:8]}-{secrets.token_hex(3)}"


def managed_labels(kind: str, **extra: str) -> dict[str, str]:
    labels = {
        L_MANAGED: "true",
        L_KIND: kind,
        L_RUNNER_VERSION: __version__,
        L_USER: str(os.getuid()),
    }
    labels.update({k: v for k, v in extra.items() if v is not None})
    return labels


def managed_filter(kind: str | None = None, **labels: str) -> dict:
    """A Docker `filters` dict selecting our resources, optionally narrowed by label values."""
    selected = [f"{L_MANAGED}=true"]
    if kind:
        selected.append(f"{L_KIND}={kind}")
    selected += [f"{k}={v}" for k, v in labels.items()]
    return {"label": selected}


# Each run's processes get their own host uid from this reserved range (no host account should
# use it): per-uid kernel limits (inotify instances, RLIMIT_NPROC accounting, keyrings) are then
# not shared by parallel workers, other users' runners, or an account that happens to be 10001.
RUN_UID_BASE = 200_000
RUN_UID_COUNT = 65_536


def run_uid(in_use: set[int]) -> int:
    """A uid of the reserved range that no running experiment holds."""
    for _ in range(64):
        uid = RUN_UID_BASE + secrets.randbelow(RUN_UID_COUNT)
        if uid not in in_use:
            return uid
    raise RuntimeError("no free run uid in the reserved range")  # 64 misses in 65,536: cannot happen in practice
