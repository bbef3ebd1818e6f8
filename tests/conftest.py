"""Shared fixtures. Tests marked `docker` use the real Docker daemon: no mocks of the sandbox."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import git
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


# Under pytest-xdist (scripts/test.sh runs two workers), each worker keeps to its share of this
# machine's CPUs (split as the runner splits them among its own workers), and so do the runs it
# starts: a confined runner's experiments keep to its CPUs (sandbox.spec.confined_cpuset). Two
# workers' torch runs then never take turns on one core
# (measured on 2 cores: two tinylm run+verify pairs side by side took 51 s unpinned, 39 s pinned;
# one after the other, 64 s). Tests marked `whole_host` get every CPU back while they run.
ALL_CPUS = sorted(os.sched_getaffinity(0))
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
MY_CPUS = ALL_CPUS
if _WORKERS > 1 and len(ALL_CPUS) >= _WORKERS:
    from runner.engine import make_slots
    from sandbox.spec import expand_cpuset

    _me = int(os.environ["PYTEST_XDIST_WORKER"].removeprefix("gw")) % _WORKERS
    MY_CPUS = expand_cpuset(make_slots((), _WORKERS, ALL_CPUS)[_me].cpuset)
    os.sched_setaffinity(0, MY_CPUS)

# A prepare.py in the autoresearch shape that needs no torch: sandbox tests start in ~1 s.
MINI_PREPARE = textwrap.dedent('''\
    import os
    TIME_BUDGET = int(os.environ.get("AUTORESEARCH_TIME_BUDGET", "2"))  # seconds
    ''')

SUMMARY = textwrap.dedent('''\
    print("---")
    print("val_bpb:          1.234567")
    print("training_seconds: 1.0")
    print("total_seconds:    1.0")
    print("peak_vram_mb:     0.0")
    print("mfu_percent:      0.00")
    print("total_tokens_M:   0.0")
    print("num_steps:        1")
    print("num_params_M:     0.0")
    print("depth:            1")
    ''')


# SUMMARY reporting the script's own VALUE constant as its val_bpb (a knob a proposer can tune).
VALUE_SUMMARY = SUMMARY.replace('print("val_bpb:          1.234567")', 'print(f"val_bpb:          {VALUE:.6f}")')


def make_repo(path: Path, train_py: str, prepare_py: str = MINI_PREPARE, extra: dict | None = None) -> Path:
    """A committed research repo at `path` with the given train.py."""
    path.mkdir(parents=True, exist_ok=True)
    files = {"prepare.py": prepare_py, "train.py": train_py, "program.md": "# test program\n", **(extra or {})}
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    repo = git.Repo.init(path, initial_branch="main")
    with repo.config_writer() as cw:
        cw.set_value("user", "name", "test")
        cw.set_value("user", "email", "test@localhost")
    repo.index.add(list(files))
    repo.index.commit("initial")
    return path


def runner_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real `runner` command in a child process, as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "runner", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def run_json(repo: Path, data_dir: Path, *extra: str) -> tuple[dict, str]:
    """`runner run --json` on the repo's HEAD, as a user would: (its record, its run log)."""
    r = runner_cli("run", "--repo", str(repo), "--data-dir", str(data_dir), "--json", *extra)
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout.strip().splitlines()[-1])
    return record, Path(record["log"]).read_text(errors="replace")


def loop_night(repo, data, tmp_path, proposals: list[tuple[str, str]], tag: str, baseline: str | None = None,
               **overrides):
    """A copy of the prepared `repo` (its train.py replaced by `baseline` when given) run through
    the real loop with verify on, no baseline reruns and no other proposer: its baseline, then
    one experiment per (train_py, description) of `proposals`, in order, each confirmed as the
    defaults do. `overrides`: runner.yaml settings (budget_s, verify, noise_runs, ...). Returns
    (the finished Loop, the copy's ResearchRepo)."""
    import shutil

    from runner.config import load_config
    from runner.engine import Engine
    from runner.loop import Loop
    from runner.proposers.base import Proposal, Proposer, Summary
    from runner.repo import ResearchRepo

    clone = tmp_path / "loop-repo"
    shutil.copytree(repo, clone, ignore=shutil.ignore_patterns(".autoresearch", "results.tsv"))
    if baseline is not None:
        (clone / "train.py").write_text(baseline)
        subprocess.run(["git", "-C", str(clone), "commit", "-qam", "baseline"], check=True)
    queue = list(proposals)

    class Scripted(Proposer):
        name = "scripted"

        def propose(self, ctx):
            train_py, description = queue.pop(0)
            return Proposal(train_py, description, "")

        def summarize(self, ctx, rows):
            return Summary([], [])

    cfg = load_config(clone, {"tag": tag, "data_dir": data, "budget_s": 2, "max_experiments": len(queue), "verify": "on",
                              "noise_runs": 0, **overrides})
    research = ResearchRepo(clone)
    loop = Loop(cfg, research, Engine(cfg, research, progress=lambda m: None), Scripted(), out=lambda line: None)
    loop.run()
    return loop, research


@pytest.fixture(scope="session", autouse=True)
def heldout_dir(tmp_path_factory) -> Path:
    """The held-out data folder (verify_data's default) for this session, never the user's own."""
    path = tmp_path_factory.mktemp("heldout") / "data"  # made as `runner prepare` makes it (mktemp's is 0700)
    os.environ["AUTORESEARCH_HELDOUT_DIR"] = str(path)
    return path


