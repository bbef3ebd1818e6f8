"""The ledger's typed records (runner/records.py): files written by earlier versions still read,
a damaged line is one clear error naming it (and skipped by the report), and a row prints as one
clean line whoever built it. No Docker."""

from __future__ import annotations

import json

import pytest
from conftest import runner_cli

from runner.ledger import HEADER, Ledger, LedgerError
from runner.policy import RunState
from runner.records import (EVENTS_VERSION, ExperimentRecord, Refused, Row, RowStatus, RunRecord, SessionSummary,
                            Start, VramCeiling, parse_event)
from runner.summary import Metrics, Outcome, OutcomeStatus
from sandbox.hooks.verify_protocol import Verdict

# An events.jsonl as the version before typed records wrote it (no "v"), with records of older
# versions still: a run without verdict, seed or node and with a duty_cycle key since dropped
# (OLDER_RUN), and a summary from before the duty cycle's seconds were recorded.
RUN = {"commit": "a" * 40, "detail": "", "exit_code": 0, "heldout_val_bpb": None, "image": "autoresearch-runner/old:aaaaaaa",
       "image_id": "sha256:1", "image_reused": False, "image_transfer_bytes": 0, "limits": {"cpuset": None},
       "log": "/elsewhere/.autoresearch/old/runs/0-aaaaaaa.log", "log_bytes": 120, "log_truncated": False,
       "memory_gb": 0.1, "node": "", "overhead_s": 1.5, "peak_mem_bytes": 1000, "peak_vram_mb": None, "reason": "",
       "seed": 0, "self_reported_val_bpb": None, "status": "ok", "total_s": 12.0, "training_seconds": 9.0,
       "training_share": 0.9, "val_bpb": 2.0, "verdict": "", "verify_phases": None,
       "verify_s": 0.0, "wall_s": 10.0}
OLDER_RUN = {"status": "crash", "reason": "exit_code", "val_bpb": None, "memory_gb": 0.0, "commit": "c" * 40,
             "image": "autoresearch-runner/old:ccccccc", "image_id": "sha256:3", "image_reused": True, "exit_code": 1,
             "wall_s": 2.0, "total_s": 3.0, "overhead_s": 1.0, "training_seconds": None, "peak_mem_bytes": None,
             "peak_vram_mb": None, "duty_cycle": None, "log": "/elsewhere/2-ccccccc.log", "log_bytes": 10,
             "log_truncated": False, "limits": {}}
METRICS = {"val_bpb": 2.0, "training_seconds": 9.0, "total_seconds": 10.0, "peak_vram_mb": None, "mfu_percent": None,
           "total_tokens_M": None, "num_steps": 10, "num_params_M": None, "depth": None, "extra": {}}


def _experiment(iteration, commit, val, status, description, run, metrics, usage=None):
    return {"event": "experiment", "tag": "old", "ts": 1700000000.0 + iteration, "iteration": iteration,
            "commit": commit, "row": {"commit": commit[:7], "val_bpb": val, "memory_gb": run["memory_gb"],
                                      "status": status, "description": description},
            "outcome": run["status"], "reason": run["reason"], "metrics": metrics, "run": run, "hypothesis": "",
            "usage": usage or {}, "parent": None, "verifies": None, "runs": []}


PREVIOUS_VERSION = [
    {"event": "start", "tag": "old", "ts": 1700000000.0, "resume": False, "branch": "autoresearch/old",
     "head": "a" * 40, "proposer": "claude", "config": {"model": "claude-sonnet-4-5", "max_cost_usd": 10.0},
     "min_delta": 0.0, "workers": 1},
    _experiment(0, "a" * 40, 2.0, "keep", "baseline", RUN, METRICS),
    _experiment(1, "b" * 40, 1.5, "keep", "lower VALUE", {**RUN, "commit": "b" * 40, "val_bpb": 1.5, "verdict": "ok",
                                                          "heldout_val_bpb": 1.52, "seed": 0},
                {**METRICS, "val_bpb": 1.5}, usage={"input_tokens": 1000, "output_tokens": 100}),
    _experiment(2, "c" * 40, 0.0, "crash", "broken [exit_code]", OLDER_RUN, None),
    {"event": "refused", "tag": "old", "ts": 1700000003.0, "iteration": 3, "reason": "changes prepare.py",
     "description": "cheat", "usage": {"input_tokens": 500, "output_tokens": 50}},
    {"event": "summary", "tag": "old", "ts": 1700000004.0, "experiments": 3, "best_commit": "b" * 40,
     "best_val_bpb": 1.5, "trajectory": ["x"], "next_ideas": [], "usage": {}},
    {"event": "a_kind_of_another_version", "tag": "old", "ts": 1700000005.0, "what": 1},
    {"event": "summary", "tag": "old", "ts": 1700000006.0, "experiments": 3, "best_commit": "b" * 40,
     "best_val_bpb": 1.5, "trajectory": [], "next_ideas": [], "usage": {}, "wall_s": 100.0, "training_s": 18.0,
     "workers": 1, "duty_cycle": 0.18},
]


