"""What the loop decides, with no I/O: the state a run carries, rebuilt from the ledger on
resume, the keep decision for one finished experiment, and the decisions around it (what the
baseline says about the night, which results are verified, what follows a result)."""

from __future__ import annotations

import ast
import math
import statistics
from dataclasses import dataclass, replace
from enum import Enum
from typing import TYPE_CHECKING, Iterable, Protocol

from sandbox.spec import REASON_LOST, REASON_UNWATCHED

from .records import ExperimentRecord, RowStatus
from .summary import VERDICT_OK, VERDICT_REFUSED, VERDICT_UNVERIFIED, Outcome, OutcomeStatus

if TYPE_CHECKING:
    from .config import RunConfig
    from .spend import Spend

# Crashes of the harness, not of the code: nothing in train.py for the proposer to fix.
HARNESS_REASONS = frozenset({REASON_LOST, REASON_UNWATCHED})


@dataclass
class RunState:
    iteration: int = 0                # experiments run so far (the baseline is 0)
    training_s: float = 0.0           # training seconds of the runs of this session (the duty cycle's)
    best_commit: str | None = None
    best_val_bpb: float = math.inf
    best_heldout_bpb: float | None = None  # the best's score on the held-out data, when the verifier had some
    baseline_val_bpb: float | None = None      # where the night started: the overfit rule compares its whole gain
    baseline_heldout_bpb: float | None = None
    since_keep: int = 0

    @classmethod
    def recover(cls, experiments: Iterable[ExperimentRecord]) -> "RunState":
        """The state after the recorded experiments (Ledger.experiments(), in order)."""
        state = cls()
        for e in experiments:
            state.iteration = max(state.iteration, e.iteration)
            if e.iteration == BASELINE_ITERATION and e.status == RowStatus.KEEP:
                state.baseline_val_bpb, state.baseline_heldout_bpb = e.row.val_bpb, e.run.heldout_val_bpb
            if e.status == RowStatus.KEEP:
                state.best_commit, state.best_val_bpb = e.commit, e.row.val_bpb
                heldout = e.run.heldout_val_bpb
                state.best_heldout_bpb = heldout if heldout is not None else state.best_heldout_bpb
                state.since_keep = 0
            else:
                state.since_keep += 1
        return state


def duty_cycle(training_s: float, wall_s: float, workers: int = 1) -> float | None:
    """The accelerator duty cycle, the one definition every view uses: seconds the workers spent
    training (what the runs report as training_seconds) over the seconds the night had for them
    (its wall time x workers). None before any time has passed."""
    return nights_duty_cycle([(training_s, wall_s, workers)])


def nights_duty_cycle(sessions: Iterable[tuple[float, float, int]]) -> float | None:
    """The duty cycle (see `duty_cycle`) of several sessions of one tag, each (training_s, wall_s,
    workers): all their training seconds over all the seconds they had. None before any time."""
    sessions = list(sessions)
    capacity = sum(wall_s * max(int(workers or 1), 1) for _, wall_s, workers in sessions)
    return sum(training_s for training_s, _, _ in sessions) / capacity if capacity > 0 else None


BASELINE_ITERATION = 0


@dataclass(frozen=True)
class StatusCounts:
    """keep / discard / crash over the experiments tried. The baseline (iteration 0) is not one:
    it is what every keep is measured against, so it is neither counted nor a keep."""

    keep: int = 0
    discard: int = 0
    crash: int = 0

    @property
    def tried(self) -> int:
        return self.keep + self.discard + self.crash

    @property
    def keep_rate(self) -> float:
        return self.keep / self.tried if self.tried else 0.0

    def __str__(self) -> str:
        """How every view says it: the Ctrl-C summary, `runner status`, the report, the alerts."""
        return (f"{self.tried} experiment{'' if self.tried == 1 else 's'} after the baseline ({self.keep} keep, "
                f"{self.discard} discard, {self.crash} crash), keep rate {100 * self.keep_rate:.1f}%")


def status_counts(experiments: Iterable[tuple[int, RowStatus]]) -> StatusCounts:
    """The one count of keeps, discards and crashes, from (iteration, results.tsv status) pairs."""
    tried = [status for iteration, status in experiments if iteration != BASELINE_ITERATION]
    return StatusCounts(*(sum(s == status for s in tried) for status in (RowStatus.KEEP, RowStatus.DISCARD, RowStatus.CRASH)))


