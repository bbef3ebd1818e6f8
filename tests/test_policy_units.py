"""The loop's decisions around a result, as pure functions (runner/policy.py): what the baseline
says about the night, the default VRAM ceiling, which results are verified, what follows a
decided result, whether a lost run runs again, how far ahead to propose. No Docker, no threads."""

from __future__ import annotations

import math

import pytest

from runner.policy import (BaselineCheck, Confirmation, Decision, FollowUp, decide_baseline, default_vram_ceiling_gb,
                           follow_up, needs_verification, pinned, prefetch_depth, rerun_lost, resumed_verify_mode,
                           resumed_vram_ceiling_gb, unconfirmed)
from runner.records import RowStatus
from runner.summary import STATUS_CRASH, STATUS_OK, STATUS_TIMEOUT, Metrics, Outcome
from sandbox.hooks.verify_protocol import Verdict
from sandbox.spec import REASON_EXIT, REASON_INTERRUPTED, REASON_LOST, REASON_UNWATCHED

KEEP, DISCARD, CRASH = RowStatus.KEEP, RowStatus.DISCARD, RowStatus.CRASH


def ok(val_bpb: float = 1.0, verdict: Verdict | None = None) -> Outcome:
    return Outcome(STATUS_OK, "", Metrics(val_bpb=val_bpb), verdict=verdict)


def crashed(reason: str = REASON_EXIT) -> Outcome:
    return Outcome(STATUS_CRASH, reason, None)


# --- the baseline ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["auto", "on", "all", "off", "sample"])
def test_an_interrupted_or_crashed_baseline_starts_no_night_whatever_the_mode(mode):
    assert decide_baseline(mode, ok(), interrupted=True, peak_vram_mb=None).check == BaselineCheck.INTERRUPTED
    assert decide_baseline(mode, crashed(), interrupted=False, peak_vram_mb=None).check == BaselineCheck.CRASHED
    timed_out = Outcome(STATUS_TIMEOUT, "timeout", None)
    assert decide_baseline(mode, timed_out, interrupted=False, peak_vram_mb=None).check == BaselineCheck.CRASHED


def test_a_watchdog_that_saw_no_gpu_memory_is_blind_but_one_that_watched_no_gpu_is_not():
    assert decide_baseline("off", ok(), interrupted=False, peak_vram_mb=0).check == BaselineCheck.WATCHDOG_BLIND
    assert decide_baseline("off", ok(), interrupted=False, peak_vram_mb=None).check == BaselineCheck.ACCEPTED
    assert decide_baseline("off", ok(), interrupted=False, peak_vram_mb=812.0).check == BaselineCheck.ACCEPTED


@pytest.mark.parametrize("verdict", [Verdict.UNVERIFIED, Verdict.REFUSED])
def test_auto_falls_back_to_the_runs_own_numbers_when_the_evaluation_cannot_be_replayed(verdict):
    decision = decide_baseline("auto", ok(verdict=verdict), interrupted=False, peak_vram_mb=None)
    assert (decision.check, decision.verify_mode) == (BaselineCheck.FALL_BACK, "off")


@pytest.mark.parametrize("mode", ["on", "all", "sample"])
@pytest.mark.parametrize("verdict", [None, Verdict.UNVERIFIED, Verdict.REFUSED, Verdict.FORGED])
def test_verification_asked_for_and_not_had_refuses_the_night(mode, verdict):
    decision = decide_baseline(mode, ok(verdict=verdict), interrupted=False, peak_vram_mb=None)
    assert (decision.check, decision.verify_mode) == (BaselineCheck.UNVERIFIABLE, mode)


@pytest.mark.parametrize("verdict", [Verdict.FORGED, Verdict.NONCAUSAL, None])
def test_auto_refuses_a_baseline_that_is_verifiable_but_not_ok(verdict):
    """Only an evaluation that cannot be replayed falls back; a forged or missing verdict on the
    baseline is the repo's problem, as with `on`."""
    assert decide_baseline("auto", ok(verdict=verdict), interrupted=False, peak_vram_mb=None).check == BaselineCheck.UNVERIFIABLE


@pytest.mark.parametrize("mode", ["auto", "on", "all", "off"])
def test_a_verified_baseline_keeps_the_mode(mode):
    verdict = None if mode == "off" else Verdict.OK
    decision = decide_baseline(mode, ok(verdict=verdict), interrupted=False, peak_vram_mb=None)
    assert (decision.check, decision.verify_mode) == (BaselineCheck.ACCEPTED, mode)


def test_off_accepts_any_verdict():
    assert decide_baseline("off", ok(verdict=Verdict.FORGED), interrupted=False, peak_vram_mb=None).check == BaselineCheck.ACCEPTED


def test_a_resumed_auto_night_stays_off_once_it_fell_back():
    assert resumed_verify_mode("auto", fell_back=True) == "off"
    assert resumed_verify_mode("auto", fell_back=False) == "auto"
    assert resumed_verify_mode("on", fell_back=True) == "on"  # on never falls back; the event cannot be its own


# --- the VRAM ceiling ------------------------------------------------------------------------


def test_the_default_vram_ceiling_is_twice_the_baselines_peak_unless_one_is_configured():
    assert default_vram_ceiling_gb(1024.0, None) == 2.0
    assert default_vram_ceiling_gb(1536.0, None) == 3.0
    assert default_vram_ceiling_gb(1024.0, 8.0) is None   # runner.yaml's limits.vram_gb wins
    assert default_vram_ceiling_gb(None, None) is None    # no GPU watched
    assert default_vram_ceiling_gb(0, None) is None       # (a blind watchdog stops the night before)


