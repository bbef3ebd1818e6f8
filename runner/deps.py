"""Which of the research repo's own dependency files the trainer image installs.

`dependencies: auto` (runner.yaml) picks, in this order: pyproject.toml + uv.lock (installed
exactly, as `uv sync --frozen` would), pyproject.toml with [project] dependencies,
requirements.txt, nothing. A path names one of those files explicitly; `none` installs nothing.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from sandbox.images import Dependencies

from .config import ConfigError

LOCK, PYPROJECT, REQUIREMENTS = "uv.lock", "pyproject.toml", "requirements.txt"


def _project_dependencies(pyproject: Path) -> list[str]:
    try:
        data = tomllib.loads(pyproject.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{pyproject.name} is not valid TOML ({exc}): fix it or set dependencies: none") from None
    return list(data.get("project", {}).get("dependencies", []) or [])


def _lock(folder: Path) -> Dependencies:
    if not (folder / PYPROJECT).is_file():
        raise ConfigError(f"{folder / LOCK} has no {PYPROJECT} beside it: uv needs both to install the lock")
    return Dependencies("lock", ((PYPROJECT, (folder / PYPROJECT).read_bytes()), (LOCK, (folder / LOCK).read_bytes())))


def resolve_dependencies(repo: Path, setting: str) -> Dependencies:
    """The dependencies of `repo` that `setting` (auto | none | a path in the repo) selects.

    Raises:
        ConfigError: a named file is missing, or pyproject.toml cannot be read.
    """
    repo = Path(repo)
    if setting == "none":
        return Dependencies()
    if setting == "auto":
        if (repo / LOCK).is_file():
            return _lock(repo)
        if (repo / PYPROJECT).is_file() and _project_dependencies(repo / PYPROJECT):
            return Dependencies("pyproject", ((PYPROJECT, (repo / PYPROJECT).read_bytes()),))
        if (repo / REQUIREMENTS).is_file():
            return Dependencies("requirements", ((REQUIREMENTS, (repo / REQUIREMENTS).read_bytes()),))
        return Dependencies()
    path = (repo / setting).resolve()
    if not path.is_relative_to(repo.resolve()) or not path.is_file():
        raise ConfigError(f"dependencies: {setting} is not a file in the repo: name uv.lock, pyproject.toml or a requirements file")
    if path.name == LOCK:
        return _lock(path.parent)
    if path.name == PYPROJECT:
        return Dependencies("pyproject", ((PYPROJECT, path.read_bytes()),))
    return Dependencies("requirements", ((REQUIREMENTS, path.read_bytes()),))
