"""The only writer of results.tsv and events.jsonl.

Both are append-only. Each record is one `os.write` of a whole line to an O_APPEND descriptor,
followed by fsync, so a kill leaves either the whole line or, at worst, a torn last line that
`Ledger` trims (and reports as an event) when it next opens the file. Nothing is ever rewritten.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from sandbox.fsafe import open_beneath

from .repo import RESULTS, RUNNER_DIR
from .text import one_line

HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription"
NOISE_FILE = "noise.json"  # the baseline's measured spread (runner noise, --min-delta auto)


class RowStatus(StrEnum):
    """The status column of results.tsv, as autoresearch writes it."""

    KEEP = "keep"
    DISCARD = "discard"
    CRASH = "crash"


STATUSES = tuple(RowStatus)


class LedgerError(ValueError):
    """results.tsv or events.jsonl cannot be used as they are; the message says what to do."""


@dataclass(frozen=True)
class Row:
    commit: str
    val_bpb: float
    memory_gb: float
    status: str
    description: str

    def line(self) -> str:
        desc = one_line(self.description)  # tabs, newlines and terminal escapes would break the TSV and its readers
        return f"{self.commit}\t{self.val_bpb:.6f}\t{self.memory_gb:.1f}\t{self.status}\t{desc}"

    @classmethod
    def parse(cls, line: str) -> "Row":
        commit, val, mem, status, desc = line.split("\t", 4)
        return cls(commit, float(val), float(mem), status, desc)


@dataclass(frozen=True)
class ExperimentRecord:
    """One experiment as events.jsonl records it (event "experiment"); read and written only here.

    `row` is its results.tsv row; `outcome` an OutcomeStatus value; `run` the engine's record of
    the run (timings, image, limits, log).
    """

    iteration: int
    commit: str
    row: Row
    outcome: str
    reason: str = ""
    metrics: dict | None = None
    run: dict = field(default_factory=dict)
    hypothesis: str = ""
    usage: dict = field(default_factory=dict)
    parent: str | None = None
    verifies: int | None = None
    runs: list = field(default_factory=list)  # the earlier runs of a confirmed experiment (other seeds); `run` is the last

    @property
    def status(self) -> RowStatus:
        return RowStatus(self.row.status)

    @property
    def training_s(self) -> float:
        return (self.metrics or {}).get("training_seconds") or 0.0

    def fields(self) -> dict:
        """The event's fields (Ledger.event adds ts, tag and the event name)."""
        return {**dataclasses.asdict(self), "row": dataclasses.asdict(self.row)}

    @classmethod
    def from_event(cls, event: dict) -> "ExperimentRecord":
        """Raises:
            ValueError: a field is missing or of the wrong type (a damaged or foreign event)."""
        row = event.get("row")
        types = {"commit": str, "val_bpb": (int, float), "memory_gb": (int, float), "status": str, "description": str}
        if not isinstance(row, dict) or set(row) != set(types):
            raise ValueError("its row is not commit, val_bpb, memory_gb, status, description")
        for name, kind in types.items():
            if not isinstance(row[name], kind) or isinstance(row[name], bool):
                raise ValueError(f"row.{name} is {row[name]!r}")
        if row["status"] not in STATUSES:
            raise ValueError(f"row.status is {row['status']!r}")
        if not isinstance(event.get("iteration"), int) or not isinstance(event.get("commit"), str):
            raise ValueError("it has no iteration or commit")
        if not isinstance(event.get("run", {}), dict) or not isinstance(event.get("metrics") or {}, dict):
            raise ValueError("its run or metrics is not an object")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in event.items() if k in known}
        values["row"] = Row(**row)
        return cls(**values)


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
                self.event("repaired", file=name, bytes_cut=cut)

    def log_path(self, iteration: int, commit: str, seed: int = 0) -> Path:
        """A run's log; an experiment's confirmation runs (other seeds) each have their own."""
        return self.runs_dir / (f"{iteration}-{commit[:7]}.log" if not seed else f"{iteration}-{commit[:7]}-seed{seed}.log")

    # --- writing ---------------------------------------------------------------------

    def append_row(self, row: Row) -> None:
        if row.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {row.status!r}")
        _append(self.root, self.results_path, row.line())

    def record(self, experiment: ExperimentRecord, **extra) -> None:
        """Record a finished experiment: its event first, then its results.tsv row (a kill
        between the two is repaired on resume from the event)."""
        self.event("experiment", **experiment.fields(), **extra)
        self.append_row(experiment.row)

    def event(self, kind: str, **fields) -> dict:
        record = {"ts": round(time.time(), 3), "tag": self.tag, "event": kind, **fields}
        _append(self.root, self.events_path, json.dumps(record, default=str, sort_keys=True))
        return record

    # --- reading ---------------------------------------------------------------------

    def rows(self) -> list[Row]:
        if not self.results_path.exists():
            return []
        lines = self.results_path.read_text().splitlines()[1:]
        return [Row.parse(line) for line in lines if line.strip()]

    def experiments(self, damaged: list[str] | None = None) -> list[ExperimentRecord]:
        """This tag's experiments, in the order they were recorded.

        Args:
            damaged: where to note lines that are not a whole experiment event (and skip
                them); None = such a line is an error.

        Raises:
            LedgerError: a line is damaged (not JSON, or an experiment event missing a field),
                naming it: resuming from a ledger that lost an experiment would redo or
                misjudge it.
        """
        if not self.events_path.exists():
            return []
        out = []
        for number, line in enumerate(self.events_path.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
                if not isinstance(event, dict):
                    raise ValueError("it is not a JSON object")
                if event.get("event") == "experiment":
                    out.append(ExperimentRecord.from_event(event))
            except ValueError as exc:
                why = f"{self.events_path} line {number} is damaged ({one_line(str(exc), 120)})"
                if damaged is None:
                    raise LedgerError(f"{why}: restore it from a backup, or delete that line and resume "
                                      "(its experiment is then forgotten)") from None
                damaged.append(why)
        return out

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

    def events(self, kind: str | None = None) -> list[dict]:
        if not self.events_path.exists():
            return []
        out = []
        for line in self.events_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if kind is None or record.get("event") == kind:
                out.append(record)
        return out
