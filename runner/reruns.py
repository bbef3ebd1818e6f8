"""Every experiment is an image; every row can be run again.

Rerun an experiment image with the limits and data it first ran with (from its labels), measure
the noise floor, list and garbage-collect experiment images, and move them between hosts.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import statistics
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sandbox import naming
from sandbox.fsafe import open_beneath
from sandbox.backend import ImageRecord, ImageStore
from sandbox.spec import Limits

from .data import DataError, data_digest
from .ledger import Ledger
from .records import RowStatus, parse, to_json
from .repo import RepoError
from .summary import OutcomeStatus

RECORDS_DIR = Path.home() / ".cache" / "autoresearch-runner" / "records"


@dataclass(frozen=True)
class ExperimentImage:
    ref: str
    id: str
    tag: str
    commit: str
    data_digest: str
    limits: Limits
    size_added_bytes: int   # layers above the shared sources image: what this experiment cost on disk
    created: str

    @classmethod
    def of(cls, store: ImageStore, image: ImageRecord) -> "ExperimentImage | None":
        """The image's record; None when it was removed since it was listed."""
        labels = image.labels
        below = labels.get(naming.L_SOURCES) or labels.get(naming.L_TRAINER, "")
        added = store.added_bytes(image.id, below, image.size)
        if added is None:
            return None
        return cls(ref=image.ref, id=image.id, tag=labels.get(naming.L_TAG, ""), commit=labels.get(naming.L_COMMIT, ""),
                   data_digest=labels.get(naming.L_DATA, ""), limits=recorded_limits(labels.get(naming.L_LIMITS, "{}")),
                   size_added_bytes=added, created=image.created)


def recorded_limits(label: str) -> Limits:
    """The Limits an image's label records; keys this runner version does not know are dropped
    (an image of another version), and an unreadable label gives the defaults."""
    try:
        recorded = json.loads(label)
    except ValueError:
        recorded = {}
    known = {f.name for f in dataclasses.fields(Limits)}
    return Limits(**{k: v for k, v in (recorded if isinstance(recorded, dict) else {}).items() if k in known})


def _age(image: ExperimentImage) -> tuple[str, str]:
    """Oldest first: by creation time, which engines list to the second, then by id (images made
    in one second keep one order, listing after listing)."""
    return image.created, image.id


def experiment_images(store: ImageStore, tag: str | None = None) -> list[ExperimentImage]:
    labels = {naming.L_TAG: tag} if tag else {}
    found = filter(None, (ExperimentImage.of(store, i) for i in store.images(naming.KIND_EXPERIMENT, **labels)))
    return sorted(found, key=_age)


def find_experiment_image(store: ImageStore, what: str, tag: str | None = None) -> ExperimentImage:
    """An experiment image by reference, id, or (a prefix of) its commit.

    Raises:
        RepoError: nothing matches, or a commit prefix matches several tags (say --tag).
    """
    if ":" in what or "/" in what:
        image = store.image(what)
        if image is not None and image.labels.get(naming.L_KIND) != naming.KIND_EXPERIMENT:
            raise RepoError(f"{what} is not an autoresearch-runner experiment image")
        found = None if image is None else ExperimentImage.of(store, image)
        if found is None:
            raise RepoError(f"no image {what} on this engine: `runner images` lists them, `runner import` brings one")
        return found
    matches = [e for e in experiment_images(store, tag) if e.commit.startswith(what.lower())]
    if not matches:
        raise RepoError(f"no experiment image for commit {what}: `runner images` lists them")
    if len({e.ref for e in matches}) > 1:
        raise RepoError(f"commit {what} has images in several tags ({', '.join(e.tag for e in matches)}): add --tag")
    return matches[0]


# --- the recorded result -------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedResult:
    """What an experiment scored when it first ran, as `runner export` carries it (record.json)."""

    val_bpb: float | None = None
    status: RowStatus | None = None
    outcome: OutcomeStatus = OutcomeStatus.OK
    description: str = ""
    image_id: str | None = None
    source: str = "ledger"  # or "imported": read from a file another host wrote (`runner import`)


def recorded_result(repo_root: Path | None, image: ExperimentImage) -> RecordedResult | None:
    """What the experiment scored when it first ran: from the repo's ledger, else from an
    imported record (`runner import`); None when neither has it, or the imported one cannot be read."""
    if repo_root is not None and image.tag:
        for e in reversed(Ledger(repo_root, image.tag).experiments()):
            if e.commit == image.commit:
                return RecordedResult(e.row.val_bpb, e.row.status, e.outcome, e.row.description, e.run.image_id)
    path = RECORDS_DIR / f"{image.id.replace('sha256:', '')}.json"
    try:
        return parse(RecordedResult, json.loads(path.read_text())) if path.exists() else None
    except (OSError, ValueError):
        return None  # a damaged record: the result is unknown


