"""Unit tests of the parts that need no daemon: parser, ledger, config, guard, log cap, proposer."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import MINI_PREPARE, SUMMARY, make_repo

from runner.config import ConfigError, load_config
from runner.ledger import HEADER, Ledger, Row
from runner.records import Repaired
from runner.proposers.offline import OfflineProposer, find_knobs, set_knob
from runner.repo import GuardError, ResearchRepo, read_time_budget
from runner.summary import judge, parse_summary
from sandbox.logcap import CappedLog
from sandbox.spec import RunResult

AUTORESEARCH_BLOCK = """step 00953 (100.0%) | loss: 3.2 | remaining: 0s
---
val_bpb:          0.997900
training_seconds: 300.1
total_seconds:    325.9
peak_vram_mb:     45060.2
mfu_percent:      39.80
total_tokens_M:   499.6
num_steps:        953
num_params_M:     50.3
depth:            8
"""


def result(output: str, exit_code=0, reason="") -> RunResult:
    return RunResult(exit_code, reason, 1.0, Path("/dev/null"), output, len(output), False, None, None, "img", "c")


def test_parses_autoresearch_summary_block():
    m = parse_summary(AUTORESEARCH_BLOCK)
    assert m.val_bpb == 0.9979 and m.num_steps == 953 and m.depth == 8 and m.peak_vram_mb == 45060.2


def test_only_the_last_block_counts():
    forged_early = "---\nval_bpb: 0.1\n" + AUTORESEARCH_BLOCK
    assert parse_summary(forged_early).val_bpb == 0.9979


@pytest.mark.parametrize("output,exit_code,reason,status,why", [
    (AUTORESEARCH_BLOCK, 0, "", "ok", ""),
    ("training...\n", 0, "", "crash", "no_summary"),
    (AUTORESEARCH_BLOCK, 1, "exit_code", "crash", "exit_code"),
    (AUTORESEARCH_BLOCK.replace("0.997900", "nan"), 0, "", "crash", "bad_metric"),
    (AUTORESEARCH_BLOCK.replace("0.997900", "oops"), 0, "", "crash", "bad_metric"),
    ("", 137, "oom", "crash", "oom"),
    ("huggingface_hub.errors.LocalEntryNotFoundError: Cannot find ... outgoing traffic has been disabled.", 1,
     "exit_code", "crash", "hub_offline"),
    (AUTORESEARCH_BLOCK, 143, "timeout", "timeout", "timeout"),
])
def test_judge(output, exit_code, reason, status, why):
    outcome = judge(result(output, exit_code, reason))
    assert (outcome.status, outcome.reason) == (status, why)


def test_ledger_appends_and_repairs_a_torn_line(tmp_path):
    ledger = Ledger(tmp_path, "t")
    ledger.open()
    ledger.append_row(Row("abc1234", 1.5, 0.4, "keep", "baseline"))
    with open(ledger.results_path, "a") as f:
        f.write("def5678\t1.4")  # a write cut short by a kill
    ledger.open()
    assert ledger.results_path.read_text() == HEADER + "\nabc1234\t1.500000\t0.4\tkeep\tbaseline\n"
    assert ledger.last(Repaired).file == "results.tsv"


def test_ledger_rows_keep_tsv_shape(tmp_path):
    ledger = Ledger(tmp_path, "t")
    ledger.open()
    ledger.append_row(Row("abc1234", 0.0, 0.0, "crash", "tabs\tand\nnewlines"))
    assert ledger.rows() == [Row("abc1234", 0.0, 0.0, "crash", "tabs and newlines")]
    with pytest.raises(ValueError):
        ledger.append_row(Row("abc1234", 0.0, 0.0, "maybe", "x"))


def test_config_rejects_unknown_and_mistyped_keys(tmp_path):
    (tmp_path / "runner.yaml").write_text("limits:\n  memory_gb: lots\n")
    with pytest.raises(ConfigError, match="'limits.memory_gb' must be float"):
        load_config(tmp_path)
    (tmp_path / "runner.yaml").write_text("budgett: 5\n")
    with pytest.raises(ConfigError, match="unknown key 'budgett'"):
        load_config(tmp_path)
    (tmp_path / "runner.yaml").write_text("env:\n  OPENAI_API_KEY: x\n")
    with pytest.raises(ConfigError, match="looks like a secret"):
        load_config(tmp_path)


def test_relative_paths_are_made_absolute(tmp_path, monkeypatch):
    """A path is mounted into containers: `--data-dir data` is from where the command runs,
    runner.yaml's `verify_data: heldout` from the repo."""
    repo, elsewhere = tmp_path / "repo", tmp_path / "elsewhere"
    repo.mkdir(), elsewhere.mkdir()
    (repo / "runner.yaml").write_text("verify_data: heldout\ndata_dir: ~/cache\n")
    monkeypatch.chdir(elsewhere)
    cfg = load_config(repo)
    assert cfg.verify_data == repo.resolve() / "heldout" and cfg.data_dir == Path.home() / "cache"
    cfg = load_config(repo, {"data_dir": Path("data")})
    assert cfg.data_dir == elsewhere / "data"


