"""A held-out text no proposer can carry: public Python source, scrambled with a secret of this host.

A held-out split is worth something only if no experiment can know its bytes. Bytes no
experiment can *read* are not enough when the text is public: tinylm's held-out text is CPython's
Tools/scripts, which a proposer can remember and train.py (1 MiB) can carry whole as a lookup
table. So `runner prepare` writes a version of it that exists nowhere else: the files in an order
drawn from the secret, and in each file the names the file itself defines (its functions,
classes, arguments and variables) renamed, by a permutation drawn from the secret, among each
other. What stays is what any model of Python learns anyway: keywords, layout, the library's
names (`os.path.join`, `print`, `self`), and each file's own set of names, each name as often as
before. What goes is the one thing a table of the public text can look up: the exact bytes
before a position. A model is scored on the scrambled text as it would be on any Python it never
saw; one that memorised the original gains only where no defined name is within its context.

The scramble is a pure function of (secret, text): `runner prepare` run again writes the same
bytes, so held-out scores stay comparable across the sessions of one night. The secret lives in
verify_data (`SECRET_NAME`), which only the verifier and prepare.py mount.
"""

from __future__ import annotations

import ast
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

# Names a model of Python knows from everywhere: never renamed (renaming them would measure how
# well a model guesses a secret, not how well it models Python).
_KEEP = frozenset(keyword.kwlist) | frozenset(keyword.softkwlist) | frozenset(dir(builtins)) | {"self", "cls", "_"}
_NAME = re.compile(rb"(?<![\w.])[A-Za-z_][A-Za-z0-9_]*(?!\w)")


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
    secret order and each file's own names permuted among themselves (see the module's doc)."""
    files = _files(text)
    rng = random.Random(hmac.new(secret, b"order" + hashlib.sha256(text).digest(), "sha256").digest())
    rng.shuffle(files)
    return b"".join(_rename(f, secret) for f in files)


def _files(text: bytes) -> list[bytes]:
    starts = [m.start() for m in re.finditer(re.escape(FILE_MARKER), text)]
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    return [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)])]


def _defined(source: bytes) -> list[str]:
    """The names `source` binds itself (defs, classes, arguments, assigned and imported-as names),
    in sorted order; none when it does not parse."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return []
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.alias) and node.asname:
            names.add(node.asname)
    return sorted(n for n in names if n not in _KEEP and not (n.startswith("__") and n.endswith("__")))


def _rename(source: bytes, secret: bytes) -> bytes:
    """`source` with its own names permuted (each occurrence not after a `.`: `os.path` stays)."""
    header, sep, body = (source.partition(b"\n") if source.startswith(FILE_MARKER) else (b"", b"", source))
    names = _defined(body)
    if len(names) < 2:
        return source
    rng = random.Random(hmac.new(secret, b"names" + hashlib.sha256(body).digest(), "sha256").digest())
    shuffled = names[:]
    rng.shuffle(shuffled)
    mapping = {a.encode(): b.encode() for a, b in zip(names, shuffled)}
    return header + sep + _NAME.sub(lambda m: mapping.get(m.group(), m.group()), body)
