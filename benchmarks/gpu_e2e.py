"""The GPU end-to-end check's stages, run by benchmarks/gpu_e2e.sh (read its header first).

On a GPU machine with a driver and a CUDA-torch python, but no Docker, no network and perhaps no
git, it runs the runner's real CLI against a real Docker engine, in stages:

  machine      python, torch, the CUDA device, which tools the machine has
  bundle       the carried bundle, unpacked with Python's own lzma and tarfile (no xz needed)
  engine       dockerd from the bundle, on its own data root, exec root, pidfile and socket
  base_image   the machine's userland, only what torch needs, imported as the base image
  repo         tinylm with a torch.compile'd model, committed with git (the machine's or the bundle's)
  sandbox_run  `runner run --gpus all`
  bare_run     the same train.py as a bare process
  loop         `runner start --max-experiments 1` (the baseline and one experiment)
  gpu_check    the runs used the GPU: peak_vram_mb > 0 and a CUDA device named in each log

Each stage has its own time limit inside one overall deadline. $OUT/results.jsonl gets one line
per stage as it ends and $OUT/results.json is rewritten then with every stage so far, so a run
cut short keeps the figures of what finished. `STANDIN=cpu` runs the same stages on a host
without a GPU (a python with CPU torch stands in for the machine's); only the GPU check is then
recorded as skipped, with why.

    python benchmarks/gpu_e2e.py check-bundle DIR      # size check, one line
    python benchmarks/gpu_e2e.py run                   # the stages; knobs in the environment
    python benchmarks/gpu_e2e.py base-files LIST       # the base image's paths (the run calls it)

Standard library only until the bundle is unpacked; then the runner's own modules.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

PROJ = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------
# Constants (units in the names)
# ---------------------------------------------------------------------------

# The device harness carries at most 64 MiB with the working tree (the checkout's own ~2 MB
# included); the bundle keeps to 60 so the rest fits beside it.
BUNDLE_LIMIT_BYTES = 60 * 2**20
BUNDLE_FILE = "bundle.tar.xz"
COMMAND_LIMIT_S = 600     # what the device harness gives one command
DEADLINE_S = 450          # the whole run: under 8 minutes, well inside COMMAND_LIMIT_S
RESERVE_S = 30            # kept back from the deadline: a stopped stage's grace, dockerd's stop, the last write
MIN_STAGE_S = 20          # a stage that would get less than this is skipped rather than started
STOP_GRACE_S = 15         # SIGINT (the runner removes its container, the loop records `interrupted`), then SIGKILL
DOCKERD_STOP_S = 20       # SIGTERM to our dockerd (it stops its containers), then SIGKILL
BUDGET_S = 10             # training seconds per run
# The sandbox kills a run at timeout_factor x budget + startup_grace_s (80 s for 10 s with the
# runner's defaults). Each container compiles cold (its inductor cache is on its own /tmp), and
# the evaluation's batch shape compiles again: the e2e repo's runner.yaml gives that its room.
STARTUP_GRACE_S = 150
LOOP_EXPERIMENTS = 1      # experiments after the loop's baseline
LOOP_TAG = "e2e"
STAGE_LIMIT_S = {         # each stage's own limit; the deadline may cut it shorter
    "machine": 60,
    "bundle": 60,
    "engine": 60,
    "base_image": 240,    # measured 99 s for the whole 14.5 GiB userland; the torch closure is a part of it
    "repo": 60,
    "sandbox_run": 200,
    "bare_run": 150,
    "loop": 320,
}
STANDIN_MODES = ("", "cpu")
GIT_CHOICES = ("auto", "machine", "bundle")
BASE_SELECTIONS = ("torch", "broad")

# The lines the e2e's patch of train.py prints (and only this module parses): the seconds the
# first compiled step took, and the CUDA device's name ("cpu" without one).
COMPILE_LINE = "e2e_compile_s"
DEVICE_LINE = "e2e_device"

# What an image that experiments run in must never hold, whatever the selection.
SECRETS = ("etc/shadow", "etc/shadow-", "etc/gshadow", "etc/gshadow-", "etc/ssh", "etc/ssl/private")
# Never needed in the base: documentation, the driver's folder (the runner bind-mounts it) and the
# CUDA toolkit (torch's wheels bring their own CUDA libraries, Triton its own ptxas).
PRUNED = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "usr/share/lintian",
          "usr/local/nvidia", "usr/local/cuda", "usr/local/cuda-*", *SECRETS)
# Folders the base needs even empty: the trainer build writes uv's cache to /tmp.
EMPTY_DIRS = ("tmp", "var/tmp", "home", "root", "opt", "run", "mnt")
# Commands the trainer image build and torch.compile use (Dockerfile.trainer: sh, useradd; Triton's
# launcher: cc; inductor's CPU kernels: g++); the packages that hold them come with their closure.
COMMANDS = ("sh", "bash", "cc", "gcc", "c++", "g++", "as", "ld", "useradd", "sort", "env")


class Refused(Exception):
    """Bad input: one line saying what to do; exit 2 (1 for an oversized bundle)."""

    def __init__(self, line: str, code: int = 2):
        super().__init__(line)
        self.code = code


class StageFailed(Exception):
    """A stage ended without its result; `figures` holds what it measured before that."""

    status = "failed"

    def __init__(self, why: str, **figures):
        super().__init__(why)
        self.figures = figures


class StageTimeout(StageFailed):
    status = "timeout"


class Interrupted(BaseException):
    """SIGTERM or SIGINT reached the orchestrator."""


# ---------------------------------------------------------------------------
# The bundle's size
# ---------------------------------------------------------------------------


def bundle_bytes(folder: Path) -> int:
    """The bytes that travel: every regular file under `folder`, by its apparent size."""
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                total += os.stat(path).st_size
    return total


def check_bundle(folder: Path) -> int:
    """The bundle's size in bytes, if it exists and is within BUNDLE_LIMIT_BYTES.

    Raises:
        Refused: no bundle there (code 2), or it is over the limit (code 1).
    """
    if not (folder / BUNDLE_FILE).is_file():
        raise Refused(f"no bundle at {folder / BUNDLE_FILE}: make it with `bash benchmarks/gpu_e2e.sh bundle {folder}` "
                      "on a host that can download packages")
    size = bundle_bytes(folder)
    if size > BUNDLE_LIMIT_BYTES:
        raise Refused(f"bundle {folder} is {size / 2**20:.1f} MiB, over the {BUNDLE_LIMIT_BYTES / 2**20:.0f} MiB "
                      "that can be carried beside the checkout (64 MiB in all): remove what is not in "
                      f"`gpu_e2e.sh bundle`'s output, or make it again", code=1)
    return size


# ---------------------------------------------------------------------------
# Staged results
# ---------------------------------------------------------------------------


class Results:
    """$OUT/results.jsonl (one line per finished stage, appended and fsync'd) and
    $OUT/results.json (the whole document, rewritten atomically after every stage)."""

    def __init__(self, out: Path, header: dict, clock: Callable[[], float] = time.monotonic):
        self.jsonl = out / "results.jsonl"
        self.json = out / "results.json"
        self.clock = clock
        self.t0 = clock()
        self.doc = {**header, "status": "running", "elapsed_s": 0.0, "stages": {}}
        self.jsonl.write_text("")
        self._write()

    def elapsed_s(self) -> float:
        return round(self.clock() - self.t0, 1)

    def status(self, stage: str) -> str | None:
        return (self.doc["stages"].get(stage) or {}).get("status")

    def figures(self, stage: str) -> dict:
        return self.doc["stages"].get(stage) or {}

    def record(self, stage: str, status: str, **figures) -> dict:
        line = {"stage": stage, "status": status, "t_s": self.elapsed_s(), **figures}
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(line, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.doc["stages"][stage] = line
        self.doc["elapsed_s"] = line["t_s"]
        self._write()
        return line

    def finish(self, status: str) -> None:
        self.doc["status"] = status
        self.doc["elapsed_s"] = self.elapsed_s()
        self._write()

    def _write(self) -> None:
        tmp = self.json.with_name(self.json.name + ".tmp")
        tmp.write_text(json.dumps(self.doc, indent=2, default=str) + "\n")
        os.replace(tmp, self.json)


# ---------------------------------------------------------------------------
# Evidence that a run used the GPU (pure)
# ---------------------------------------------------------------------------


def marker(text: str, key: str) -> str | None:
    """The value of the last `key: value` line the e2e's patch printed, or None."""
    found = re.findall(rf"^{re.escape(key)}:\s*(.+?)\s*$", text, re.M)
    return found[-1] if found else None


def gpu_evidence(peak_vram_mb: float | None, log_text: str) -> dict:
    """Whether a run used the GPU: a VRAM peak above zero and a CUDA device named in its log."""
    device = marker(log_text, DEVICE_LINE)
    named = bool(device) and device != "cpu"
    return {"gpu_used": bool(peak_vram_mb) and peak_vram_mb > 0 and named,
            "peak_vram_mb": peak_vram_mb, "device": device}


# ---------------------------------------------------------------------------
# The base image's files: only what torch needs
# ---------------------------------------------------------------------------


def _norm_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dist_closure(roots: list[str]) -> dict:
    """The installed distributions `roots` need, by their Requires-Dist, extras followed.

    Markers are evaluated with `packaging` when it can be imported (pip's copy will do); without
    it every requirement counts, which takes more, never less. Returns {name: Distribution}.
    """
    from importlib import metadata

    try:
        from packaging.requirements import Requirement
    except ImportError:
        try:
            from pip._vendor.packaging.requirements import Requirement
        except ImportError:
            Requirement = None
    installed: dict = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            installed.setdefault(_norm_name(name), dist)  # the first on sys.path wins, as for import
    done: dict[str, set[str]] = {}
    todo = [(_norm_name(r), frozenset()) for r in roots]
    while todo:
        name, extras = todo.pop()
        dist = installed.get(name)
        if dist is None:
            continue
        seen = done.setdefault(name, set())
        new = (set(extras) | {""}) - seen
        if not new:
            continue
        seen |= new
        for line in dist.requires or []:
            if Requirement is None:
                m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?", line)
                if m:
                    todo.append((_norm_name(m.group(1)), frozenset(x.strip() for x in (m.group(2) or "").split(",") if x.strip())))
                continue
            req = Requirement(line)
            if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in new):
                continue
            todo.append((_norm_name(req.name), frozenset(req.extras)))
    return {name: installed[name] for name in done if name in installed}