# --- rerun -----------------------------------------------------------------------------------


def rerun(engine, image: ExperimentImage, n: int, log_dir: Path) -> list:
    """Run `image` n times on data with the same digest, under this host's limits (runner.yaml)
    with the training budget it first ran with, capped by this host's: the image's limits
    label is information, never authority (a forged one asked for unlimited memory).

    Raises:
        DataError: the data cache differs from the one the experiment saw.
    """
    current = data_digest(engine.cfg.data_dir)
    if image.data_digest and current != image.data_digest:
        raise DataError(
            f"the data in {engine.cfg.data_dir} (digest {current[:12]}) is not what {image.ref} ran on "
            f"({image.data_digest[:12]}): point --data-dir at that data, or prepare it with the same prepare.py"
        )
    runs = []
    for i in range(n):
        log = log_dir / f"rerun-{image.commit[:7]}-{int(time.time())}-{i}.log"
        run = engine.run_commit(image.commit, image.tag or "rerun", log, limits=rerun_limits(engine, image), image=image.ref)
        runs.append(engine.verify(run, image.tag or "rerun") if engine.cfg.verify != "off" else run)
    return runs


RERUN_MAX_BUDGET_S = 3600.0  # no recorded budget makes a rerun train longer than this without --budget


def rerun_limits(engine, image: ExperimentImage) -> Limits:
    """This host's limits for a rerun of `image`: runner.yaml's ceilings; the budget from --budget
    or budget_s, else the recorded one up to RERUN_MAX_BUDGET_S."""
    budget = engine.cfg.budget_s or min(image.limits.time_budget_s, RERUN_MAX_BUDGET_S)
    return engine.cfg.sandbox_limits(budget)


def compare(image: ExperimentImage, record: RecordedResult | None, runs: list) -> dict:
    """The recorded result of `image` beside its reruns: what `runner rerun` prints (--json: as is)."""
    recorded = record.val_bpb if record and record.outcome == OutcomeStatus.OK else None
    new = [r.outcome.val_bpb if r.outcome.status == OutcomeStatus.OK else None for r in runs]
    return {
        "image": image.ref, "image_id": image.id, "commit": image.commit,
        "recorded_val_bpb": recorded, "recorded_status": record.status if record else None,
        "recorded_source": record.source if record else None,
        "new_val_bpb": new,
        "diff": [None if v is None or recorded is None else round(v - recorded, 6) for v in new],
        "statuses": [r.outcome.status + (f" {r.outcome.reason}" if r.outcome.reason else "")
                     + (f" ({r.outcome.verdict})" if r.outcome.verdict else "") for r in runs],
        "logs": [str(r.result.log_path) for r in runs],
    }


def noise_floor(values: list[float]) -> dict:
    return {
        "n": len(values),
        "values": values,
        "mean": statistics.fmean(values),
        "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
        "spread": max(values) - min(values),
    }


def save_noise(ledger: Ledger, noise: dict) -> Path:
    path = ledger.noise_path
    tmp = path.with_suffix(".tmp")
    fd = open_beneath(ledger.root, tmp.relative_to(ledger.root), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(noise, indent=2))
    tmp.replace(path)  # rename replaces a link at `path` itself, never its target
    return path


def load_noise(ledger: Ledger) -> dict | None:
    path = ledger.noise_path
    return json.loads(path.read_text()) if path.exists() else None


# --- images on disk --------------------------------------------------------------------------


def gc_plan(images: list[ExperimentImage], statuses: dict[str, RowStatus], keep_discarded: int) -> list[ExperimentImage]:
    """Images a policy allows removing: discarded or crashed experiments beyond the newest
    `keep_discarded` per tag. Kept experiments and images of unknown status always stay."""
    doomed = []
    by_tag: dict[str, list[ExperimentImage]] = {}
    for img in images:
        if statuses.get(img.commit) in (RowStatus.DISCARD, RowStatus.CRASH):
            by_tag.setdefault(img.tag, []).append(img)
    for imgs in by_tag.values():
        imgs.sort(key=_age, reverse=True)
        doomed += imgs[keep_discarded:]
    return doomed


def statuses_from_ledger(repo_root: Path, tags: set[str]) -> dict[str, RowStatus]:
    """commit -> its row status; a commit ever kept stays 'keep'."""
    status: dict[str, RowStatus] = {}
    for tag in tags:
        for e in Ledger(repo_root, tag).experiments():
            if status.get(e.commit) != RowStatus.KEEP:
                status[e.commit] = e.row.status
    return status


# --- moving between hosts --------------------------------------------------------------------


