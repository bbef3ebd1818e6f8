"""The research loop: setup, baseline, then propose -> guard -> commit -> run -> decide -> log,
until stopped. Resumable after any kill: the ledger is the truth, the branch is reset to the
last keep it records.

What is decided is runner/policy.py's (pure functions: the baseline's check, which results are
verified, keep or not, what follows); the threads, tickets and signals are the Scheduler's
(runner/scheduler.py). What is left here is the side effects around them: git, the ledger, the
proposer, the alerts.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sandbox.backend import SandboxError, SetupError
from sandbox.images import BuiltImage
from sandbox.spec import REASON_INTERRUPTED

from .config import RunConfig
from .data import check_data_dir, data_digest
from .engine import Engine, ExperimentRun, Slot
from .ledger import Ledger
from .records import (BaselineFailed, Confirming, ExperimentRecord, FixFailed, HarnessError, Interrupted, Lost,
                      NearMissConflict, Noise, NoiseFailed, NoiseRunFailed, NotifyFailed, ProposerErrored, Refused,
                      ResetOnResume, RowRestored, Row, RowStatus, SessionSummary, Start, Stopped, Swept,
                      VerificationUnavailable, VramCeiling, WallLimit)
from .notify import NOTIFY_FORCED_WAIT_S, Alert, Notifier
from .policy import (BaselineCheck, FollowUp, RunState, StatusCounts, cap_reached, confirm, decide, decide_baseline,
                     default_vram_ceiling_gb, duty_cycle, experiment_wall_limit_s, follow_up, needs_verification, pinned, prefetch_depth,
                     resumed_verify_mode, resumed_vram_ceiling_gb, seed_only_change, status_counts, unconfirmed)
from .progress import Reporter
from .proposers.base import Context, Proposal, Proposer, ProposerError, Summary
from .repo import EDITABLE, IN_SCOPE, GuardError, ResearchRepo, branch_name
from .reruns import load_noise, noise_floor, save_noise
from .scheduler import Scheduler
from .spend import Spend, describe, spent
from .summary import (STATUS_OK, VERDICT_FORGED, VERDICT_NONCAUSAL, VERDICT_OK, VERDICT_OVERFIT, VERDICT_REFUSED,
                      VERDICT_SEED_PINNED, VERDICT_UNNORMALISED, VERDICT_UNVERIFIED, judge, with_val_bpb)
from .text import HYPOTHESIS_MAX_CHARS, block, one_line

KEEP, DISCARD, CRASH = RowStatus.KEEP, RowStatus.DISCARD, RowStatus.CRASH
LOG_TAIL_FOR_FIX = 50  # lines of a crashed run's output offered to the proposer
PROPOSER_BACKOFF_S = 15  # first wait after a failed proposal; doubles, capped at 10 minutes
PROPOSER_MAX_ERRORS = 12  # failed proposals in a row (about 1.5 hours of backoff) before giving up
# An engine or NVML hiccup while an experiment runs: the experiment is run again after these
# waits (seconds); one that outlasts them all stops the night.
HARNESS_BACKOFF_S = (10, 60, 300)
MAX_REFUSED_IN_A_ROW = 10  # refused proposals in a row before the run stops: the proposer is broken
# The verifier's verdicts that make a `verification_refused` alert (overfit and seed_pinned are the runner's own).
REFUSING_VERDICTS = frozenset({VERDICT_UNVERIFIED, VERDICT_FORGED, VERDICT_NONCAUSAL, VERDICT_UNNORMALISED, VERDICT_REFUSED})
SECONDS_PER_HOUR = 3600


class LoopError(RuntimeError):
    """The loop cannot start or go on (baseline crashed, branch state wrong); the message says why."""


class ProposalRefused(Exception):
    """A proposal that will not be run: the guard refused it, or the proposer failed making it."""


def sanitized(proposal: Proposal) -> Proposal:
    """A proposal's words, through the one sanitiser, before anything prints, commits or records them."""
    return dataclasses.replace(proposal, description=one_line(proposal.description) or "(no description)",
                               hypothesis=one_line(proposal.hypothesis, HYPOTHESIS_MAX_CHARS))


@dataclass
class Job:
    """One experiment on its way: proposed on `parent`, committed off-branch, its sources read
    from git (under the lock); its image is built by the worker that runs it (outside the lock)."""

    iteration: int
    parent: str
    proposal: Proposal
    commit: str
    sources: tuple[bytes, bytes]      # ResearchRepo.snapshot_tars(commit)
    image: BuiltImage | None = None
    retry_fix: bool = True
    verifies: int | None = None  # the near-miss iteration this job re-applies
    seed: int = 0                # the runner's seed offset for this run (sandbox/hooks/seeds.py)
    runs: tuple = ()             # earlier runs of this commit, with other seeds: a would-be keep confirming


