"""A bounded sink for a run's output: the host disk and the runner's memory stay flat
whatever the code inside prints (2 GB of lines, or one line that never ends).

The first `head_bytes` go straight to the log file; after that only the last `tail_bytes` are
kept in a ring, and written after a marker when the sink closes. The summary block is printed
last, so it is always in the tail.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from pathlib import Path

from .fsafe import open_beneath, relative_to_root


class CappedLog:
    """Thread-safe: the pump that writes may outlive the wait for it (a flood that trails the
    exit), so tail() and close() see whole chunks, and a write after close() is dropped."""

    def __init__(self, path: Path, head_bytes: int, tail_bytes: int, root: Path | None = None):
        """`root`: a trusted directory above `path` (the research repo); nothing between the two,
        nor the log itself, may be a symlink (see sandbox.fsafe)."""
        self.path = path
        self.head_bytes = head_bytes
        self.tail_bytes = tail_bytes
        self.total_bytes = 0
        self._written = 0
        self._tail: deque[bytes] = deque()
        self._tail_len = 0
        self._lock = threading.Lock()
        base, below = relative_to_root(path, root)
        base.mkdir(parents=True, exist_ok=True)
        fd = open_beneath(base, below, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        self._file = os.fdopen(fd, "wb")

    def write(self, chunk: bytes) -> None:
        with self._lock:
            if not self._file.closed:
                self._write(chunk)

    def _write(self, chunk: bytes) -> None:
        self.total_bytes += len(chunk)
        room = self.head_bytes - self._written
        if room > 0:
            head = chunk[:room]
            self._file.write(head)
            self._file.flush()
            self._written += len(head)
        # The tail ring always sees everything, so it holds the last bytes even if the
        # process stopped printing right at the head cap.
        self._tail.append(chunk)
        self._tail_len += len(chunk)
        while self._tail_len - len(self._tail[0]) >= self.tail_bytes:
            self._tail_len -= len(self._tail.popleft())

    @property
    def truncated(self) -> bool:
        return self.total_bytes > self._written

    def tail(self) -> bytes:
        with self._lock:
            return self._tail_bytes()

    def _tail_bytes(self) -> bytes:
        return b"".join(self._tail)[-self.tail_bytes:]

    def close(self) -> None:
        """Write the kept tail after the head if anything was dropped, then close the file."""
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._file.closed:
            return
        if self.truncated:
            tail = self._tail_bytes()
            dropped = self.total_bytes - self._written - len(tail)
            if dropped > 0:
                self._file.write(f"\n[runner: {dropped} bytes of output dropped by the log cap]\n".encode())
                self._file.write(tail)
            else:  # head and tail overlap: write only what the head lacks
                self._file.write(tail[len(tail) - (self.total_bytes - self._written):])
        self._file.close()