def export_image(store: ImageStore, image: ExperimentImage, record: RecordedResult | None, out: Path) -> Path:
    """One file: the image (saved by the image store, streamed) and its recorded result."""
    out = Path(out)
    with tempfile.TemporaryFile() as saved:
        store.save_image(image.id, saved)
        size = saved.tell()
        saved.seek(0)
        with tarfile.open(out, "w") as tar:
            meta = json.dumps({"ref": image.ref, "id": image.id, "record": record and to_json(record)}).encode()
            info = tarfile.TarInfo("record.json")
            info.size = len(meta)
            tar.addfile(info, io.BytesIO(meta))
            info = tarfile.TarInfo("image.tar")
            info.size = size
            tar.addfile(info, saved)
    return out


def _quarantined(saved: tarfile.TarFile) -> tuple[dict, tempfile.SpooledTemporaryFile]:
    """Check a docker-save archive from an untrusted file and make a copy the engine will load
    without any name: exactly one image, an experiment image of this runner, no volumes, no
    entrypoint, no healthcheck.

    Returns:
        (the image's config labels, the copy, positioned at its start)

    Raises:
        RepoError: what is refused, and why.
    """
    manifest = json.loads(saved.extractfile("manifest.json").read())
    if not isinstance(manifest, list) or len(manifest) != 1:
        raise RepoError(f"the file holds {len(manifest) if isinstance(manifest, list) else 'no'} images: "
                        "an export holds exactly one experiment image")
    config = (json.loads(saved.extractfile(manifest[0]["Config"]).read()).get("config") or {})
    labels = config.get("Labels") or {}
    if labels.get(naming.L_KIND) != naming.KIND_EXPERIMENT or not labels.get(naming.L_COMMIT):
        raise RepoError("the file's image is not an autoresearch-runner experiment image")
    for key, what in (("Volumes", "a VOLUME (writable host disk outside every cap)"),
                      ("Entrypoint", "an ENTRYPOINT (code that runs before the experiment's command)"),
                      ("Healthcheck", "a HEALTHCHECK (a second process the runner never started)")):
        if config.get(key):
            raise RepoError(f"the file's image declares {what}: refused")
    manifest[0]["RepoTags"] = None  # loaded by id only: nothing on this engine is renamed by it
    copy = tempfile.SpooledTemporaryFile(max_size=64 * 2**20)
    with tarfile.open(fileobj=copy, mode="w") as out:
        for member in saved.getmembers():
            if member.name == "repositories":
                continue  # the legacy tag file
            if member.name == "manifest.json":
                data = json.dumps(manifest).encode()
                info = tarfile.TarInfo("manifest.json")
                info.size = len(data)
                out.addfile(info, io.BytesIO(data))
            else:
                out.addfile(member, saved.extractfile(member) if member.isfile() else None)
    copy.seek(0)
    return labels, copy


def import_image(store: ImageStore, path: Path) -> ExperimentImage:
    """Load an exported experiment (checked in quarantine: see _quarantined) under its own name,
    which must not exist yet, and keep its record, marked imported, for `runner rerun`.

    Raises:
        RepoError: the file is not an export of `runner export`, or its image is refused.
        SandboxError: the engine failed to load it (its own words).
    """
    try:
        with tarfile.open(path) as tar:
            meta = json.loads(tar.extractfile("record.json").read())
            image_tar = tar.extractfile("image.tar")
            if image_tar is None:
                raise KeyError("image.tar")
            with tarfile.open(fileobj=image_tar) as saved:
                labels, copy = _quarantined(saved)
    except RepoError:
        raise  # refused in quarantine: the reason is the message
    except (OSError, KeyError, tarfile.TarError, ValueError, TypeError):
        raise RepoError(f"{path} is not a file written by `runner export`") from None
    tag, commit = labels.get(naming.L_TAG) or "imported", labels[naming.L_COMMIT]
    try:
        naming.check_tag(tag)
    except naming.TagError:
        raise RepoError(f"the file's image names the tag {tag!r}, which is not usable here: refused") from None
    with copy:
        images = store.load_images(copy)
    if len(images) != 1:
        raise RepoError(f"{path} loaded {len(images)} images: an export holds exactly one")
    image = images[0]
    ref = naming.experiment_image_ref(tag, commit)
    existing = store.image(ref)
    if existing is not None and existing.id != image.id:
        raise RepoError(f"{ref} already exists on this engine as another image: an import never replaces a name "
                        f"(remove it first if you mean to)")
    store.tag_image(image.id, ref)
    try:
        record = parse(RecordedResult, meta["record"]) if meta.get("record") else None
    except ValueError:
        record = None  # a record another version (or a hand) wrote wrong: the image's result is unknown here
    if record is not None:
        RECORDS_DIR.mkdir(parents=True, exist_ok=True)
        record = dataclasses.replace(record, source="imported")
        (RECORDS_DIR / f"{image.id.replace('sha256:', '')}.json").write_text(json.dumps(to_json(record)))
    image = store.image(ref)
    loaded = None if image is None else ExperimentImage.of(store, image)
    if loaded is None:
        raise RepoError(f"{ref} was removed while it was imported: import it again")
    return loaded
