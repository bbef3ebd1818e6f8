"""`runner init-example`: the bundled tinylm target as a fresh git repo."""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

import git

from .repo import RepoError

# Copied into the repo. The held-out text (examples/heldout/) never is: runner.yaml names it in
# the package, and `runner prepare` writes it where only the verifier reads it.
FILES = ("prepare.py", "train.py", "program.md", "README.md", "runner.yaml", "data/cpython-3.11-stdlib.txt.xz",
         "data/LICENSE-PSF.txt")


def example_source(name: str = "tinylm") -> Path:
    return Path(str(resources.files("autoresearch_examples") / name))


def init_example(directory: Path, name: str = "tinylm") -> Path:
    """Copy the example into `directory` and commit it on branch main.

    Raises:
        RepoError: `directory` exists and is not empty.
    """
    directory = Path(directory).resolve()
    if directory.exists() and any(directory.iterdir()):
        raise RepoError(f"{directory} exists and is not empty: pick a new directory")
    src = example_source(name)
    for rel in FILES:
        (directory / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / rel, directory / rel)
    repo = git.Repo.init(directory, initial_branch="main")
    with repo.config_writer() as cw:
        if not repo.config_reader().has_option("user", "name"):
            cw.set_value("user", "name", "autoresearch-runner")
            cw.set_value("user", "email", "runner@localhost")
    repo.index.add(list(FILES))
    repo.index.commit(f"{name}: initial research target")
    return directory
