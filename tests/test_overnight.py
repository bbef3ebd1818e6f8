"""The overnight operator (issue 23): alerts to a webhook or a command, caps that end the night
cleanly, one count of keeps and one duty cycle everywhere, and a morning report with every
experiment. Loops run on the fake backend (no Docker); webhooks are a server on 127.0.0.1 that
each test starts and stops."""

from __future__ import annotations

import http.server
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import make_repo
from fake_backend import FakeBackend
from test_loop_decisions import TRAIN, Scripted, variant

from runner.config import ConfigError, NotifyTarget, load_config
from runner.proposers.base import Proposal

SECRET_PATH, SECRET_QUERY = "T0KEN-in-the-path", "s3cret-in-the-query"


class _Hook(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.received.append({"path": self.path, "headers": dict(self.headers), "body": json.loads(body)})
        self.send_response(self.server.status)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def webhook():
    """A webhook receiver on 127.0.0.1: `.received` holds every POST; `.status` is its answer."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    server.received, server.status = [], 200
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_port}/hook/{SECRET_PATH}?token={SECRET_QUERY}"
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Spending(Scripted):
    """Each proposal reports the tokens a Claude call would have used."""

    usage = {"input_tokens": 400_000, "output_tokens": 20_000}  # $1.50 at claude-sonnet-4-5's price

    def propose(self, ctx):
        proposal = super().propose(ctx)
        return Proposal(proposal.train_py, proposal.description, proposal.hypothesis, dict(self.usage))


def night(tmp_path, data_dir, proposals, runner_yaml: str = "", proposer=Scripted, **overrides):
    """A loop on the fake backend, over a repo whose committed runner.yaml is `runner_yaml`."""
    from runner.engine import Engine
    from runner.loop import Loop
    from runner.repo import ResearchRepo

    path = tmp_path / "repo"
    if not path.exists():
        make_repo(path, TRAIN, extra={"runner.yaml": runner_yaml} if runner_yaml else None)
    cfg = load_config(path, {"tag": "fake", "data_dir": data_dir, "budget_s": 5, "confirm": "off", "noise_runs": 0,
                             **overrides})
    repo = ResearchRepo(path)
    lines: list[str] = []
    loop = Loop(cfg, repo, Engine(cfg, repo, progress=lambda m: None, backend=FakeBackend().pair()), proposer(proposals),
                out=lines.append)
    return loop, path, lines


def events(path, kind=None):
    all_ = [json.loads(line) for line in (path / ".autoresearch/fake/events.jsonl").read_text().splitlines()]
    return [e for e in all_ if kind is None or e["event"] == kind]


def everything_written(path: Path) -> str:
    """Every file the run left in the repo (ledger, results, logs, report), as one text."""
    return "\n".join(p.read_text(errors="replace") for p in [path / "results.tsv", *(path / ".autoresearch").rglob("*")]
                     if p.is_file() and p.suffix != ".png")


# --- alerts --------------------------------------------------------------------------------


def test_a_new_best_and_the_end_of_the_night_reach_a_local_webhook(tmp_path, data_dir, webhook, capfd):
    from runner.report import write_report

    loop, path, lines = night(tmp_path, data_dir, [(variant(VALUE=1.5), "better"), (variant(VALUE=1.9), "worse")],
                              f"notify:\n  - url: {webhook.url}\n", max_experiments=2)
    loop.run()
    kinds = [m["body"]["event"] for m in webhook.received]
    assert kinds == ["new_best", "cap"]                     # a stop at max_experiments is a cap
    best, end = (m["body"] for m in webhook.received)
    assert best["text"] == best["content"] == best["message"]          # Slack, Discord, plain JSON
    assert "new best val_bpb 1.500000 (-0.500000) at experiment 1" in best["text"] and "better" in best["text"]
    assert best["iteration"] == 1 and best["val_bpb"] == 1.5 and best["tag"] == "fake"
    assert best["allowed_mentions"] == {"parse": []}
    assert "stopped (max_experiments reached: 2 of 2)" in end["text"] and end["cap"] == "max_experiments"
    assert "2 experiments after the baseline (1 keep, 1 discard, 0 crash)" in end["text"]
    assert webhook.received[0]["path"] == f"/hook/{SECRET_PATH}?token={SECRET_QUERY}"
    assert webhook.received[0]["headers"]["Content-Type"] == "application/json"
    # The URL's secret is nowhere the run writes or prints.
    write_report(path, "fake")
    out, err = capfd.readouterr()
    written = everything_written(path) + "\n".join(lines) + out + err
    assert SECRET_PATH not in written and SECRET_QUERY not in written
    [start] = events(path, "start")
    assert start["config"]["notify"][0]["url"] == f"http://127.0.0.1:{webhook.server_port}"


def test_an_alert_that_fails_is_logged_and_the_night_goes_on(tmp_path, data_dir, webhook, capfd):
    webhook.status = 500
    dead = f"http://127.0.0.1:{_closed_port()}/x/{SECRET_PATH}"
    loop, path, lines = night(tmp_path, data_dir, [(variant(VALUE=1.5), "better")],
                              f"notify:\n  - url: {webhook.url}\n  - url: {dead}\n", max_experiments=1)
    t0 = time.monotonic()
    loop.run()
    assert time.monotonic() - t0 < 30
    assert [e["row"]["status"] for e in events(path, "experiment")] == ["keep", "keep"]
    failed = events(path, "notify_failed")
    assert {(e["target"], e["alert"]) for e in failed} == {
        (f"http://127.0.0.1:{webhook.server_port}", "new_best"), (f"http://127.0.0.1:{webhook.server_port}", "cap"),
        (dead.rsplit("/x/", 1)[0], "new_best"), (dead.rsplit("/x/", 1)[0], "cap")}
    assert {e["error"] for e in failed if str(webhook.server_port) in e["target"]} == {"HTTP 500"}
    assert all("ConnectionRefusedError" in e["error"] for e in failed if str(webhook.server_port) not in e["target"])
    err = capfd.readouterr().err
    assert f"notify: new_best alert to http://127.0.0.1:{webhook.server_port} failed: HTTP 500" in err
    assert SECRET_PATH not in err + everything_written(path) and SECRET_QUERY not in err + everything_written(path)
    assert lines[-1].startswith("\n=== autoresearch fake: 1 experiment after the baseline")


def test_a_command_target_gets_each_alert_as_json_on_stdin(tmp_path, data_dir):
    got = tmp_path / "alerts.jsonl"
    script = f"import sys; open({str(got)!r}, 'ab').write(sys.stdin.buffer.read() + b'\\n')"
    loop, path, _ = night(tmp_path, data_dir, [(variant(VALUE=1.5), "better")],
                          f"notify:\n  command: [{sys.executable}, -c, {json.dumps(script)}]\n  events: [stopped]\n",
                          max_experiments=1)
    loop.run()
    [alert] = [json.loads(line) for line in got.read_text().splitlines()]
    assert alert["event"] == "cap" and alert["reason"] == "max_experiments reached: 1 of 1" and alert["keeps"] == 1
    [start] = events(path, "start")
    assert start["config"]["notify"][0]["command"] == [sys.executable]  # its arguments stay out of the ledger


def test_a_crash_streak_is_alerted_once_when_it_reaches_its_length(tmp_path, data_dir, webhook):
    crashes = [(variant(CRASH=1), f"crash {i}") for i in range(4)]
    loop, path, _ = night(tmp_path, data_dir, crashes,
                          f"notify:\n  - url: {webhook.url}\n    events: [crash_streak]\n    crash_streak: 2\n",
                          max_experiments=4)
    loop.run()
    assert [e["row"]["status"] for e in events(path, "experiment")] == ["keep"] + ["crash"] * 4
    [alert] = [m["body"] for m in webhook.received]
    assert alert["event"] == "crash_streak" and alert["streak"] == 2 and alert["iteration"] == 2
    assert "2 crashes in a row, the last experiment 2" in alert["text"] and alert["text"].endswith(": crash 1 [exit_code]")


def test_a_description_cannot_mention_anyone(tmp_path):
    from runner.notify import Alert, body

    sent = json.loads(body("t", Alert("new_best", "new best: <!channel> @everyone & co")))
    assert sent["text"] == "new best: &lt;!channel&gt; @everyone &amp; co"       # Slack: no mention, no link
    assert sent["content"] == "new best: <!channel> @everyone & co" and sent["allowed_mentions"] == {"parse": []}


def test_wants_digest_and_redaction_units():
    from runner.notify import Alert, next_digest, wants
    from runner.text import redact_url

    streak = NotifyTarget(url="http://h/", crash_streak=3)
    assert [wants(streak, Alert("crash_streak", "", {"streak": n})) for n in (1, 2, 3, 4)] == [False, False, True, False]
    assert wants(NotifyTarget(url="http://h/", events=("stopped",)), Alert("cap", ""))
    assert not wants(NotifyTarget(url="http://h/", events=("cap",)), Alert("stopped", ""))
    assert next_digest(datetime(2026, 3, 5, 6, 0), "07:30") == datetime(2026, 3, 5, 7, 30)
    assert next_digest(datetime(2026, 3, 5, 7, 30), "07:30") == datetime(2026, 3, 6, 7, 30)
    assert redact_url("https://user:pw@hooks.slack.com/services/T0/B1/XYZ?x=1") == "https://hooks.slack.com"
    assert redact_url("http://[::1]:8080/a") == "http://[::1]:8080"
    assert redact_url("hooks.example/no-scheme") == "(URL without scheme://host)"


def test_a_digest_goes_out_at_its_time(webhook):
    from runner.notify import Alert, Notifier

    now = [datetime(2026, 3, 5, 7, 29, 50)]
    notifier = Notifier((NotifyTarget(url=webhook.url, events=(), digest_at="07:30"),), "night", clock=lambda: now[0])
    notifier.digest_poll_s = 0.05
    notifier.start(digest=lambda: Alert("digest", "night digest: 3 experiments", {"experiments": 3}))
    time.sleep(0.3)
    assert webhook.received == []                     # not yet 07:30
    now[0] = datetime(2026, 3, 5, 7, 30, 1)
    deadline = time.monotonic() + 5
    while not webhook.received and time.monotonic() < deadline:
        time.sleep(0.05)
    notifier.close()
    [digest] = [m["body"] for m in webhook.received]
    assert digest["event"] == "digest" and digest["experiments"] == 3 and digest["text"] == "night digest: 3 experiments"


def test_basic_auth_in_the_url_is_a_header_not_a_secret_in_the_request_line(webhook):
    from runner.notify import Alert, Destination, body, deliver

    url = webhook.url.replace("http://", "http://bot:pa%3Ass@")
    deliver(Destination(NotifyTarget(url=url), url, "x"), body("t", Alert("stopped", "done")))
    [got] = webhook.received
    assert got["headers"]["Authorization"] == "Basic Ym90OnBhOnNz"  # bot:pa:ss
    assert "bot" not in got["path"]


@pytest.mark.parametrize("yaml_text,expected", [
    ("notify:\n  - url: ftp://h/{s}\n", "notify[0].url must be an http:// or https:// URL, got ftp://h"),
    ("notify:\n  - url: https://h/{s}\n    command: [x]\n", "notify[0] needs exactly one of url, url_env or command, got url, command"),
    ("notify:\n  - url: https://h/{s}\n    events: [new_best, sometimes]\n", "notify[0].events: unknown event 'sometimes'"),
    ("notify:\n  - url: https://h/{s}\n    digest_at: '7am'\n", "notify[0].digest_at must be a local time HH:MM"),
    ("notify:\n  - url: https://h/{s}\n    crash_streak: 0\n", "notify[0].crash_streak must be at least 1"),
    ("notify: https://h/{s}\n", "'notify' must be a list of mappings"),
    ("max_cost_usd: 5\nmodel: claude-mystery-9\n", "max_cost_usd needs the price of model claude-mystery-9: add it"),
    ("max_hours: 0\n", "max_hours must be a positive number"),
    ("prices:\n  claude-x: [1.0]\n", "key 'prices.claude-x' must be [float, float], got [1.0]"),
])
def test_config_errors_say_what_to_do_and_never_show_a_webhook_secret(tmp_path, yaml_text, expected):
    (tmp_path / "runner.yaml").write_text(yaml_text.format(s=SECRET_PATH))
    with pytest.raises(ConfigError, match=re.escape(expected)) as info:
        load_config(tmp_path)
    assert SECRET_PATH not in str(info.value)


def test_url_env_reads_the_webhook_from_the_environment(tmp_path, monkeypatch):
    from runner.notify import Notifier

    (tmp_path / "runner.yaml").write_text("notify:\n  - url_env: NIGHT_HOOK\nprices:\n  my-model: [2, 4]\n")
    cfg = load_config(tmp_path)
    assert cfg.prices["my-model"] == (2.0, 4.0) and cfg.prices["claude-sonnet-4"] == (3.0, 15.0)  # added to the defaults
    monkeypatch.delenv("NIGHT_HOOK", raising=False)
    with pytest.raises(ConfigError, match="url_env NIGHT_HOOK must hold an http:// or https:// URL; it is not set"):
        Notifier(cfg.notify, "t")
    monkeypatch.setenv("NIGHT_HOOK", f"https://hooks.example/{SECRET_PATH}")
    assert [d.label for d in Notifier(cfg.notify, "t").destinations] == ["https://hooks.example"]


# --- caps ----------------------------------------------------------------------------------


def test_a_spend_cap_stops_the_night_cleanly_with_a_summary_and_an_alert(tmp_path, data_dir, webhook):
    from runner.report import collect, summary_lines

    proposals = [(variant(VALUE=v), f"try {v}") for v in (1.9, 1.8, 1.7, 1.6, 1.5)]
    loop, path, lines = night(tmp_path, data_dir, proposals, f"notify:\n  - url: {webhook.url}\n    events: [cap]\n",
                              proposer=Spending, max_cost_usd=2.0, model="claude-sonnet-4-5")
    loop.run()
    # $1.50 a proposal: the second reaches $3.00 >= $2.00; it still runs, nothing more is proposed.
    assert len(events(path, "experiment")) == 3
    [stopped] = events(path, "stopped")
    assert stopped["cap"] == "max_cost_usd" and stopped["reason"] == "max_cost_usd reached: $3.00 spent of $2.00"
    summary = lines[-1]
    assert "=== autoresearch fake: 2 experiments after the baseline" in summary
    assert "stopped: max_cost_usd reached: $3.00 spent of $2.00" in summary
    assert "spend: $3.00 of $2.00, 0.84M tokens" in summary
    [alert] = [m["body"] for m in webhook.received]
    assert alert["event"] == "cap" and alert["cap"] == "max_cost_usd"
    assert "tokens: 800,000 in, 40,000 out, about $3.00 (claude-sonnet-4-5)" in summary_lines(collect(path, "fake"))

    # Resumed, the night has already spent its cap: it stops before proposing anything.
    again, _, lines = night(tmp_path, data_dir, proposals[2:], proposer=Spending, max_cost_usd=2.0,
                            model="claude-sonnet-4-5")
    again.run(resume=True)
    assert len(events(path, "experiment")) == 3 and "stopped: max_cost_usd reached" in lines[-1]


@pytest.mark.parametrize("cap,value,experiments", [("max_total_tokens", 500_000, 2), ("max_hours", 1e-7, 0)])
def test_token_and_hour_caps_stop_the_night(tmp_path, data_dir, cap, value, experiments):
    proposals = [(variant(VALUE=v), f"try {v}") for v in (1.9, 1.8, 1.7)]
    loop, path, lines = night(tmp_path, data_dir, proposals, proposer=Spending, **{cap: value})
    loop.run()
    assert len(events(path, "experiment")) == 1 + experiments
    [stopped] = events(path, "stopped")
    assert stopped["cap"] == cap and stopped["reason"].startswith(f"{cap} reached: ")
    assert f"stopped: {cap} reached: " in lines[-1]


def test_an_interrupted_night_records_why_it_stopped(tmp_path, data_dir):
    loop, path, lines = night(tmp_path, data_dir, [(variant(VALUE=1.5), "better")], max_experiments=3)
    loop.stop_reason = "SIGINT received"  # what the signal handler sets, with the stop event
    loop.stop.set()
    loop.run()
    [stopped] = events(path, "stopped")
    assert stopped == {**stopped, "reason": "SIGINT received", "cap": None}


# --- one count, one duty cycle -------------------------------------------------------------


def test_the_summary_status_and_report_count_and_measure_alike(tmp_path, data_dir):
    """The baseline is the reference, not a keep: all three views count 3 experiments, 1 keep."""
    from runner.report import collect, summary_lines
    from runner.status import night as status_night

    loop, path, lines = night(tmp_path, data_dir, [(variant(VALUE=1.5), "better"), (variant(VALUE=1.9), "worse"),
                                                   (variant(CRASH=1), "broken")], max_experiments=3)
    loop.run()
    words = "3 experiments after the baseline (1 keep, 1 discard, 1 crash), keep rate 33.3%"
    [summary] = events(path, "summary")
    assert f"=== autoresearch fake: {words}" in lines[-1]
    assert f"accelerator duty cycle: {100 * summary['duty_cycle']:.1f}%" in lines[-1]
    data = collect(path, "fake")
    assert f"experiments: {words}" in summary_lines(data)
    status = status_night(path, "fake")
    assert str(status.counts) == str(data.counts) == words and status.best_val_bpb == 1.5
    assert status.duty_cycle == pytest.approx(data.duty_cycle) == pytest.approx(summary["duty_cycle"], rel=1e-3)
    assert status.spend == "$0.00, 0.00M tokens"  # the offline proposer spends nothing
    from runner.proposers.base import trajectory_from_rows                  # the summary's fallback bullets
    assert trajectory_from_rows(loop.ledger.rows())[-1] == words


# --- the morning report --------------------------------------------------------------------


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows, self.links, self.scripts, self.meta = [], [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr" and "data-iteration" in attrs:
            self.rows.append(attrs)
        elif tag == "a":
            self.links.append(attrs["href"])
        elif tag == "script":
            self.scripts.append(attrs)
        elif tag == "meta":
            self.meta.append(attrs)


def test_the_report_has_every_experiment_escaped_and_linked_to_its_log(tmp_path, data_dir):
    from urllib.parse import unquote

    from runner.report import write_report

    hostile = '<script>alert("pwned")</script> & <img src=x onerror=alert(1)>'
    loop, path, _ = night(tmp_path, data_dir, [(variant(VALUE=1.5), hostile), (variant(VALUE=1.9), "worse"),
                                               (variant(CRASH=1), "broken")], max_experiments=3)
    loop.run()
    for out in (None, tmp_path / "elsewhere"):
        png, page = write_report(path, "fake", out)
        text = page.read_text()
        parsed = _Page()
        parsed.feed(text)
        assert [int(r["data-iteration"]) for r in parsed.rows] == [0, 1, 2, 3]       # every experiment, one row
        assert [r["class"] for r in parsed.rows] == ["keep", "keep", "discard", "crash"]
        assert parsed.scripts == [{}] and "http" not in text.split("<script>")[1]  # ours only, inline
        assert "<script>alert" not in text and "<img src=x" not in text
        assert "&lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt; &amp; &lt;img src=x onerror=alert(1)&gt;" in text
        logs = [page.parent / unquote(href) for href in parsed.links]
        assert len(logs) == 4 and all(log.is_file() for log in logs)
        assert "val_bpb:" in logs[1].read_text()
        if out is None:
            assert parsed.links[1].startswith("runs/1-")                    # relative, beside the page
        assert parsed.meta == [{"charset": "utf-8"}]                          # no reload outside --watch
        assert '<th data-num>val_bpb</th>' in text and "table.sortable th" in text


def test_the_plot_has_whole_experiment_ticks_and_keeps_its_labels_inside(tmp_path, data_dir):
    from runner.report import collect, figure

    loop, path, _ = night(tmp_path, data_dir, [(variant(VALUE=2.1), "worse"), (variant(VALUE=2.2), "worse"),
                                               (variant(VALUE=1.5), "a long description of the last keep, at the edge")],
                          max_experiments=3)
    loop.run()
    fig = figure(collect(path, "fake"))
    ax = fig.axes[0]
    fig.canvas.draw()
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
    box = ax.get_window_extent()
    labels = [t for t in ax.texts if t.get_text()]
    assert len(labels) == 2                                                  # the baseline and the keep
    for label in labels:
        extent = label.get_window_extent()
        assert box.x0 <= extent.x0 and extent.x1 <= box.x1 and box.y0 <= extent.y0 and extent.y1 <= box.y1, label.get_text()


def test_report_watch_rewrites_the_page_as_rows_arrive(tmp_path, data_dir):
    import os

    from conftest import REPO_ROOT

    loop, path, _ = night(tmp_path, data_dir, [(variant(VALUE=1.5), "better")], max_experiments=1)
    page = path / ".autoresearch/fake/report.html"
    events_path = path / ".autoresearch/fake/events.jsonl"
    kept = events_path.with_suffix(".later")
    loop.run()
    events_path.rename(kept)                      # the watch starts before the night has recorded anything
    proc = subprocess.Popen([sys.executable, "-m", "runner", "report", "--tag", "fake", "--repo", str(path),
                             "--watch", "--every", "0.2"], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    said: list[str] = []
    errors: list[str] = []  # drained as it comes: a full stderr pipe would stall the watch
    reader = threading.Thread(target=lambda: said.extend(proc.stdout), daemon=True)
    err_reader = threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True)
    reader.start()
    err_reader.start()

    def rows() -> int:
        return page.read_text().count("data-iteration=") if page.exists() else 0

    def wait_for(condition):
        deadline = time.monotonic() + 120
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.1)
        return condition()

    try:
        later = kept.read_text().splitlines(keepends=True)
        first = next(i for i, line in enumerate(later) if '"event": "experiment"' in line and '"iteration": 1' in line)
        assert wait_for(lambda: any("waiting for the first experiment of fake" in line for line in said))
        events_path.write_text("".join(later[:first]))          # everything up to the baseline
        assert wait_for(lambda: rows() == 1)
        assert '<meta http-equiv="refresh" content="1">' in page.read_text()  # the browser reloads it
        with open(events_path, "a") as f:                       # experiment 1 arrives
            f.write("".join(later[first:]))
        assert wait_for(lambda: rows() == 2)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        reader.join(10)
        err_reader.join(10)
        err = "".join(errors)
    out = "".join(said)
    assert proc.returncode == 0, err
    assert "stopped watching" in out
    assert out.count("wrote ") >= 2 and "Traceback" not in err


def test_the_live_panel_shows_the_counts_and_the_spend_against_its_caps():
    import io

    from rich.console import Console

    from runner.progress import LiveReporter
    from runner.spend import Spend, describe

    reporter = LiveReporter("night", console=Console(file=io.StringIO(), force_terminal=True, width=160))
    try:
        reporter.recorded("keep", 2.0, 0)                      # the baseline: not counted as a keep
        reporter.recorded("keep", 1.5, 1)
        reporter.recorded("crash", 0.0, 2)
        spend = Spend(400_000, 20_000)
        reporter.spending(describe(spend, "claude-sonnet-4-5", {"claude-sonnet-4": (3.0, 15.0)}, 5.0, None, 1.25, 8))
        frame = io.StringIO()
        Console(file=frame, width=160).print(reporter.render())
    finally:
        reporter.close()
    shown = frame.getvalue()
    assert "keep 1  discard 0  crash 1" in shown and "$1.50 of $5.00, 0.42M tokens, 1.2 h of 8 h" in shown
