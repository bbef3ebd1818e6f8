"""The only writer of results.tsv and events.jsonl.

Both are append-only. Each record is one `os.write` of a whole line to an O_APPEND descriptor,
followed by fsync, so a kill leaves either the whole line or, at worst, a torn last line that
`Ledger` trims (and reports as an event) when it next opens the file. Nothing is ever rewritten.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

from sandbox.fsafe import open_beneath

# The records themselves are records.py's; Row, RowStatus and STATUSES are imported from here too.
from .records import EVENTS_VERSION, STATUSES, Event, ExperimentRecord, Repaired, Row, RowStatus, parse_event  # noqa: F401  (re-exported: callers import them from the ledger)
from .repo import RESULTS, RUNNER_DIR
from .text import one_line

HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription"
NOISE_FILE = "noise.json"  # the baseline's measured spread (runner noise, --min-delta auto)

E = TypeVar("E", bound=Event)


class LedgerError(ValueError):
    """results.tsv or events.jsonl cannot be used as they are; the message says what to do."""


def _append(root: Path, path: Path, line: str) -> None:
    """One whole line appended to `path` (below `root`, reached without following links), fsync'd."""
    fd = open_beneath(root, path.relative_to(root), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, (line + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _trim_torn_tail(root: Path, path: Path) -> int:
    """Cut a last line that lacks its newline (a write torn by a kill). Returns bytes cut."""
    try:
        fd = open_beneath(root, path.relative_to(root), os.O_RDWR, make_dirs=False)
    except FileNotFoundError:
        return 0
    with os.fdopen(fd, "r+b") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return 0
        keep = data.rfind(b"\n") + 1
        f.truncate(keep)
        return len(data) - keep


@dataclass(frozen=True)
class RunnerFiles:
    """Where the runner keeps its files in a research repo, outside any one tag's ledger."""

    root: Path

    @property
    def dir(self) -> Path:
        return Path(self.root) / RUNNER_DIR

    @property
    def prepare_log(self) -> Path:
        return self.dir / "prepare.log"

    @property
    def hub_fetch_log(self) -> Path:
        return self.dir / "hub-fetch.log"

    @property
    def reruns_dir(self) -> Path:
        return self.dir / "reruns"

    def adhoc_run_log(self, commit: str) -> Path:
        """The log of `runner run` on one commit."""
        return self.dir / "runs" / f"run-{commit[:7]}.log"


class Ledger:
    def __init__(self, repo_root: Path, tag: str):
        self.root = Path(repo_root)
        self.tag = tag
        self.files = RunnerFiles(self.root)
        self.results_path = self.root / RESULTS
        self.dir = self.files.dir / tag
        self.events_path = self.dir / "events.jsonl"
        self.runs_dir = self.dir / "runs"

    def exists(self) -> bool:
        return self.events_path.exists()

    def open(self) -> None:
        """Create the files if needed; repair a torn last line left by a kill."""
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        torn = {p.name: _trim_torn_tail(self.root, p) for p in (self.results_path, self.events_path)}
        if not self.results_path.exists() or self.results_path.stat().st_size == 0:
            _append(self.root, self.results_path, HEADER)
        elif self.results_path.read_text().splitlines()[0] != HEADER:
            raise LedgerError(f"{self.results_path} does not start with the results.tsv header "
                              f"({HEADER.replace(chr(9), ' ')}): move it away, or fix its first line")
        for name, cut in torn.items():
            if cut:
                self.event(Repaired(file=name, bytes_cut=cut))

    def log_path(self, iteration: int, commit: str, seed: int = 0) -> Path:
        """A run's log; an experiment's confirmation runs (other seeds) each have their own."""
        return self.runs_dir / (f"{iteration}-{commit[:7]}.log" if not seed else f"{iteration}-{commit[:7]}-seed{seed}.log")

    # --- writing ---------------------------------------------------------------------

    def append_row(self, row: Row) -> None:
        """Raises:
            ValueError: `row`'s status is not a RowStatus (a Row checks it when it is made)."""
        if row.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {row.status!r}")
        _append(self.root, self.results_path, row.line())

    def record(self, experiment: ExperimentRecord) -> None:
        """Record a finished experiment: its event first, then its results.tsv row (a kill
        between the two is repaired on resume from the event)."""
        self.event(experiment)
        self.append_row(experiment.row)

    def event(self, event: Event | str, **fields) -> Event:
        """Append one event, stamped with the time, the tag and the format's version. Returns it so stamped.

        Args:
            event: a records.Event. A kind's name with its `fields` is read into one first (how
                callers outside runner/, in benchmarks/ and scripts/, still write).

        Raises:
            ValueError: a kind's name this version does not know, or fields that are not that kind's.
        """
        if isinstance(event, str):
            typed = parse_event({"event": event, **fields})
            if typed is None:
                raise ValueError(f"{event!r} is not a kind of event (see records.py)")
            event = typed
        event = replace(event, ts=round(time.time(), 3), tag=self.tag, v=EVENTS_VERSION)
        _append(self.root, self.events_path, json.dumps(event.to_json(), default=str, sort_keys=True))
        return event

    # --- reading ---------------------------------------------------------------------

    def rows(self) -> list[Row]:
        """results.tsv's rows (every tag's).

        Raises:
            LedgerError: a line is not a row (five columns, two numbers, a RowStatus), naming it.
        """
        if not self.results_path.exists():
            return []
        rows = []
        for number, line in enumerate(self.results_path.read_text(errors="replace").splitlines()[1:], 2):
            if not line.strip():
                continue
            try:
                rows.append(Row.parse(line))
            except ValueError as exc:
                raise LedgerError(f"{self.results_path} line {number} is not a results.tsv row "
                                  f"({one_line(str(exc), 120)}): fix or delete that line") from None
        return rows

    def read(self, damaged: list[str] | None = None) -> list[Event]:
        """Every event of this tag, in the order recorded: the one reader of events.jsonl. Lines of
        a kind this version does not know are left out.

        Args:
            damaged: where to note lines that cannot be read (and skip them): not JSON, not an
                event, a later version's, a field missing or of the wrong type. None = such a
                line is an error.

        Raises:
            LedgerError: a line is damaged, naming the file and the line: resuming from a ledger
                that lost an experiment (or a ceiling, or a cap's spend) would redo or misjudge it.
        """
        if not self.events_path.exists():
            return []
        out = []
        for number, line in enumerate(self.events_path.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            obj = None
            try:
                obj = json.loads(line)
                event = parse_event(obj)
            except (ValueError, RecursionError) as exc:
                why = f"{self.events_path} line {number} is damaged ({one_line(str(exc), 120)})"
                if damaged is None:
                    what = "its experiment" if isinstance(obj, dict) and obj.get("event") == "experiment" else "what it records"
                    raise LedgerError(f"{why}: restore it from a backup, or delete that line and resume "
                                      f"({what} is then forgotten)") from None
                damaged.append(why)
                continue
            if event is not None:
                out.append(event)
        return out

    def events(self, kind: type[E], damaged: list[str] | None = None) -> list[E]:
        """This tag's events of one kind (a records.Event class), in order; see `read`.

        A kind's name instead of its class gives the lines as dicts, damaged lines skipped: for
        callers outside runner/ (benchmarks/) not yet converted.
        """
        if isinstance(kind, str):
            return [e.to_json() for e in self.read(damaged=[]) if e.KIND == kind]
        return [e for e in self.read(damaged) if isinstance(e, kind)]

    def last(self, kind: type[E], damaged: list[str] | None = None) -> E | None:
        """This tag's last event of one kind, or None; see `read`."""
        found = self.events(kind, damaged)
        return found[-1] if found else None

    def experiments(self, damaged: list[str] | None = None) -> list[ExperimentRecord]:
        """This tag's experiments, in the order they were recorded; see `read`."""
        return self.events(ExperimentRecord, damaged)

    def missing_rows(self) -> list[Row]:
        """This tag's recorded experiments whose results.tsv row a kill left unwritten.

        results.tsv is every tag's (two tags from one commit share a baseline row, to the
        letter): a line counts as this tag's only beyond the copies the other tags' ledgers
        account for.
        """
        present = Counter(row.line() for row in self.rows())
        for events in self.files.dir.glob("*/events.jsonl"):
            if events.parent.name != self.tag:
                present -= Counter(e.row.line() for e in Ledger(self.root, events.parent.name).experiments())
        missing = []
        for e in self.experiments():
            if present[e.row.line()] > 0:
                present[e.row.line()] -= 1
            else:
                missing.append(e.row)
        return missing

    def results_text(self, last: int = 20) -> str:
        """results.tsv's header and this tag's last `last` rows. The root results.tsv holds every
        tag's rows (as autoresearch's does); a run sees only its own."""
        return "\n".join([HEADER] + [r.row.line() for r in self.experiments()[-last:]])

    @property
    def noise_path(self) -> Path:
        return self.dir / NOISE_FILE