def test_cli_overrides_config_file(tmp_path):
    (tmp_path / "runner.yaml").write_text("budget_s: 30\nlimits:\n  memory_gb: 4\n  pids: 64\n")
    cfg = load_config(tmp_path, {"budget_s": 5, "memory_gb": 2})
    assert cfg.budget_s == 5 and cfg.limits.memory_gb == 2 and cfg.limits.pids == 64
    assert cfg.sandbox_limits(5).mem_limit_bytes == 2 * 1024**3


def test_time_budget_read_from_prepare():
    assert read_time_budget(MINI_PREPARE) == 2
    assert read_time_budget("TIME_BUDGET = 300  # seconds\n") == 300


def test_guard_refuses_commits_touching_other_files(tmp_path):
    path = make_repo(tmp_path / "r", SUMMARY)
    repo = ResearchRepo(path)
    (path / "prepare.py").write_text("TIME_BUDGET = 99999\n")
    repo.git.index.add(["prepare.py"])
    sha = repo.git.index.commit("sneaky").hexsha
    with pytest.raises(GuardError, match="changes prepare.py"):
        repo.guard(sha)
    with pytest.raises(GuardError, match="does not parse"):
        repo.commit_train_py(sha, "def broken(:\n", "x", "refs/autoresearch/t/1")


def test_snapshot_is_root_owned_and_read_only(tmp_path):
    import io
    import tarfile

    path = make_repo(tmp_path / "r", SUMMARY)
    (path / "results.tsv").write_text("untracked\n")
    repo = ResearchRepo(path)
    fixed, editable = repo.snapshot_tars(repo.head().sha)
    members = {}
    for blob in (fixed, editable):
        with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
            members.update({m.name: m for m in tar.getmembers()})
    assert set(members) == {"repo/prepare.py", "repo/train.py", "repo/program.md"}
    assert all(m.uid == 0 and m.mode == 0o444 and m.mtime == 0 for m in members.values())
    with tarfile.open(fileobj=io.BytesIO(editable)) as tar:
        assert tar.getnames() == ["repo/train.py"]
    # A commit that changes only train.py leaves the fixed part byte-identical.
    new = repo.commit_train_py(repo.head().sha, SUMMARY + "# changed\n", "edit", "refs/autoresearch/t/1")
    assert repo.snapshot_tars(new.sha)[0] == fixed


def test_log_cap_keeps_head_and_tail(tmp_path):
    log = CappedLog(tmp_path / "log", head_bytes=100, tail_bytes=50)
    for i in range(10000):
        log.write(f"line {i}\n".encode())
    log.write(b"---\nval_bpb: 1.0\n")
    log.close()
    text = (tmp_path / "log").read_text()
    assert text.startswith("line 0\n") and text.endswith("---\nval_bpb: 1.0\n")
    assert "bytes of output dropped by the log cap" in text
    assert len(text) < 400 and log.truncated and log.total_bytes > 80000