def test_a_resumed_night_keeps_the_recorded_ceiling_unless_one_is_configured_now():
    assert resumed_vram_ceiling_gb(3.5, None) == 3.5
    assert resumed_vram_ceiling_gb(3.5, 8.0) is None
    assert resumed_vram_ceiling_gb(None, None) is None


# --- which results are verified --------------------------------------------------------------


def gate(mode="on", outcome=None, baseline=False, confirming=False, stopped=False, best=2.0, min_delta=0.1) -> bool:
    return needs_verification(mode, outcome or ok(1.5), baseline=baseline, confirming=confirming, stopped=stopped,
                              best_val_bpb=best, min_delta=min_delta)


def test_only_a_result_that_could_be_kept_is_verified():
    assert gate(outcome=ok(1.5))                  # better by 0.5 > min_delta: a keep or a near-miss
    assert not gate(outcome=ok(1.95))             # within min_delta of the best: it can never be kept
    assert not gate(outcome=ok(1.9))              # exactly min_delta better: not more than it
    assert not gate(outcome=ok(2.5))


def test_the_baseline_and_confirmation_runs_are_always_verified_and_all_verifies_everything():
    assert gate(outcome=ok(9.0), baseline=True, best=math.inf)
    assert gate(outcome=ok(9.0), confirming=True)
    assert gate("all", outcome=ok(9.0))
    assert gate("sample", outcome=ok(1.5)) and not gate("sample", outcome=ok(9.0))
    assert gate("auto", outcome=ok(1.5))


def test_nothing_is_verified_when_off_without_a_result_or_once_stopped():
    for kwargs in ({"mode": "off"}, {"outcome": crashed()}, {"outcome": Outcome(STATUS_TIMEOUT, "timeout", None)},
                   {"stopped": True}):
        assert not gate(**kwargs, baseline=True)
        assert not gate(**{"mode": "all", **kwargs})


# --- confirmation and what follows a result --------------------------------------------------


def test_a_confirmation_run_without_a_verified_result_leaves_the_keep_unconfirmed():
    assert not unconfirmed(ok()) and not unconfirmed(ok(verdict=Verdict.OK))
    assert unconfirmed(crashed()) and unconfirmed(ok(verdict=Verdict.UNVERIFIED)) and unconfirmed(ok(verdict=Verdict.OVERFIT))


def test_a_seed_pinned_keep_is_a_discard_and_nothing_else_changes():
    pinned_runs = Confirmation((1.5, 1.5), 1.5, seed_pinned=True)
    varied = Confirmation((1.5, 1.6), 1.55, seed_pinned=False)
    assert pinned(Decision(KEEP), pinned_runs) == Decision(DISCARD, seed_pinned=True)
    assert pinned(Decision(KEEP), varied) == Decision(KEEP)
    assert pinned(Decision(KEEP), None) == Decision(KEEP)
    assert pinned(Decision(DISCARD, near_miss=True), pinned_runs) == Decision(DISCARD, near_miss=True)


@pytest.mark.parametrize("decision, runs, confirm_runs, stopped, expected", [
    (Decision(KEEP), 1, 1, False, FollowUp.CONFIRM),         # a would-be keep runs again first
    (Decision(KEEP), 2, 1, False, FollowUp.NONE),            # confirmed: kept, nothing follows
    (Decision(KEEP), 2, 2, False, FollowUp.CONFIRM),
    (Decision(KEEP), 1, 0, False, FollowUp.NONE),            # confirm: off
    (Decision(KEEP), 1, 1, True, FollowUp.NONE),             # stopped: decided on what it has
    (Decision(DISCARD, near_miss=True), 1, 1, False, FollowUp.REAPPLY),
    (Decision(DISCARD, near_miss=True), 1, 1, True, FollowUp.REAPPLY),  # committed; the stopped worker runs nothing
    (Decision(CRASH, fix=True), 1, 1, False, FollowUp.FIX),
    (Decision(CRASH, fix=True), 1, 1, True, FollowUp.NONE),  # no new edit (and no tokens) once stopped
    (Decision(CRASH), 1, 1, False, FollowUp.NONE),           # a fix already, or the harness's crash
    (Decision(DISCARD), 1, 1, False, FollowUp.NONE),
    (Decision(DISCARD, overfit="memorised"), 1, 1, False, FollowUp.NONE),
])
def test_what_follows_a_decided_result(decision, runs, confirm_runs, stopped, expected):
    assert follow_up(decision, runs, confirm_runs, stopped) == expected


# --- the harness around a run ----------------------------------------------------------------


def test_a_run_lost_with_its_node_runs_once_more_unless_stopping():
    assert rerun_lost(REASON_LOST, stopped=False)
    assert not rerun_lost(REASON_LOST, stopped=True)
    for reason in ("", REASON_EXIT, REASON_INTERRUPTED, REASON_UNWATCHED):
        assert not rerun_lost(reason, stopped=False)


def test_prefetch_auto_proposes_ahead_for_an_llm_or_several_workers():
    assert prefetch_depth("auto", "offline", 1) == 0
    assert prefetch_depth("auto", "claude", 1) == 1
    assert prefetch_depth("auto", "offline", 2) == 1
    assert prefetch_depth(3, "offline", 1) == 3
    assert prefetch_depth(0, "claude", 4) == 0