def cap_reached(cfg: "RunConfig", spend: "Spend", hours: float, experiments: int) -> tuple[str, str] | None:
    """(the cap's key, why) for the first of the night's caps that is reached, or None.

    max_experiments and max_hours count this session; max_cost_usd and max_total_tokens count the
    tag's whole spend (a resumed night does not spend its cap again)."""
    cost = spend.cost_usd(cfg.model, cfg.prices)
    if cfg.max_cost_usd is not None and cost is not None and cost >= cfg.max_cost_usd:
        return "max_cost_usd", f"max_cost_usd reached: ${cost:.2f} spent of ${cfg.max_cost_usd:.2f}"
    if cfg.max_total_tokens is not None and spend.total_tokens >= cfg.max_total_tokens:
        return "max_total_tokens", f"max_total_tokens reached: {spend.total_tokens:,} of {cfg.max_total_tokens:,}"
    if cfg.max_hours is not None and hours >= cfg.max_hours:
        return "max_hours", f"max_hours reached: {hours:.2f} h of {cfg.max_hours:g} h"
    if cfg.max_experiments is not None and experiments >= cfg.max_experiments:
        return "max_experiments", f"max_experiments reached: {experiments} of {cfg.max_experiments}"
    return None


class JobLike(Protocol):
    parent: str          # the commit the edit was proposed on
    retry_fix: bool      # a crash may still be sent back to the proposer once


@dataclass(frozen=True)
class Decision:
    status: RowStatus
    near_miss: bool = False   # better than the best, but the best moved: re-apply on the new best
    fix: bool = False         # ask the proposer to fix this crash, once
    overfit: str = ""         # why the val gain does not hold on the held-out data (a discard)
    seed_pinned: bool = False  # a would-be keep whose runs ignore the runner's seeds (a discard; see `confirm`)
    within_margin: bool = False  # better than the best, but by no more than the verifier's margin (a discard)


@dataclass(frozen=True)
class HeldoutRule:
    """How much of a val gain must show on the held-out data (see `overfit`)."""

    tolerance: float = 0.02  # bpb the night's held-out gain may fall short of its val gain by, at most
    relative: float = 0.05   # ... plus this fraction of the val gain (a held-out text of another distribution)


def overfit(state: RunState, outcome: Outcome, min_delta: float, rule: HeldoutRule = HeldoutRule()) -> str:
    """Why `outcome` would be an overfit keep, or "" when it is not (or nothing tells).

    The held-out data is read by no experiment, so what a run gains there is real; what it gains
    on val alone may be memorised. Two rules, both by construction rather than by recognising an
    attack:

    - The keep must gain on held-out data too: more than half of min_delta (more than nothing
      when min_delta is 0) against the current best's held-out score. A result that memorised
      val, or a slice of it, gains nothing there, whatever its val.
    - The night's whole val gain, from the baseline to this result, must show on held-out data
      within max(min_delta, rule.tolerance) + rule.relative x that gain. Compared with the
      baseline, not the current best, the allowance is granted once per night, not again at
      every keep: memorised val rides on real gains by that much at most, and never ratchets.
    """
    if outcome.heldout_bpb is None or state.best_heldout_bpb is None:
        return ""
    val_gain = state.best_val_bpb - outcome.val_bpb
    heldout_gain = state.best_heldout_bpb - outcome.heldout_bpb
    if heldout_gain <= min_delta / 2:
        return (f"val_bpb improved by {val_gain:.6f} but held-out bpb by {heldout_gain:+.6f} "
                f"({outcome.heldout_bpb:.6f} against the best's {state.best_heldout_bpb:.6f}; a keep must gain "
                f"more than {min_delta / 2:.6f} there too)")
    if state.baseline_val_bpb is None or state.baseline_heldout_bpb is None:
        return ""
    night_val = state.baseline_val_bpb - outcome.val_bpb
    night_heldout = state.baseline_heldout_bpb - outcome.heldout_bpb
    allowed = max(min_delta, rule.tolerance) + rule.relative * max(night_val, 0.0)
    if night_val - night_heldout <= allowed:
        return ""
    return (f"since the baseline val_bpb improved by {night_val:.6f} but held-out bpb by {night_heldout:.6f}: "
            f"{night_val - night_heldout:.6f} of the val gain does not hold on data no experiment reads "
            f"(allowed {allowed:.6f})")


