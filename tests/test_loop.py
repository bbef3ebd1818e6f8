"""The research loop on the real daemon: decisions, the branch, the ledger, stop and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import SUMMARY, VALUE_SUMMARY, make_repo, runner_cli

from runner.ledger import HEADER
from runner.records import ExperimentRecord, ProposerErrored, Refused
from runner.proposers.base import Proposal, Proposer, Summary
from sandbox import naming

pytestmark = pytest.mark.docker

MINI_TRAIN = """import time
VALUE = 2.0       # the val_bpb this script reports
SLEEP_S = 0       # seconds to sleep before reporting
CRASH = 0         # 1 = exit with an error
time.sleep(SLEEP_S)
if CRASH:
    raise SystemExit("boom: CRASH is set")
""" + VALUE_SUMMARY


def variant(**values) -> str:
    text = MINI_TRAIN
    for name, value in values.items():
        text = "\n".join(f"{name} = {value}" if line.startswith(f"{name} = ") else line for line in text.splitlines()) + "\n"
    return text


class Scripted(Proposer):
    """Replays a fixed list of proposals and records where the branch was at each call."""

    name = "scripted"

    def __init__(self, repo, proposals, before=None):
        self.repo, self.proposals, self.before = repo, list(proposals), before
        self.heads = []

    def propose(self, ctx):
        self.heads.append(self.repo.head().sha)
        if self.before:
            self.before(self.repo)
        train_py, desc = self.proposals.pop(0)
        return Proposal(train_py, desc, "scripted")

    def summarize(self, ctx, rows):
        return Summary(["scripted"], ["none"])


def make_loop(repo_path, proposer_factory, data_dir, **overrides):
    from runner.config import load_config
    from runner.engine import Engine
    from runner.loop import Loop
    from runner.repo import ResearchRepo

    cfg = load_config(repo_path, {"tag": "t", "data_dir": data_dir, "budget_s": 1, "confirm": "off", "noise_runs": 0,
                                  **overrides})
    repo = ResearchRepo(repo_path)
    lines = []
    proposer = proposer_factory(repo)
    return Loop(cfg, repo, Engine(cfg, repo, progress=lambda m: None), proposer, out=lines.append), proposer, lines


def test_keep_discard_crash_timeout_and_the_branch_after_each(tmp_path, data_dir):
    path = make_repo(tmp_path / "r", MINI_TRAIN)
    proposals = [
        (variant(VALUE=1.5), "better"),
        (variant(VALUE=1.8), "worse"),
        (variant(CRASH=1), "crashes"),
        (variant(SLEEP_S=60), "hangs"),
        (variant(VALUE=1.0), "best"),
    ]
    loop, proposer, lines = make_loop(path, lambda repo: Scripted(repo, proposals), data_dir,
                                      max_experiments=5, startup_grace_s=2, kill_grace_s=1)
    loop.run()
    rows = loop.ledger.rows()
    assert [(r.status, r.description) for r in rows] == [
        ("keep", "baseline"), ("keep", "better"), ("discard", "worse"),
        ("crash", "crashes [exit_code]"), ("discard", "hangs [timeout]"), ("keep", "best"),
    ]
    assert [r.val_bpb for r in rows] == [2.0, 1.5, 1.8, 0.0, 0.0, 1.0]
    baseline, better = rows[0].commit, rows[1].commit
    # Where the branch stood when each proposal was asked for: always at the last keep.
    assert [h[:7] for h in proposer.heads] == [baseline, better, better, better, better]
    assert loop.repo.head().sha[:7] == rows[-1].commit
    assert loop.repo.current_branch() == "autoresearch/t"
    assert (path / "results.tsv").read_text().splitlines()[0] == HEADER
    assert lines[1] == f"[EXP] t 1 | commit:{better} | val_bpb:1.500000 | mem:{rows[1].memory_gb:.1f}GB | status:keep | better"
    events = loop.ledger.events(ExperimentRecord)
    assert [e.outcome for e in events] == ["ok", "ok", "ok", "crash", "timeout", "ok"]
    assert all(e.run.image.startswith("autoresearch-runner/t:") for e in events)
    assert "=== autoresearch t: 5 experiments after the baseline (2 keep, 2 discard, 1 crash)" in lines[-1]


def test_proposer_that_edits_prepare_py_is_refused(tmp_path, data_dir):
    path = make_repo(tmp_path / "r", MINI_TRAIN)
    original = (path / "prepare.py").read_text()

    def tamper(repo):
        (repo.path / "prepare.py").write_text("TIME_BUDGET = 100000\n")

    loop, _, lines = make_loop(path, lambda repo: Scripted(repo, [(variant(VALUE=1.0), "cheat")], before=tamper),
                               data_dir, max_experiments=1)
    loop.run()
    refused = loop.ledger.events(Refused)
    assert refused and "prepare.py" in refused[0].reason
    assert [r.description for r in loop.ledger.rows()] == ["baseline"]
    assert (path / "prepare.py").read_text() == original
    assert len(list(loop.repo.git.iter_commits())) == 1


def test_crash_gets_one_fix_attempt(tmp_path, data_dir):
    class Fixer(Scripted):
        def fix_crash(self, ctx, crashed, log_tail):
            self.seen_tail = log_tail
            return Proposal(variant(VALUE=1.25), "remove the crash", "fixed")

    path = make_repo(tmp_path / "r", MINI_TRAIN)
    loop, proposer, _ = make_loop(path, lambda repo: Fixer(repo, [(variant(CRASH=1), "crashy")]), data_dir,
                                  max_experiments=1)
    loop.run()
    assert [(r.status, r.description) for r in loop.ledger.rows()] == [
        ("keep", "baseline"), ("crash", "crashy [exit_code]"), ("keep", "fix: remove the crash")]
    assert "boom: CRASH is set" in proposer.seen_tail


def test_offline_loop_on_the_example(tinylm, tmp_path):
    repo, data = tinylm
    r = runner_cli("start", "--repo", str(repo), "--data-dir", str(data), "--tag", "demo",
                   "--budget", "3", "--max-experiments", "1", "--proposer", "offline")
    assert r.returncode == 0, r.stderr
    exp = [line for line in r.stdout.splitlines() if line.startswith("[EXP] demo ")]
    assert len(exp) == 2 and "status:keep | baseline" in exp[0]
    assert "=== autoresearch demo: 1 experiment after the baseline" in r.stdout and "next ideas:" in r.stdout
    events = [json.loads(line) for line in (repo / ".autoresearch/demo/events.jsonl").read_text().splitlines()]
    kept = [e["commit"] for e in events if e["event"] == "experiment" and e["row"]["status"] == "keep"]
    import git
    assert git.Repo(repo).head.commit.hexsha == kept[-1]
    assert git.Repo(repo).active_branch.name == "autoresearch/demo"
    r = runner_cli("start", "--repo", str(repo), "--data-dir", str(data), "--tag", "demo")
    assert r.returncode == 2 and "--resume" in r.stderr


def _running(client, tag):
    return client.containers.list(filters=naming.managed_filter(naming.KIND_RUN, **{naming.L_TAG: tag}))


def _start_in_background(path, data_dir, tag, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "runner", "start", "--repo", str(path), "--data-dir", str(data_dir), "--tag", tag,
         "--budget", "1", "--proposer", "offline", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def _wait_for_experiment_container(client, tag, min_iteration, timeout_s=120):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for c in _running(client, tag):
            if int(c.labels[naming.L_ITERATION]) >= min_iteration:
                return c
        time.sleep(0.2)
    raise AssertionError(f"no experiment container for iteration >= {min_iteration} of {tag}")


def test_resume_after_sigkill_mid_experiment(tmp_path, data_dir, docker_client):
    path = make_repo(tmp_path / "r", variant(SLEEP_S=4))
    proc = _start_in_background(path, data_dir, "k")
    orphan = _wait_for_experiment_container(docker_client, "k", 1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert orphan.id in [c.id for c in _running(docker_client, "k")]  # the kill left it behind

    r = runner_cli("start", "--repo", str(path), "--data-dir", str(data_dir), "--tag", "k", "--resume",
                   "--budget", "1", "--proposer", "offline", "--max-experiments", "1")
    assert r.returncode == 0, r.stderr
    assert _running(docker_client, "k") == []
    events = [json.loads(line) for line in (path / ".autoresearch/k/events.jsonl").read_text().splitlines()]
    experiments = [e for e in events if e["event"] == "experiment"]
    iterations = [e["iteration"] for e in experiments]
    assert iterations == sorted(set(iterations))              # none doubled
    rows = (path / "results.tsv").read_text().splitlines()[1:]
    assert len(rows) == len(experiments)                        # none lost
    last_keep = [e["commit"] for e in experiments if e["row"]["status"] == "keep"][-1]
    import git
    assert git.Repo(path).head.commit.hexsha == last_keep
    assert any(e["event"] == "swept" for e in events)


def test_sigint_stops_the_run_and_prints_a_summary(tmp_path, data_dir, docker_client):
    path = make_repo(tmp_path / "r", variant(SLEEP_S=30))
    proc = _start_in_background(path, data_dir, "s")
    _wait_for_experiment_container(docker_client, "s", 0)
    time.sleep(1)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "=== autoresearch s:" in out
    assert _running(docker_client, "s") == []
    events = [json.loads(line) for line in (path / ".autoresearch/s/events.jsonl").read_text().splitlines()]
    assert any(e["event"] == "interrupted" for e in events)
    assert not any(e["event"] == "experiment" for e in events)  # a partial run is no result


PARALLEL_TRAIN = """import time
VALUE = 2.0
UNCHANGED_1 = 0
BONUS = 0.0
UNCHANGED_2 = 0
SLEEP_S = 0
time.sleep(SLEEP_S)
""" + SUMMARY.replace('print("val_bpb:          1.234567")', 'print(f"val_bpb:          {VALUE - BONUS:.6f}")')


def test_parallel_cpu_workers_keep_the_ledger_and_branch_consistent(tmp_path, data_dir):
    """Two workers, each pinned to its own CPU. B starts from the baseline like A, finishes
    after A was kept, beats the best it started from: a near-miss, re-applied on A and verified."""
    from runner.engine import make_slots

    def edit(**values):
        text = PARALLEL_TRAIN
        for name, value in values.items():
            text = text.replace(f"{name} = {dict(VALUE='2.0', BONUS='0.0', SLEEP_S='0')[name]}\n", f"{name} = {value}\n", 1)
        return text

    path = make_repo(tmp_path / "r", PARALLEL_TRAIN)
    proposals = [(edit(VALUE="1.5"), "A: lower VALUE"), (edit(BONUS="0.8", SLEEP_S="4"), "B: add BONUS slowly")]
    loop, proposer, lines = make_loop(path, lambda repo: Scripted(repo, proposals), data_dir,
                                      max_experiments=2, tag="par")
    slots = make_slots((), 2, cpus=[0, 1])
    loop.run(slots=slots)
    rows = loop.ledger.rows()
    assert [(r.status, r.description, r.val_bpb) for r in rows] == [
        ("keep", "baseline", 2.0),
        ("keep", "A: lower VALUE", 1.5),
        ("discard", "B: add BONUS slowly [near-miss]", 1.2),
        ("keep", "B: add BONUS slowly (re-applied)", 0.7),
    ]
    events = loop.ledger.events(ExperimentRecord)
    assert [e.iteration for e in events] == [0, 1, 2, 3]
    assert events[3].verifies == 2 and events[3].parent == events[1].commit
    assert {e.run.limits["cpuset"] for e in events[1:3]} == {"0", "1"}
    assert proposer.heads == [events[0].commit] * 2  # both proposed on the baseline
    assert loop.repo.head().sha == events[3].commit
    assert (path / "results.tsv").read_text().count("\n") == 5
    assert "accelerator duty cycle" in lines[-1]


def test_proposer_outage_backs_off_and_the_loop_goes_on(tmp_path, data_dir, monkeypatch):
    import runner.loop as loop_mod
    from runner.proposers.base import ProposerError

    monkeypatch.setattr(loop_mod, "PROPOSER_BACKOFF_S", 0.05)

    class Flaky(Scripted):
        failures = 2

        def propose(self, ctx):
            if self.failures:
                self.failures -= 1
                raise ProposerError("Anthropic API: APIConnectionError: down")
            return super().propose(ctx)

    path = make_repo(tmp_path / "r", MINI_TRAIN)
    loop, _, _ = make_loop(path, lambda repo: Flaky(repo, [(variant(VALUE=1.5), "after the outage")]), data_dir,
                           max_experiments=1)
    loop.run()
    assert len(loop.ledger.events(ProposerErrored)) == 2
    assert [r.description for r in loop.ledger.rows()] == ["baseline", "after the outage"]


class Exploding(Scripted):
    """Proposes once, then fails every time with a bug (not a ProposerError): each failure is a
    refused proposal, and after MAX_REFUSED_IN_A_ROW of them the run must stop, loudly. It fails
    only once its one experiment is recorded: a proposer bug stops every thread at once, so a
    prefetching proposer that failed sooner would interrupt that experiment (on a busy host)."""

    def propose(self, ctx):
        if not self.proposals:
            events = self.repo.path / ".autoresearch" / "t" / "events.jsonl"
            deadline = time.monotonic() + 120
            while events.read_text().count('"event": "experiment"') < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            raise RuntimeError("a bug in the proposer")
        return super().propose(ctx)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_proposer_bug_stops_the_run_with_an_error_not_a_normal_summary(tmp_path, data_dir, workers):
    from runner.loop import LoopError

    repo = make_repo(tmp_path / "repo", MINI_TRAIN)
    loop, proposer, lines = make_loop(repo, lambda r: Exploding(r, [(variant(VALUE=1.5), "better")]), data_dir,
                                      workers=workers, prefetch=1 if workers > 1 else 0)
    slots = [None] if workers == 1 else __import__("runner.engine", fromlist=["make_slots"]).make_slots((), 2, cpus=[0, 1])
    with pytest.raises(LoopError, match="proposer failed: LoopError: 10 proposals in a row were refused; "
                                        "the last: the proposer failed: RuntimeError: a bug in the proposer"):
        loop.run(slots=slots)
    events = [json.loads(l) for l in (repo / ".autoresearch" / "t" / "events.jsonl").read_text().splitlines()]
    stopped = [e for e in events if e["event"] == "stopped"]
    assert stopped and "a bug in the proposer" in stopped[0]["reason"]
    assert [e["row"]["status"] for e in events if e["event"] == "experiment"] == ["keep", "keep"]
    assert any(e["event"] == "summary" for e in events)


STUBBORN_TRAIN = """import signal, time
KNOB = 1.0        # the offline proposer's only knob: every experiment changes it
signal.signal(signal.SIGTERM, signal.SIG_IGN)
if KNOB != 1.0:
    time.sleep(120)   # experiments hang and ignore SIGTERM; the baseline does not
""" + SUMMARY


@pytest.mark.whole_host  # --workers 2: a CPU each
def test_a_second_ctrl_c_stops_now_and_leaves_no_container(tmp_path, data_dir, docker_client):
    """Two workers, each in an experiment that ignores SIGTERM: the first Ctrl-C would wait for
    the kill grace; the second must stop at once and remove both containers, not leak them."""
    path = make_repo(tmp_path / "r", STUBBORN_TRAIN)
    proc = _start_in_background(path, data_dir, "cc", "--workers", "2")
    _wait_for_experiment_container(docker_client, "cc", 1)
    deadline = time.monotonic() + 60
    while len(_running(docker_client, "cc")) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(_running(docker_client, "cc")) == 2
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.5)
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 8  # well inside the 10 s kill grace a first Ctrl-C honours
    assert docker_client.containers.list(all=True, filters=naming.managed_filter(naming.KIND_RUN, **{naming.L_TAG: "cc"})) == []