def _real(path: str) -> str:
    """`path` with its folders' links resolved and its last component kept (a link stays a link)."""
    path = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def _link_chain(path: str) -> list[str]:
    """`path` and every link it goes through to its target, each as _real gives it."""
    chain: list[str] = []
    p = _real(path)
    for _ in range(40):
        if p in chain or not os.path.lexists(p):
            break
        chain.append(p)
        if not os.path.islink(p):
            break
        p = _real(os.path.join(os.path.dirname(p), os.readlink(p)))
    return chain


def _pruned(path: str, prune: tuple[str, ...]) -> bool:
    """Whether `path` is one of the `prune` patterns (relative to /, fnmatch) or below one."""
    parts = path.strip("/").split("/")
    for pat in prune:
        n = pat.count("/") + 1
        if len(parts) >= n and fnmatch.fnmatchcase("/".join(parts[:n]), pat):
            return True
    return False


def _walk(root: str, prune: tuple[str, ...], skip: set[str] = frozenset()) -> list[str]:
    """Every entry under `root` (links kept as links), except pruned paths and `skip`."""
    out: list[str] = []
    if not os.path.lexists(root) or _pruned(root, prune) or root in skip:
        return out
    out.append(root)
    if os.path.islink(root) or not os.path.isdir(root):
        return out
    for here, dirs, files in os.walk(root):
        keep = []
        for d in dirs:
            p = os.path.join(here, d)
            if _pruned(p, prune) or p in skip:
                continue
            out.append(p)
            if not os.path.islink(p):
                keep.append(d)
        dirs[:] = keep
        out.extend(p for p in (os.path.join(here, f) for f in files) if not _pruned(p, prune) and p not in skip)
    return out


def _dpkg_db() -> tuple[dict, dict]:
    """Installed packages: ({name: (binary name, essential, [dependency groups])}, {virtual: name})."""
    fmt = "${db:Status-Abbrev}\t${Package}\t${binary:Package}\t${Essential}\t${Provides}\t${Pre-Depends}, ${Depends}\n"
    out = subprocess.run(["dpkg-query", "-W", "-f", fmt], capture_output=True, text=True, check=True).stdout
    pkgs: dict = {}
    provides: dict = {}
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) != 6 or not parts[0].startswith("ii"):
            continue
        _st, name, binary, essential, prov, deps = parts
        groups = [[a.strip().split(" ")[0].split(":")[0] for a in g.split("|") if a.strip()]
                  for g in deps.split(",") if g.strip()]
        pkgs.setdefault(name, (binary, essential == "yes", groups))
        for v in prov.split(","):
            if v.strip():
                provides.setdefault(v.strip().split(" ")[0].split(":")[0], name)
    return pkgs, provides


def _dpkg_owners(paths: list[str]) -> set[str]:
    """The packages that own any of `paths` (each also tried with /usr merged or split)."""
    tries: set[str] = set()
    for p in paths:
        for q in (p, os.path.realpath(p)):
            tries.add(q)
            for top in ("/bin/", "/sbin/", "/lib/", "/lib64/"):
                if q.startswith("/usr" + top):
                    tries.add(q[4:])
                elif q.startswith(top):
                    tries.add("/usr" + q)
    if not tries:
        return set()
    out = subprocess.run(["dpkg-query", "-S", *sorted(tries)], capture_output=True, text=True).stdout
    owners: set[str] = set()
    for line in out.splitlines():
        if line.startswith(("diversion by", "local diversion")) or ": " not in line:
            continue
        for name in line.split(": ", 1)[0].split(","):
            owners.add(name.strip().split(":")[0])
    return owners


def _ldd_libs(files: list[str]) -> set[str]:
    """The system libraries that `files` load, as this machine's loader finds them without
    LD_LIBRARY_PATH (the image has no such setting either)."""
    libs: set[str] = set()
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    for i in range(0, len(files), 40):
        out = subprocess.run(["ldd", *files[i:i + 40]], capture_output=True, text=True, env=env).stdout
        libs.update(m.group(1) for m in re.finditer(r"=>\s+(/\S+)\s+\(", out))
    return libs