def _write(tmp_path, events: list[dict], tag: str = "old") -> Ledger:
    ledger = Ledger(tmp_path, tag)
    ledger.open()
    ledger.events_path.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in events))
    return ledger


def test_an_events_file_of_the_previous_version_reads_typed(tmp_path):
    ledger = _write(tmp_path, PREVIOUS_VERSION)
    events = ledger.read()
    assert [type(e) for e in events] == [Start, ExperimentRecord, ExperimentRecord, ExperimentRecord, Refused,
                                         SessionSummary, SessionSummary]  # the unknown kind left out
    assert {e.v for e in events} == {0}
    baseline, keep, crash = ledger.experiments()
    assert keep.status is RowStatus.KEEP and keep.outcome is OutcomeStatus.OK and keep.run.verdict is Verdict.OK
    assert baseline.run.verdict is None and baseline.metrics == Metrics(**{**METRICS, "extra": {}})
    assert crash.status is RowStatus.CRASH and crash.run.seed == 0 and crash.run.node is None and crash.metrics is None
    assert keep.training_s == 9.0 and crash.training_s == 0.0
    assert ledger.last(SessionSummary).wall_s == 100.0 and ledger.events(SessionSummary)[0].wall_s is None
    state = RunState.recover(ledger.experiments())
    assert (state.iteration, state.best_commit, state.best_heldout_bpb, state.since_keep) == (2, "b" * 40, 1.52, 1)


def test_a_record_of_the_previous_version_is_written_back_to_the_letter():
    """The typed writer's view of a whole record of the previous version is that record ("v"
    aside): the formats agree, statuses and verdicts are written as the same words."""
    added_since = {"image_build_s": 0.0, "margin_bpb": 0.0}  # run record fields newer than that version: written with their defaults
    for obj in (PREVIOUS_VERSION[i] for i in (0, 1, 2, 4, 7)):
        event = parse_event(obj)
        written = {k: v for k, v in event.to_json().items() if k != "v"}
        if isinstance(obj.get("run"), dict):
            assert {k: written["run"].pop(k) for k in added_since} == added_since
        assert written == obj
        assert json.dumps(written, sort_keys=True) == json.dumps(obj, sort_keys=True)
    assert parse_event(PREVIOUS_VERSION[1]).run.to_json()["verdict"] == ""  # unverified: "", as it always was


def test_the_report_and_the_cli_read_a_previous_versions_night(tmp_path):
    from runner.report import collect, summary_lines
    from runner.status import night

    _write(tmp_path, PREVIOUS_VERSION)
    data = collect(tmp_path, "old")
    lines = summary_lines(data)
    assert "experiments: 2 experiments after the baseline (1 keep, 0 discard, 1 crash), keep rate 50.0%" in lines
    assert "verified: 1 ok" in lines and data.input_tokens == 1500 and data.model == "claude-sonnet-4-5"
    assert data.damaged == [] and data.duty_cycle == pytest.approx(0.18)
    # the logs are found in this repo's runs folder, wherever the runs were recorded
    assert data.points[0]["logs"] == [("log", Ledger(tmp_path, "old").runs_dir / "0-aaaaaaa.log")]
    assert night(tmp_path, "old", now=1700000010.0).counts.crash == 1
    r = runner_cli("report", "--repo", str(tmp_path), "--tag", "old", "--out", str(tmp_path / "out"))
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    assert "verified: 1 ok" in r.stdout


def test_new_events_carry_the_version_and_old_ones_read_as_version_0(tmp_path):
    ledger = Ledger(tmp_path, "t")
    ledger.open()
    written = ledger.event(VramCeiling(gb=3.5))
    line = json.loads(ledger.events_path.read_text().splitlines()[-1])
    assert line == {"event": "vram_ceiling", "gb": 3.5, "tag": "t", "ts": written.ts, "v": EVENTS_VERSION}
    with open(ledger.events_path, "a") as f:
        f.write(json.dumps({"event": "vram_ceiling", "gb": 7, "tag": "t", "ts": 1.0}) + "\n")
    assert [(e.gb, e.v) for e in ledger.events(VramCeiling)] == [(3.5, EVENTS_VERSION), (7, 0)]


@pytest.mark.parametrize("line,why", [
    ('{"event": "vram_ceiling", "tag": "t", "ts": 1.0}', "gb is missing"),
    ('{"event": "vram_ceiling", "tag": "t", "ts": 1.0, "gb": "3.5"}', "gb is '3.5', not a number"),
    ('{"event": "experiment", "iteration": 1, "commit": "c", "outcome": "ok", "runs": null, '
     '"row": {"commit": "c", "val_bpb": 1.0, "memory_gb": 0.0, "status": "keep", "description": "x"}}',
     "runs is null, not a list"),
    ('{"event": "experiment", "iteration": 1, "commit": "c", "outcome": "ok", '
     '"row": {"commit": "c", "val_bpb": 1.0, "memory_gb": 0.0, "status": "kept", "description": "x"}}',
     "row.status is 'kept', not one of keep, discard, crash"),
    ('{"event": "summary", "wall_s": "long"}', "wall_s is 'long', not a number"),
    ('{"event": "stopped", "reason": "x", "v": 2}', "written by a later runner (events version 2"),
    ('{"event": "stopped", "reason": "x"', "Expecting"),
    ('["stopped"]', "not an event"),
])
def test_a_damaged_line_is_one_error_naming_it_and_the_report_skips_it(tmp_path, line, why):
    ledger = _write(tmp_path, PREVIOUS_VERSION[:3])
    with open(ledger.events_path, "a") as f:
        f.write(line + "\n")
    with pytest.raises(LedgerError) as err:
        ledger.read()
    message = str(err.value)
    assert "events.jsonl line 4 is damaged (" in message and why in message and "\n" not in message
    damaged: list[str] = []
    assert len(ledger.read(damaged)) == 3 and len(damaged) == 1 and "line 4" in damaged[0]