def pytest_runtest_setup(item):
    """A test of the Ray unit, or one marked `whole_host` (workers that each need a CPU), has
    every CPU of this machine while it runs, its fixtures' processes included; any other test
    its worker's share."""
    if MY_CPUS != ALL_CPUS:
        whole = item.get_closest_marker("whole_host") or shared_unit(item.nodeid.split("::", 1)[0]) == "ray"
        os.sched_setaffinity(0, ALL_CPUS if whole else MY_CPUS)


@pytest.fixture(scope="session")
def docker_client():
    from sandbox.backend import SandboxError
    from sandbox.docker_backend import connect

    try:
        return connect()
    except SandboxError as exc:
        pytest.fail(f"these tests need a Docker daemon: {exc}")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A data cache for mini repos (they read nothing from it, but it must exist)."""
    d = tmp_path_factory.mktemp("data")
    (d / "placeholder.txt").write_text("prepared\n")
    return d


# The suite's example scores a quarter of the validation bytes (prepare.EVAL_TOKENS): the same
# code and data, a quarter of every evaluation (train.py's own, the verifier's passes on val and
# held-out text and their probes): ~4 s of each ~22 s run and verification on this 2-core host.
# Tests whose margins were measured on the example as it ships (tests/redteam/test_review3.py)
# use `tinylm_as_shipped`.
SUITE_EVAL_TOKENS = 16384


def _example(root: Path, eval_tokens: int | None = None) -> tuple[Path, Path]:
    repo, data = root / "repo", root / "data"
    r = runner_cli("init-example", str(repo))
    assert r.returncode == 0, r.stderr
    if eval_tokens is not None:
        prepare = repo / "prepare.py"
        text = prepare.read_text()
        assert text.count("\nEVAL_TOKENS = 65536 ") == 1
        prepare.write_text(text.replace("\nEVAL_TOKENS = 65536 ", f"\nEVAL_TOKENS = {eval_tokens} "))
        subprocess.run(["git", "-C", str(repo), "commit", "-qam", f"evaluate {eval_tokens} bytes"], check=True)
    r = runner_cli("prepare", "--repo", str(repo), "--data-dir", str(data))
    assert r.returncode == 0, r.stdout + r.stderr
    return repo, data


@pytest.fixture(scope="session")
def tinylm(tmp_path_factory, docker_client) -> tuple[Path, Path]:
    """The bundled example as a fresh repo scoring SUITE_EVAL_TOKENS bytes, prepared once per
    session: (repo, data_dir)."""
    return _example(tmp_path_factory.mktemp("tinylm"), SUITE_EVAL_TOKENS)


@pytest.fixture(scope="session")
def tinylm_as_shipped(tmp_path_factory, docker_client) -> tuple[Path, Path]:
    """The bundled example exactly as `runner init-example` makes it, prepared: (repo, data_dir)."""
    return _example(tmp_path_factory.mktemp("tinylm-as-shipped"))


@pytest.fixture
def engine_for(docker_client, data_dir):
    """Build an Engine for a repo with config overrides; runs go through the real sandbox."""
    from runner.config import load_config
    from runner.engine import Engine
    from runner.repo import ResearchRepo

    def make(repo_path: Path, **overrides):
        overrides.setdefault("data_dir", data_dir)
        cfg = load_config(repo_path, overrides)
        return Engine(cfg, ResearchRepo(repo_path), progress=lambda m: None)

    return make


@pytest.fixture
def run_train(tmp_path, engine_for):
    """Run one train.py text in the sandbox; returns the ExperimentRun."""
    counter = {"n": 0}

    def run(train_py: str, budget_s: float = 2, **overrides):
        counter["n"] += 1
        repo = make_repo(tmp_path / f"repo{counter['n']}", train_py)
        engine = engine_for(repo, budget_s=budget_s, **overrides)
        return engine.run_commit(engine.repo.head().sha, "test", repo / ".autoresearch" / "run.log")

    return run


@functools.lru_cache(maxsize=None)
def shared_unit(path: str) -> str | None:
    """The unit of work a test module's tests share under pytest-xdist: "ray" for every module
    that starts a Ray cluster (tests/cluster.py: one cluster at a time on this host, with every
    CPU) or a fake GPU host (tests/gpuhost.py: fake hosts share one engine, whose containers hold
    the fake GPUs' leases), the module itself for one with a module-scoped fixture (made once, as
    in a serial run), else None: each test is a unit of its own."""
    source = REPO_ROOT / path
    text = source.read_text() if source.is_file() else ""
    if "RayCluster(" in text or "FakeGpuHost(" in text:
        return "ray"
    return path if 'scope="module"' in text else None


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadscope` (scripts/test.sh) with the scopes of shared_unit. xdist starts the
    largest units first, the long Ray unit among them. (By path: `--dist loadgroup`'s marks
    travel in node ids, which pytest 9.2 no longer lets a plugin change: pytest-xdist issue 1386.)"""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SuiteScopes(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return shared_unit(nodeid.split("::", 1)[0]) or nodeid

    return SuiteScopes(config, log)
