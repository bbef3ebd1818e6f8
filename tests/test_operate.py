"""Operating a run: the documented config, live progress parsing, status and reports."""

from __future__ import annotations

import dataclasses
import io

import pytest
import yaml
from conftest import REPO_ROOT, make_repo, runner_cli
from test_loop import MINI_TRAIN, Scripted, _start_in_background, _wait_for_experiment_container, make_loop, variant

from runner.config import LimitsConfig, RunConfig, load_config
from runner.progress import LiveReporter, last_step


def test_example_config_documents_every_key_and_loads(tmp_path):
    example = yaml.safe_load((REPO_ROOT / "runner.example.yaml").read_text())
    fields = {f.name for f in dataclasses.fields(RunConfig)} - {"repo", "tag"}
    assert set(example) == fields
    assert set(example["limits"]) == {f.name for f in dataclasses.fields(LimitsConfig)}
    (tmp_path / "runner.yaml").write_text((REPO_ROOT / "runner.example.yaml").read_text())
    cfg = load_config(tmp_path)
    # what the host decides: the data caches, the hub cache, the CA bundle of its proxy
    assert cfg == dataclasses.replace(RunConfig(), repo=tmp_path.resolve(), data_dir=cfg.data_dir,
                                      hf_cache=cfg.hf_cache, ca_bundle=cfg.ca_bundle, verify_data=cfg.verify_data)


def test_config_errors_name_the_key_on_the_command_line(tmp_path, data_dir):
    repo = make_repo(tmp_path / "r", MINI_TRAIN, extra={"runner.yaml": "limits:\n  pids: many\n"})
    r = runner_cli("run", "--repo", str(repo), "--data-dir", str(data_dir))
    assert r.returncode == 2 and r.stderr.strip() == "error: runner.yaml: key 'limits.pids' must be int, got 'many'"


@pytest.mark.parametrize("text,expected", [
    ("step 00012 (4.0%) | loss: 3.456789 | lrm: 1.00 | remaining: 52s\n", (12, 3.456789)),
    ("\rstep 00951 (99.8%) | loss: 2.100000 | lrm: 0.10\rstep 00953 (100.0%) | loss: 2.000001 | lrm: 0.10 | remaining: 0s    ", (953, 2.000001)),
    ("no progress yet\n", None),
])
def test_step_and_loss_are_read_from_the_log_tail(tmp_path, text, expected):
    log = tmp_path / "run.log"
    log.write_text("header\n" * 1000 + text)
    assert last_step(log) == expected


def test_live_panel_shows_the_running_experiment(tmp_path):
    from rich.console import Console

    log = tmp_path / "run.log"
    log.write_text("step 00042 (50.0%) | loss: 1.234500 | remaining: 5s\n")
    out = io.StringIO()
    reporter = LiveReporter("night", console=Console(file=out, force_terminal=True, width=140))
    try:
        reporter.recorded("keep", 3.5, 0)
        reporter.started(7, "abcdef1234", "DEPTH 3 -> 4", log, 60)
        frame = io.StringIO()
        Console(file=frame, width=140).print(reporter.render())
    finally:
        reporter.close()
    shown = frame.getvalue()
    assert "best val_bpb 3.500000" in shown and "DEPTH 3 -> 4" in shown and "42" in shown and "1.2345" in shown
    assert "/ 60s" in shown


@pytest.mark.docker
def test_status_lists_what_runs_now(tmp_path, data_dir, docker_client):
    import os
    import signal

    path = make_repo(tmp_path / "r", variant(SLEEP_S=20))
    proc = _start_in_background(path, data_dir, "st")
    try:
        _wait_for_experiment_container(docker_client, "st", 0)
        r = runner_cli("status", "--tag", "st")
        assert r.returncode == 0, r.stderr
        line = next(line for line in r.stdout.splitlines() if line.startswith("st "))
        assert str(path) in line and f"{os.getuid():>5}" in line
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.communicate(timeout=60)
    assert "no experiments running" in runner_cli("status", "--tag", "st").stdout


@pytest.mark.docker
def test_report_from_a_real_short_run(tmp_path, data_dir):
    path = make_repo(tmp_path / "r", MINI_TRAIN)
    proposals = [(variant(VALUE=1.5), "halve the gap"), (variant(VALUE=1.8), "worse"), (variant(CRASH=1), "crash"),
                 (variant(VALUE=1.2), "lower again")]
    loop, _, _ = make_loop(path, lambda repo: Scripted(repo, proposals), data_dir, max_experiments=4, tag="rep")
    loop.run()
    r = runner_cli("report", "--tag", "rep", "--repo", str(path))
    assert r.returncode == 0, r.stderr
    assert "keep rate 50.0%" in r.stdout and "-0.500000" in r.stdout
    png, page = path / ".autoresearch/rep/progress.png", path / ".autoresearch/rep/report.html"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    html = page.read_text()
    assert "data:image/png;base64," in html and "halve the gap" in html and "lower again" in html
    r = runner_cli("report", "--tag", "nothing", "--repo", str(path))
    assert r.returncode == 2 and "no experiments recorded" in r.stderr