def test_resume_refuses_a_damaged_ceiling_naming_its_line_and_the_report_warns_and_goes_on(tmp_path, data_dir):
    from fake_backend import FakeBackend
    from test_loop_decisions import Scripted, make

    from runner.engine import Engine
    from runner.loop import Loop

    loop, path, _ = make(tmp_path, data_dir, [], max_experiments=0)
    loop.run()
    events = path / ".autoresearch/fake/events.jsonl"
    with open(events, "a") as f:
        f.write('{"event": "vram_ceiling", "tag": "fake", "ts": 1.0}\n')  # a ceiling without its gb
    n = len(events.read_text().splitlines())
    again = Loop(loop.cfg, loop.repo, Engine(loop.cfg, loop.repo, progress=lambda m: None, backend=FakeBackend().pair()),
                 Scripted([]), out=lambda line: None)
    with pytest.raises(LedgerError, match=f"events.jsonl line {n} is damaged \\(gb is missing\\): restore it"):
        again.setup(resume=True)
    r = runner_cli("report", "--repo", str(path), "--tag", "fake", "--out", str(tmp_path / "report"))
    assert r.returncode == 0, r.stderr
    assert f"warning: {events} line {n} is damaged (gb is missing): skipped" in r.stderr and "Traceback" not in r.stderr
    assert "experiments: 0 experiments after the baseline" in r.stdout


ESCAPES = "tabs\there\nnew line \x1b[2J\x1b]52;c;cm0gLXJmIH4K\x07 done\u202e"


def test_a_row_built_anywhere_prints_as_one_clean_line(tmp_path):
    """results.tsv and the [EXP] line sanitise the row themselves, not only the loop's rows."""
    ledger = Ledger(tmp_path, "t")
    ledger.open()
    row = Row("abc\t1234", 1.5, 0.4, "keep", ESCAPES)
    ledger.append_row(row)
    text = (tmp_path / "results.tsv").read_text()
    assert text.startswith(HEADER + "\n") and text.count("\n") == 2 and "\x1b" not in text and "\x07" not in text
    columns = text.splitlines()[1].split("\t")
    assert columns == ["abc 1234", "1.500000", "0.4", "keep", "tabs here new line done"]
    assert ledger.rows() == [Row("abc 1234", 1.5, 0.4, RowStatus.KEEP, "tabs here new line done")]
    exp = row.exp_line("t", 3)
    assert exp == "[EXP] t 3 | commit:abc 1234 | val_bpb:1.500000 | mem:0.4GB | status:keep | tabs here new line done"


def test_records_are_typed_whoever_builds_them():
    assert Row("a", 1.0, 0.0, "discard", "x").status is RowStatus.DISCARD
    with pytest.raises(ValueError, match="status is 'maybe'"):
        Row("a", 1.0, 0.0, "maybe", "x")
    outcome = Outcome("ok", "", None, verdict="")
    assert outcome.status is OutcomeStatus.OK and outcome.verdict is None
    assert Outcome("ok", "", None, verdict="forged").verdict is Verdict.FORGED
    record = ExperimentRecord(1, "c", Row("c", 1.0, 0.0, "keep", "x"), "ok", run={"wall_s": 1, "verdict": "ok"},
                              metrics={"val_bpb": 1.0})
    assert record.run == RunRecord(wall_s=1, verdict=Verdict.OK) and record.metrics == Metrics(1.0)
    with pytest.raises(ValueError, match="iteration is '1', not int"):
        ExperimentRecord("1", "c", Row("c", 1.0, 0.0, "keep", "x"), "ok")


def test_a_kind_by_name_is_still_written_typed_for_callers_outside_runner(tmp_path):
    """benchmarks/ and scripts/ write `ledger.event("summary", ...)` and read dicts by a kind's name."""
    ledger = Ledger(tmp_path, "t")
    ledger.open()
    ledger.event("summary", wall_s=10.0, training_s=9.0, workers=1, usage={})
    assert ledger.last(SessionSummary).training_s == 9.0
    assert ledger.events("summary")[0]["wall_s"] == 10.0
    with pytest.raises(ValueError, match="not a kind of event"):
        ledger.event("x")
    with pytest.raises(ValueError, match="wall_s is 'long'"):
        ledger.event("summary", wall_s="long")