def decide(state: RunState, job: JobLike, outcome: Outcome, min_delta: float, heldout: HeldoutRule = HeldoutRule()) -> Decision:
    """Keep only a finite result better than the current best by more than `min_delta` and its
    verification's margin (what reading ahead inside the probe's tolerance could gain), proposed
    on that best, verified when it was verified at all (a verdict other than ok is a discard),
    and not an overfit on val (see `overfit`; a discard). If the best moved while it ran, it is
    a near-miss (a discard to re-apply and verify). A timeout is a discard; anything else that
    did not end with a result is a crash, sent back to the proposer to fix once unless the
    harness caused it (a node lost twice, NVML gone)."""
    if outcome.status == OutcomeStatus.OK and outcome.verdict not in (None, VERDICT_OK):
        return Decision(RowStatus.DISCARD)  # unverified, forged or noncausal: recorded, never kept
    better = outcome.status == OutcomeStatus.OK and outcome.val_bpb < state.best_val_bpb - min_delta
    improved = better and outcome.val_bpb + outcome.margin_bpb < state.best_val_bpb - min_delta
    if better and not improved:  # a read-ahead inside the verifier's tolerance could have made the difference
        return Decision(RowStatus.DISCARD, within_margin=True)
    if improved:
        why = overfit(state, outcome, min_delta, heldout)
        if why:
            return Decision(RowStatus.DISCARD, overfit=why)
        if job.parent == state.best_commit:
            return Decision(RowStatus.KEEP)
        return Decision(RowStatus.DISCARD, near_miss=True)
    if outcome.status in (OutcomeStatus.OK, OutcomeStatus.TIMEOUT):
        return Decision(RowStatus.DISCARD)
    return Decision(RowStatus.CRASH, fix=job.retry_fix and outcome.reason not in HARNESS_REASONS)


# --- seeds and confirmation ------------------------------------------------------------------


def _seedless(tree: ast.AST) -> str:
    """`tree` with every value that seeds something set to 0: the arguments of a call whose
    name says seed (torch.manual_seed(42), np.random.seed(SEED), Random(seed=7)) and what a
    name that says seed is assigned (SEED = 42)."""

    def says_seed(node) -> bool:
        name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""
        return "seed" in name.lower()

    class Zero(ast.NodeTransformer):
        def visit_Call(self, node):
            self.generic_visit(node)
            if says_seed(node.func):
                node.args = [_zero(a) for a in node.args]
            for kw in node.keywords:
                if kw.arg and "seed" in kw.arg.lower():
                    kw.value = _zero(kw.value)
            return node

        def visit_Assign(self, node):
            self.generic_visit(node)
            if any(says_seed(t) for t in node.targets):
                node.value = _zero(node.value)
            return node

    return ast.dump(Zero().visit(tree))


def _zero(node):
    return ast.Constant(0)  # whatever the seed is: a literal, a name, an expression


def seed_only_change(old: str, new: str) -> bool:
    """Whether `new` differs from `old` in seeds alone (comments and layout aside): the runner
    decides seeds (confirmation runs use several), so such an edit is no experiment."""
    try:
        before, after = ast.parse(old), ast.parse(new)
        return ast.dump(before) != ast.dump(after) and _seedless(before) == _seedless(after)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False  # not Python the guard accepts: it refuses the edit, with its own reason


@dataclass(frozen=True)
class Confirmation:
    """A would-be keep's runs, each with another seed, and what they say together."""

    values: tuple[float, ...]  # val_bpb of each run, the first (train.py's own seeds) first
    mean: float
    seed_pinned: bool          # far closer together under different seeds than the baseline's runs


# Runs under different seeds closer together than this fraction of the baseline's spread over
# seeds ignored the seeds. Two honest runs land that close by chance about 1% of the time (their
# difference is ~N(0, 2 sigma^2); the baseline's spread of three runs is ~1.7 sigma).
PINNED_FRACTION = 0.01


def confirm(values: list[float], baseline_values: list[float] | None) -> Confirmation:
    """The rule: a result is kept on the mean of its runs (the first and its confirmation runs,
    each with another seed), held to the same bar as the first was (better than the best by
    more than min_delta, which `auto` sets from the baseline's spread over seeds). Runs that
    agree far closer than the baseline's did (within PINNED_FRACTION of its spread; exactly,
    or with a jitter added to look varied) show a train.py that overrides the runner's seeds:
    confirmation could not test it, so it is not confirmed."""
    spread = max(baseline_values) - min(baseline_values) if baseline_values else 0.0
    close = len(values) > 1 and max(values) - min(values) <= PINNED_FRACTION * spread
    return Confirmation(tuple(values), statistics.fmean(values), spread > 0 and close)


