"""A held-out text no proposer can carry: public Python source, scrambled with a secret of this host.

A held-out split is worth something only if no experiment can know its bytes. Bytes no
experiment can *read* are not enough when the text is public: tinylm's held-out text is CPython's
Tools/scripts, which a proposer can remember and train.py (1 MiB) can carry whole as a lookup
table. So `runner prepare` writes a version of it that exists nowhere else: the files in an order
drawn from the secret, and in each file every word (names in code, comments and strings alike,
the file's own path too) replaced by another word of the same file, by a permutation drawn from
the secret. What stays is what a model of Python learns from any text: keywords and builtins,
punctuation, layout, and each file's consistency (a name is the same name throughout the file).
What goes is what a table of the public text looks up: the exact bytes before a position. (A
milder scramble, renaming only the names each file defines, left a third of the text's 24-byte
contexts in place: comments, strings and library calls, which a table carries as well.)

The scramble is a pure function of (secret, text): `runner prepare` run again writes the same
bytes, so held-out scores stay comparable across the sessions of one night. The secret lives in
verify_data (`SECRET_NAME`), which only the verifier and prepare.py mount.
"""

from __future__ import annotations

import builtins
import hashlib
import hmac
import keyword
import os
import random
import re
from pathlib import Path

SECRET_NAME = ".heldout-secret"
SECRET_BYTES = 32
FILE_MARKER = b"# ===== file: "  # tinylm's corpus format: each file after such a line
SCRAMBLES = ("python",)           # the kinds `heldout:` accepts (#scramble=python)

# Words a model of Python meets in every file: never replaced (replacing them would measure how
# well a model guesses a secret, not how well it models Python).
_KEEP = frozenset(w.encode() for w in (*keyword.kwlist, *keyword.softkwlist, *dir(builtins), "self", "cls", "_"))
_WORD = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*")


def load_secret(folder: Path) -> bytes:
    """The host's held-out secret in `folder` (verify_data), made on first use (0600, never
    replaced: the held-out text of every later prepare depends on it)."""
    path = Path(folder) / SECRET_NAME
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        secret = path.read_bytes()
        if len(secret) != SECRET_BYTES:
            raise ValueError(f"{path} is not a held-out secret ({len(secret)} bytes, not {SECRET_BYTES}): remove it, "
                             "and run `runner prepare` again (held-out scores of earlier runs are then not comparable)")
        return secret
    with os.fdopen(fd, "wb") as f:
        secret = os.urandom(SECRET_BYTES)
        f.write(secret)
    return secret


def scramble_python(text: bytes, secret: bytes) -> bytes:
    """`text` (Python files, one after each FILE_MARKER line, or one file) with its files in a
    secret order and each file's words permuted among themselves (see the module's doc)."""
    files = _files(text)
    rng = random.Random(hmac.new(secret, b"order" + hashlib.sha256(text).digest(), "sha256").digest())
    rng.shuffle(files)
    return b"".join(_rename(f, secret) for f in files)


def _files(text: bytes) -> list[bytes]:
    starts = [m.start() for m in re.finditer(re.escape(FILE_MARKER), text)]
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    return [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)])]


def _rename(source: bytes, secret: bytes) -> bytes:
    """`source` with its words (all but keywords and builtins) permuted among themselves."""
    marker = FILE_MARKER if source.startswith(FILE_MARKER) else b""
    body = source[len(marker):]
    words = sorted({w for w in _WORD.findall(body) if w not in _KEEP})
    rng = random.Random(hmac.new(secret, b"words" + hashlib.sha256(body).digest(), "sha256").digest())
    shuffled = words[:]
    rng.shuffle(shuffled)
    mapping = dict(zip(words, shuffled))
    return marker + _WORD.sub(lambda m: mapping.get(m.group(), m.group()), body)