class Loop:
    def __init__(self, cfg: RunConfig, repo: ResearchRepo, engine: Engine, proposer: Proposer,
                 out: Reporter | Callable[[str], None] = print):
        """`out`: a Reporter (the live panel on a terminal), or a callable taking each line."""
        if not cfg.tag:
            raise LoopError("a run needs --tag")
        self.cfg = cfg
        self.tag = cfg.tag
        self.repo = repo
        self.engine = engine
        self.proposer = proposer
        self.reporter = out if isinstance(out, Reporter) else Reporter(out)
        self.out = self.reporter.line
        self.ledger = Ledger(repo.path, cfg.tag)
        self.state = RunState()
        self.scheduler = Scheduler()
        self.stop = self.scheduler.stop  # set by a signal, a failure, a cap; every thread watches it
        self.lock = threading.RLock()  # git, the ledger, the state: one worker at a time
        self.min_delta = 0.0
        self.started = time.monotonic()
        # auto verifies like on, unless the baseline shows this repo's evaluation cannot be replayed
        # (then it falls back to the runs' own numbers; on refuses to start instead)
        self.verify_mode = cfg.verify
        self.workers = 1
        self.spend = Spend()        # the tag's model tokens, every session's (read back from the ledger at setup)
        self.crashes_in_a_row = 0
        # Why the night ends: the first reason wins; finish() records it as the `stopped` event.
        self.stop_reason: str | None = None
        self.stop_cap: str | None = None
        self.failure: str | None = None  # a worker's or the proposer's exception (its own `stopped` event)
        self.notifier = Notifier(cfg.notify, cfg.tag, on_failure=self._notify_failed)

    # --- setup -----------------------------------------------------------------------

    def setup(self, resume: bool) -> None:
        branch = branch_name(self.tag)
        if resume:
            if not self.repo.branch_exists(branch) or not self.ledger.exists():
                raise LoopError(f"nothing to resume for tag {self.tag}: start it without --resume")
        else:
            if self.repo.branch_exists(branch):
                raise LoopError(f"branch {branch} exists: continue it with --resume, or pick a new --tag")
            self.repo.ensure_clean()
        # Readiness before the branch or the ledger changes: in-scope files that are committed
        # text (no links to host files), data, the engine, the trainer image.
        for name in IN_SCOPE:
            self.repo.committed_text(name)
        check_data_dir(self.cfg.data_dir)
        self.engine.trainer()
        self.engine.time_budget_s()  # read from git here, before any worker thread asks
        self._sweep()
        self.min_delta = self._min_delta()
        if resume:
            self.repo.checkout(branch)
            self.ledger.open()
            self._recover()
        else:
            self.repo.create_branch(branch)
            self.ledger.open()
        self.spend = spent(self.ledger.read())
        self.ledger.event(Start(resume=resume, branch=branch, head=self.repo.head().sha, proposer=self.proposer.name,
                                config=self.cfg.to_dict(), min_delta=self.min_delta, workers=self.workers))
        self.reporter.spending(self._spend_line())

    def _min_delta(self) -> float:
        if self.cfg.min_delta != "auto":
            return float(self.cfg.min_delta)
        noise = load_noise(self.ledger)
        return 0.0 if noise is None else 2 * noise["spread"]  # measured after the baseline otherwise

    def _recover(self) -> None:
        """Rebuild the state from the ledger; put the branch back at the last keep.

        A kill can leave: an experiment committed but not recorded (reset away and proposed
        again), a recorded experiment whose results.tsv row was not yet written (row added).
        """
        for row in self.ledger.missing_rows():
            self.ledger.append_row(row)
            self.ledger.event(RowRestored(commit=row.commit))
        self.state = RunState.recover(self.ledger.experiments())
        self.verify_mode = resumed_verify_mode(self.cfg.verify, self.ledger.last(VerificationUnavailable) is not None)
        ceiling = self.ledger.last(VramCeiling)
        ceiling_gb = resumed_vram_ceiling_gb(None if ceiling is None else ceiling.gb, self.cfg.limits.vram_gb)
        if ceiling_gb is not None:
            self.engine.vram_ceiling_gb = ceiling_gb  # the default ceiling outlives the stop
        if (wall := self.ledger.last(WallLimit)) is not None:  # so does the measured deadline (this config's allowance)
            self.engine.wall_limit_s = experiment_wall_limit_s(wall.baseline_wall_s, self.engine.time_budget_s(),
                                                               self.cfg.limits.overtime_s, self.workers)
        if self.state.best_commit is None:
            return  # killed before the baseline finished: run it again
        head = self.repo.head().sha
        if head != self.state.best_commit:
            self.ledger.event(ResetOnResume(abandoned=head, to=self.state.best_commit))
            self.repo.reset_hard(self.state.best_commit)

    def _sweep(self) -> None:
        """Remove containers that this user's dead runners left (any tag; never another user's)."""
        swept = self.engine.executor.cleanup()
        if swept:
            self.out(f"removed {len(swept)} container(s) left by dead runners")
            if self.ledger.events_path.parent.exists():
                self.ledger.event(Swept(containers=swept))

    # --- one experiment --------------------------------------------------------------

    def _read(self, name: str) -> str:
        """An in-scope file as committed at the branch head (never the work tree: see committed_text)."""
        return self.repo.committed_text(name)

    def context(self) -> Context:
        """Orientation for the proposer: the in-scope files, the last ~20 rows, the git log."""
        return Context(
            tag=self.tag,
            iteration=self.state.iteration + 1,
            train_py=self._read(EDITABLE),
            prepare_py=self._read("prepare.py"),
            program_md=self._read("program.md"),
            readme=self._read("README.md"),
            results_tail=self.ledger.results_text(20),
            git_log=[c.message.splitlines()[0] for c in self.repo.log(20)],
            best_val_bpb=self.state.best_val_bpb,
            experiments_since_keep=self.state.since_keep,
            widen=self.state.since_keep > self.cfg.stale_after,
        )

    def _run(self, job: "Job | None", commit: str, iteration: int, log_path: Path | None = None,
             slot: Slot | None = None, seed: int | None = None, decides: bool = True) -> ExperimentRun:
        """One run of `commit` (a job's, else the baseline's); `decides`: False for a run whose
        number decides nothing (a noise rerun), which is then neither exported nor verified."""
        seed = (job.seed if job else 0) if seed is None else seed
        log_path = log_path or self.ledger.log_path(iteration, commit, seed)
        self.reporter.started(iteration, commit, job.proposal.description if job else "baseline", log_path,
                              self.engine.limits().time_budget_s)
        try:
            if job is not None and job.image is None:
                # A docker build takes seconds: never under the lock the other workers settle with.
                job.image = self.engine.experiment_image(job.commit, self.tag, self.engine.limits(),
                                                         data_digest(self.cfg.data_dir), sources=job.sources)
            run = self.engine.run_commit(commit, self.tag, log_path, iteration=iteration, stop=self.stop,
                                         image=job.image if job else None, slot=slot,
                                         export=decides and self.verify_mode != "off", seed=seed)
            if run.lost is not None:
                # Its node died (a cluster) and the engine ran it once more on a live node: an
                # event records the loss; the experiment is counted once, by that second try.
                with self.lock:
                    lost = dataclasses.replace(run, result=run.lost, outcome=judge(run.lost))
                    self.ledger.event(Lost(iteration=iteration, commit=commit, run=lost.record()))
            if decides and self._needs_verification(run, job):
                run = self.engine.verify(run, self.tag, iteration, stop=self.stop, slot=slot)
        finally:
            self.reporter.finished(iteration)
        if self.stop.is_set():
            with self.lock:
                self.repo.respawn_git()
        return run

    def _needs_verification(self, run: ExperimentRun, job: "Job | None") -> bool:
        """policy.needs_verification of `run` (the baseline's when `job` is None)."""
        with self.lock:
            best_val_bpb, min_delta = self.state.best_val_bpb, self.min_delta
        return needs_verification(self.verify_mode, run.outcome, baseline=job is None, confirming=bool(job and job.runs),
                                  stopped=self.stop.is_set(), best_val_bpb=best_val_bpb, min_delta=min_delta)

    def _record(self, iteration: int, run: ExperimentRun, status: RowStatus, description: str,
                proposal: Proposal | None, parent: str | None = None, verifies: int | None = None,
                earlier: tuple[ExperimentRun, ...] = ()) -> Row:
        """Log one experiment: its event (every run of it, `earlier` ones with other seeds first)
        and its results.tsv row (with `earlier` runs, val_bpb is their mean with `run`'s)."""
        outcome = run.outcome
        if earlier:  # before the tags: "idea (2 runs) [unconfirmed]"
            base, sep, tags = description.partition(" [")
            description = f"{base} ({len(earlier) + 1} runs){sep}{tags}"
        if outcome.status != STATUS_OK:
            description = f"{description} [{outcome.reason}]"
        elif outcome.verdict not in (None, VERDICT_OK):
            description = f"{description} [{outcome.verdict}]"
        row = Row(run.commit[:7], outcome.val_bpb, run.memory_gb, status, description)
        record = ExperimentRecord(
            iteration=iteration, commit=run.commit, row=row, outcome=outcome.status, reason=outcome.reason,
            metrics=outcome.metrics, run=run.record(),
            hypothesis=proposal.hypothesis if proposal else "", usage=proposal.usage if proposal else {},
            parent=parent, verifies=verifies, runs=tuple(r.record() for r in earlier),
        )
        self.ledger.record(record)
        self.reporter.recorded(status, row.val_bpb, iteration)
        self.out(row.exp_line(self.tag, iteration))
        self.state.training_s += record.training_s + sum(
            (r.outcome.metrics.training_seconds or 0.0) for r in earlier if r.outcome.metrics)
        self.reporter.spending(self._spend_line())
        self._alert_on(iteration, run, status, row)
        return row

    def _alert_on(self, iteration: int, run: ExperimentRun, status: RowStatus, row: Row) -> None:
        """The alerts one recorded experiment makes: a crash streak, a result the verifier refused.
        (A new best is alerted where a keep is decided.)"""
        self.crashes_in_a_row = self.crashes_in_a_row + 1 if status == CRASH else 0
        where = f"experiment {iteration} ({row.commit})"
        if status == CRASH:
            self.notifier.send("crash_streak", f"{self.tag}: {self.crashes_in_a_row} crashes in a row, the last "
                               f"{where}: {row.description}", streak=self.crashes_in_a_row,
                               iteration=iteration, commit=row.commit, reason=run.outcome.reason)
        if run.outcome.verdict in REFUSING_VERDICTS:
            self.notifier.send("verification_refused", f"{self.tag}: the verifier refused {where}: "
                               f"{run.outcome.verdict} ({one_line(run.outcome.detail, 200)}): {row.description}",
                               iteration=iteration, commit=row.commit, verdict=str(run.outcome.verdict))

    def _spent(self, usage: dict) -> None:
        """Count a proposal's tokens as the proposer hands it over (the caps see them at once;
        the ledger keeps them in the event that records the proposal)."""
        self.spend.add(usage)
        self.reporter.spending(self._spend_line())

    def _hours(self) -> float:
        return (time.monotonic() - self.started) / SECONDS_PER_HOUR

    def _spend_line(self) -> str:
        c = self.cfg
        return describe(self.spend, c.model, c.prices, c.max_cost_usd, c.max_total_tokens, self._hours(), c.max_hours)

    def baseline(self, slot: Slot | None = None) -> None:
        commit = self.repo.head().sha
        run = self._run(None, commit, 0, slot=slot)
        decision = decide_baseline(self.verify_mode, run.outcome, interrupted=run.result.reason == REASON_INTERRUPTED,
                                   peak_vram_mb=run.result.peak_vram_mb)
        if decision.check == BaselineCheck.INTERRUPTED:
            self.ledger.event(Interrupted(iteration=0, commit=commit, run=run.record()))
            return
        if decision.check == BaselineCheck.CRASHED:
            self.ledger.event(BaselineFailed(commit=commit, reason=run.outcome.reason, run=run.record()))
            raise LoopError(
                f"the baseline crashed ({run.outcome.reason}): the environment or data is broken, not the idea. "
                + (f"{run.outcome.detail}. " if run.outcome.detail else "")
                + f"Read {run.result.log_path}; last lines:\n{block(run.result.tail_lines(15))}"
            )
        if decision.check == BaselineCheck.WATCHDOG_BLIND:
            # The watchdog sampled GPUs the whole run and never saw the baseline's processes on
            # them: it is blind (a runner in its own PID namespace, a driver hiding processes),
            # and no ceiling it holds would ever fire.
            self.ledger.event(BaselineFailed(commit=commit, reason="watchdog_blind", run=run.record()))
            raise LoopError(
                "the VRAM watchdog saw no GPU memory of the baseline's processes on its GPUs, so it could enforce no "
                "VRAM ceiling: a runner in a container needs --pid host (see the README); if train.py does not use "
                "the GPU, pass --gpus none"
            )
        if decision.check == BaselineCheck.FALL_BACK:
            # This repo's evaluation cannot be replayed (another function name, an argument that
            # is not plain data): the night goes on with the runs' own numbers, and says so.
            self.verify_mode = decision.verify_mode
            self.ledger.event(VerificationUnavailable(why=run.outcome.detail))
            # stderr: the [EXP] stream on stdout stays one line per experiment
            print(f"verification unavailable ({one_line(run.outcome.detail, 200)}): keeps are decided by the runs' "
                  f"own val_bpb; set verify_target (now {self.cfg.verify_target}) to verify them", file=sys.stderr)
            run = dataclasses.replace(run, outcome=dataclasses.replace(run.outcome, verdict=None, detail="", self_reported=None))
        elif decision.check == BaselineCheck.UNVERIFIABLE:
            self.ledger.event(BaselineFailed(commit=commit, reason=run.outcome.verdict or "", run=run.record()))
            raise LoopError(
                f"the baseline's val_bpb could not be verified ({run.outcome.verdict}: {one_line(run.outcome.detail, 300)}): "
                f"set verify_target in runner.yaml to the repo's evaluation function (now {self.cfg.verify_target}) "
                "and verify_args to rebuild its arguments, or verify: auto to fall back to the runs' own numbers "
                "when the baseline cannot be verified"
            )
        self._record(0, run, KEEP, "baseline", None)
        self.state.best_commit, self.state.best_val_bpb = commit, run.outcome.val_bpb
        self.state.best_heldout_bpb = run.outcome.heldout_bpb
        self.state.baseline_val_bpb, self.state.baseline_heldout_bpb = run.outcome.val_bpb, run.outcome.heldout_bpb
        wall_limit_s = experiment_wall_limit_s(run.result.wall_s, self.engine.time_budget_s(), self.cfg.limits.overtime_s,
                                               self.workers)
        if wall_limit_s is not None:
            self.engine.wall_limit_s = wall_limit_s
            self.ledger.event(WallLimit(baseline_wall_s=run.result.wall_s, s=round(wall_limit_s, 3)))
        ceiling_gb = default_vram_ceiling_gb(run.result.peak_vram_mb, self.cfg.limits.vram_gb)
        if ceiling_gb is not None:
            self.engine.vram_ceiling_gb = ceiling_gb
            self.ledger.event(VramCeiling(gb=ceiling_gb))

    def measure_noise(self, slot: Slot | None = None) -> None:
        """Rerun the baseline, each time with another seed, until noise_runs more results are in
        (a crashed rerun is tried again, up to twice as many runs). The spread is the report's
        noise band, tells confirmation whether this repo moves with the seed (seed_pinned), and
        with min_delta auto sets min_delta to twice it. Without enough results nothing is saved,
        and the next start measures again."""
        baseline = next(e for e in self.ledger.experiments() if e.iteration == 0)
        values, attempts = [baseline.row.val_bpb], 0
        wanted = self.cfg.noise_runs
        while len(values) <= wanted and attempts < 2 * wanted and not self.stop.is_set():
            attempts += 1
            # Each rerun with another seed: the spread is what seeds alone move the number by.
            run = self._run(None, baseline.commit, 0, self.ledger.runs_dir / f"noise-{attempts}.log", slot=slot,
                            seed=attempts, decides=False)
            with self.lock:  # the accelerator trained: the night's duty cycle counts it
                self.state.training_s += (run.outcome.metrics.training_seconds or 0.0) if run.outcome.metrics else 0.0
            if run.outcome.status == STATUS_OK:
                values.append(run.outcome.val_bpb)
            elif run.result.reason != REASON_INTERRUPTED:
                self.ledger.event(NoiseRunFailed(attempt=attempts, reason=run.outcome.reason))
        if len(values) <= wanted:
            if not self.stop.is_set():
                self.ledger.event(NoiseFailed(results=len(values), attempts=attempts))
                self.out(f"noise floor: only {len(values)} baseline results in {attempts} reruns; min_delta stays "
                         f"{self.min_delta} until the next start measures again")
            return
        noise = noise_floor(values)
        save_noise(self.ledger, noise)
        if self.cfg.min_delta == "auto":
            self.min_delta = 2 * noise["spread"]
        self.ledger.event(Noise(**noise, min_delta=self.min_delta))
        self.out(f"noise floor: {len(values)} baseline runs (other seeds), spread {noise['spread']:.6f}; "
                 f"min_delta {self.min_delta:.6f}")

    # --- jobs: propose -> commit; then for each finished job: decide, record, follow up ---

    def _propose(self) -> Job | None:
        """Ask the proposer for the next experiment and commit it off-branch on the best commit.

        The proposer runs without the lock (a Claude call takes a while); git does not.

        Raises:
            ProposerError: passed on for the caller's backoff.
        """
        with self.lock:
            ctx = self.context()
            parent = self.state.best_commit
        try:
            proposal = sanitized(self.proposer.propose(ctx))
            with self.lock:
                self._spent(proposal.usage)
        except ProposerError as exc:
            self.ledger.event(ProposerErrored(iteration=ctx.iteration, error=one_line(str(exc), 500)))
            self.out(f"proposer: {one_line(str(exc))}")
            raise
        except Exception as exc:  # malformed model output the proposer choked on: a refusal, not the night's end
            reason = f"the proposer failed: {type(exc).__name__}: {one_line(str(exc))}"
            self.ledger.event(Refused(iteration=ctx.iteration, reason=reason, description=""))
            self.out(f"refused: {reason}")
            raise ProposalRefused(reason) from exc
        with self.lock:
            if self.stop.is_set():  # stopped while the proposer worked: drop the proposal
                self.repo.respawn_git()
                self.ledger.event(Interrupted(iteration=None, commit=None, description=proposal.description,
                                              usage=proposal.usage))
                return None
            return self._commit_job(parent, proposal)

    def _commit_job(self, parent: str, proposal: Proposal, **job_fields) -> Job | None:
        """Guard and commit `proposal` on `parent`, and read its sources. Caller holds the lock."""
        iteration = self.state.iteration + 1
        if seed_only_change(self.repo.committed_text("train.py", parent), proposal.train_py):
            reason = "the edit changes only a seed: the runner decides seeds (a keep is confirmed over several)"
            self.ledger.event(Refused(iteration=iteration, reason=reason, description=proposal.description,
                                      usage=proposal.usage))
            self.out(f"refused: {reason}")
            raise ProposalRefused(reason)
        try:
            commit = self.repo.commit_train_py(parent, proposal.train_py, f"{self.tag}: {proposal.description}",
                                               ref=f"refs/autoresearch/{self.tag}/{iteration}")
        except GuardError as exc:
            self.ledger.event(Refused(iteration=iteration, reason=str(exc), description=proposal.description,
                                      usage=proposal.usage))
            self.out(f"refused: {exc}")
            self.repo.reset_hard(self.state.best_commit)
            raise ProposalRefused(str(exc)) from None
        self.state.iteration = iteration
        return Job(iteration, parent, proposal, commit.sha, self.repo.snapshot_tars(commit.sha), **job_fields)

    def _run_job(self, job: Job, slot: Slot | None) -> ExperimentRun | None:
        """Run `job`, again after a harness error (the engine, NVML, a node: not the idea), with
        a backoff; None if stopped meanwhile.

        Raises:
            SandboxError: the harness kept failing through every backoff, or is set up wrong
                (SetupError: no retry would mend it).
        """
        for delay in (*HARNESS_BACKOFF_S, None):
            try:
                return self._run(job, job.commit, job.iteration, slot=slot)
            except SandboxError as exc:
                if delay is None or self.stop.is_set() or isinstance(exc, SetupError):
                    raise
                self.ledger.event(HarnessError(iteration=job.iteration, commit=job.commit,
                                               error=one_line(str(exc), 500), retry_in_s=delay))
                self.out(f"harness error on experiment {job.iteration} ({one_line(str(exc))}): running it again in {delay}s")
                if self.stop.wait(delay):
                    return None
        return None

    def _execute(self, job: Job, slot: Slot | None) -> None:
        """For one job and every follow-up it causes (a confirmation run, a re-applied near-miss,
        a crash fix): run it, decide and record it (policy.decide), follow up (policy.follow_up)."""
        while job is not None and not self.stop.is_set():
            run = self._run_job(job, slot)
            if run is None:
                return
            with self.lock:
                follow, next_job = self._settle(job, run)
            if follow == FollowUp.FIX and (self.stop.is_set() or self._cap(0)):
                follow = FollowUp.NONE  # stopped, or a cap ends the night: no new edit (and no tokens past a spend cap)
            job = self._fix(job, run) if follow == FollowUp.FIX else next_job

    def _fix(self, crashed: Job, run: ExperimentRun) -> Job | None:
        """Ask the proposer to fix `crashed` (its output's tail) and commit the fix as a job, or None."""
        with self.lock:
            ctx = self.context()
        try:
            fix = self.proposer.fix_crash(ctx, crashed.proposal, run.result.tail_lines(LOG_TAIL_FOR_FIX))
            if fix is not None:
                with self.lock:
                    self._spent(fix.usage)
        except Exception as exc:  # no fix this time (an API outage, a malformed reply); the night goes on
            self.ledger.event(FixFailed(iteration=crashed.iteration, error=one_line(f"{type(exc).__name__}: {exc}", 500)))
            fix = None
        with self.lock:
            if fix is None or self.stop.is_set():
                return None
            fix = sanitized(dataclasses.replace(fix, description=f"fix: {fix.description}"))
            # On the crashed edit's own parent: if the best moved meanwhile, the
            # near-miss path re-applies the fix rather than undoing the newer keep.
            try:
                return self._commit_job(crashed.parent, fix, retry_fix=False)
            except ProposalRefused:
                return None

    def _settle(self, job: Job, run: ExperimentRun) -> tuple[FollowUp, Job | None]:
        """Decide keep/discard/crash (policy), log it, and prepare what follows. Caller holds the lock.

        Returns:
            the follow-up (policy.follow_up), with the job to run next for CONFIRM (the same
            commit, another seed) and REAPPLY (the near-miss re-applied on the new best; None
            when it does not merge or the guard refuses it).
        """
        if run.result.reason == REASON_INTERRUPTED:
            self.ledger.event(Interrupted(iteration=job.iteration, commit=job.commit, run=run.record()))
            return FollowUp.NONE, None
        own, confirmation = run, None
        if job.runs:  # a confirmation run of a would-be keep
            if unconfirmed(own.outcome):
                self._record(job.iteration, own, DISCARD, f"{job.proposal.description} [unconfirmed]", job.proposal,
                             parent=job.parent, verifies=job.verifies, earlier=job.runs)
                self.proposer.observe(job.proposal, DISCARD, None)
                self.state.since_keep += 1
                self.repo.reset_hard(self.state.best_commit)
                return FollowUp.NONE, None
            baseline = load_noise(self.ledger)
            confirmation = confirm([r.outcome.val_bpb for r in (*job.runs, own)], baseline and baseline.get("values"))
            run = with_val_bpb(own, confirmation.mean)
        decision = decide(self.state, job, run.outcome, self.min_delta, self.cfg.heldout_rule)
        runs = (*job.runs, own)
        follow = follow_up(decision, len(runs), self.cfg.confirm_runs, self.stop.is_set())
        if follow == FollowUp.CONFIRM:
            # A would-be keep runs again, with another seed, before anything is decided.
            self.ledger.event(Confirming(iteration=job.iteration, commit=job.commit,
                                         values=[r.outcome.val_bpb for r in runs]))
            return follow, dataclasses.replace(job, runs=runs, seed=len(runs))
        decision = pinned(decision, confirmation)
        if decision.seed_pinned:
            run = dataclasses.replace(run, outcome=dataclasses.replace(
                run.outcome, verdict=VERDICT_SEED_PINNED, detail="its runs agree exactly under different seeds"))
        earlier = job.runs
        if decision.overfit:
            run = dataclasses.replace(run, outcome=dataclasses.replace(run.outcome, verdict=VERDICT_OVERFIT,
                                                                       detail=decision.overfit))
        outcome = run.outcome
        extra = {"parent": job.parent, "verifies": job.verifies}
        val = outcome.val_bpb if outcome.status == STATUS_OK else None
        if decision.status == KEEP:
            self._keep(job, run, earlier)
            return FollowUp.NONE, None
        self.state.since_keep += 1
        if follow == FollowUp.REAPPLY:
            self._record(job.iteration, run, DISCARD, f"{job.proposal.description} [near-miss]", job.proposal, **extra,
                         earlier=earlier)
            self.proposer.observe(job.proposal, DISCARD, val)
            return follow, self._reapply(job)
        description = job.proposal.description + (" [within the verifier's margin]" if decision.within_margin else
                                                  " [unconfirmed]" if confirmation and decision.status == DISCARD
                                                  and run.outcome.verdict in (None, VERDICT_OK) else "")
        self._record(job.iteration, run, decision.status, description, job.proposal, **extra, earlier=earlier)
        self.proposer.observe(job.proposal, decision.status, val)
        self.repo.reset_hard(self.state.best_commit)  # nothing of a failed edit stays in the work tree
        return follow, None

    def _keep(self, job: Job, run: ExperimentRun, earlier: tuple[ExperimentRun, ...]) -> None:
        """Record `run` as the new best, alert it, and advance the branch to it. Caller holds the lock."""
        outcome = run.outcome
        row = self._record(job.iteration, run, KEEP, job.proposal.description, job.proposal, parent=job.parent,
                           verifies=job.verifies, earlier=earlier)
        self.proposer.observe(job.proposal, KEEP, outcome.val_bpb)
        self.notifier.send("new_best", f"{self.tag}: new best val_bpb {outcome.val_bpb:.6f} "
                           f"({outcome.val_bpb - self.state.best_val_bpb:+.6f}) at experiment {job.iteration} "
                           f"({row.commit}): {row.description}", iteration=job.iteration, commit=row.commit,
                           val_bpb=outcome.val_bpb, previous_val_bpb=self.state.best_val_bpb)
        self.state.best_commit, self.state.best_val_bpb = job.commit, outcome.val_bpb
        if outcome.heldout_bpb is not None:  # a keep without a held-out figure never switches the rule off
            self.state.best_heldout_bpb = outcome.heldout_bpb
        self.state.since_keep = 0
        self.repo.reset_hard(job.commit)  # the branch advances to the keep

    def _reapply(self, job: Job) -> Job | None:
        """A near-miss's edit merged onto the new best, committed as a job to verify it; None when
        it does not merge (an event says so) or the guard refuses it. Caller holds the lock."""
        merged = self.repo.merge_train_py(job.parent, self.state.best_commit, job.commit)
        if merged is None:
            self.ledger.event(NearMissConflict(iteration=job.iteration, commit=job.commit))
            return None
        # usage {}: its tokens were counted with the near-miss itself
        again = dataclasses.replace(job.proposal, train_py=merged, usage={},
                                    description=f"{job.proposal.description} (re-applied)")
        try:
            return self._commit_job(self.state.best_commit, again, verifies=job.iteration, retry_fix=False)
        except ProposalRefused:
            return None

    # --- the whole run ---------------------------------------------------------------

    def run(self, resume: bool = False, slots: list[Slot] | None = None) -> Summary:
        """Setup, baseline, experiments until stopped or max_experiments; then the summary.

        Args:
            slots: one per parallel worker (GPUs, CPUs); None or one slot = sequential.
        """
        restore = self.scheduler.install_signal_handlers(self._signalled)
        self.started = time.monotonic()
        slots = slots or [None]
        self.workers = len(slots)
        self.notifier.start(digest=self._digest)
        close_wait_s = None
        try:
            self.setup(resume)
            # The baseline and its reruns run in a worker's slot, as every experiment does: its
            # GPU peak (the default VRAM ceiling) and its speed are measured on the same share.
            if self.state.best_commit is None and not self.stop.is_set():
                self.baseline(slots[0])
            if (self.cfg.noise_runs and self.state.best_commit is not None and not self.stop.is_set()
                    and load_noise(self.ledger) is None):
                self.measure_noise(slots[0])
            failure = None
            if self.state.best_commit is not None and not self.stop.is_set():
                errors = [0, 0]  # proposer errors, refused proposals: in a row
                failure = self.scheduler.run(slots, prefetch_depth(self.cfg.prefetch, self.proposer.name, len(slots)),
                                             propose=lambda: self._next_job(errors), execute=self._execute,
                                             capped=self._cap, on_failure=self._failed)
            summary = self.finish(len(slots))
            if failure is not None:
                who, exc = failure
                raise LoopError(f"the run stopped: {who} failed: {exc.__class__.__name__}: {exc} "
                                f"(events: {self.ledger.events_path})") from exc
            return summary
        except KeyboardInterrupt:
            # The second Ctrl-C: stop now. Workers may still be inside a run; remove this
            # runner's containers rather than leave them to a sweep that spares live owners.
            self.stop.set()
            self.engine.executor.cleanup(owner=self.engine.executor.owner)
            self.ledger.event(Interrupted(iteration=None, commit=None, forced=True))
            self.notifier.send("stopped", f"{self.tag}: stopped at once (forced: a second interrupt)", reason="forced")
            close_wait_s = NOTIFY_FORCED_WAIT_S
            raise
        except Exception as exc:
            self.notifier.send("failed", f"{self.tag}: the run failed: {type(exc).__name__}: {one_line(str(exc), 500)}",
                               error=one_line(f"{type(exc).__name__}: {exc}", 500))
            raise
        finally:
            restore()
            self.reporter.close()
            try:
                self._sweep()
            except SandboxError:
                pass  # the daemon went away; the next start sweeps
            self.notifier.close(*(() if close_wait_s is None else (close_wait_s,)))

    def _cap(self, proposed: int) -> bool:
        """Whether one of the night's caps (policy.cap_reached) is reached, `proposed` proposals into
        this session; the first one reached becomes the night's stop reason."""
        reached = cap_reached(self.cfg, self.spend, self._hours(), proposed)
        if reached is not None:
            self._end(reached[1], cap=reached[0])
        return reached is not None

    def _end(self, reason: str, cap: str | None = None) -> None:
        """Note why the night ends (the first reason wins); finish() records and alerts it."""
        with self.lock:
            if self.stop_reason is None:
                self.stop_reason, self.stop_cap = reason, cap

    def _next_job(self, errors: list[int]) -> Job | None:
        """Propose until a job comes out; back off on proposer errors (an API outage must not
        end a night's run). Returns None when stopped, out of patience, or after a refused
        proposal (it counts as proposed).

        Raises:
            LoopError: MAX_REFUSED_IN_A_ROW proposals in a row were refused: the proposer is broken.
        """
        while not self.stop.is_set():
            try:
                job = self._propose()
                errors[0] = errors[1] = 0
                return job
            except ProposalRefused as exc:
                errors[1] += 1
                if errors[1] >= MAX_REFUSED_IN_A_ROW:
                    raise LoopError(f"{errors[1]} proposals in a row were refused; the last: {exc}") from None
                return None
            except ProposerError:
                errors[0] += 1
                if errors[0] >= PROPOSER_MAX_ERRORS:
                    self._end(f"proposer failed {errors[0]} times in a row")
                    self.stop.set()
                    return None
                self.stop.wait(min(PROPOSER_BACKOFF_S * 2 ** (errors[0] - 1), 600))
        return None

    def _failed(self, who: str, exc: BaseException) -> None:
        """The first thread that raised (the scheduler has stopped the others): its own `stopped` event."""
        self.failure = f"{who} failed: {exc.__class__.__name__}: {exc}"
        self.ledger.event(Stopped(reason=self.failure))

    def finish(self, workers: int = 1) -> Summary:
        """Record why the night ended (the `stopped` event, unless a failure recorded its own) and
        the summary; print the summary and alert it."""
        with self.lock:  # a proposer thread may still be using git
            if self.stop.is_set():
                self.repo.respawn_git()
            experiments = self.ledger.experiments()
            context = self.context()
        reason = self.stop_reason or "stop requested"
        if self.failure is None:
            self.ledger.event(Stopped(reason=reason, cap=self.stop_cap))
        summary = self.proposer.summarize(context, [e.row for e in experiments])
        self.spend.add(summary.usage)
        # The ledger keeps both to the millisecond; the duty cycle is computed from what it keeps,
        # so `runner report` (which reads them back) says the same figure on a short night too.
        wall_s, training_s = round(time.monotonic() - self.started, 3), round(self.state.training_s, 3)
        duty = duty_cycle(training_s, wall_s, workers) or 0.0
        counts = status_counts((e.iteration, e.status) for e in experiments)
        self.ledger.event(SessionSummary(
            experiments=len(experiments), best_commit=self.state.best_commit,
            best_val_bpb=None if math.isinf(self.state.best_val_bpb) else self.state.best_val_bpb,
            trajectory=summary.trajectory, next_ideas=summary.next_ideas, usage=summary.usage,
            wall_s=wall_s, training_s=training_s, workers=workers, duty_cycle=round(duty, 4)))
        self.out(format_summary(self.tag, counts, self.state, summary, duty, stopped=reason, spend=self._spend_line()))
        if self.failure is None:
            self.notifier.send("cap" if self.stop_cap else "stopped",
                               f"{self.tag}: stopped ({reason}). {counts}; {self._best_text()}; {self._spend_line()}",
                               reason=reason, cap=self.stop_cap, experiments=counts.tried, keeps=counts.keep,
                               best_val_bpb=None if math.isinf(self.state.best_val_bpb) else self.state.best_val_bpb)
        return summary

    def _best_text(self) -> str:
        if self.state.best_commit is None:
            return "no baseline yet"
        return f"best val_bpb {self.state.best_val_bpb:.6f} ({self.state.best_commit[:7]})"

    def _digest(self) -> Alert:
        """The daily digest (notify digest_at), from the ledger: the delivery thread calls it."""
        counts = status_counts((e.iteration, e.status) for e in self.ledger.experiments(damaged=[]))
        return Alert("digest", f"{self.tag} digest: {counts}; {self._best_text()}; {self._spend_line()}",
                     {"experiments": counts.tried, "keeps": counts.keep})

    def _notify_failed(self, target: str, kind: str, error: str) -> None:
        """An alert that did not go out: said on stderr and in events.jsonl (if the run has one); the night goes on."""
        print(f"notify: {kind} alert to {target} failed: {error}", file=sys.stderr)
        if self.ledger.events_path.exists():
            self.ledger.event(NotifyFailed(target=target, alert=kind, error=error))

    def _signalled(self, name: str) -> None:
        """A first SIGINT/SIGTERM (the scheduler then stops the night): it is the stop reason unless
        one came first. Called in the signal handler: it takes no lock (the main thread may hold it)."""
        self.stop_reason = self.stop_reason or f"{name} received"

def format_summary(tag: str, counts: StatusCounts, state: RunState, summary: Summary, duty: float | None = None,
                   stopped: str | None = None, spend: str | None = None) -> str:
    """The summary printed when a night ends (Ctrl-C, a cap): counts as policy.StatusCounts says them."""
    best = "none" if state.best_commit is None else f"{state.best_commit[:7]} val_bpb {state.best_val_bpb:.6f}"
    lines = [
        "",
        f"=== autoresearch {tag}: {counts}",
        f"best: {best}" + ("" if duty is None else f"   accelerator duty cycle: {100 * duty:.1f}%"),
        *([f"stopped: {stopped}"] if stopped else []),
        *([f"spend: {spend}"] if spend else []),
        "trajectory:",
        *[f"  - {t}" for t in summary.trajectory],
        "next ideas:",
        *[f"  - {i}" for i in summary.next_ideas],
    ]
    return "\n".join(lines)
