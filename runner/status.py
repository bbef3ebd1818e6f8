"""`runner status`: the experiments running on this engine now, from container labels, joined
with each run's ledger (its repo path is a label) for the best result so far."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sandbox import naming
from sandbox.backend import Executor

from .ledger import Ledger, RowStatus


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
    best_val_bpb: float | None
    kept: int


def _elapsed(started_at: str) -> float:
    started = datetime.fromisoformat(started_at[:26].rstrip("Z") + "+00:00") if started_at else None
    return (datetime.now(timezone.utc) - started).total_seconds() if started else 0.0


def running(executor: Executor, tag: str | None = None) -> list[Running]:
    labels = {naming.L_TAG: tag} if tag else {}
    out = []
    for run in executor.running(**labels):
        lab = run.labels
        repo = lab.get(naming.L_REPO, "")
        best, kept = None, 0
        if repo and Path(repo).is_dir():
            keeps = [e.row.val_bpb for e in Ledger(Path(repo), lab.get(naming.L_TAG, "")).experiments()
                     if e.status == RowStatus.KEEP]
            best, kept = (keeps[-1] if keeps else None), len(keeps)
        out.append(Running(
            tag=lab.get(naming.L_TAG, ""), iteration=int(lab.get(naming.L_ITERATION, "0") or 0),
            commit=lab.get(naming.L_COMMIT, ""), elapsed_s=_elapsed(run.started_at),
            gpus=lab.get(naming.L_GPUS, ""), user=lab.get(naming.L_USER, ""), owner=lab.get(naming.L_OWNER, ""),
            repo=repo, best_val_bpb=best, kept=kept,
        ))
    return sorted(out, key=lambda r: (r.tag, r.iteration))
