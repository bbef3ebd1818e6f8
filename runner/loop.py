"""The research loop: setup, baseline, then propose -> guard -> commit -> run -> decide -> log,
until stopped. Resumable after any kill: the ledger is the truth, the branch is reset to the
last keep it records.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

from sandbox.backend import SandboxError
from sandbox.spec import REASON_INTERRUPTED

from .config import RunConfig
from .data import check_data_dir
from .engine import Engine, ExperimentRun
from .ledger import HEADER, Ledger, Row
from .reruns import load_noise, noise_floor, save_noise
from .proposers.base import Context, Proposal, Proposer, ProposerError, Summary
from .repo import EDITABLE, GuardError, ResearchRepo, branch_name
from .summary import STATUS_OK, STATUS_TIMEOUT

KEEP, DISCARD, CRASH = "keep", "discard", "crash"
LOG_TAIL_FOR_FIX = 50  # lines of a crashed run's output offered to the proposer
NOISE_RERUNS = 2  # extra baseline runs when --min-delta auto has no noise floor yet
PROPOSER_BACKOFF_S = 15  # first wait after a failed proposal; doubles, capped at 10 minutes
PROPOSER_MAX_ERRORS = 12  # failed proposals in a row (about 1.5 hours of backoff) before giving up


class LoopError(RuntimeError):
    """The loop cannot start or go on (baseline crashed, branch state wrong); the message says why."""


@dataclass
class State:
    iteration: int = 0                # experiments run so far (the baseline is 0)
    best_commit: str | None = None
    best_val_bpb: float = math.inf
    since_keep: int = 0


def exp_line(tag: str, iteration: int, row: Row) -> str:
    return (f"[EXP] {tag} {iteration} | commit:{row.commit} | val_bpb:{row.val_bpb:.6f} | "
            f"mem:{row.memory_gb:.1f}GB | status:{row.status} | {row.description}")


class Loop:
    def __init__(self, cfg: RunConfig, repo: ResearchRepo, engine: Engine, proposer: Proposer, out=print):
        if not cfg.tag:
            raise LoopError("a run needs --tag")
        self.cfg = cfg
        self.tag = cfg.tag
        self.repo = repo
        self.engine = engine
        self.proposer = proposer
        self.out = out
        self.ledger = Ledger(repo.path, cfg.tag)
        self.state = State()
        self.stop = threading.Event()
        self.min_delta = 0.0

    # --- setup -----------------------------------------------------------------------

    def setup(self, resume: bool) -> None:
        branch = branch_name(self.tag)
        if resume:
            if not self.repo.branch_exists(branch) or not self.ledger.exists():
                raise LoopError(f"nothing to resume for tag {self.tag}: start it without --resume")
            self.repo.checkout(branch)
        else:
            if self.repo.branch_exists(branch):
                raise LoopError(f"branch {branch} exists: continue it with --resume, or pick a new --tag")
            self.repo.ensure_clean()
        # Readiness before anything changes: Docker, base and trainer images, data.
        check_data_dir(self.cfg.data_dir)
        self.engine.trainer()
        self._sweep()
        self.min_delta = self._min_delta()
        if resume:
            self.ledger.open()
            self._recover()
        else:
            self.repo.create_branch(branch)
            self.ledger.open()
        self.ledger.event("start", resume=resume, branch=branch, head=self.repo.head().sha,
                          proposer=self.proposer.name, config=self.cfg.to_dict(), min_delta=self.min_delta)

    def _min_delta(self) -> float:
        if self.cfg.min_delta != "auto":
            return float(self.cfg.min_delta)
        noise = load_noise(self.repo.path, self.tag)
        return 0.0 if noise is None else 2 * noise["spread"]  # measured after the baseline otherwise

    def _recover(self) -> None:
        """Rebuild the state from the ledger; put the branch back at the last keep.

        A kill can leave: an experiment committed but not recorded (reset away and proposed
        again), a recorded experiment whose results.tsv row was not yet written (row added).
        """
        experiments = self.ledger.events("experiment")
        rows = self.ledger.rows()
        recorded = {(r.commit, r.status) for r in rows}
        for e in experiments:
            row = Row(**e["row"])
            if (row.commit, row.status) not in recorded:
                self.ledger.append_row(row)
                self.ledger.event("row_restored", commit=row.commit)
        for e in experiments:
            self.state.iteration = max(self.state.iteration, e["iteration"])
            if e["row"]["status"] == KEEP:
                self.state.best_commit = e["commit"]
                self.state.best_val_bpb = e["row"]["val_bpb"]
                self.state.since_keep = 0
            else:
                self.state.since_keep += 1
        if self.state.best_commit is None:
            return  # killed before the baseline finished: run it again
        head = self.repo.head().sha
        if head != self.state.best_commit:
            self.ledger.event("reset_on_resume", abandoned=head, to=self.state.best_commit)
            self.repo.reset_hard(self.state.best_commit)

    def _sweep(self) -> None:
        """Remove containers that this user's dead runners left (any tag; never another user's)."""
        swept = self.engine.sandbox.cleanup()
        if swept:
            self.out(f"removed {len(swept)} container(s) left by dead runners")
            if self.ledger.events_path.parent.exists():
                self.ledger.event("swept", containers=swept)

    # --- one experiment --------------------------------------------------------------

    def context(self) -> Context:
        rows_text = self.repo.path.joinpath("results.tsv").read_text().splitlines() if self.ledger.results_path.exists() else [HEADER]
        read = lambda name: (self.repo.path / name).read_text() if (self.repo.path / name).exists() else ""
        return Context(
            tag=self.tag,
            iteration=self.state.iteration + 1,
            train_py=read(EDITABLE),
            prepare_py=read("prepare.py"),
            program_md=read("program.md"),
            readme=read("README.md"),
            results_tail="\n".join([rows_text[0]] + rows_text[1:][-20:]),
            git_log=[c.message.splitlines()[0] for c in self.repo.log(20)],
            best_val_bpb=self.state.best_val_bpb,
            experiments_since_keep=self.state.since_keep,
            widen=self.state.since_keep > self.cfg.stale_after,
        )

    def _run(self, commit: str, iteration: int, log_path: Path | None = None) -> ExperimentRun:
        run = self.engine.run_commit(commit, self.tag, log_path or self.ledger.log_path(iteration, commit),
                                     iteration=iteration, stop=self.stop)
        if self.stop.is_set():
            self.repo.respawn_git()
        return run

    def _record(self, iteration: int, run: ExperimentRun, status: str, description: str,
                proposal: Proposal | None) -> Row:
        outcome = run.outcome
        if outcome.status != STATUS_OK:
            description = f"{description} [{outcome.reason}]"
        row = Row(run.commit[:7], outcome.val_bpb, run.memory_gb, status, description)
        # Event first: on resume a row missing from results.tsv is restored from it.
        self.ledger.event(
            "experiment", iteration=iteration, commit=run.commit, row=dataclasses.asdict(row),
            outcome=outcome.status, reason=outcome.reason,
            metrics=dataclasses.asdict(outcome.metrics) if outcome.metrics else None,
            run=run.to_dict(), hypothesis=proposal.hypothesis if proposal else "",
            usage=proposal.usage if proposal else {},
        )
        self.ledger.append_row(row)
        self.out(exp_line(self.tag, iteration, row))
        return row

    def baseline(self) -> None:
        commit = self.repo.head().sha
        run = self._run(commit, 0)
        if run.result.reason == REASON_INTERRUPTED:
            self._interrupted(0, commit, run)
            return
        if run.outcome.status != STATUS_OK:
            self.ledger.event("baseline_failed", commit=commit, reason=run.outcome.reason, run=run.to_dict())
            raise LoopError(
                f"the baseline crashed ({run.outcome.reason}): the environment or data is broken, not the idea. "
                f"Read {run.result.log_path}; last lines:\n{run.result.tail_lines(15)}"
            )
        self._record(0, run, KEEP, "baseline", None)
        self.state.best_commit, self.state.best_val_bpb = commit, run.outcome.val_bpb
        if self.cfg.min_delta == "auto" and load_noise(self.repo.path, self.tag) is None:
            self.measure_noise(run.outcome.val_bpb)

    def measure_noise(self, first: float) -> None:
        """Rerun the baseline NOISE_RERUNS more times; keeps must then beat 2 x the spread."""
        values = [first]
        for i in range(NOISE_RERUNS):
            run = self._run(self.state.best_commit, 0, self.ledger.runs_dir / f"noise-{i + 1}.log")
            if self.stop.is_set() or run.outcome.status != STATUS_OK:
                return
            values.append(run.outcome.val_bpb)
        noise = noise_floor(values)
        save_noise(self.repo.path, self.tag, noise)
        self.min_delta = 2 * noise["spread"]
        self.ledger.event("noise", **noise, min_delta=self.min_delta)
        self.out(f"noise floor: {len(values)} baseline runs, spread {noise['spread']:.6f} -> min_delta {self.min_delta:.6f}")

    def step(self) -> None:
        """One experiment: orient, propose, guard, commit, run, decide, log."""
        ctx = self.context()
        try:
            proposal = self.proposer.propose(ctx)
        except ProposerError as exc:
            self.ledger.event("proposer_error", iteration=ctx.iteration, error=str(exc))
            self.out(f"proposer: {exc}")
            raise
        if self.stop.is_set():  # stopped while the proposer worked: drop the proposal
            self.repo.respawn_git()
            self.ledger.event("interrupted", iteration=ctx.iteration, commit=None, description=proposal.description)
            return
        self._try(ctx, proposal, retry_fix=True)

    def _try(self, ctx: Context, proposal: Proposal, retry_fix: bool) -> None:
        iteration = ctx.iteration
        try:
            commit = self.repo.commit_train_py(proposal.train_py, f"{self.tag}: {proposal.description}")
        except GuardError as exc:
            self.ledger.event("refused", iteration=iteration, reason=str(exc), description=proposal.description)
            self.out(f"refused: {exc}")
            self.repo.reset_hard(self.state.best_commit)
            return
        self.state.iteration = iteration
        run = self._run(commit.sha, iteration)
        if run.result.reason == REASON_INTERRUPTED:
            self._interrupted(iteration, commit.sha, run)
            return
        outcome = run.outcome
        if outcome.status == STATUS_OK and outcome.val_bpb < self.state.best_val_bpb - self.min_delta:
            status = KEEP
        elif outcome.status in (STATUS_OK, STATUS_TIMEOUT):
            status = DISCARD
        else:
            status = CRASH
        self._record(iteration, run, status, proposal.description, proposal)
        self.proposer.observe(proposal, status, outcome.val_bpb if outcome.status == STATUS_OK else None)
        if status == KEEP:
            self.state.best_commit, self.state.best_val_bpb = commit.sha, outcome.val_bpb
            self.state.since_keep = 0
            return
        self.state.since_keep += 1
        self.repo.reset_hard(self.state.best_commit)
        if status == CRASH and retry_fix and not self.stop.is_set():
            fix = self.proposer.fix_crash(self.context(), proposal, run.result.tail_lines(LOG_TAIL_FOR_FIX))
            if fix is not None:
                fix = dataclasses.replace(fix, description=f"fix: {fix.description}")
                self._try(self.context(), fix, retry_fix=False)

    def _interrupted(self, iteration: int, commit: str, run: ExperimentRun) -> None:
        self.ledger.event("interrupted", iteration=iteration, commit=commit, run=run.to_dict())
        if self.state.best_commit:
            self.repo.reset_hard(self.state.best_commit)

    # --- the whole run ---------------------------------------------------------------

    def run(self, resume: bool = False) -> Summary:
        """Setup, baseline, experiments until stopped or max_experiments; then the summary."""
        restore = self._install_signal_handlers()
        try:
            self.setup(resume)
            if self.state.best_commit is None and not self.stop.is_set():
                self.baseline()
            done = 0
            errors_in_row = 0
            while not self.stop.is_set() and self.state.best_commit is not None:
                if self.cfg.max_experiments is not None and done >= self.cfg.max_experiments:
                    break
                try:
                    self.step()
                    errors_in_row = 0
                    done += 1
                except ProposerError:
                    # An API outage must not end a night's run: back off and ask again.
                    errors_in_row += 1
                    if errors_in_row >= PROPOSER_MAX_ERRORS:
                        self.ledger.event("stopped", reason=f"proposer failed {errors_in_row} times in a row")
                        break
                    self.stop.wait(min(PROPOSER_BACKOFF_S * 2 ** (errors_in_row - 1), 600))
            return self.finish()
        finally:
            restore()
            try:
                self._sweep()
            except SandboxError:
                pass  # the daemon went away; the next start sweeps

    def finish(self) -> Summary:
        if self.stop.is_set():
            self.repo.respawn_git()
        rows = self._rows_of_this_tag()
        summary = self.proposer.summarize(self.context(), rows)
        self.ledger.event("summary", experiments=len(rows), best_commit=self.state.best_commit,
                          best_val_bpb=None if math.isinf(self.state.best_val_bpb) else self.state.best_val_bpb,
                          trajectory=summary.trajectory, next_ideas=summary.next_ideas, usage=summary.usage)
        self.out(format_summary(self.tag, rows, self.state, summary))
        return summary

    def _rows_of_this_tag(self) -> list[Row]:
        return [Row(**e["row"]) for e in self.ledger.events("experiment")]

    def _install_signal_handlers(self):
        """First SIGINT/SIGTERM: stop after cleaning up the current run. Second: stop now."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            if self.stop.is_set():
                raise KeyboardInterrupt
            self.stop.set()
            self.out(f"\n{signal.Signals(signum).name}: stopping after the current run is cleaned up (again to force)")

        for s in previous:
            signal.signal(s, handler)
        return lambda: [signal.signal(s, h) for s, h in previous.items()]


def format_summary(tag: str, rows: list[Row], state: State, summary: Summary) -> str:
    counts = {s: sum(r.status == s for r in rows) for s in (KEEP, DISCARD, CRASH)}
    best = "none" if state.best_commit is None else f"{state.best_commit[:7]} val_bpb {state.best_val_bpb:.6f}"
    lines = [
        "",
        f"=== autoresearch {tag}: {len(rows)} experiments ({counts[KEEP]} keep, {counts[DISCARD]} discard, {counts[CRASH]} crash)",
        f"best: {best}",
        "trajectory:",
        *[f"  - {t}" for t in summary.trajectory],
        "next ideas:",
        *[f"  - {i}" for i in summary.next_ideas],
    ]
    return "\n".join(lines)
