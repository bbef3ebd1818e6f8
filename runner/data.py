"""The prepared data cache: is it there, and which exact data is it (its digest)."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

MANIFEST = "manifest.json"


class DataError(ValueError):
    """The data cache is missing or unusable; the message says how to prepare it."""


MANIFEST_MAX_BYTES = 16 * 2**20  # a manifest lists files; it is never a dataset


def _regular_files(data_dir: Path) -> list[Path]:
    """Every regular file under `data_dir`, never through a symlink, never a FIFO or a device:
    prepare.py wrote this tree with the cache writable, so the runner must not follow it blindly."""
    found = []
    for folder, dirs, files in os.walk(data_dir, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            path = Path(folder) / name
            if stat.S_ISREG(path.lstat().st_mode):
                found.append(path)
    return found


def _read_regular(path: Path, limit: int) -> bytes:
    """A regular file's bytes (at most `limit`), opened without following a link and without
    blocking on a FIFO swapped in since the walk.

    Raises:
        DataError: it is not a regular file any more, or larger than `limit`.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise DataError(f"{path} cannot be read as a regular file ({exc.strerror}): re-run `runner prepare`") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            raise DataError(f"{path} is not a regular file of at most {limit:,} bytes: re-run `runner prepare`")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(limit + 1)[:limit]
    finally:
        os.close(fd)


def data_digest(data_dir: Path) -> str:
    """sha256 naming the data an experiment saw.

    Prepared caches that write a manifest (tinylm does, with a sha256 per file) are named by
    their manifests; otherwise by the list of files and sizes, which is cheap on a multi-GB
    cache and still changes when files are added, removed or rewritten at another size. Only
    regular files count; links, FIFOs and devices are never followed or read.

    Raises:
        DataError: a manifest is not a regular file (or absurdly large).
    """
    data_dir = Path(data_dir)
    h = hashlib.sha256()
    files = _regular_files(data_dir)
    manifests = [f for f in files if f.name == MANIFEST]
    if manifests:
        for m in manifests:
            h.update(str(m.relative_to(data_dir)).encode() + b"\0" + _read_regular(m, MANIFEST_MAX_BYTES) + b"\0")
        return h.hexdigest()
    for f in files:
        h.update(f"{f.relative_to(data_dir)}\0{f.lstat().st_size}\0".encode())
    return h.hexdigest()


def check_data_dir(data_dir: Path) -> None:
    """Raise DataError unless `data_dir` holds prepared data."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir() or not any(data_dir.iterdir()):
        raise DataError(f"no prepared data in {data_dir}: run `runner prepare` first")
