"""What a person watching the loop sees: plain `[EXP]` lines, and on a terminal a live panel
(Rich) with each running experiment's elapsed time against its budget, the step and loss read
from its training log, the best val_bpb so far, the keep/discard/crash counts and the spend
against its caps."""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .policy import StatusCounts, status_counts

# autoresearch prints "step 00953 (100.0%) | loss: 3.2 | ..." behind a carriage return;
# tinylm prints the same shape one per line.
STEP_LINE = re.compile(r"step\s+(\d+)\b.*?loss:\s*([0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)")
TAIL_BYTES = 4096


def last_step(log_path: Path) -> tuple[int, float] | None:
    """(step, loss) from the last training-progress line of a log, or None."""
    try:
        with open(log_path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - TAIL_BYTES))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    for line in reversed(re.split(r"[\r\n]+", tail)):
        m = STEP_LINE.search(line)
        if m:
            return int(m.group(1)), float(m.group(2))
    return None


@dataclass
class Active:
    iteration: int
    commit: str
    description: str
    log_path: Path
    budget_s: float
    started: float


class Reporter:
    """Plain output: one line per event. The loop calls the hooks; this one prints lines only."""

    def __init__(self, out: Callable[[str], None] = print):
        self.out = out
        self.best: float | None = None
        self.statuses: list[tuple[int, str]] = []  # (iteration, status) of each recorded experiment
        self.spend_line = ""
        self.active: dict[int, Active] = {}
        self._lock = threading.Lock()

    def line(self, text: str) -> None:
        self.out(text)

    def started(self, iteration: int, commit: str, description: str, log_path: Path, budget_s: float) -> None:
        with self._lock:
            self.active[iteration] = Active(iteration, commit, description, log_path, budget_s, time.monotonic())

    def finished(self, iteration: int) -> None:
        with self._lock:
            self.active.pop(iteration, None)

    def recorded(self, status: str, val_bpb: float, iteration: int) -> None:
        with self._lock:
            self.statuses.append((iteration, status))
            if status == "keep":
                self.best = val_bpb

    @property
    def counts(self) -> StatusCounts:
        with self._lock:
            return status_counts(self.statuses)

    def spending(self, line: str) -> None:
        """The spend against its caps (spend.describe), for the panel's head."""
        self.spend_line = line

    def close(self) -> None:
        pass


class LiveReporter(Reporter):
    """A Rich live panel under the `[EXP]` lines, refreshed twice a second."""

    def __init__(self, tag: str, console=None):
        from rich.console import Console
        from rich.live import Live

        self.console = console or Console()
        super().__init__(self.console.print)
        self.tag = tag
        self.live = Live(get_renderable=self.render, console=self.console, refresh_per_second=2, transient=True)
        self.live.start()

    def line(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)

    def render(self):
        from rich.console import Group
        from rich.markup import escape
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        counts = self.counts
        with self._lock:
            active = list(self.active.values())
            best = self.best
        head = (f"[bold]{escape(self.tag)}[/] best val_bpb {'-' if best is None else f'{best:.6f}'}  "
                f"keep {counts.keep}  discard {counts.discard}  crash {counts.crash}"
                + (f"  [dim]{escape(self.spend_line)}[/]" if self.spend_line else ""))
        table = Table(expand=False, box=None, padding=(0, 1))
        for col in ("exp", "commit", "elapsed / budget", "", "step", "loss", "change"):
            table.add_column(col)
        now = time.monotonic()
        for a in sorted(active, key=lambda a: a.iteration):
            elapsed = now - a.started
            step = last_step(a.log_path)
            table.add_row(str(a.iteration), a.commit[:7], f"{elapsed:5.0f}s / {a.budget_s:.0f}s",
                          ProgressBar(total=a.budget_s, completed=min(elapsed, a.budget_s), width=24),
                          "-" if step is None else str(step[0]), "-" if step is None else f"{step[1]:.4f}",
                          Text(a.description[:50]))  # a proposer's words: plain text, never Rich markup
        return Group(Text.from_markup(head), table)

    def close(self) -> None:
        self.live.stop()
