"""`runner status`: the experiments running on this engine now, from container labels, joined
with each run's ledger (its repo path is a label) for the night so far: the counts, the best,
the duty cycle and the spend against its caps, as the Ctrl-C summary and the report say them."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sandbox import naming
from sandbox.backend import Executor

from .config import DEFAULT_PRICES_PER_MTOK
from .ledger import Ledger
from .policy import StatusCounts, nights_duty_cycle, status_counts
from .records import ExperimentRecord, RowStatus, SessionSummary, Start
from .spend import describe, spent

SECONDS_PER_HOUR = 3600


@dataclass(frozen=True)
class Night:
    """A tag's night so far, from its ledger alone."""

    counts: StatusCounts
    best_val_bpb: float | None
    duty_cycle: float | None  # policy.nights_duty_cycle over its sessions, a running one up to now
    spend: str                # spend.describe: tokens, cost and hours against the caps of its last start


@dataclass(frozen=True)
class Running:
    tag: str
    iteration: int
    commit: str
    elapsed_s: float
    gpus: str
    user: str
    owner: str
    repo: str
    night: Night | None       # None when the repo is not on this host


def night(repo: Path, tag: str, now: float | None = None) -> Night:
    """The night of `tag` in `repo` so far; `now` (epoch seconds) ends a session still running."""
    now = time.time() if now is None else now
    events = Ledger(repo, tag).read(damaged=[])  # status reads what it can
    experiments = [e for e in events if isinstance(e, ExperimentRecord)]
    keeps = [e.row.val_bpb for e in experiments if e.status == RowStatus.KEEP]
    # Sessions as the loop measures them: a summary closes one; a start without one is running.
    sessions, start, training_s = [], None, 0.0
    for e in events:
        if isinstance(e, Start):
            start, training_s = e, 0.0
        elif isinstance(e, ExperimentRecord) and start is not None:
            training_s += sum(r.training_seconds or 0.0 for r in (*e.runs, e.run))
        elif isinstance(e, SessionSummary) and e.wall_s is not None:
            sessions.append((e.training_s or 0.0, e.wall_s, e.workers or 1))
            start = None
    hours = None
    if start is not None and start.ts is not None:
        hours = (now - start.ts) / SECONDS_PER_HOUR
        sessions.append((training_s, now - start.ts, start.workers or 1))
    last = ([e for e in events if isinstance(e, Start)] or [Start()])[-1]
    number = (int, float)
    line = describe(spent(events), last.setting("model", str), last.setting("prices", dict) or DEFAULT_PRICES_PER_MTOK,
                    last.setting("max_cost_usd", number), last.setting("max_total_tokens", number), hours,
                    last.setting("max_hours", number))
    return Night(status_counts((e.iteration, e.status) for e in experiments), keeps[-1] if keeps else None,
                 nights_duty_cycle(sessions), line)


def _elapsed(started_at: str) -> float:
    started = datetime.fromisoformat(started_at[:26].rstrip("Z") + "+00:00") if started_at else None
    return (datetime.now(timezone.utc) - started).total_seconds() if started else 0.0


def running(executor: Executor, tag: str | None = None) -> list[Running]:
    labels = {naming.L_TAG: tag} if tag else {}
    out = []
    for run in executor.running(**labels):
        lab = run.labels
        repo = lab.get(naming.L_REPO, "")
        so_far = night(Path(repo), lab.get(naming.L_TAG, "")) if repo and Path(repo).is_dir() else None
        out.append(Running(
            tag=lab.get(naming.L_TAG, ""), iteration=int(lab.get(naming.L_ITERATION, "0") or 0),
            commit=lab.get(naming.L_COMMIT, ""), elapsed_s=_elapsed(run.started_at),
            gpus=lab.get(naming.L_GPUS, ""), user=lab.get(naming.L_USER, ""), owner=lab.get(naming.L_OWNER, ""),
            repo=repo, night=so_far,
        ))
    return sorted(out, key=lambda r: (r.tag, r.iteration))
