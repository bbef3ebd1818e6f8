"""Receiving the export hook's files from a running experiment, every byte treated as hostile.

The files lie in the run's /out tmpfs, which the engine's archive API cannot see, so `tar` run
in the container (tar_command) sends them down an exec's output. train.py shares that
container and uid: it can replace a file with a link (to a huge file, to /dev/zero), a fifo or
a directory, and stop or feed the tar process. So the stream is read as plain ustar, only
regular files of the expected names are written, nothing is buffered beyond a chunk, and the
whole stream is capped at what /out can hold. The caller cuts it at a deadline.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

from .fsafe import open_write_beneath

COLLECT_TIMEOUT_S = 60.0            # the stream is cut here; an honest 256 MiB export takes about a second
TAR_OVERHEAD_BYTES = 64 * 1024      # headers, padding and tar's 10 KiB records above the files' own bytes
BLOCK_BYTES = 512                   # tar's unit: each header, and each file padded up to it
WRITE_BYTES = 1024 * 1024           # the most of one file held in memory at once
REGULAR = (b"0", b"\0")             # ustar type flags of a regular file


class Refused(Exception):
    """The stream is not what an honest export sends; nothing of it is kept."""


def tar_command(directory: str, names: Iterable[str]) -> list[str]:
    """GNU tar writing `names` in `directory` to stdout as plain ustar. It archives a link as a
    link and a device or a fifo as what it is, reading none of them; an absent name is left out.
    A link as `directory` itself is followed: the byte cap bounds what it can reach. Owner 0 in
    every header: ustar holds no uid above 2,097,151, and tar would leave such a file out."""
    return ["tar", "--format=ustar", "--owner=0", "--group=0", "--numeric-owner", "-C", directory, "-cf", "-", "--",
            *names]


class _Capped:
    """Exact reads from an iterator of byte chunks, never more than `cap_bytes` taken from it."""

    def __init__(self, chunks: Iterable[bytes], cap_bytes: int):
        self._chunks, self._buf, self.cap_bytes, self.left = iter(chunks), bytearray(), cap_bytes, cap_bytes

    def read(self, n: int) -> bytes:
        while len(self._buf) < n:
            try:
                chunk = next(self._chunks)
            except StopIteration:
                raise Refused("the stream ended early (cut at the deadline, or the run exited)") from None
            except Exception as exc:  # a stream cut from another thread breaks in the SDK's own ways
                raise Refused(f"the stream broke: {exc!r}") from None
            self.left -= len(chunk)
            if self.left < 0:
                raise Refused(f"more than {self.cap_bytes} bytes: more than /out can hold")
            self._buf += chunk
        data = bytes(self._buf[:n])
        del self._buf[:n]  # cheap at the front of a bytearray
        return data


def _octal(field: bytes) -> int:
    digits = field.strip(b" \0")
    if not re.fullmatch(rb"[0-7]{1,12}", digits):
        raise Refused("a tar header with a malformed number")
    return int(digits, 8)


def _regular_member(header: bytes, cap_bytes: int) -> tuple[str, int]:
    """(name, size) of a ustar header of a regular file, anything else refused."""
    if header[257:263] != b"ustar\0":
        raise Refused("not a ustar header")
    if _octal(header[148:156]) != sum(header[:148]) + 8 * ord(" ") + sum(header[156:]):
        raise Refused("a tar header with a wrong checksum")
    if header[156:157] not in REGULAR:
        raise Refused("not a regular file (a link, a device, a fifo, a directory or an extended header)")
    if header[345:500].strip(b"\0"):
        raise Refused("a name with a prefix: not one of ours")
    size = _octal(header[124:136])
    if size > cap_bytes:
        raise Refused(f"a file of {size} bytes: more than /out can hold")
    return header[:100].split(b"\0", 1)[0].decode("ascii", errors="replace"), size


def receive_regular_files(chunks: Iterable[bytes], names: Iterable[str], dest: Path, root: Path | None,
                          cap_bytes: int) -> None:
    """Write the files `names` from tar_command's output into `dest`, streamed to disk, no link
    below `root` followed. Every name must come once, as a regular file.

    Args:
        chunks: the tar stream, in pieces of any size.
        cap_bytes: the most bytes taken from `chunks` in all.

    Raises:
        Refused: a member that is not a regular file of one of `names`, a name twice or missing,
            a malformed header, more than `cap_bytes`, or an early end. What was written is removed.
        UnsafePathError: a link on the way to `dest` (the runner never writes through one).
    """
    stream, wanted, written = _Capped(chunks, cap_bytes), set(names), []
    try:
        while wanted:
            header = stream.read(BLOCK_BYTES)
            if header == bytes(BLOCK_BYTES):  # the end of the archive
                raise Refused(f"missing: {', '.join(sorted(wanted))}")
            name, size = _regular_member(header, cap_bytes)
            if name not in wanted:
                raise Refused(f"{name!r}: not expected, or sent twice")
            wanted.remove(name)
            with open_write_beneath(dest / name, root) as f:
                written.append(dest / name)
                left = size
                while left:
                    piece = stream.read(min(left, WRITE_BYTES))
                    f.write(piece)
                    left -= len(piece)
            stream.read(-size % BLOCK_BYTES)
    except BaseException:
        for path in written:  # each reached without a link a moment ago
            path.unlink(missing_ok=True)
        raise
