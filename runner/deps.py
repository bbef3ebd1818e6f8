"""Which of the research repo's own dependency files the trainer image installs.

`dependencies: auto` (runner.yaml) picks, in this order: pyproject.toml + uv.lock (installed
exactly, as `uv sync --frozen` would), pyproject.toml with [project] dependencies,
requirements.txt, nothing. A path names one of those files explicitly; `none` installs nothing.
Files are read as committed at HEAD (a work-tree file could be a link to any host file, which
would go into the image).
"""

from __future__ import annotations

import posixpath
import tomllib
from typing import Callable

from sandbox.images import Dependencies

from .config import ConfigError

LOCK, PYPROJECT, REQUIREMENTS = "uv.lock", "pyproject.toml", "requirements.txt"

Reader = Callable[[str], str]  # a committed file's text, "" when it is not tracked


def _project_dependencies(text: str, name: str) -> list[str]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{name} is not valid TOML ({exc}): fix it or set dependencies: none") from None
    return list(data.get("project", {}).get("dependencies", []) or [])


def _lock(read: Reader, folder: str) -> Dependencies:
    lock, pyproject = read(posixpath.join(folder, LOCK)), read(posixpath.join(folder, PYPROJECT))
    if not pyproject:
        raise ConfigError(f"{posixpath.join(folder, LOCK)} has no {PYPROJECT} beside it: uv needs both to install the lock")
    return Dependencies("lock", ((PYPROJECT, pyproject.encode()), (LOCK, lock.encode())))


def resolve_dependencies(read: Reader, setting: str) -> Dependencies:
    """The dependencies that `setting` (auto | none | a path in the repo) selects, from the
    files `read` returns.

    Raises:
        ConfigError: a named file is not tracked, or pyproject.toml cannot be read.
        RepoError: a dependency file is tracked as a symlink.
    """
    if setting == "none":
        return Dependencies()
    if setting == "auto":
        if read(LOCK):
            return _lock(read, "")
        pyproject = read(PYPROJECT)
        if pyproject and _project_dependencies(pyproject, PYPROJECT):
            return Dependencies("pyproject", ((PYPROJECT, pyproject.encode()),))
        requirements = read(REQUIREMENTS)
        if requirements:
            return Dependencies("requirements", ((REQUIREMENTS, requirements.encode()),))
        return Dependencies()
    path = posixpath.normpath(setting)
    text = "" if path.startswith(("..", "/")) else read(path)
    if not text:
        raise ConfigError(f"dependencies: {setting} is not a file committed in the repo: name uv.lock, pyproject.toml "
                          "or a requirements file")
    name = posixpath.basename(path)
    if name == LOCK:
        return _lock(read, posixpath.dirname(path))
    if name == PYPROJECT:
        return Dependencies("pyproject", ((PYPROJECT, text.encode()),))
    return Dependencies("requirements", ((REQUIREMENTS, text.encode()),))
