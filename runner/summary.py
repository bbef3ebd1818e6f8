"""The one parser of a run's summary block, and the one judge of a finished run.

autoresearch's train.py ends by printing

    ---
    val_bpb:          0.997900
    training_seconds: 300.1
    ...

Only the last such block counts, only from a process that exited 0 on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from enum import StrEnum

from sandbox.hooks.verify_protocol import Verdict, VerifyReport
from sandbox.spec import REASON_EXIT, REASON_TIMEOUT, RunResult

from .text import one_line

class OutcomeStatus(StrEnum):
    """How a finished run came out (results.tsv's row status is ledger.RowStatus, decided from it)."""

    OK = "ok"
    CRASH = "crash"
    TIMEOUT = "timeout"


STATUS_OK, STATUS_CRASH, STATUS_TIMEOUT = OutcomeStatus.OK, OutcomeStatus.CRASH, OutcomeStatus.TIMEOUT

REASON_NO_SUMMARY = "no_summary"
REASON_BAD_METRIC = "bad_metric"
REASON_HUB_OFFLINE = "hub_offline"   # asked the offline Hugging Face Hub for something not prefetched

# huggingface_hub's words when an offline run asks for something its cache does not hold.
_HUB_OFFLINE_MARKS = ("outgoing traffic has been disabled", "LocalEntryNotFoundError", "OfflineModeIsEnabled")


@dataclass(frozen=True)
class Metrics:
    val_bpb: float
    training_seconds: float | None = None
    total_seconds: float | None = None
    peak_vram_mb: float | None = None
    mfu_percent: float | None = None
    total_tokens_M: float | None = None
    num_steps: int | None = None
    num_params_M: float | None = None
    depth: int | None = None
    extra: dict[str, str] = field(default_factory=dict)


_FLOAT_KEYS = {"val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent", "total_tokens_M", "num_params_M"}
_INT_KEYS = {"num_steps", "depth"}


def parse_summary(text: str) -> Metrics | None:
    """Metrics from the last `---` block of `text`, or None if there is none with a val_bpb.

    A val_bpb that is not a finite number yields a Metrics whose val_bpb is NaN, so the judge
    can tell "no block" from "a block with a broken number".
    """
    lines = text.splitlines()
    try:
        start = len(lines) - 1 - lines[::-1].index("---")
    except ValueError:
        return None
    values: dict[str, str] = {}
    for line in lines[start + 1:]:
        key, sep, value = line.partition(":")
        if not sep or not key.strip() or " " in key.strip():
            break
        values[key.strip()] = value.strip()
    if "val_bpb" not in values:
        return None
    kwargs: dict = {"extra": {}}
    for key, raw in values.items():
        if key in _FLOAT_KEYS:
            kwargs[key] = _number(raw, float)
        elif key in _INT_KEYS:
            kwargs[key] = _number(raw, int)
        else:
            kwargs["extra"][key] = raw
    if kwargs.get("val_bpb") is None:
        kwargs["val_bpb"] = math.nan
    return Metrics(**kwargs)


def _number(raw: str, kind):
    try:
        value = kind(float(raw)) if kind is int else float(raw)
    except (ValueError, OverflowError):
        return None
    return value


@dataclass(frozen=True)
class Outcome:
    """A finished run as the loop sees it: status ok|crash|timeout, why, and the metrics."""

    status: OutcomeStatus
    reason: str
    metrics: Metrics | None
    detail: str = ""    # what to do about the reason, where the runner can say (see engine)
    verdict: Verdict | None = None  # None = not verified (only Verdict.OK may be kept)
    self_reported: float | None = None  # the run's own val_bpb, when a verified one replaced it
    heldout_bpb: float | None = None    # the verifier's evaluation on the held-out data (verify_data), if any
    margin_bpb: float = 0.0             # what a read-ahead inside the verifier's tolerance could gain
                                        # (a keep must beat the best by more)

    def __post_init__(self):
        # Typed whoever made it: "ok" becomes OutcomeStatus.OK, "" no verdict (anything else a ValueError).
        object.__setattr__(self, "status", OutcomeStatus(self.status))
        object.__setattr__(self, "verdict", Verdict(self.verdict) if self.verdict else None)

    @property
    def val_bpb(self) -> float:
        return self.metrics.val_bpb if self.status == STATUS_OK and self.metrics else 0.0


def with_val_bpb(run, val_bpb: float):
    """`run` (an ExperimentRun) standing for several runs of its commit: their mean val_bpb."""
    outcome = run.outcome
    return replace(run, outcome=replace(outcome, metrics=replace(outcome.metrics, val_bpb=val_bpb)))


def judge(result: RunResult) -> Outcome:
    """Decide what a run produced. The number only counts from a clean exit with a finite val_bpb."""
    if result.reason == REASON_TIMEOUT:
        return Outcome(STATUS_TIMEOUT, REASON_TIMEOUT, None)
    if result.reason or result.exit_code != 0:
        if result.reason in ("", REASON_EXIT) and any(mark in result.output_tail for mark in _HUB_OFFLINE_MARKS):
            return Outcome(STATUS_CRASH, REASON_HUB_OFFLINE, None)
        return Outcome(STATUS_CRASH, result.reason or "exit_code", None)
    metrics = parse_summary(result.output_tail)
    if metrics is None:
        return Outcome(STATUS_CRASH, REASON_NO_SUMMARY, None)
    if not math.isfinite(metrics.val_bpb) or metrics.val_bpb <= 0:
        return Outcome(STATUS_CRASH, REASON_BAD_METRIC, metrics)
    return Outcome(STATUS_OK, "", metrics)


def memory_gb(result: RunResult) -> float:
    """Peak memory of the run in GB: NVML's VRAM peak on a GPU, else the container's RAM peak.

    Measured by the host, never taken from the run's own log.
    """
    if result.peak_vram_mb:
        return round(result.peak_vram_mb / 1024, 1)
    if result.peak_mem_bytes:
        return round(result.peak_mem_bytes / 1024**3, 1)
    return 0.0


VERDICT_OK, VERDICT_UNVERIFIED, VERDICT_FORGED, VERDICT_NONCAUSAL = Verdict.OK, Verdict.UNVERIFIED, Verdict.FORGED, Verdict.NONCAUSAL
VERDICT_UNNORMALISED, VERDICT_REFUSED, VERDICT_OVERFIT = Verdict.UNNORMALISED, Verdict.REFUSED, Verdict.OVERFIT
VERDICT_SEED_PINNED = Verdict.SEED_PINNED
DETAIL_MAX_CHARS = 300  # a verdict's detail, as stored and printed


def apply_verification(outcome: Outcome, report: VerifyReport | None, tolerance: float) -> Outcome:
    """The outcome once trusted code has evaluated the exported model.

    Args:
        report: the verifier's report (already checked to carry this verification's secret),
            or None when there was nothing to verify (the run bypassed or broke the export hook).
        tolerance: the largest relative difference between the self-reported and the verified
            val_bpb that is not a forgery.

    Returns:
        verdict ok with the verified val_bpb as the metric (the self-reported one kept beside it,
        the held-out figure when there is one); else the verifier's verdict (unverified,
        refused, noncausal; unnormalised from older verifiers) or forged, with a detail fit to
        print. Only ok is kept.
    """
    if outcome.status != STATUS_OK or outcome.metrics is None:
        return outcome
    claimed = outcome.metrics.val_bpb
    if report is None:
        report = VerifyReport.unverified("no exported model: the evaluation function was bypassed or the export failed")
    detail = one_line(report.why, DETAIL_MAX_CHARS)
    if report.val_bpb is None:
        verdict = report.verdict if report.verdict != Verdict.OK else Verdict.UNVERIFIED
        return replace(outcome, verdict=verdict, detail=detail or "the verifier gave no number", self_reported=claimed)
    verified = float(report.val_bpb)
    verified_outcome = replace(outcome, metrics=replace(outcome.metrics, val_bpb=verified), self_reported=claimed,
                               heldout_bpb=report.heldout_bpb, detail=detail, margin_bpb=report.margin_bpb or 0.0)
    if report.verdict != Verdict.OK:
        return replace(verified_outcome, verdict=report.verdict)
    if not math.isfinite(verified) or abs(claimed - verified) > tolerance * max(abs(verified), 1e-9):
        return replace(verified_outcome, verdict=Verdict.FORGED,
                       detail=f"self-reported val_bpb {claimed:.6f}, verified {verified:.6f}")
    return replace(verified_outcome, verdict=Verdict.OK)