def _dpkg_files(seeds: set[str]) -> tuple[list[str], int]:
    """The files of `seeds`, the Essential packages and everything they depend on.
    Returns (files, number of packages)."""
    pkgs, provides = _dpkg_db()
    want = {n for n, (_b, essential, _g) in pkgs.items() if essential} | {s for s in seeds if s in pkgs}
    todo = list(want)
    while todo:
        for group in pkgs[todo.pop()][2]:
            for alt in group:
                name = alt if alt in pkgs else provides.get(alt)
                if name:
                    if name not in want:
                        want.add(name)
                        todo.append(name)
                    break
    out = subprocess.run(["dpkg-query", "-L", *sorted(pkgs[n][0] for n in want)], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.startswith("/")], len(want)


def base_files(selection: str, dists: list[str]) -> tuple[list[str], dict]:
    """The paths (relative to /) that the base image takes from this machine, and a summary.

    `torch`: the Essential packages, the packages that hold python, its headers, the C and C++
    compilers, useradd and the system libraries torch's and Triton's binaries load, with their
    dependencies (dpkg); /etc; of python's packages only the distributions `dists` need.
    `broad`: /usr and /etc whole but for documentation, the CUDA toolkit and the driver's
    folder, and python's packages as for `torch`. Either way, no SECRETS.

    Raises:
        subprocess.CalledProcessError, FileNotFoundError: `torch` on a machine without dpkg.
    """
    paths: set[str] = set()
    python = sys.executable
    paths.update(_link_chain(python))
    venv = sys.prefix != sys.base_prefix
    site_dirs = {os.path.realpath(p) for p in (*site.getsitepackages(), sysconfig.get_paths()["purelib"],
                                               sysconfig.get_paths()["platlib"]) if os.path.isdir(p)}
    if venv:
        for name in ("pyvenv.cfg", "lib64"):
            paths.update(_link_chain(os.path.join(sys.prefix, name)))
        bindir = os.path.join(sys.prefix, "bin")
        for entry in os.listdir(bindir) if os.path.isdir(bindir) else []:
            if entry.startswith("python"):
                paths.update(_link_chain(os.path.join(bindir, entry)))

    closure = dist_closure(dists)
    dist_bytes: dict[str, int] = {}
    for name, dist in sorted(closure.items()):
        files = dist.files
        chosen: list[str] = []
        if files is None:  # no RECORD (a system package's egg-info): its top-level folders whole
            base = str(dist.locate_file(""))
            tops = (dist.read_text("top_level.txt") or dist.metadata["Name"]).split()
            for top in tops:
                for cand in (os.path.join(base, top), os.path.join(base, top + ".py")):
                    chosen += _walk(_real(cand), PRUNED)
            chosen += _walk(_real(str(getattr(dist, "_path", ""))), PRUNED) if getattr(dist, "_path", None) else []
        else:
            for f in files:
                p = _real(str(dist.locate_file(f)))
                if os.path.lexists(p):
                    chosen.append(p)
        paths.update(chosen)
        dist_bytes[name] = sum(os.lstat(p).st_size for p in chosen if os.path.isfile(p) and not os.path.islink(p))

    # Python's own pieces: its interpreter, standard library, headers and shared library.
    cfg = sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_prefix})
    libpython = os.path.join(sysconfig.get_config_var("LIBDIR") or "", sysconfig.get_config_var("LDLIBRARY") or "")
    pieces = [os.path.realpath(python), cfg["stdlib"], cfg["platstdlib"], cfg["include"], cfg["platinclude"], libpython]
    pieces = sorted({p for p in pieces if p and os.path.lexists(p)})
    skip = site_dirs | {os.path.join(p, d) for p in pieces for d in ("site-packages", "dist-packages")}

    summary: dict = {"selection": selection, "python": python, "venv": venv, "dists": len(closure),
                     "dist_mb": {k: round(v / 2**20, 1) for k, v in sorted(dist_bytes.items(), key=lambda kv: -kv[1])[:8]}}
    if selection == "torch":
        torch_bins = [p for p in paths if re.search(r"/(torch/lib/[^/]+\.so[.0-9]*|torch/_C[^/]*\.so|triton/_C/[^/]+\.so)$", p)
                      and os.path.isfile(p)]
        libs = {lib for lib in _ldd_libs([os.path.realpath(python), *torch_bins])
                if not any(lib.startswith(d + "/") for d in site_dirs)}
        commands = [c for c in (shutil.which(n) for n in COMMANDS) if c]
        for c in commands:
            paths.update(_link_chain(c))
        headers = [os.path.join(cfg["include"], "Python.h"), "/usr/include/stdio.h"]
        owners = _dpkg_owners([*pieces, *libs, *(os.path.realpath(c) for c in commands), *headers])
        files, npkgs = _dpkg_files(owners)
        for p in files:
            q = _real(p)
            if os.path.lexists(q) and not _pruned(q, PRUNED) and not any(q == s or q.startswith(s + "/") for s in skip):
                paths.add(q)
        # Links that update-alternatives made (cc -> /etc/alternatives/cc -> gcc) are in no package.
        for d in ("/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin"):
            for entry in os.scandir(d) if os.path.isdir(d) else []:
                if entry.is_symlink() and os.path.realpath(entry.path) in paths:
                    paths.update(_link_chain(entry.path))
        summary["packages"] = npkgs
    else:
        for top in ("usr", "bin", "sbin", "lib", "lib64"):
            paths.update(_walk("/" + top, PRUNED, skip))
    # Python's own pieces whole, whoever installed them (their compiled caches are in no package).
    for piece in pieces:
        paths.update(_walk(piece, PRUNED, skip))
    paths.update(_walk("/etc", PRUNED))
    for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        if os.path.islink("/" + top):
            paths.add("/" + top)
    paths.update("/" + d for d in EMPTY_DIRS if os.path.isdir("/" + d))
    for p in list(paths):  # every folder on the way, so their modes travel too
        parent = os.path.dirname(p)
        while parent not in ("/", "") and parent not in paths:
            paths.add(parent)
            parent = os.path.dirname(parent)
    rel = sorted(p.lstrip("/") for p in paths if p != "/" and not _pruned(p, SECRETS))
    summary["files"] = len(rel)
    summary["bytes"] = sum(os.lstat("/" + p).st_size for p in rel if os.path.isfile("/" + p) and not os.path.islink("/" + p))
    return rel, summary


