"""The Proposer interface: research state in, the next train.py out. A proposer never touches
git or Docker; the loop does that with what it returns.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

from ..policy import status_counts


@dataclass(frozen=True)
class Proposal:
    train_py: str
    description: str           # one line, goes into the commit message and results.tsv
    hypothesis: str = ""
    usage: dict = field(default_factory=dict)  # token counts of the model calls that made it


@dataclass(frozen=True)
class Context:
    """What the loop shows a proposer before each experiment ("orient")."""

    tag: str
    iteration: int
    train_py: str
    prepare_py: str
    program_md: str
    readme: str
    results_tail: str          # the last ~20 rows of results.tsv, header included
    git_log: list[str]         # recent commit subjects on the branch, newest first
    best_val_bpb: float
    experiments_since_keep: int
    widen: bool                # stuck for a while: try bolder changes


@dataclass(frozen=True)
class Summary:
    trajectory: list[str]      # 3-5 bullets
    next_ideas: list[str]      # 3 ideas
    usage: dict = field(default_factory=dict)


class ProposerError(RuntimeError):
    """The proposer could not produce a proposal (API down past its retries, no edit made)."""


class Proposer(abc.ABC):
    name: str = "proposer"

    @abc.abstractmethod
    def propose(self, ctx: Context) -> Proposal:
        """The next experiment: a complete new train.py and a one-line description.

        Raises:
            ProposerError: nothing could be proposed this time; the loop records it and retries.
        """

    def fix_crash(self, ctx: Context, crashed: Proposal, log_tail: str) -> Proposal | None:
        """A corrected train.py for a run that crashed, or None to give up on it.

        `log_tail` is untrusted output of the crashed code.
        """
        return None

    def observe(self, proposal: Proposal, status: str, val_bpb: float | None) -> None:
        """Feedback after each experiment (keep, discard or crash)."""

    @abc.abstractmethod
    def summarize(self, ctx: Context, rows: list) -> Summary:
        """The end-of-run narrative: trajectory and next ideas."""


def trajectory_from_rows(rows: list) -> list[str]:
    """3-5 bullets from the ledger alone: the baseline, the latest improvements, the counts."""
    kept = [r for r in rows if r.status == "keep"]
    bullets = []
    if kept:
        bullets.append(f"baseline {kept[0].val_bpb:.6f} at {kept[0].commit}")
        steps = [f"{row.description}: {prev.val_bpb:.6f} -> {row.val_bpb:.6f}" for prev, row in zip(kept, kept[1:])]
        bullets += steps[-3:]
    # rows in the ledger's order: the first is the baseline (iteration 0), which policy.status_counts leaves out
    bullets.append(str(status_counts((i, r.status) for i, r in enumerate(rows))))
    return bullets
