"""Alerts: what the loop tells people while the night runs unattended (`notify:` in runner.yaml).

A target is a webhook (each alert one JSON POST) or a command (the same JSON on its stdin). One
body fits Slack ("text"), Discord ("content") and plain JSON consumers ("message") at once, with
the alert's kind and fields beside them:

    {"text": "...", "content": "...", "message": "...", "allowed_mentions": {"parse": []},
     "event": "new_best", "tag": "mar5", "ts": 1767225600.0, ...the alert's fields}

The loop only queues alerts; one background thread delivers them, each delivery bounded by
NOTIFY_TIMEOUT_S, so a dead endpoint never holds the night up. A delivery that fails is handed to
`on_failure` (the loop writes a `notify_failed` event and a stderr line) and the night goes on.
A webhook URL's path, query and userinfo are often its secret: it is shown as scheme://host only.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import queue
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Callable, Mapping
from urllib.parse import unquote, urlsplit, urlunsplit

from . import __version__
from .config import ConfigError, NotifyTarget
from .text import one_line, redact_url

NOTIFY_TIMEOUT_S = 10       # one delivery: an HTTP request, or a command's whole run
NOTIFY_QUEUE_MAX = 100      # alerts waiting to go out; beyond it an alert is dropped (and that is reported)
NOTIFY_CLOSE_WAIT_S = 20    # at the end of a run, how long its last alerts may take to go out
NOTIFY_FORCED_WAIT_S = 3    # the same after a forced stop (a second Ctrl-C): the person wants out
DIGEST_POLL_S = 30          # how often the delivery thread looks at the clock for a due digest
TEXT_MAX_CHARS = 1500       # an alert's text (Discord refuses content over 2000 characters)
RESPONSE_MAX_BYTES = 65536  # of a webhook's answer, read and dropped


class NotifyError(RuntimeError):
    """A delivery failed; the message is safe to log (no URL beyond scheme://host)."""


@dataclass(frozen=True)
class Alert:
    kind: str            # one of config.NOTIFY_EVENTS, or "digest"
    text: str            # one line, for people
    fields: dict = field(default_factory=dict)  # for programs: iteration, commit, val_bpb, reason ...


def wants(target: NotifyTarget, alert: Alert) -> bool:
    """Whether `target` is told of `alert`: a kind it lists (`stopped` includes a stop at a cap);
    a crash streak only when it reaches exactly the target's own length (once per streak); a
    digest only at its digest_at (the delivery thread sends those itself)."""
    listed = alert.kind in target.events or (alert.kind == "cap" and "stopped" in target.events)
    if alert.kind == "digest" or not listed:
        return False
    if alert.kind == "crash_streak":
        return alert.fields.get("streak") == target.crash_streak
    return True


def next_digest(after: datetime, at: str) -> datetime:
    """The first local time `at` ("HH:MM") strictly after `after` (a naive local datetime)."""
    hour, minute = (int(x) for x in at.split(":"))
    due = after.replace(hour=hour, minute=minute, second=0, microsecond=0)
    return due if due > after else due + timedelta(days=1)


def body(tag: str, alert: Alert) -> bytes:
    """The JSON every target gets (see the module docstring)."""
    text = one_line(alert.text, TEXT_MAX_CHARS)
    # Slack reads <...> as links and mentions (<!channel>): text from the proposer must not ping anyone.
    slack = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return json.dumps({**alert.fields, "text": slack, "content": text, "message": text,
                       "allowed_mentions": {"parse": []}, "event": alert.kind, "tag": tag,
                       "ts": round(time.time(), 3)}, default=str).encode()


@dataclass(frozen=True)
class Destination:
    """A target made ready to deliver to: its URL read (url_env), and the label logs may show."""

    target: NotifyTarget
    url: str | None
    label: str


def resolve(target: NotifyTarget, environ: Mapping[str, str]) -> Destination:
    """Raises:
        ConfigError: url_env names a variable that is not set, or holds no http(s) URL."""
    if target.command:
        return Destination(target, None, f"command {os.path.basename(target.command[0])}")
    url = target.url
    if target.url_env is not None:
        url = environ.get(target.url_env, "")
        if redact_url(url).split("://")[0] not in ("http", "https"):
            raise ConfigError(f"notify: url_env {target.url_env} must hold an http:// or https:// URL; "
                              f"it is {'not set' if not url else redact_url(url)}")
    return Destination(target, url, redact_url(url))


def deliver(dest: Destination, data: bytes) -> None:
    """Send `data` to one destination, within NOTIFY_TIMEOUT_S.

    Raises:
        NotifyError: it failed (an HTTP status, no answer, a command that failed or timed out).
    """
    if dest.url is None:
        _run_command(dest.target.command, data)
        return
    try:
        _post(dest.url, data)
    except urllib.error.HTTPError as exc:
        raise NotifyError(f"HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise NotifyError(_scrub(f"{type(reason).__name__}: {reason}", dest.url)) from None


def _post(url: str, data: bytes) -> None:
    parts = urlsplit(url)
    headers = {"Content-Type": "application/json", "User-Agent": f"autoresearch-runner/{__version__}"}
    if parts.username is not None:  # https://user:password@host/...: basic auth, not part of the request line
        token = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(token).decode()
        url = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=NOTIFY_TIMEOUT_S) as response:
        response.read(RESPONSE_MAX_BYTES)


def _run_command(argv: tuple[str, ...], data: bytes) -> None:
    name = os.path.basename(argv[0])
    try:
        done = subprocess.run(list(argv), input=data, capture_output=True, timeout=NOTIFY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise NotifyError(f"{name} did not finish in {NOTIFY_TIMEOUT_S}s") from None
    except OSError as exc:
        raise NotifyError(f"cannot run {name}: {exc.strerror or exc}") from None
    if done.returncode != 0:
        raise NotifyError(f"{name} exited {done.returncode}: {one_line(done.stderr.decode(errors='replace')[-300:])}")


def _scrub(text: str, url: str) -> str:
    """`text` without any piece of `url` beyond scheme://host (an error may quote the URL)."""
    parts = urlsplit(url)
    for secret in sorted({url, parts.netloc, parts.path, parts.query, parts.username or "", parts.password or ""},
                         key=len, reverse=True):
        if len(secret) > 1:
            text = text.replace(secret, "...")
    return one_line(text, 300)


class Notifier:
    """Queues alerts for the targets that want them; one daemon thread delivers them (and each
    target's daily digest). `on_failure(label, kind, error)` hears of every delivery that failed."""

    def __init__(self, targets: tuple[NotifyTarget, ...], tag: str,
                 on_failure: Callable[[str, str, str], None] | None = None,
                 environ: Mapping[str, str] | None = None, clock: Callable[[], datetime] = datetime.now):
        """Raises:
            ConfigError: a target's url_env is not set (see `resolve`)."""
        self.destinations = [resolve(t, os.environ if environ is None else environ) for t in targets]
        self.tag = tag
        self.on_failure = on_failure or (lambda label, kind, error: None)
        self.clock = clock
        self.digest_poll_s = DIGEST_POLL_S
        self._queue: queue.Queue = queue.Queue(maxsize=NOTIFY_QUEUE_MAX)
        self._thread: threading.Thread | None = None
        self._digest: Callable[[], Alert] | None = None

    def start(self, digest: Callable[[], Alert] | None = None) -> None:
        """Start delivering; `digest` makes the daily digest's alert when one is due."""
        if self.destinations and self._thread is None:
            self._digest = digest
            self._thread = threading.Thread(target=self._serve, name="notify", daemon=True)
            self._thread.start()

    def send(self, kind: str, text: str, **fields) -> None:
        """Queue one alert (never blocks); dropped, and reported, when the queue is full."""
        alert = Alert(kind, text, fields)
        if self._thread is None or not any(wants(d.target, alert) for d in self.destinations):
            return
        try:
            self._queue.put_nowait(alert)
        except queue.Full:
            self.on_failure("notify", kind, f"{NOTIFY_QUEUE_MAX} alerts are waiting: this one was dropped")

    def close(self, wait_s: float = NOTIFY_CLOSE_WAIT_S) -> None:
        """Let the queued alerts go out for at most `wait_s`, then stop; what is left is reported."""
        if self._thread is None:
            return
        deadline = time.monotonic() + wait_s
        try:
            self._queue.put(None, timeout=wait_s)
        except queue.Full:
            pass
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            self.on_failure("notify", "close", f"alerts still undelivered after {wait_s:g}s were abandoned")
        self._thread = None

    def _serve(self) -> None:
        due = {i: next_digest(self.clock(), d.target.digest_at)
               for i, d in enumerate(self.destinations) if d.target.digest_at}
        while True:
            try:
                alert = self._queue.get(timeout=self.digest_poll_s)
            except queue.Empty:
                alert = ""
            if alert is None:
                return
            now = self.clock()
            for i, when in due.items():
                if now >= when and self._digest is not None:
                    due[i] = next_digest(now, self.destinations[i].target.digest_at)
                    try:
                        self._deliver(self.destinations[i], self._digest())
                    except Exception as exc:  # reading the ledger for the digest: reported, the thread goes on
                        self.on_failure(self.destinations[i].label, "digest", one_line(f"{type(exc).__name__}: {exc}"))
            if alert:
                for d in self.destinations:
                    if wants(d.target, alert):
                        self._deliver(d, alert)

    def _deliver(self, dest: Destination, alert: Alert) -> None:
        try:
            deliver(dest, body(self.tag, alert))
        except NotifyError as exc:
            self.on_failure(dest.label, alert.kind, str(exc))