def test_a_log_pump_that_outlives_the_run_cannot_write_into_a_closed_log(tmp_path):
    """The output stream can trail the exit by more than the wait for it: a write after close()
    is dropped, and what close() wrote stays the end of the file."""
    import threading

    log = CappedLog(tmp_path / "log", head_bytes=1 << 20, tail_bytes=1 << 10)
    stop = threading.Event()
    errors = []

    def pump():
        try:
            while not stop.is_set():
                log.write(b"flood\n")
        except Exception as exc:  # the pump of record swallows these: the test must see them
            errors.append(exc)

    t = threading.Thread(target=pump)
    t.start()
    log.write(b"")
    log.close()
    size = (tmp_path / "log").stat().st_size
    log.write(b"after close\n")
    stop.set()
    t.join()
    assert errors == [] and (tmp_path / "log").stat().st_size == size
    assert log.tail().endswith(b"flood\n")


TRAIN = """import math
DEPTH = 3                 # blocks
LEARNING_RATE = 0.003     # peak
USE_BIAS = True
NAME = "x"
"""


def test_offline_proposer_changes_one_knob_keeping_comments():
    assert [k.name for k in find_knobs(TRAIN)] == ["DEPTH", "LEARNING_RATE"]
    k = find_knobs(TRAIN)[1]
    assert set_knob(TRAIN, k, 0.006).splitlines()[2] == "LEARNING_RATE = 0.006     # peak"


def test_offline_proposer_is_seeded_and_reproducible():
    from runner.proposers.base import Context

    ctx = Context("t", 3, TRAIN, "", "", "", HEADER, [], 1.0, 0, False)
    a, b = OfflineProposer(seed=7).propose(ctx), OfflineProposer(seed=7).propose(ctx)
    assert a == b
    changed = [(x, y) for x, y in zip(TRAIN.splitlines(), a.train_py.splitlines()) if x != y]
    assert len(changed) == 1
    others = {OfflineProposer(seed=s).propose(ctx).description for s in range(10)}
    assert len(others) > 1


def test_confirm_off_in_runner_yaml_is_read_as_off(tmp_path):
    """YAML reads a bare `off` as false: `confirm: off` in runner.yaml turns confirmation off
    (it was refused as 'must be int, got False')."""
    from runner.config import load_config

    (tmp_path / "runner.yaml").write_text("confirm: off\n")
    assert load_config(tmp_path).confirm_runs == 0
    (tmp_path / "runner.yaml").write_text("confirm: on\n")
    assert load_config(tmp_path).confirm_runs == 1
    (tmp_path / "runner.yaml").write_text("confirm: 3\n")
    assert load_config(tmp_path).confirm_runs == 3


def test_a_confined_process_names_its_cpus_and_an_unconfined_one_none(tmp_path):
    import os

    from runner.config import load_config
    from sandbox.spec import confined_cpuset

    mine = sorted(os.sched_getaffinity(0))
    online = tmp_path / "online"
    online.write_text(f"{mine[0]}-{mine[-1]}\n" if mine == list(range(mine[0], mine[-1] + 1)) else ",".join(map(str, mine)))
    assert confined_cpuset(online) is None                      # every online CPU: no cpuset
    online.write_text(f"{mine[-1] + 1},{','.join(map(str, mine))}\n")
    assert confined_cpuset(online) == ",".join(map(str, mine))  # one CPU it may not use: its own
    assert confined_cpuset(tmp_path / "absent") is None         # the host does not say: none

    if len(mine) < 2:
        return
    os.sched_setaffinity(0, mine[:1])  # as under `taskset -c <first>`
    try:
        assert load_config(tmp_path).sandbox_limits(5).cpuset == str(mine[0])
        (tmp_path / "runner.yaml").write_text(f"limits:\n  cpuset: '{mine[-1]}'\n")
        assert load_config(tmp_path).sandbox_limits(5).cpuset == str(mine[-1])  # runner.yaml's wins
        (tmp_path / "runner.yaml").write_text("cluster: 127.0.0.1:6379\n")
        assert load_config(tmp_path).sandbox_limits(5).cpuset is None  # the driver's CPUs say nothing of a node's
    finally:
        os.sched_setaffinity(0, mine)
