"""Hugging Face Hub repos a research repo will ask for.

Experiments have no network: a Hub download (autoresearch's `get_kernel(...)`) can only be
served from a hub cache that a trusted, networked step filled beforehand. That step is
`runner prepare`: it finds the repo ids with `ast` in train.py and prepare.py (never executing
them), adds `hf_prefetch:` from runner.yaml, and downloads them in the trainer image with the
repo's own `kernels` / `huggingface_hub`, so a kernel's build variant is the one experiments
will look for. Experiments get the hub cache (never HF_HOME with its token files) read-only and
HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import ast
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import ConfigError

# call name -> what it fetches. from_pretrained is a method; any object's counts.
_CALLS = {
    "get_kernel": "kernel",
    "get_locked_kernel": "kernel",
    "snapshot_download": "model",
    "hf_hub_download": "model",
    "from_pretrained": "model",
}
_FIRST_ARG_KW = ("repo_id", "pretrained_model_name_or_path")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")
_KINDS = ("model", "dataset", "space", "kernel")
SOURCES = ("train.py", "prepare.py")


@dataclass(frozen=True)
class HubRef:
    """One Hub repo to fetch: kernel repos get the build variants this image will load."""

    repo_id: str
    kind: str = "model"               # model | dataset | space | kernel
    revision: str | None = None
    files: tuple[str, ...] = ()       # only these files (hf_hub_download with a literal filename)

    @property
    def repo_type(self) -> str:
        return "model" if self.kind == "kernel" else self.kind

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.repo_id}" + (f"@{self.revision}" if self.revision else "")

    def cache_folder(self, hub_cache: Path) -> Path:
        """Where huggingface_hub keeps this repo in a hub cache."""
        return Path(hub_cache) / "--".join([f"{self.repo_type}s", *self.repo_id.split("/")])

    def is_cached(self, hub_cache: Path) -> bool:
        snapshots = self.cache_folder(hub_cache) / "snapshots"
        return snapshots.is_dir() and any(snapshots.iterdir())

    def to_dict(self) -> dict:
        return {**asdict(self), "repo_type": self.repo_type, "label": self.label}


def parse_prefetch(entry: str) -> HubRef:
    """`[kind:]org/name[@revision]` from runner.yaml's hf_prefetch.

    Raises:
        ConfigError: the entry is not of that form.
    """
    kind, sep, rest = entry.partition(":")
    if not sep:
        kind, rest = "model", entry
    repo_id, _, revision = rest.partition("@")
    if kind not in _KINDS or not _REPO_ID.match(repo_id):
        raise ConfigError(f"hf_prefetch: {entry!r} is not [model|dataset|space|kernel:]org/name[@revision]")
    return HubRef(repo_id, kind, revision or None)


def _strings(node: ast.AST) -> list[str]:
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def _is_repo_id(text: str) -> bool:
    return bool(_REPO_ID.match(text)) and ".." not in text


def find_refs(source: str) -> list[HubRef]:
    """The Hub repos that `source` (Python, never executed) names in calls that download.

    A call's repo id is a string literal, or a name bound somewhere in the module to an
    expression of literals (autoresearch: `repo = "a/b" if cap == (9, 0) else "c/d"`; both count).
    Unparseable source names nothing.
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    bound: dict[str, list[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    bound.setdefault(target.id, []).extend(s for s in _strings(node.value) if "/" in s)
    refs: list[HubRef] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if name not in _CALLS:
            continue
        kw = {k.arg: k.value for k in node.keywords if k.arg}
        first = node.args[0] if node.args else next((kw[k] for k in _FIRST_ARG_KW if k in kw), None)
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            candidates = [first.value]
        elif isinstance(first, ast.Name):
            candidates = bound.get(first.id, [])
        else:
            continue
        kind = _CALLS[name]
        repo_type = kw.get("repo_type")
        if kind == "model" and isinstance(repo_type, ast.Constant) and repo_type.value in ("dataset", "space"):
            kind = repo_type.value
        revision = kw.get("revision")
        revision = revision.value if isinstance(revision, ast.Constant) and isinstance(revision.value, str) else None
        files: tuple[str, ...] = ()
        if name == "hf_hub_download":
            filename = node.args[1] if len(node.args) > 1 else kw.get("filename")
            if isinstance(filename, ast.Constant) and isinstance(filename.value, str):
                files = (filename.value,)  # else a computed file name: fetch the whole repo
        for repo_id in candidates:
            if _is_repo_id(repo_id) and not repo_id.startswith((".", "/")):
                refs.append(HubRef(repo_id, kind, revision, files))
    return _merge(refs)


def _merge(refs: list[HubRef]) -> list[HubRef]:
    """One ref per (kind, repo, revision); a whole-repo fetch absorbs file fetches."""
    merged: dict[tuple, HubRef] = {}
    for ref in refs:
        key = (ref.kind, ref.repo_id, ref.revision)
        prev = merged.get(key)
        if prev is None:
            merged[key] = ref
        elif prev.files and ref.files:
            merged[key] = HubRef(ref.repo_id, ref.kind, ref.revision, tuple(sorted(set(prev.files) | set(ref.files))))
        else:
            merged[key] = HubRef(ref.repo_id, ref.kind, ref.revision)
    return list(merged.values())


def wanted_refs(sources: dict[str, str], prefetch: tuple[str, ...]) -> list[HubRef]:
    """Refs found in `sources` (file name -> text) plus the explicit hf_prefetch entries."""
    found = [ref for text in sources.values() for ref in find_refs(text)]
    return _merge(found + [parse_prefetch(e) for e in prefetch])


def missing_detail(refs: list[HubRef], hub_cache: Path | None) -> str:
    """What to tell the user when an experiment asked the offline hub for something uncached."""
    missing = [r for r in refs if hub_cache is None or not r.is_cached(hub_cache)]
    how = "add it to hf_prefetch in runner.yaml (e.g. `hf_prefetch: [kernel:org/name]`) and run `runner prepare`"
    if missing:
        names = ", ".join(r.repo_id for r in missing)
        return f"Hugging Face Hub repo {names} is not in the prepared hub cache ({hub_cache}): {how}"
    return f"a Hugging Face Hub download was refused offline (a repo not named literally in train.py): {how}"


# Run in the trainer image by `runner prepare` (python -I: the repo's directory is not on the
# path). Prints one `HUB ok|failed <label> ...` line per ref; the runner reads those lines.
FETCH_SCRIPT = r'''
import json, sys
refs = json.loads(sys.argv[1])
try:
    from huggingface_hub import snapshot_download
except ImportError:
    print("HUB failed * huggingface_hub is not installed in the trainer image: add it (or kernels) to the repo's dependencies", flush=True)
    sys.exit(3)

def kernel(ref):
    try:
        from kernels.utils import install_kernel
    except ImportError:
        install_kernel = None
    if install_kernel is not None:
        try:
            # the variants this image's torch will load, exactly as get_kernel() asks for them
            return str(install_kernel(ref["repo_id"], revision=ref["revision"] or "main")[1])
        except TypeError:
            pass  # another kernels API: fall back to every build variant
    return snapshot_download(ref["repo_id"], revision=ref["revision"], allow_patterns=["build/*"])

for ref in refs:
    try:
        if ref["kind"] == "kernel":
            path = kernel(ref)
        else:
            path = snapshot_download(ref["repo_id"], repo_type=ref["repo_type"], revision=ref["revision"],
                                     allow_patterns=list(ref["files"]) or None)
        print("HUB ok", ref["label"], path, flush=True)
    except Exception as exc:
        why = (str(exc).strip().splitlines() or [""])[0][:300]
        print("HUB failed", ref["label"], type(exc).__name__ + ":", why, flush=True)
'''


@dataclass(frozen=True)
class FetchReport:
    fetched: list[str]    # labels
    failed: list[str]     # "<label> <why>"
    fatal: list[str]      # the failures that stop `runner prepare`: explicit hf_prefetch entries, no hub client


def read_fetch_report(log_text: str, explicit: set[str]) -> FetchReport:
    """What the fetch script printed. Repos found in the code may legitimately fail (autoresearch
    names one FA3 repo per GPU generation); a repo the user listed in hf_prefetch may not."""
    fetched, failed = [], []
    for line in log_text.splitlines():
        if line.startswith("HUB ok "):
            fetched.append(line.split()[2])
        elif line.startswith("HUB failed "):
            failed.append(line[len("HUB failed "):])
    fatal = [f for f in failed if f.split()[0] in explicit | {"*"}]
    return FetchReport(fetched, failed, fatal)
