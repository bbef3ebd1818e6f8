"""The research repo through GitPython: layout checks, the autoresearch branch, commits,
the guard that only train.py changes, resets, and the source snapshot an image is built from.
"""

from __future__ import annotations

import ast
import io
import math
import operator
import os
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import git
from gitdb import IStream

EDITABLE = "train.py"
IN_SCOPE = (EDITABLE, "prepare.py", "program.md", "README.md")  # what a proposer is shown
REQUIRED = ("prepare.py", "train.py")
RUNNER_DIR = ".autoresearch"
RESULTS = "results.tsv"
# Kept out of git's view: a run's own records must survive `git reset --hard` and never
# make the tree dirty.
IGNORED = (f"/{RUNNER_DIR}/", f"/{RESULTS}")


class RepoError(ValueError):
    """The repo cannot be used as asked; the message says what to do."""


class GuardError(RepoError):
    """A proposal or commit breaks the rules (touches files other than train.py, or does not parse)."""


@dataclass(frozen=True)
class Commit:
    sha: str
    message: str

    @property
    def short(self) -> str:
        return self.sha[:7]


def branch_name(tag: str) -> str:
    return f"autoresearch/{tag}"


class ResearchRepo:
    def __init__(self, path: Path):
        self.path = Path(path).resolve()
        for name in REQUIRED:
            if not (self.path / name).is_file():
                raise RepoError(f"{self.path} has no {name}: point --repo at a research repo laid out like autoresearch "
                                f"(prepare.py, train.py, program.md), or make one with `runner init-example DIR`")
        try:
            self.git = git.Repo(self.path)
        except (git.InvalidGitRepositoryError, git.NoSuchPathError):
            raise RepoError(f"{self.path} is not a git repository: run `git init` and commit prepare.py and train.py") from None
        if not self.git.head.is_valid():
            raise RepoError(f"{self.path} has no commits yet: commit prepare.py and train.py first")
        self.check_runner_paths()
        self._exclude_runner_files()

    def check_runner_paths(self) -> None:
        """Refuse a repo that tracks the runner's own paths, or has links among them: the
        runner would write run output wherever they point.

        Raises:
            RepoError: which path, and what to do.
        """
        tracked = self.git.git.ls_files("--", RESULTS, RUNNER_DIR).split()
        if tracked:
            raise RepoError(f"{self.path} tracks {', '.join(tracked[:3])}: those are the runner's own files; "
                            f"`git rm --cached` them and commit")
        links = [p for p in (self.path / RESULTS, self.path / RUNNER_DIR) if p.is_symlink()]
        if (self.path / RUNNER_DIR).is_dir() and not links:
            for folder, dirs, files in os.walk(self.path / RUNNER_DIR, followlinks=False):
                links += [Path(folder, n) for n in dirs + files if Path(folder, n).is_symlink()]
        if links:
            raise RepoError(f"{links[0]} is a symlink: the runner never writes through links; remove it")

    def _exclude_runner_files(self) -> None:
        exclude = Path(self.git.git_dir) / "info" / "exclude"
        exclude.parent.mkdir(parents=True, exist_ok=True)
        lines = exclude.read_text().splitlines() if exclude.exists() else []
        missing = [p for p in IGNORED if p not in lines]
        if missing:
            with open(exclude, "a") as f:
                f.write("\n# autoresearch-runner records\n" + "\n".join(missing) + "\n")

    def respawn_git(self) -> None:
        """Drop GitPython's persistent `git cat-file` children and let it start fresh ones.

        A terminal's Ctrl-C goes to the whole process group, so it kills those children too;
        the loop calls this after a stop request before touching git again.
        """
        self.git.git.clear_cache()

    # --- state -----------------------------------------------------------------------

    def head(self) -> Commit:
        c = self.git.head.commit
        return Commit(c.hexsha, c.message.strip())

    def resolve(self, rev: str) -> Commit:
        try:
            c = self.git.commit(rev)
        except (git.BadName, ValueError, git.GitCommandError):
            raise RepoError(f"unknown commit {rev!r}: give a sha, branch or tag that `git log` shows") from None
        return Commit(c.hexsha, c.message.strip())

    def changed_files(self) -> set[str]:
        """Tracked files that differ from HEAD, staged or not."""
        return {d.a_path for d in self.git.index.diff(None)} | {d.a_path for d in self.git.index.diff("HEAD")}

    def ensure_clean(self) -> None:
        if self.git.is_dirty(untracked_files=False):
            changed = sorted(self.changed_files())
            raise RepoError(f"work tree has uncommitted changes ({', '.join(changed[:5])}): commit or stash them first")

    def committed_text(self, name: str, rev: str = "HEAD") -> str:
        """The committed content of `name` at `rev`: from the blob, never the work tree (whose
        file could be a link to any host file); "" when it is not tracked there.

        Raises:
            RepoError: it is tracked as a symlink.
        """
        try:
            item = self.git.commit(rev).tree / name
        except KeyError:
            return ""
        if item.type != "blob":
            return ""
        if item.mode == 0o120000:
            raise RepoError(f"{name} is tracked as a symlink: the runner reads in-scope files as committed text "
                            f"and never follows links; commit the file itself")
        return item.data_stream.read().decode("utf-8", errors="replace")

    def current_branch(self) -> str | None:
        return None if self.git.head.is_detached else self.git.active_branch.name

    def branch_exists(self, name: str) -> bool:
        return name in [h.name for h in self.git.heads]

    def log(self, n: int = 20) -> list[Commit]:
        return [Commit(c.hexsha, c.message.strip()) for c in self.git.iter_commits(max_count=n)]

    # --- changes ---------------------------------------------------------------------

    def create_branch(self, name: str) -> None:
        if self.branch_exists(name):
            raise RepoError(f"branch {name} exists: continue it with --resume, or pick a new --tag")
        self.git.create_head(name).checkout()

    def checkout(self, name: str) -> None:
        """Raises RepoError when git refuses (local changes in the way, for one)."""
        try:
            self.git.heads[name].checkout()
        except git.GitCommandError as exc:
            why = (exc.stderr or str(exc)).strip().splitlines()
            raise RepoError(f"git cannot check out {name}: {why[-1] if why else exc} "
                            f"(commit or stash the changes in {self.path}, then resume)") from None

    def commit_train_py(self, parent: str, new_text: str, message: str, ref: str) -> Commit:
        """Commit `new_text` as train.py on top of `parent`, off the branch and off the work tree.

        The commit is kept alive by `ref` (refs/autoresearch/...); the branch moves only when
        the experiment is kept (`reset_hard` on the branch). Experiments running in parallel each get their own
        commit this way. The text and the work tree are checked before anything is written; the
        commit is guarded again once made (nothing but train.py differs from its parent).

        Raises:
            GuardError: the text does not parse, or a tracked file other than train.py was
                changed in the work tree (a proposer reaching past its one file).
        """
        check_python(new_text)
        touched = self.changed_files() - {EDITABLE}
        if touched:
            raise GuardError(f"the work tree has changes to {', '.join(sorted(touched))}: only {EDITABLE} may change")
        data = new_text.encode()
        blob = self.git.odb.store(IStream("blob", len(data), io.BytesIO(data)))
        parent_commit = self.git.commit(parent)
        mode = parent_commit.tree[EDITABLE].mode if EDITABLE in parent_commit.tree else 0o100644
        index = git.IndexFile.from_tree(self.git, parent_commit)
        index.add([git.BaseIndexEntry((mode, blob.binsha, 0, EDITABLE))], write=False)
        tree = index.write_tree()
        c = git.Commit.create_from_tree(self.git, tree, message, parent_commits=[parent_commit], head=False)
        git.Reference.create(self.git, ref, c.hexsha, force=True)
        self.guard(c.hexsha)
        return Commit(c.hexsha, message)

    def guard(self, sha: str) -> None:
        """Raise GuardError if commit `sha` changes any file but train.py relative to its parent."""
        c = self.git.commit(sha)
        parent = c.parents[0] if c.parents else None
        changed = {d.a_path for d in parent.diff(c)} | {d.b_path for d in parent.diff(c)} if parent else set()
        others = sorted(p for p in changed if p and p != EDITABLE)
        if others:
            raise GuardError(f"commit {sha[:7]} changes {', '.join(others)}: only {EDITABLE} may change")

    def merge_train_py(self, base: str, ours: str, theirs: str) -> str | None:
        """Three-way merge of train.py: the change base->theirs re-applied on ours.

        Returns the merged text, or None if the two changes conflict.
        """
        with tempfile.TemporaryDirectory(prefix="ar-merge-") as tmp:
            paths = []
            for name, rev in (("ours", ours), ("base", base), ("theirs", theirs)):
                path = Path(tmp) / name
                path.write_text(self.committed_text(EDITABLE, rev))
                paths.append(str(path))
            try:
                return self.git.git.merge_file("-p", *paths, strip_newline_from_stdout=False)
            except git.GitCommandError:
                return None

    def reset_hard(self, sha: str) -> None:
        """Branch, index and tracked files back to `sha`.

        results.tsv and .autoresearch/ are excluded from git's view, so they are never touched.
        """
        self.git.head.reset(sha, index=True, working_tree=True)

    # --- snapshot --------------------------------------------------------------------

    def snapshot_tars(self, sha: str) -> tuple[bytes, bytes]:
        """The tree at `sha` as two tars under `repo/`: (every fixed file, train.py alone).

        Built from the raw blobs of the commit, not by `git archive`: .gitattributes filters
        (smudge drivers, git-lfs), export-subst and export-ignore would run host code on
        repo-chosen input and make the image differ from what was committed. No .git, no
        results, no untracked files, no submodules. Every entry is root-owned and read-only
        (files 0444, executables and dirs 0555), so inside the container the research code can
        change none of it. Timestamps are zeroed and entries sorted: the fixed tar of two commits
        that differ only in train.py is byte-identical, so their images share one sources layer.
        """
        fixed, editable = io.BytesIO(), io.BytesIO()
        items = sorted((item for item in self.git.commit(sha).tree.traverse() if item.type in ("blob", "tree")),
                       key=lambda item: item.path)
        with tarfile.open(fileobj=fixed, mode="w", format=tarfile.USTAR_FORMAT) as f_out, \
                tarfile.open(fileobj=editable, mode="w", format=tarfile.USTAR_FORMAT) as e_out:
            for item in items:
                info = tarfile.TarInfo(f"repo/{item.path}")
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                info.mtime = 0
                data = None
                if item.type == "tree":
                    info.type, info.mode = tarfile.DIRTYPE, 0o555
                elif item.mode == 0o120000:  # a symlink: its target is the blob's content
                    info.type, info.mode = tarfile.SYMTYPE, 0o777
                    info.linkname = item.data_stream.read().decode("utf-8", errors="replace")
                else:
                    blob = item.data_stream.read()
                    info.size, data = len(blob), io.BytesIO(blob)
                    info.mode = 0o555 if item.mode & 0o111 else 0o444
                (e_out if item.path == EDITABLE else f_out).addfile(info, data)
        return fixed.getvalue(), editable.getvalue()