def unconfirmed(outcome: Outcome) -> bool:
    """Whether a confirmation run leaves its would-be keep unconfirmed (a discard, whatever the
    earlier runs said): it ended without a result, or its result was not verified ok."""
    return outcome.status != OutcomeStatus.OK or outcome.verdict not in (None, VERDICT_OK)


def pinned(decision: Decision, confirmation: Confirmation | None) -> Decision:
    """`decision` after its confirmation: a keep whose runs are seed-pinned (see `confirm`) is a
    discard (seed_pinned); anything else is unchanged."""
    if decision.status == RowStatus.KEEP and confirmation is not None and confirmation.seed_pinned:
        return replace(decision, status=RowStatus.DISCARD, seed_pinned=True)
    return decision


# --- what follows a decided result -----------------------------------------------------------


class FollowUp(Enum):
    """What the worker does next with the experiment it just settled."""

    NONE = "none"        # nothing: the worker takes the next proposal
    CONFIRM = "confirm"  # run the would-be keep again, with another seed, before anything is decided
    REAPPLY = "reapply"  # a near-miss: re-apply its edit on the new best and run that
    FIX = "fix"          # ask the proposer to fix the crash, once


def follow_up(decision: Decision, runs: int, confirm_runs: int, stopped: bool) -> FollowUp:
    """What follows `decision` (the one `decide` made, before `pinned`), after `runs` runs of
    the experiment (its first and any confirmation runs): a would-be keep runs again until it
    has had confirm_runs more; a near-miss is re-applied; a crash `decide` marked fixable is sent
    back to the proposer. A stopped night starts nothing new (a near-miss is still re-applied:
    its job is committed, and the worker does not run it once stopped)."""
    if decision.status == RowStatus.KEEP and runs <= confirm_runs and not stopped:
        return FollowUp.CONFIRM
    if decision.near_miss:
        return FollowUp.REAPPLY
    if decision.fix and not stopped:
        return FollowUp.FIX
    return FollowUp.NONE


# --- what the baseline says about the night --------------------------------------------------

VRAM_CEILING_FACTOR = 2  # the default VRAM ceiling: this many times the baseline's peak (as NVML measured it)
MIB_PER_GIB = 1024


class BaselineCheck(Enum):
    """What the baseline's run says about the night."""

    INTERRUPTED = "interrupted"        # stopped while it ran: nothing recorded, the next start runs it again
    CRASHED = "crashed"                # no result: the environment or data is broken, not an idea
    WATCHDOG_BLIND = "watchdog_blind"  # the VRAM watchdog saw none of its GPU memory: no ceiling could fire
    UNVERIFIABLE = "unverifiable"      # verification asked for and the baseline not verified ok: nothing could be kept
    FALL_BACK = "fall_back"            # verify auto, and this repo's evaluation cannot be replayed: verify off
    ACCEPTED = "accepted"              # the best to beat


@dataclass(frozen=True)
class BaselineDecision:
    check: BaselineCheck
    verify_mode: str  # what the night verifies with from here on: "off" after FALL_BACK, else as it was


def decide_baseline(verify_mode: str, outcome: Outcome, interrupted: bool, peak_vram_mb: float | None) -> BaselineDecision:
    """Whether the night can start from this baseline, and with what verification.

    Args:
        verify_mode: the night's verify mode (auto | on | all | off | sample).
        outcome: the baseline's outcome, verified when verification was on.
        interrupted: the run was stopped by the runner (a signal) before it finished.
        peak_vram_mb: the watchdog's peak of the baseline's GPU memory; 0 means it sampled GPUs
            and saw none (it is blind), None that it watched no GPU.
    """
    def decided(check: BaselineCheck) -> BaselineDecision:
        return BaselineDecision(check, "off" if check == BaselineCheck.FALL_BACK else verify_mode)

    if interrupted:
        return decided(BaselineCheck.INTERRUPTED)
    if outcome.status != OutcomeStatus.OK:
        return decided(BaselineCheck.CRASHED)
    if peak_vram_mb == 0:
        return decided(BaselineCheck.WATCHDOG_BLIND)
    if verify_mode == "auto" and outcome.verdict in (VERDICT_UNVERIFIED, VERDICT_REFUSED):
        # Another function name, an argument that is not plain data: nothing in this repo could
        # be verified, so auto goes on with the runs' own numbers (on and all refuse instead).
        return decided(BaselineCheck.FALL_BACK)
    if verify_mode != "off" and outcome.verdict != VERDICT_OK:
        # Unverifiable here means unverifiable for every experiment: nothing could ever be kept.
        return decided(BaselineCheck.UNVERIFIABLE)
    return decided(BaselineCheck.ACCEPTED)