# ---------------------------------------------------------------------------
# The run: settings, a child process with a deadline, the stages
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """The run's knobs, read from the environment once (gpu_e2e.sh's header lists them)."""

    out: Path
    bundle: Path
    standin: str = ""             # "" on the GPU machine; "cpu" for the rehearsal without a GPU
    gpus: str = "all"
    budget_s: float = BUDGET_S
    deadline_s: float = DEADLINE_S
    docker_host: str = ""         # an engine already running, instead of the bundle's dockerd
    base: str = ""                # a base image already there, instead of importing the userland
    base_selection: str = "torch"
    base_dists: tuple[str, ...] = ("torch", "numpy")  # numpy: torch warns at import without it
    git: str = "auto"
    work_parent: Path = Path("/var/tmp")
    keep: bool = False

    @classmethod
    def from_env(cls, env: dict[str, str]) -> "Settings":
        """Raises:
            Refused: a knob has a value it cannot take (the line says which and what it takes).
        """
        def number(name: str, default: float) -> float:
            raw = env.get(name, "")
            try:
                value = float(raw) if raw else default
            except ValueError:
                raise Refused(f"{name} must be a number of seconds, got {raw!r}") from None
            if value <= 0:
                raise Refused(f"{name} must be above 0, got {raw!r}")
            return value

        def choice(name: str, default: str, allowed: tuple[str, ...]) -> str:
            value = env.get(name, default)
            if value not in allowed:
                raise Refused(f"{name} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")
            return value

        if not env.get("OUT"):
            raise Refused("set OUT to a folder for the results (results.json, results.jsonl, log.txt)")
        standin = choice("STANDIN", "", STANDIN_MODES)
        deadline = number("DEADLINE_S", DEADLINE_S)
        if deadline > COMMAND_LIMIT_S - RESERVE_S:
            raise Refused(f"DEADLINE_S={deadline:g} leaves no room under the device's {COMMAND_LIMIT_S} s command limit: "
                          f"use {COMMAND_LIMIT_S - RESERVE_S} or less")
        return cls(
            out=Path(env["OUT"]).absolute(),
            bundle=Path(env.get("BUNDLE") or PROJ / ".gpu-bundle").absolute(),
            standin=standin,
            gpus=env.get("GPUS") or ("none" if standin else "all"),
            budget_s=number("BUDGET", BUDGET_S),
            deadline_s=deadline,
            docker_host=env.get("E2E_DOCKER_HOST", ""),
            base=env.get("E2E_BASE", ""),
            base_selection=choice("E2E_BASE_SELECT", "torch", BASE_SELECTIONS),
            base_dists=tuple(env.get("E2E_BASE_DISTS", "torch numpy").split()),
            git=choice("E2E_GIT", "auto", GIT_CHOICES),
            work_parent=Path(env.get("E2E_WORK") or "/var/tmp"),
            keep=env.get("E2E_KEEP", "") not in ("", "0"),
        )


class Console:
    """Prints to stdout and to $OUT/log.txt, each line stamped with the seconds since the start."""

    def __init__(self, log: Path):
        self.f = open(log, "w", buffering=1)
        self.t0 = time.monotonic()
        self.lock = threading.Lock()

    def say(self, text: str, stamp: bool = True) -> None:
        line = f"[t={time.monotonic() - self.t0:5.0f}s] {text}" if stamp else text
        with self.lock:
            print(line, flush=True)
            self.f.write(line + "\n")


