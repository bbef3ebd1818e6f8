"""What the loop decides, with no I/O: the state a run carries, rebuilt from the ledger on
resume, and the keep decision for one finished experiment."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Protocol

from .ledger import ExperimentRecord, RowStatus
from .summary import VERDICT_OK, Outcome, OutcomeStatus


@dataclass
class RunState:
    iteration: int = 0                # experiments run so far (the baseline is 0)
    training_s: float = 0.0           # training seconds of the runs of this session (the duty cycle's)
    best_commit: str | None = None
    best_val_bpb: float = math.inf
    since_keep: int = 0

    @classmethod
    def recover(cls, experiments: Iterable[ExperimentRecord]) -> "RunState":
        """The state after the recorded experiments (Ledger.experiments(), in order)."""
        state = cls()
        for e in experiments:
            state.iteration = max(state.iteration, e.iteration)
            if e.status == RowStatus.KEEP:
                state.best_commit, state.best_val_bpb = e.commit, e.row.val_bpb
                state.since_keep = 0
            else:
                state.since_keep += 1
        return state


class JobLike(Protocol):
    parent: str          # the commit the edit was proposed on
    retry_fix: bool      # a crash may still be sent back to the proposer once


@dataclass(frozen=True)
class Decision:
    status: RowStatus
    near_miss: bool = False   # better than the best, but the best moved: re-apply on the new best
    fix: bool = False         # ask the proposer to fix this crash, once


def decide(state: RunState, job: JobLike, outcome: Outcome, min_delta: float) -> Decision:
    """Keep only a finite result better than the current best by more than `min_delta`, proposed
    on that best, and verified when it was verified at all (a verdict other than ok is a discard). If the best moved while it ran, it is a near-miss (a discard to re-apply and
    verify). A timeout is a discard; anything else that did not end with a result is a crash."""
    if outcome.status == OutcomeStatus.OK and outcome.verdict not in ("", VERDICT_OK):
        return Decision(RowStatus.DISCARD)  # unverified, forged or noncausal: recorded, never kept
    improved = outcome.status == OutcomeStatus.OK and outcome.val_bpb < state.best_val_bpb - min_delta
    if improved:
        if job.parent == state.best_commit:
            return Decision(RowStatus.KEEP)
        return Decision(RowStatus.DISCARD, near_miss=True)
    if outcome.status in (OutcomeStatus.OK, OutcomeStatus.TIMEOUT):
        return Decision(RowStatus.DISCARD)
    return Decision(RowStatus.CRASH, fix=job.retry_fix)