def resumed_verify_mode(configured: str, fell_back: bool) -> str:
    """The verify mode a resumed night runs with: auto stays off once an earlier session's
    baseline showed verification unavailable (`fell_back`, its event in the ledger)."""
    return "off" if configured == "auto" and fell_back else configured


def default_vram_ceiling_gb(peak_vram_mb: float | None, configured_gb: float | None) -> float | None:
    """The VRAM ceiling the night sets when runner.yaml sets none (`configured_gb` None):
    VRAM_CEILING_FACTOR times the baseline's peak. None when one is configured or no peak was
    measured (no GPU watched)."""
    if not peak_vram_mb or configured_gb is not None:
        return None
    return VRAM_CEILING_FACTOR * peak_vram_mb / MIB_PER_GIB


def resumed_vram_ceiling_gb(recorded_gb: float | None, configured_gb: float | None) -> float | None:
    """The default VRAM ceiling a resumed night keeps: the one an earlier session recorded,
    unless runner.yaml sets one now. None: leave the limits as runner.yaml makes them."""
    return recorded_gb if configured_gb is None else None


# Training past the budget: the budget is kept by train.py's own loop, which the host cannot see
# into. What the host measures is each run's wall time, container start to exit; after the
# baseline, no run may take longer than the baseline did by more than an allowance (a larger
# model's slower evaluation, a loaded host), or it is stopped as a timeout and decides nothing.
OVERTIME_FRACTION = 0.1  # of the training budget ...
OVERTIME_MIN_S = 10.0    # ... and at least this many seconds, and at least the baseline's own overhead
SHARED_HOST_FACTOR = 2   # several workers slow each other's startup and evaluation (measured: ~2x on a 2-core host)


def experiment_wall_limit_s(baseline_wall_s: float | None, budget_s: float, overtime_s: float | None,
                            workers: int = 1) -> float | None:
    """The deadline experiments run under after the baseline: its wall time plus `overtime_s`
    (runner.yaml limits.overtime_s), by default the largest of OVERTIME_FRACTION of the budget,
    OVERTIME_MIN_S and the baseline's time outside the budget (its startup and evaluation, which
    a loaded host stretches), SHARED_HOST_FACTOR times that with several workers. None without a
    measured baseline (the budget's deadline holds).

    Time past the budget is the one gain no held-out data shows (the model is honestly better),
    so it is bounded where it is measured: a train.py that ignores its budget trains at most
    this allowance longer than the baseline did, and further than that it is a timeout."""
    if not baseline_wall_s or baseline_wall_s <= 0:
        return None
    if overtime_s is not None:
        return baseline_wall_s + overtime_s
    allowance = max(OVERTIME_FRACTION * budget_s, OVERTIME_MIN_S, baseline_wall_s - budget_s)
    return baseline_wall_s + allowance * (SHARED_HOST_FACTOR if workers > 1 else 1)


# --- which results are verified --------------------------------------------------------------


def needs_verification(verify_mode: str, outcome: Outcome, *, baseline: bool, confirming: bool, stopped: bool,
                       best_val_bpb: float, min_delta: float) -> bool:
    """Verify where it decides: the baseline, a result that could be kept (better than the best
    by more than min_delta: a keep, or a near-miss to re-apply), and every confirmation run.
    A result that is not verified is never kept: the best only gets better, so one that could
    not be kept when it finished cannot be later. `verify: all` verifies every result; nothing
    is verified with verification off, without a result, or once the night is stopped."""
    if verify_mode == "off" or outcome.status != OutcomeStatus.OK or stopped:
        return False
    if verify_mode == "all" or baseline or confirming:
        return True
    return outcome.val_bpb < best_val_bpb - min_delta


# --- the harness around a run ----------------------------------------------------------------


def rerun_lost(reason: str, stopped: bool) -> bool:
    """Whether a run is run once more (on a fresh spec): its node died under it (a cluster
    backend restarts the worker on a live node) and the night is not stopping. The second try
    is what counts; a second loss is a crash that no fix is asked for (HARNESS_REASONS)."""
    return reason == REASON_LOST and not stopped


def prefetch_depth(configured: int | str, proposer: str, workers: int) -> int:
    """How many proposals are prepared beyond one per worker: runner.yaml's prefetch, or with
    auto one when an LLM proposal takes long enough to leave the accelerator idle (the claude
    proposer, or several workers to keep fed), else none."""
    if configured != "auto":
        return int(configured)
    return 1 if (proposer == "claude" or workers > 1) else 0