MAX_TRAIN_PY_BYTES = 1 << 20  # 1 MiB: a proposal is a script, not a payload (it costs memory and a layer)


def check_python(text: str) -> None:
    """Raise GuardError unless `text` is a train.py the runner will commit: a str under
    MAX_TRAIN_PY_BYTES that Python parses."""
    if not isinstance(text, str):
        raise GuardError(f"train.py must be text, got {type(text).__name__}")
    size = len(text.encode("utf-8", errors="replace"))
    if size > MAX_TRAIN_PY_BYTES:
        raise GuardError(f"train.py is {size:,} bytes, over the {MAX_TRAIN_PY_BYTES:,} a proposal may be")
    try:
        ast.parse(text)
    except SyntaxError as exc:
        raise GuardError(f"train.py does not parse: line {exc.lineno}: {exc.msg}") from None
    except (RecursionError, MemoryError, ValueError) as exc:  # 0+0+...+0, null bytes: the parser gives up
        raise GuardError(f"train.py does not parse: {type(exc).__name__}") from None


def read_time_budget(prepare_py: str) -> float | None:
    """TIME_BUDGET from prepare.py's top level: a constant expression (`5 * 60`), optionally
    through `int(...)`/`float(...)` and `os.environ.get(NAME, "N")` / `os.getenv` defaults.

    Returns None when prepare.py sets no TIME_BUDGET.

    Raises:
        RepoError: TIME_BUDGET is set to something that cannot be read without running it.
    """
    for node in ast.parse(prepare_py).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "TIME_BUDGET" for t in targets):
                try:
                    value = float(_constant(node.value))
                except (ValueError, TypeError, ArithmeticError):
                    value = math.nan
                if not math.isfinite(value) or value <= 0:
                    raise RepoError(f"TIME_BUDGET in prepare.py ({ast.unparse(node.value)}) is not a positive constant "
                                    "the runner can read: set budget_s in runner.yaml or pass --budget")
                return value
    return None


_ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
               ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}


def _constant(node: ast.AST):
    """The value of a constant expression, without running anything; ValueError otherwise."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
        left, right = float(_constant(node.left)), float(_constant(node.right))
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise ValueError("exponent too large")
        return _ARITHMETIC[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = float(_constant(node.operand))
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.Call) and len(node.args) >= 1:
        name = ast.unparse(node.func)
        if name in ("int", "float", "round") and len(node.args) == 1:
            return float(_constant(node.args[0]))
        if name in ("os.environ.get", "os.getenv", "environ.get", "getenv") and len(node.args) == 2:
            return float(_constant(node.args[1]))  # the default: the runner sets the variable itself
    raise ValueError(f"not a constant: {ast.unparse(node)}")

