"""The prepared data cache: is it there, and which exact data is it (its digest)."""

from __future__ import annotations

import hashlib
from pathlib import Path

MANIFEST = "manifest.json"


class DataError(ValueError):
    """The data cache is missing or unusable; the message says how to prepare it."""


def data_digest(data_dir: Path) -> str:
    """sha256 naming the data an experiment saw.

    Prepared caches that write a manifest (tinylm does, with a sha256 per file) are named by
    their manifests; otherwise by the list of files and sizes, which is cheap on a multi-GB
    cache and still changes when files are added, removed or rewritten at another size.
    """
    data_dir = Path(data_dir)
    h = hashlib.sha256()
    manifests = sorted(data_dir.rglob(MANIFEST))
    if manifests:
        for m in manifests:
            h.update(str(m.relative_to(data_dir)).encode() + b"\0" + m.read_bytes() + b"\0")
        return h.hexdigest()
    for f in sorted(p for p in data_dir.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(data_dir)}\0{f.stat().st_size}\0".encode())
    return h.hexdigest()


def check_data_dir(data_dir: Path) -> None:
    """Raise DataError unless `data_dir` holds prepared data."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir() or not any(data_dir.iterdir()):
        raise DataError(f"no prepared data in {data_dir}: run `runner prepare` first")
