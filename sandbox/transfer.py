"""Moving images between engines by content, without a registry: an engine's save stream with
the layers the receiving engine already holds left out.

`docker load` reads a layer's file only when the receiving engine lacks that layer (it looks the
layer chain up first), so a save archive whose manifest names every layer but which carries only
the missing ones loads into an engine that has the rest: trainer and sources layers move once
per engine, an experiment adds its own few KiB. Layers are recognised by their diff ID, the
sha256 of the uncompressed layer tar, which is what an image's RootFS lists: by name in the OCI
layout that engines from 25 on write (`blobs/sha256/<diff id>`), else by hashing the member once
(the legacy layout names layer folders by v1 ids, which repeat for the same layer chain, so a
name is hashed the first time only).
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
import tempfile
from collections.abc import Iterable, Iterator

CHUNK = 32 * 2**20
_OCI_BLOB = re.compile(r"^blobs/sha256/([0-9a-f]{64})$")
_SPOOL_IN_MEMORY = 16 * 2**20


class ChunkReader(io.RawIOBase):
    """A file object over an iterator of byte chunks (an engine's save or export stream)."""

    def __init__(self, chunks: Iterable[bytes]):
        self._chunks = iter(chunks)
        self._buffer = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._buffer:
            try:
                self._buffer = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buffer))
        b[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n


class _ChunkWriter(io.RawIOBase):
    """Collects what tarfile writes; the caller drains full chunks as they fill."""

    def __init__(self):
        self.pending: list[bytes] = []
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.pending.append(bytes(b))
        self.size += len(b)
        return len(b)

    def drain(self, at_least: int) -> Iterator[bytes]:
        if self.size >= at_least:
            data, self.pending, self.size = b"".join(self.pending), [], 0
            yield data


class LayerNames:
    """What each legacy layer member name was found to hold (its diff ID), remembered across
    saves: the same layer chain gives the same names, so a layer is hashed once per process."""

    def __init__(self):
        self._digests: dict[str, str] = {}

    def get(self, name: str) -> str | None:
        match = _OCI_BLOB.match(name)
        return "sha256:" + match.group(1) if match else self._digests.get(name)

    def learn(self, name: str, digest: str) -> None:
        self._digests[name] = digest


def _spool_and_hash(source, size: int):
    spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY)
    h = hashlib.sha256()
    remaining = size
    while remaining:
        block = source.read(min(remaining, 1 << 20))
        if not block:
            break
        h.update(block)
        spool.write(block)
        remaining -= len(block)
    spool.seek(0)
    return spool, "sha256:" + h.hexdigest()


def without_layers(save_stream: Iterable[bytes], have: set[str], names: LayerNames,
                   chunk: int = CHUNK) -> Iterator[bytes]:
    """The save archive `save_stream` with the layers whose diff IDs are in `have` left out,
    as chunks of about `chunk` bytes."""
    out = _ChunkWriter()
    with tarfile.open(fileobj=io.BufferedReader(ChunkReader(save_stream), 1 << 20), mode="r|") as src, \
            tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as dst:
        for member in src:
            layer = member.isfile() and (member.name.endswith("/layer.tar") or _OCI_BLOB.match(member.name))
            if not layer or not member.isfile():
                dst.addfile(member, src.extractfile(member) if member.isfile() else None)
            else:
                digest = names.get(member.name)
                if digest is not None and digest in have:
                    continue  # the receiving engine has it: tarfile skips its bytes
                if digest is None:
                    spool, digest = _spool_and_hash(src.extractfile(member), member.size)
                    names.learn(member.name, digest)
                    with spool:
                        if digest not in have:
                            dst.addfile(member, spool)
                else:
                    dst.addfile(member, src.extractfile(member))
            yield from out.drain(chunk)
    yield from out.drain(0)
