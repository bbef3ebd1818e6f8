"""Opening the runner's own files without following links.

A research repo is untrusted input: a tracked or planted symlink at `.autoresearch/...` or
`results.tsv` would make the runner write run output into any host file it can write (a shell
rc file, say). Every file of the runner's is opened from a trusted root (the repo's own
directory), one path component at a time, each with O_NOFOLLOW.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePath
from typing import BinaryIO


class UnsafePathError(OSError):
    """A component of a runner path is a symlink or not what it should be."""


def open_beneath(root: Path, relative: PurePath | str, flags: int, mode: int = 0o644, make_dirs: bool = True) -> int:
    """A descriptor for `root/relative`, reached without following any symlink below `root`.

    Args:
        flags: os.open flags for the file itself (O_NOFOLLOW is added).
        make_dirs: create missing directories on the way (0o755).

    Raises:
        UnsafePathError: a directory on the way, or the file, is a symlink (or not a directory).
        OSError: as os.open.
    """
    parts = PurePath(relative).parts
    if not parts or any(p in ("..", "/") for p in parts):
        raise UnsafePathError(f"{relative}: not a path below {root}")
    dfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in parts[:-1]:
            try:
                nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
            except FileNotFoundError:
                if not make_dirs:
                    raise
                os.mkdir(name, 0o755, dir_fd=dfd)
                nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
            except OSError as exc:  # ELOOP (a link) or ENOTDIR
                raise UnsafePathError(f"{Path(root, *parts)}: {name} is a symlink or not a directory; "
                                      "the runner never writes through links") from exc
            os.close(dfd)
            dfd = nfd
        try:
            return os.open(parts[-1], flags | os.O_NOFOLLOW, mode, dir_fd=dfd)
        except OSError as exc:
            if exc.errno == 40:  # ELOOP: the file itself is a link
                raise UnsafePathError(f"{Path(root, *parts)} is a symlink; the runner never writes through links") from exc
            raise
    finally:
        os.close(dfd)


def relative_to_root(path: Path, root: Path | None) -> tuple[Path, PurePath]:
    """(root, path below it) for open_beneath; without a root, the path's own directory."""
    path = Path(path)
    if root is not None:
        try:
            return Path(root), path.relative_to(root)
        except ValueError:
            pass
    return path.parent, PurePath(path.name)


def open_write_beneath(path: Path, root: Path | None) -> BinaryIO:
    """`path` opened for writing (created, or truncated), no link below `root` followed (the repo
    is untrusted ground): for output streamed in pieces.

    Raises:
        UnsafePathError: as open_beneath.
    """
    base, below = relative_to_root(path, root)
    base.mkdir(parents=True, exist_ok=True)
    return os.fdopen(open_beneath(base, below, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "wb")


def write_beneath(path: Path, root: Path | None, data: bytes) -> None:
    """Write `data` to `path`, no link below `root` followed (the repo is untrusted ground)."""
    with open_write_beneath(path, root) as f:
        f.write(data)