class Run:
    """One end-to-end run: its settings, work folder, console, results and the processes it started."""

    def __init__(self, s: Settings):
        self.s = s
        s.out.mkdir(parents=True, exist_ok=True)
        self.console = Console(s.out / "log.txt")
        s.work_parent.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="gpu-e2e.", dir=s.work_parent))
        self.home = self.work / "home"
        self.repo = self.work / "repo"
        self.data = self.home / ".cache" / "autoresearch"
        self.bundle_dir = self.work / "bundle"
        self.dockerd: subprocess.Popen | None = None
        self.bridge: str | None = None  # a bridge of our own, where another engine's docker0 is on this host
        self.docker_host = s.docker_host
        self.base_ref = s.base
        self.imported_base: str | None = None
        self.env = dict(os.environ)
        self.env.update(HOME=str(self.home), PYTHONUNBUFFERED="1")
        self.git = "git"
        self.t_end = time.monotonic() + s.deadline_s
        self.results = Results(s.out, {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "mode": "cpu-standin" if s.standin else "gpu",
            "python": sys.executable,
            "budget_s": s.budget_s,
            "deadline_s": s.deadline_s,
            "gpus": s.gpus,
            "work": str(self.work),
        })

    def say(self, text: str) -> None:
        self.console.say(text)

    def left_s(self) -> float:
        return self.t_end - time.monotonic()

    # --- a child process with a deadline ---------------------------------------------

    def call(self, args: list[str], end: float, *, cwd: Path | None = None, env: dict | None = None,
             log: Path | None = None, echo: bool = True) -> tuple[int, str]:
        """Run `args` in a process group of its own until it exits or the monotonic time `end`.

        Its output goes to the console (and to `log`). Returns (exit code, output).

        Raises:
            StageTimeout: it was still running at `end`; the group got SIGINT (the runner
                then removes its container; the loop records the run as interrupted), and
                SIGKILL STOP_GRACE_S later.
        """
        sink = open(log, "w") if log else None
        lines: list[str] = []
        proc = subprocess.Popen(args, cwd=cwd, env=env or self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)

        def pump() -> None:
            for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                lines.append(line)
                if sink:
                    sink.write(line + "\n")
                if echo:
                    self.console.say("    " + line, stamp=False)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=max(end - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            self.stop_group(proc)
            reader.join(5)
            raise StageTimeout(f"`{' '.join(args[:4])} ...` still running at its limit; stopped") from None
        except BaseException:  # Interrupted: the child's group stops before the run's teardown
            self.stop_group(proc)
            raise
        reader.join(10)
        if sink:
            sink.close()
        return proc.returncode, "\n".join(lines)

    def stop_group(self, proc: subprocess.Popen, first: int = signal.SIGINT, grace_s: float = STOP_GRACE_S) -> None:
        """`first` to the process group we started, then SIGKILL after `grace_s`."""
        for sig, wait_s in ((first, grace_s), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait_s)
                return
            except subprocess.TimeoutExpired:
                continue

    def runner_env(self) -> dict:
        env = dict(self.env)
        env["PYTHONPATH"] = ":".join(p for p in (str(self.bundle_dir / "pylib"), str(PROJ), env.get("PYTHONPATH", "")) if p)
        if self.docker_host:
            env["DOCKER_HOST"] = self.docker_host
        return env

    def runner(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "runner", *args]

    # --- stages ----------------------------------------------------------------------

    def stage_machine(self, end: float) -> dict:
        probe = ("import json, sys, torch\n"
                 "cuda = torch.cuda.is_available()\n"
                 "print(json.dumps({'python_version': sys.version.split()[0], 'torch': torch.__version__, 'cuda_available': cuda,\n"
                 "                  'devices': [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []}))")
        rc, out = self.call([sys.executable, "-c", probe], end, echo=False)
        info = _last_json(out)
        if rc != 0 or info is None:
            raise StageFailed(f"{sys.executable} cannot import torch ({_last_line(out)}): point PYTHON at the machine's "
                              "CUDA-torch python (for STANDIN=cpu, a python with CPU torch)")
        tools = {t: shutil.which(t) is not None for t in ("git", "tar", "mount", "xz", "dpkg-query", "ldd", "nvidia-smi")}
        figures = {**info, "tools": tools, "cpus": os.cpu_count(), "kernel": os.uname().release,
                   "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}
        if tools["nvidia-smi"]:
            rc, smi = self.call(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"], end, echo=False)
            figures["nvidia_smi"] = smi.strip().splitlines() if rc == 0 else None
        self.say(f"python {info['python_version']}, torch {info['torch']}, CUDA devices {info['devices'] or 'none'}")
        if not self.s.standin and not info["cuda_available"]:
            raise StageFailed(f"no CUDA device visible to {sys.executable}: run this on the GPU machine, "
                              "or set STANDIN=cpu for the rehearsal without a GPU", **figures)
        if not tools["tar"]:
            raise StageFailed("tar is missing (the base image is made with it)", **figures)
        return figures

    def stage_bundle(self, end: float) -> dict:
        size = check_bundle(self.s.bundle)
        t0 = time.monotonic()
        with tarfile.open(self.s.bundle / BUNDLE_FILE, "r:xz") as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(self.bundle_dir, filter="data")
            else:
                tar.extractall(self.bundle_dir)
        figures = {"bundle_bytes": size, "bundle_mib": round(size / 2**20, 1), "unpack_s": round(time.monotonic() - t0, 1)}
        manifest = self.bundle_dir / "manifest.json"
        if manifest.is_file():
            figures["manifest"] = json.loads(manifest.read_text())
        for p in (self.bundle_dir / "pylib", PROJ):
            sys.path.insert(0, str(p))
        # git: GitPython runs the git binary, so the runner needs one. The machine's when it has one
        # (E2E_GIT=auto), else the bundle's (Debian's, with the libraries it links, run through a wrapper
        # so that only git sees them).
        use_bundle = self.s.git == "bundle" or (self.s.git == "auto" and shutil.which("git") is None)
        if use_bundle:
            wrapper = self.work / "gitbin" / "git"
            wrapper.parent.mkdir()
            # GIT_EXEC_PATH: the bundle has no git-core helpers, so a command that needs one fails here
            # as it would on a machine without git, instead of finding this host's.
            wrapper.write_text(f'#!/bin/sh\nLD_LIBRARY_PATH="{self.bundle_dir}/lib${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}" '
                               f'GIT_EXEC_PATH="{self.bundle_dir}/bin" exec "{self.bundle_dir}/bin/git" "$@"\n')
            wrapper.chmod(0o755)
            self.git = str(wrapper)
            self.env["PATH"] = f"{wrapper.parent}:{self.env.get('PATH', '')}"
        elif shutil.which("git") is None:
            raise StageFailed("E2E_GIT=machine but this machine has no git: use E2E_GIT=auto or bundle", **figures)
        else:
            self.git = shutil.which("git")
        self.env["GIT_PYTHON_GIT_EXECUTABLE"] = self.git
        rc, out = self.call([self.git, "--version"], end, echo=False)
        figures["git"] = {"source": "bundle" if use_bundle else "machine", "version": out.strip()}
        if rc != 0:
            raise StageFailed(f"git from the {figures['git']['source']} does not run: {_last_line(out)}", **figures)
        self.say(f"bundle {figures['bundle_mib']} MiB unpacked in {figures['unpack_s']} s; {out.strip()} ({figures['git']['source']})")
        return figures

    def stage_engine(self, end: float) -> dict:
        import docker
        import requests

        if self.docker_host:
            info = docker.DockerClient(base_url=self.docker_host).info()
            return {"engine": "given", "docker_host": self.docker_host, "server_version": info["ServerVersion"]}
        if not any(line.split()[1:2] == ["/sys/fs/cgroup"] for line in Path("/proc/mounts").read_text().splitlines()):
            if shutil.which("mount") is None:
                raise StageFailed("/sys/fs/cgroup is not mounted and there is no mount command to mount it")
            rc, out = self.call(["mount", "-t", "cgroup2", "none", "/sys/fs/cgroup"], end)
            if rc != 0:
                raise StageFailed(f"mounting cgroup2 failed: {_last_line(out)}")
        run_dir = self.work / "run"
        run_dir.mkdir()
        sock = f"unix://{run_dir}/docker.sock"
        env = dict(self.env)
        env["PATH"] = f"{self.bundle_dir / 'bin'}:{env.get('PATH', '')}"
        # The bundle's libraries last: the machine's own come first where it has them.
        env["LD_LIBRARY_PATH"] = ":".join(p for p in (env.get("LD_LIBRARY_PATH", ""), str(self.bundle_dir / "lib")) if p)
        t0 = time.monotonic()
        # Its own data root, exec root, pidfile and socket: it never meets an engine already on the
        # host. No iptables: experiments have network "none". A daemon told --bridge=none deletes
        # the host's docker0 at start, which would cut another engine's containers off (the CPU
        # stand-in on a host whose own engine runs): there it gets a bridge of its own.
        bridge = "none"
        if Path("/sys/class/net/docker0").exists():
            if shutil.which("ip") is None:
                raise StageFailed("another Docker engine's docker0 is on this host and there is no `ip` to give this "
                                  "dockerd a bridge of its own: set E2E_DOCKER_HOST to use that engine")
            self.bridge = bridge = f"e2ebr{os.getpid() % 100000}"
            for cmd in (["ip", "link", "add", bridge, "type", "bridge"], ["ip", "addr", "add", "172.30.254.1/24", "dev", bridge]):
                if self.call(cmd, end)[0] != 0:
                    raise StageFailed(f"could not make the bridge {bridge}: {' '.join(cmd)} failed")
        self.dockerd = subprocess.Popen(
            [str(self.bundle_dir / "bin" / "dockerd"), "--data-root", str(self.work / "docker"), "--exec-root", str(run_dir),
             "--pidfile", str(run_dir / "docker.pid"), "-H", sock, "--iptables=false", "--ip-masq=false", f"--bridge={bridge}"],
            env=env, stdout=open(self.s.out / "dockerd.log", "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        while True:
            try:  # the client asks the engine its API version as it is made
                client = docker.DockerClient(base_url=sock, timeout=10)
                client.ping()
                break
            except (docker.errors.DockerException, requests.exceptions.RequestException):
                if self.dockerd.poll() is not None:
                    raise StageFailed(f"dockerd exited ({self.dockerd.returncode}): read {self.s.out / 'dockerd.log'}") from None
                if time.monotonic() > end:
                    raise StageTimeout(f"dockerd did not answer: read {self.s.out / 'dockerd.log'}") from None
                time.sleep(0.25)
        self.docker_host = sock
        info = client.info()
        figures = {"engine": "bundle", "up_s": round(time.monotonic() - t0, 1), "server_version": info["ServerVersion"],
                   "storage_driver": info["Driver"], "cgroup_version": info.get("CgroupVersion"),
                   "runtimes": sorted(info.get("Runtimes") or {}), "dockerd_pid": self.dockerd.pid}
        self.say(f"dockerd {figures['server_version']} up in {figures['up_s']} s ({figures['storage_driver']}, cgroup v{figures['cgroup_version']})")
        return figures

    def stage_base_image(self, end: float) -> dict:
        import docker

        if self.base_ref:
            client = docker.DockerClient(base_url=self.docker_host, timeout=30)
            try:
                image = client.images.get(self.base_ref)
            except docker.errors.ImageNotFound:
                raise StageFailed(f"E2E_BASE={self.base_ref} is not an image on this engine") from None
            return {"base": self.base_ref, "given": True, "size_gib": round(image.attrs["Size"] / 2**30, 2)}
        selections = [self.s.base_selection] + (["broad"] if self.s.base_selection == "torch" else [])
        attempts = []
        for selection in selections:
            try:
                figures = self._import_base(selection, end)
            except StageFailed as exc:
                attempts.append({"selection": selection, "why": str(exc), **exc.figures})
                if isinstance(exc, StageTimeout) or selection == selections[-1]:
                    raise type(exc)(str(exc), attempts=attempts) from None
                self.say(f"base image from selection {selection!r} failed ({exc}); trying {selections[-1]!r}")
                continue
            return {**figures, "attempts": attempts} if attempts else figures
        raise AssertionError("unreachable")

    def _import_base(self, selection: str, end: float) -> dict:
        import docker
        import requests
        from sandbox.images import RUNNER_UID

        listing = self.work / f"base-{selection}.list"
        t0 = time.monotonic()
        env = dict(os.environ)  # the machine's python as it is, without the bundle
        args = [sys.executable, __file__, "base-files", str(listing), "--selection", selection,
                "--dists", ",".join(self.s.base_dists)]
        rc, out = self.call(args, end, env=env, echo=False)
        summary = _last_json(out)
        if rc != 0 or summary is None:
            raise StageFailed(f"choosing the base image's files failed: {_last_line(out)}")
        select_s = round(time.monotonic() - t0, 1)
        self.say(f"base image: {summary['files']} files, {summary['bytes'] / 2**30:.2f} GiB ({selection}) chosen in {select_s} s")
        ref = f"gpu-e2e/hostbase:{self.work.name.replace('.', '-').lower()}-{selection}"
        pybin = os.path.dirname(sys.executable)
        tar = subprocess.Popen(["tar", "-C", "/", "--numeric-owner", "--no-recursion", "--null", "-T", str(listing), "-cf", "-"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        sent = 0

        def stream():
            nonlocal sent
            while chunk := tar.stdout.read(1 << 20):
                if time.monotonic() > end:
                    raise StageTimeout("the base image's import ran past its limit")
                sent += len(chunk)
                yield chunk

        t1 = time.monotonic()
        client = docker.DockerClient(base_url=self.docker_host, timeout=max(end - time.monotonic(), 10))
        repository, tag = ref.rsplit(":", 1)
        try:
            client.api.import_image(src=stream(), stream_src=True, repository=repository, tag=tag,
                                    changes=[f"ENV PATH={pybin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                                             "ENV LANG=C.UTF-8"])
        except (StageFailed, Interrupted):
            self.stop_group(tar, signal.SIGTERM, 2)
            raise
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            self.stop_group(tar, signal.SIGTERM, 2)
            raise StageFailed(f"docker import failed: {exc}") from None
        finally:
            tar.stdout.close()
        tar_err = tar.stderr.read().decode(errors="replace")
        tar.wait()
        if tar.returncode not in (0, 1):  # 1: a file changed while it was read
            raise StageFailed(f"tar failed ({tar.returncode}): {_last_line(tar_err)}")
        import_s = round(time.monotonic() - t1, 1)
        self.imported_base = ref
        image = client.images.get(ref)
        figures = {"base": ref, "selection": selection, "select_s": select_s, "files": summary["files"],
                   "tar_bytes": sent, "import_s": import_s, "size_gib": round(image.attrs["Size"] / 2**30, 2),
                   "packages": summary.get("packages"), "dists": summary.get("dists"), "dist_mb": summary.get("dist_mb")}
        self.say(f"imported {ref}: {sent / 2**30:.2f} GiB in {import_s} s")
        smoke = self._smoke(client, ref, RUNNER_UID, end)
        figures["smoke"] = smoke
        if not smoke.get("ok"):
            client.images.remove(ref, force=True)
            self.imported_base = None
            raise StageFailed(f"the imported base cannot run what the runner needs: {smoke.get('why')}", **figures)
        self.base_ref = ref
        return figures

    def _smoke(self, client, ref: str, uid: int, end: float) -> dict:
        """What the trainer image build and torch.compile need, checked in the base as the runner's user:
        useradd, python with torch (and Triton on a GPU machine), the Python headers, a C compiler (and
        in the CPU stand-in, where inductor writes C++ kernels, a C++ one)."""
        need_cxx = bool(self.s.standin)
        check = (
            "import json, os, shutil, sys, sysconfig\n"
            "out = {}\n"
            "try:\n"
            "    import torch; out['torch'] = torch.__version__\n"
            f"    if {not need_cxx}: import triton; out['triton'] = triton.__version__\n"
            "except Exception as e: out['why'] = f'import: {type(e).__name__}: {e}'\n"
            "h = os.path.join(sysconfig.get_paths()['include'], 'Python.h')\n"
            "missing = [n for n, ok in (('Python.h', os.path.exists(h)), ('cc', shutil.which('cc') or shutil.which('gcc')),\n"
            f"    ('g++', shutil.which('g++') or not {need_cxx}), ('useradd', shutil.which('useradd') or os.path.exists('/usr/sbin/useradd'))) if not ok]\n"
            "if missing: out['why'] = out.get('why', '') + ' missing: ' + ', '.join(missing)\n"
            "out['ok'] = 'why' not in out\n"
            "print(json.dumps(out))\n")
        t0 = time.monotonic()
        container = client.containers.create(ref, ["python3", "-c", check], user=f"{uid}:{uid}", network_mode="none",
                                             labels={"gpu-e2e": "smoke"})
        try:
            container.start()
            while True:
                container.reload()
                if container.status == "exited":
                    break
                if time.monotonic() > end:
                    return {"ok": False, "why": "the check ran past the stage's limit"}
                time.sleep(0.2)
            out = container.logs().decode(errors="replace")
        finally:
            container.remove(force=True)
        result = _last_json(out) or {"ok": False, "why": _last_line(out)}
        result["s"] = round(time.monotonic() - t0, 1)
        self.say(f"base check: {json.dumps(result)}")
        return result

    def stage_repo(self, end: float) -> dict:
        shutil.copytree(PROJ / "examples" / "tinylm", self.repo)
        patch_train(self.repo / "train.py")
        # The loop runs the baseline and its one experiment, nothing else: no baseline reruns for the
        # noise floor (noise_runs), no second run of a would-be keep (confirm).
        (self.repo / "runner.yaml").write_text(f"base_image: {self.base_ref or 'missing'}\ndependencies: none\n"
                                               f"noise_runs: 0\nconfirm: 0\nlimits:\n  startup_grace_s: {STARTUP_GRACE_S}\n")
        git = [self.git, "-C", str(self.repo), "-c", "user.name=e2e", "-c", "user.email=e2e@localhost"]
        for args in (["init", "-q", "--template=", "-b", "main"], ["add", "-A"], ["commit", "-qm", "torch.compile the model"]):
            rc, out = self.call(git + args, end)
            if rc != 0:
                raise StageFailed(f"git {args[0]} failed: {_last_line(out)}")
        t0 = time.monotonic()
        rc, out = self.call([sys.executable, "prepare.py"], end, cwd=self.repo, echo=False)
        if rc != 0:
            raise StageFailed(f"prepare.py failed: {_last_line(out)}")
        return {"prepare_s": round(time.monotonic() - t0, 1), "repo": str(self.repo)}

    def stage_sandbox_run(self, end: float) -> dict:
        rc, out = self.call(self.runner("run", "--repo", str(self.repo), "--data-dir", str(self.data), "--gpus", self.s.gpus,
                                        "--budget", f"{self.s.budget_s:g}", "--json"), end, env=self.runner_env())
        record = _last_json(out)
        if record is None:
            raise StageFailed(f"runner run printed no result (exit {rc}): {_last_line(out)}")
        log_text = _read(record.get("log"))
        (self.s.out / "sandbox_run.log").write_text(log_text)
        figures = run_figures(log_text)  # the runner's record wins where both have a figure (val_bpb: the verified one)
        figures.update(outcome=record.get("status"), **{k: record.get(k) for k in (
            "reason", "val_bpb", "verdict", "wall_s", "total_s", "overhead_s", "training_seconds", "peak_vram_mb",
            "memory_gb", "verify_s", "training_share", "image")})
        figures["gpu"] = gpu_evidence(record.get("peak_vram_mb"), log_text)
        self.say(f"sandbox: {figures['outcome']} val_bpb {figures['val_bpb']} wall {figures['wall_s']} s "
                 f"compile {figures['compile_s']} s peak_vram_mb {figures['peak_vram_mb']}")
        if record.get("status") != "ok":
            raise StageFailed(f"runner run: {record.get('status')} {record.get('reason')}: {record.get('detail')}", **figures)
        return figures

    def stage_bare_run(self, end: float) -> dict:
        # Caches of its own, as cold as each container's: the host's would make the bare compile look cheap.
        cache = self.work / "bare-cache"
        env = dict(self.env, AUTORESEARCH_TIME_BUDGET=f"{self.s.budget_s:g}", TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"),
                   TRITON_CACHE_DIR=str(cache / "triton"))
        t0 = time.monotonic()
        rc, out = self.call([sys.executable, "train.py"], end, cwd=self.repo, env=env, log=self.s.out / "bare_run.log")
        wall_s = round(time.monotonic() - t0, 2)
        figures = {"exit_code": rc, "wall_s": wall_s, **run_figures(out)}
        figures["gpu"] = gpu_evidence(figures.get("peak_vram_mb_torch"), out)
        sandbox = self.results.figures("sandbox_run")
        if sandbox.get("steps") and figures.get("steps"):
            figures["speed_ratio_sandbox_over_bare_steps"] = round(sandbox["steps"] / figures["steps"], 3)
        self.say(f"bare: val_bpb {figures.get('val_bpb')} wall {wall_s} s compile {figures.get('compile_s')} s")
        if rc != 0:
            raise StageFailed(f"train.py exited {rc}: {_last_line(out)}", **figures)
        return figures

    def stage_loop(self, end: float) -> dict:
        args = self.runner("start", "--repo", str(self.repo), "--data-dir", str(self.data), "--gpus", self.s.gpus,
                           "--budget", f"{self.s.budget_s:g}", "--tag", LOOP_TAG, "--max-experiments", str(LOOP_EXPERIMENTS),
                           "--proposer", "offline", "--min-delta", "0")
        timeout: StageTimeout | None = None
        t0 = time.monotonic()
        try:
            rc, out = self.call(args, end, env=self.runner_env())
        except StageTimeout as exc:
            timeout, rc, out = exc, None, ""
        figures = {"exit_code": rc, "wall_s": round(time.monotonic() - t0, 1), **self._loop_figures()}
        if timeout is not None:
            raise StageTimeout(str(timeout), **figures)
        if rc != 0:
            raise StageFailed(f"runner start exited {rc}: {_last_line(out)}", **figures)
        if figures["experiments"] < LOOP_EXPERIMENTS + 1:
            raise StageFailed(f"{figures['experiments']} experiments recorded, {LOOP_EXPERIMENTS + 1} expected", **figures)
        return figures

    def _loop_figures(self) -> dict:
        from runner.ledger import ExperimentRecord

        events_path = self.repo / ".autoresearch" / LOOP_TAG / "events.jsonl"
        text = events_path.read_text() if events_path.is_file() else ""
        (self.s.out / "loop_events.jsonl").write_text(text)
        exps = [ExperimentRecord.from_event(e) for e in (json.loads(line) for line in text.splitlines() if line.strip())
                if e.get("event") == "experiment"]
        train_s = sum(e.training_s for e in exps)
        wall_s = sum(e.run.get("total_s") or 0 for e in exps)
        return {
            "experiments": len(exps),
            "outcomes": [e.outcome for e in exps],
            "rows": [e.row.status for e in exps],
            "val_bpb": [e.row.val_bpb for e in exps],
            "duty_cycle": round(train_s / wall_s, 4) if wall_s else None,
            "overhead_s": [e.run.get("overhead_s") for e in exps],
            "compile_s": [run_figures(_read(e.run.get("log"))).get("compile_s") for e in exps],
            "gpu": [gpu_evidence(e.run.get("peak_vram_mb"), _read(e.run.get("log"))) for e in exps],
        }

    def stage_gpu_check(self, _end: float) -> dict:
        runs = {}
        for stage in ("sandbox_run", "bare_run"):
            if "gpu" in self.results.figures(stage):
                runs[stage] = self.results.figures(stage)["gpu"]
        for i, ev in enumerate(self.results.figures("loop").get("gpu") or []):
            runs[f"loop[{i}]"] = ev
        if self.s.standin:
            return {"checked": False, "why": f"STANDIN={self.s.standin}: this host has no GPU; each run's peak_vram_mb "
                                             "and device line are recorded as they are", "runs": runs}
        if not runs:
            raise StageFailed("no run finished, so nothing shows that the GPU was used")
        idle = [name for name, ev in runs.items() if not ev["gpu_used"]]
        if idle:
            raise StageFailed(f"no GPU use shown by {', '.join(idle)} (peak_vram_mb > 0 and a CUDA device line needed)", runs=runs)
        return {"checked": True, "runs": runs}

    # --- teardown ----------------------------------------------------------------------

    def teardown(self) -> dict:
        """Stop what this run started and remove what it made; returns what was done."""
        done: dict = {}
        if self.dockerd is not None:
            t0 = time.monotonic()
            self.stop_group(self.dockerd, signal.SIGTERM, DOCKERD_STOP_S)
            done["dockerd_stop_s"] = round(time.monotonic() - t0, 1)
        if self.bridge is not None:
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
            done["bridge_removed"] = self.bridge
        elif self.imported_base and self.docker_host:
            done["removed_images"] = remove_descendants(self.docker_host, self.imported_base)
        mounted = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
                   if line.split()[1].startswith(str(self.work) + "/")]
        if mounted:
            done["work_kept"] = f"{len(mounted)} mounts remain under it, e.g. {mounted[0]}"
        elif not self.s.keep:
            shutil.rmtree(self.work, ignore_errors=True)
            done["work_removed"] = not self.work.exists()
        return done


STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("machine", ()),
    ("bundle", ("machine",)),
    ("engine", ("machine", "bundle")),
    ("base_image", ("machine", "engine")),
    ("repo", ("machine", "bundle")),
    ("sandbox_run", ("base_image", "repo")),
    ("bare_run", ("machine", "repo")),
    ("loop", ("base_image", "repo")),
)


def run(s: Settings) -> int:
    """The stages in order, each within min(its own limit, what the deadline leaves), then the
    GPU check and the teardown. Returns the exit code: 0 when every stage is ok (the GPU check
    may be skipped in the CPU stand-in), else 1."""
    check_bundle(s.bundle)
    r = Run(s)

    def interrupted(signum, _frame):
        raise Interrupted(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, interrupted)
    r.say(f"gpu_e2e: mode {r.results.doc['mode']}, deadline {s.deadline_s:g} s, budget {s.budget_s:g} s, "
          f"results in {s.out}, work in {r.work}")
    status = "complete"
    try:
        for name, needs in STAGES:
            run_stage(r, name, needs)
        run_stage(r, "gpu_check", (), always=True)
    except Interrupted as exc:
        r.say(f"{exc}: stopping")
        status = f"interrupted ({exc})"
    finally:  # whatever happened, the dockerd and the children this run started stop
        r.results.doc["teardown"] = r.teardown()
    stages = r.results.doc["stages"]
    if status == "complete" and not all(line["status"] == "ok" or (name == "gpu_check" and s.standin and line["status"] == "skipped")
                                        for name, line in stages.items()):
        status = "incomplete"
    r.results.finish(status)
    r.say(f"== {status} in {r.results.doc['elapsed_s']} s: " +
          ", ".join(f"{n} {line['status']} ({line.get('stage_s', '-')} s)" for n, line in stages.items()))
    return 0 if status == "complete" else 1


def run_stage(r: Run, name: str, needs: tuple[str, ...], always: bool = False) -> None:
    """One stage, recorded as it ends: ok, failed, timeout, error (a harness failure) or skipped
    (a stage it needs is not ok, or the deadline leaves too little). `always`: runs whatever the
    deadline (the GPU check only reads what the others recorded)."""
    missing = [n for n in needs if r.results.status(n) != "ok"]
    left = r.left_s() - RESERVE_S
    if missing:
        r.results.record(name, "skipped", why=f"needs {', '.join(missing)}")
        return
    if left < MIN_STAGE_S and not always:
        r.results.record(name, "skipped", why=f"deadline: {max(left, 0):.0f} s left of {r.s.deadline_s:g}")
        return
    limit = min(STAGE_LIMIT_S.get(name, MIN_STAGE_S), max(left, MIN_STAGE_S))
    r.say(f"== {name} (limit {limit:.0f} s)")
    t0 = time.monotonic()
    figures: dict = {}
    try:
        figures = getattr(r, f"stage_{name}")(t0 + limit)
        status, why = "ok", None
    except StageFailed as exc:
        figures, status, why = exc.figures, exc.status, str(exc)
    except Exception as exc:  # a harness failure: recorded as such; later stages go on where they can
        status, why = "error", f"{type(exc).__name__}: {exc}"
    if name == "gpu_check" and status == "ok" and not figures.get("checked"):
        status = "skipped"
    r.results.record(name, status, stage_s=round(time.monotonic() - t0, 1), **({"why": why} if why else {}), **figures)
    if why:
        r.say(f"{name}: {status}: {why}")


# ---------------------------------------------------------------------------
# Small pieces
# ---------------------------------------------------------------------------


def patch_train(path: Path) -> None:
    """tinylm's train.py with its model torch.compile'd (the first step timed) and the device named."""
    src = path.read_text()
    anchor = "model = GPT().to(device)\n"
    if anchor not in src:
        raise StageFailed(f"tinylm's train.py no longer has {anchor.strip()!r}: update patch_train in benchmarks/gpu_e2e.py")
    src = src.replace(anchor, anchor + (
        f"print(f\"{DEVICE_LINE}: {{torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}}\", flush=True)\n"
        "_t_compile = time.time()\n"
        "model = torch.compile(model, dynamic=False)\n"
        "with autocast:\n"
        "    model(torch.zeros(BATCH_SIZE, SEQ_LEN, dtype=torch.long, device=device)).float().sum().backward()\n"
        "model.zero_grad(set_to_none=True)\n"
        f"print(f\"{COMPILE_LINE}: {{time.time() - _t_compile:.1f}}\", flush=True)\n"))
    path.write_text(src)


def run_figures(log_text: str) -> dict:
    """A run's figures from its log: the summary block (runner.summary, the one parser of it) and
    the e2e's own compile line."""
    from runner.summary import parse_summary

    m = parse_summary(log_text)
    compile_s = marker(log_text, COMPILE_LINE)
    return {"val_bpb": m.val_bpb if m else None, "steps": m.num_steps if m else None,
            "training_seconds": m.training_seconds if m else None,
            "peak_vram_mb_torch": m.peak_vram_mb if m else None, "compile_s": float(compile_s) if compile_s else None,
            "device": marker(log_text, DEVICE_LINE)}


def remove_descendants(docker_host: str, ref: str) -> list[str]:
    """Remove the image `ref` and every image built on it (children first), on an engine this run
    shares with others: only what grew from the base this run imported goes."""
    import docker

    client = docker.DockerClient(base_url=docker_host, timeout=120)
    try:
        base = client.images.get(ref).id
    except docker.errors.ImageNotFound:
        return []
    images = client.images.list(all=True)
    parent = {img.id: img.attrs.get("Parent") or "" for img in images}

    def depth(image_id: str) -> int:
        d = 0
        while image_id and image_id != base:
            image_id, d = parent.get(image_id, ""), d + 1
        return d if image_id == base else -1

    mine = sorted((i for i in parent if depth(i) >= 0), key=depth, reverse=True)
    removed = []
    for image_id in mine:
        try:
            client.images.remove(image_id, force=True, noprune=False)
            removed.append(image_id[:19])
        except docker.errors.APIError:
            pass
    return removed


def _read(path: str | None) -> str:
    try:
        return Path(path).read_text(errors="replace") if path else ""
    except OSError:
        return ""


def _last_json(text: str) -> dict | None:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def _last_line(text: str) -> str:
    """The runner's last `error:` line if it printed one, else the last line: what a failure says."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["no output"])[-1][:300]


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="gpu_e2e.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check-bundle", help="the bundle's size against BUNDLE_LIMIT_BYTES").add_argument("dir", type=Path)
    sub.add_parser("run", help="the stages; knobs in the environment (gpu_e2e.sh's header)")
    files = sub.add_parser("base-files", help="the base image's paths, NUL-separated, into LIST; a JSON summary on stdout")
    files.add_argument("list", type=Path)
    files.add_argument("--selection", choices=BASE_SELECTIONS, default="torch")
    files.add_argument("--dists", default="torch", help="comma-separated distributions whose closure the base takes")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "check-bundle":
            size = check_bundle(args.dir)
            print(f"bundle {args.dir}: {size / 2**20:.1f} MiB of {BUNDLE_LIMIT_BYTES / 2**20:.0f} MiB allowed")
            return 0
        if args.cmd == "run":
            return run(Settings.from_env(dict(os.environ)))
        rel, summary = base_files(args.selection, args.dists.split(","))
        args.list.write_bytes(b"".join(p.encode() + b"\0" for p in rel))
        print(json.dumps(summary))
        return 0
    except Refused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
