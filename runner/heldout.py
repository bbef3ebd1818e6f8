"""Held-out files: what `runner prepare` puts into verify_data when prepare.py does not.

The verifier's held-out figure means something only if no experiment could read the data it
comes from: not the repo, not the image, not the data cache. karpathy/autoresearch's prepare.py
knows nothing of held-out data, and tinylm's held-out text ships with the runner, outside the
repo. `heldout:` in runner.yaml maps a path under verify_data to where its bytes come from:

    heldout:
      data/shard_06542.parquet: https://host/path/shard_06541.parquet#sha256=<64 hex digits>
      tokenizer/tokenizer.pkl: data_dir:tokenizer/tokenizer.pkl
      tinylm/val.bin: package:autoresearch_examples/heldout/cpython-3.11-tools-scripts.txt

A source is an http(s) URL (downloaded on this host), `data_dir:PATH` (a file of the data cache
prepare.py filled, such as its tokenizer), `package:PACKAGE/PATH` (a file an installed Python
package ships) or an absolute host path. `#sha256=` pins the source's bytes; a pinned download
already in place is not fetched again. `#scramble=python` (after the pin, joined by `&`) writes
public Python source scrambled with this host's secret (runner/scramble.py): a text that exists
nowhere else, so that no proposer can remember it and no train.py can carry it.

This is trusted code on the runner's host, run after prepare.py (a tokenizer it trains is
copied from the data cache). A held-out file that is byte for byte a file experiments read
(the data cache, the repo) is refused: it would hold out nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import ssl
import stat
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, BinaryIO, Callable

from sandbox.fsafe import open_beneath

from . import __version__
from .data import DataError
from .errors import ConfigError
from .scramble import SCRAMBLES, load_secret, scramble_python

if TYPE_CHECKING:
    from .config import RunConfig

DOWNLOAD_TIMEOUT_S = 60      # per connection attempt and per read; a shard streams for longer
DOWNLOAD_ATTEMPTS = 3        # a dropped connection is tried again, after 2 s, then 4 s
CHUNK_BYTES = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SKIP_IN_REPO = (".git", ".autoresearch")  # git's objects and the runner's own files


class HeldoutError(DataError):
    """A held-out file could not be made (download failed, pin mismatch, not held out)."""


@dataclass(frozen=True)
class HeldoutFile:
    """One `heldout:` entry: `target` (below verify_data) from `location`, of kind `kind`."""

    target: PurePosixPath
    kind: str          # url | data_dir | package | path
    location: str      # the URL, the path below data_dir, PACKAGE/PATH, or the host path
    sha256: str | None = None
    scramble: str | None = None  # one of scramble.SCRAMBLES: written scrambled with the host's secret

    @property
    def source(self) -> str:
        return self.location if self.kind in ("url", "path") else f"{self.kind}:{self.location}"


def _relative(text: str, what: str) -> PurePosixPath:
    path = PurePosixPath(text)
    if not text or path.is_absolute() or any(p in ("..", ".") for p in text.split("/")) or "\\" in text:
        raise ConfigError(f"heldout: {what} {text!r} must be a relative path without '..'")
    return path


def parse(target: str, source: str) -> HeldoutFile:
    """One `heldout:` entry, `target: source[#sha256=HEX][&scramble=python]`.

    Raises:
        ConfigError: the target is not a plain relative path, the source is of no known kind,
            or the pin is not `#sha256=` and 64 lowercase hex digits.
    """
    location, sep, fragment = source.partition("#")
    options = {}
    for option in fragment.split("&") if sep else ():
        key, _, value = option.partition("=")
        if key not in ("sha256", "scramble") or key in options:
            raise ConfigError(f"heldout.{target}: after '#' come sha256=<64 lowercase hex digits> and scramble=python, "
                              f"joined by '&'; got #{fragment}")
        options[key] = value
    sha, scramble = options.get("sha256"), options.get("scramble")
    if sha is not None and not _SHA256.fullmatch(sha):
        raise ConfigError(f"heldout.{target}: pin a file as #sha256=<64 lowercase hex digits>, got #sha256={sha}")
    if scramble is not None and scramble not in SCRAMBLES:
        raise ConfigError(f"heldout.{target}: scramble= takes one of {', '.join(SCRAMBLES)}, got {scramble!r}")
    dest = _relative(target, "target")
    if location.startswith(("http://", "https://")):
        return HeldoutFile(dest, "url", location, sha, scramble)
    if location.startswith("data_dir:"):
        return HeldoutFile(dest, "data_dir", str(_relative(location[len("data_dir:"):], "data_dir path")), sha, scramble)
    if location.startswith("package:"):
        package, _, inner = location[len("package:"):].partition("/")
        if not package.replace(".", "").replace("_", "").isalnum():
            raise ConfigError(f"heldout.{target}: package:PACKAGE/PATH names an importable package, got {location!r}")
        return HeldoutFile(dest, "package", f"{package}/{_relative(inner, 'package path')}", sha, scramble)
    if location.startswith(("/", "~")):
        return HeldoutFile(dest, "path", location, sha, scramble)
    raise ConfigError(f"heldout.{target}: the source must be an http(s) URL, data_dir:PATH, package:PACKAGE/PATH "
                      f"or an absolute path, got {location!r}")


def entries(cfg: RunConfig) -> list[HeldoutFile]:
    """The parsed `heldout:` entries of `cfg`, in the order runner.yaml gives them."""
    return [parse(target, source) for target, source in cfg.heldout.items()]


def fill(cfg: RunConfig, progress: Callable[[str], None] = print) -> list[Path]:
    """Write every `heldout:` file into verify_data. A pinned URL whose file is already there
    with that digest is not downloaded again; every other source is fetched or copied each time.

    Returns:
        the files written or kept, on this host.

    Raises:
        HeldoutError: a source is missing or unreadable, a download failed, a file does not
            match its pin, or a file is byte for byte one that experiments read.
    """
    wanted = entries(cfg)
    if not wanted:
        return []
    if cfg.verify_data is None:
        raise HeldoutError("heldout: needs verify_data (the folder only the verifier reads); it is null")
    root = Path(cfg.verify_data).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    seen = _ExperimentFiles(Path(cfg.data_dir).expanduser(), Path(cfg.repo))
    done = []
    for entry in wanted:
        dest = root / entry.target
        if entry.kind == "url" and entry.sha256 and not entry.scramble and dest.is_file() and _sha256_file(dest) == entry.sha256:
            digest, how = entry.sha256, "kept"
        else:
            digest = _write(root, entry, lambda out, e=entry: _copy_source(cfg, e, out))
            how = "downloaded" if entry.kind == "url" else "copied"
        written = digest
        if entry.scramble:
            written = _scramble(root, entry)
            how += f", scrambled ({entry.scramble}) with this host's secret"
        if (entry.kind != "data_dir" or entry.scramble) and (twin := seen.find(dest, written)) is not None:
            dest.unlink()
            raise HeldoutError(f"heldout.{entry.target}: {entry.source} is byte for byte {twin}, which experiments "
                               "read; held-out data must be data no experiment sees (docs/heldout.md)")
        pin = "pinned" if entry.sha256 else f"pin it with #sha256={digest}"
        progress(f"held-out {entry.target}: {how} from {entry.source} ({dest.stat().st_size:,} bytes; {pin})")
        done.append(dest)
    return done


SCRAMBLE_MAX_BYTES = 64 << 20  # scrambling parses the text whole: for held-out source code, not shards


def _scramble(root: Path, entry: HeldoutFile) -> str:
    """Rewrite the written target scrambled with the host's secret (runner/scramble.py); returns
    the sha256 of what is now there."""
    dest = root / entry.target
    if dest.stat().st_size > SCRAMBLE_MAX_BYTES:
        dest.unlink()
        raise HeldoutError(f"heldout.{entry.target}: {entry.source} is over {SCRAMBLE_MAX_BYTES >> 20} MiB; scramble= is "
                           "for held-out source code (a shard of text needs none: no train.py can carry it)")
    try:
        secret = load_secret(root)
    except (OSError, ValueError) as exc:
        raise HeldoutError(f"heldout.{entry.target}: {exc}") from None
    scrambled = scramble_python(dest.read_bytes(), secret)
    return _write(root, dataclasses.replace(entry, sha256=None), lambda out: out.write(scrambled))


def _write(root: Path, entry: HeldoutFile, copy: Callable[[_Hashing], None]) -> str:
    """`copy(file)` into a temporary file beside the target, checked against the pin, then moved
    into place; returns the sha256 of what was written. Nothing is left behind on failure."""
    part = entry.target.with_name(f".{entry.target.name}.part")
    try:
        fd = open_beneath(root, part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    except OSError as exc:
        raise HeldoutError(f"heldout.{entry.target}: cannot write into {root}: {exc}") from None
    try:
        with _Hashing(os.fdopen(fd, "wb")) as out:
            copy(out)
        digest = out.sha256.hexdigest()
        if entry.sha256 is not None and digest != entry.sha256:
            raise HeldoutError(f"heldout.{entry.target}: {entry.source} has sha256 {digest}, "
                               f"not the pinned {entry.sha256}")
        os.replace(root / part, root / entry.target)
        return digest
    except OSError as exc:  # the disk is full, the target is a folder, ...
        raise HeldoutError(f"heldout.{entry.target}: cannot write {root / entry.target}: {exc}") from None
    finally:
        (root / part).unlink(missing_ok=True)


class _Hashing:
    """A write-only file that hashes what goes through it."""

    def __init__(self, f: BinaryIO):
        self.f, self.sha256 = f, hashlib.sha256()

    def restart(self) -> None:
        """Empty the file and the hash (a download tried again)."""
        self.f.seek(0)
        self.f.truncate()
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        return self.f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


def _copy_source(cfg: RunConfig, entry: HeldoutFile, out: _Hashing) -> None:
    if entry.kind == "url":
        _download(entry.location, out, cfg.ca_bundle)
        return
    if entry.kind == "data_dir":
        f = _open_data_file(Path(cfg.data_dir).expanduser(), entry)
    else:
        path = _package_file(entry) if entry.kind == "package" else Path(entry.location).expanduser()
        try:
            f = open(path, "rb")
        except OSError as exc:
            raise HeldoutError(f"heldout.{entry.target}: cannot read {entry.source}: {exc.strerror or exc}") from None
    with f:
        shutil.copyfileobj(f, out, CHUNK_BYTES)


def _open_data_file(data_dir: Path, entry: HeldoutFile) -> BinaryIO:
    """A regular file of the data cache, reached without following a link (prepare.py wrote the
    cache; see runner/data.py)."""
    try:
        fd = open_beneath(data_dir, entry.location, os.O_RDONLY | os.O_NONBLOCK, make_dirs=False)
    except OSError as exc:
        raise HeldoutError(f"heldout.{entry.target}: {data_dir / entry.location} is not readable "
                           f"({exc.strerror or exc}); did prepare.py make it?") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise HeldoutError(f"heldout.{entry.target}: {data_dir / entry.location} is not a regular file")
    return os.fdopen(fd, "rb")


def _package_file(entry: HeldoutFile) -> Path:
    package, _, inner = entry.location.partition("/")
    try:
        return Path(str(resources.files(package) / inner))
    except (ModuleNotFoundError, TypeError):
        raise HeldoutError(f"heldout.{entry.target}: package {package!r} is not installed") from None


def _download(url: str, out: _Hashing, ca_bundle: Path | None) -> None:
    """GET `url` into `out`, following redirects, with the host's proxy settings ($https_proxy)
    and, behind a TLS-intercepting proxy, its CA (`ca_bundle`) besides the system's."""
    context = ssl.create_default_context()
    if ca_bundle is not None and Path(ca_bundle).is_file():
        context.load_verify_locations(cafile=str(ca_bundle))
    request = urllib.request.Request(url, headers={"User-Agent": f"autoresearch-runner/{__version__}"})
    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        try:
            with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S, context=context) as response:
                shutil.copyfileobj(response, out, CHUNK_BYTES)
            return
        except urllib.error.HTTPError as exc:
            if exc.code < 500 or attempt == DOWNLOAD_ATTEMPTS:
                raise HeldoutError(f"heldout: {url}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            if attempt == DOWNLOAD_ATTEMPTS:
                raise HeldoutError(f"heldout: {url}: {getattr(exc, 'reason', exc)}") from None
        out.restart()
        time.sleep(2 ** attempt)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


class _ExperimentFiles:
    """The regular files experiments can read that the runner knows of (the data cache and the
    repo's tree), by size, hashed only when a held-out file has the same size."""

    def __init__(self, data_dir: Path, repo: Path):
        self.by_size: dict[int, list[Path]] = {}
        for top, skip in ((data_dir, ()), (repo, _SKIP_IN_REPO)):
            for folder, dirs, files in os.walk(top, followlinks=False):
                dirs[:] = [d for d in dirs if not (Path(folder) == top and d in skip)]
                for name in files:
                    st = os.lstat(os.path.join(folder, name))
                    if stat.S_ISREG(st.st_mode):
                        self.by_size.setdefault(st.st_size, []).append(Path(folder, name))

    def find(self, path: Path, digest: str) -> Path | None:
        """A file experiments read with the bytes of `path` (sha256 `digest`), if any."""
        for candidate in self.by_size.get(path.stat().st_size, []):
            if candidate != path and _sha256_file(candidate) == digest:
                return candidate
        return None
