"""The verifier's pieces that need no daemon and no torch: the report channel, the archive and
expression checks that run before torch sees a byte of the run, and the overfit rule."""

from __future__ import annotations

import json
import zipfile

import pytest

from runner.policy import RunState, decide
from runner.summary import STATUS_OK, Metrics, Outcome
from sandbox.hooks import verify_archive
from sandbox.hooks.verify_protocol import Verdict, VerifyReport, new_secret, parse_report

SECRET = new_secret()


def test_a_report_counts_only_with_its_secret_and_only_once():
    line = VerifyReport(Verdict.OK, val_bpb=1.5, probed_positions=10).to_line(SECRET)
    assert parse_report(f"noise\n{line}\n", SECRET).verdict == Verdict.OK
    assert parse_report(f"noise\n{line}\n", SECRET).val_bpb == 1.5
    # what the evaluated program could print: another secret, no secret, the old format
    other = VerifyReport(Verdict.OK, val_bpb=0.01).to_line(new_secret())
    for output in (other, 'VERIFY {"verdict": "ok", "val_bpb": 0.01}', line.replace(SECRET, SECRET.upper()), ""):
        assert parse_report(output, SECRET).verdict == Verdict.UNVERIFIED
    # two reports with the secret: one of them is not the verifier's
    assert parse_report(f"{line}\n{line}\n", SECRET).verdict == Verdict.UNVERIFIED


def test_why_an_export_failed_is_the_hooks_last_word_on_it():
    from runner.verifier import export_failure

    out = ("step 1\nAUTORESEARCH_VERIFY_FAILED RuntimeError: first\ntraining...\n"
           "AUTORESEARCH_VERIFY_FAILED RuntimeError: the model called with the token ids alone must return logits\n"
           "---\nval_bpb: 1.0\n")
    assert export_failure(out) == "RuntimeError: the model called with the token ids alone must return logits"
    assert export_failure("val_bpb: 1.0\nsaid AUTORESEARCH_VERIFY_FAILED in passing\n") == ""


@pytest.mark.parametrize("body", [
    '{"verdict": "ok", "val_bpb": NaN}',
    '{"verdict": "ok", "val_bpb": "1.0"}',
    '{"verdict": "great", "val_bpb": 1.0}',
    '{"verdict": "ok", "val_bpb": 1.0, "extra": 1}',
    '{"verdict": "ok", "val_bpb": 1.0, "probed_positions": 1.5}',
    '["ok"]',
])
def test_a_report_that_does_not_parse_is_unverified(body):
    assert parse_report(f"VERIFY {SECRET} {body}", SECRET).verdict == Verdict.UNVERIFIED


# --- the archive, checked as a plain zip before torch.export.load --------------------------------

def _config(prefix: str, n: int, **meta) -> bytes:
    return json.dumps({"config": {f"w{i}": {"path_name": f"{prefix}{i}", "use_pickle": False, **meta} for i in range(n)}}).encode()


def _archive(tmp_path, graph: dict | None = None, extra: dict | None = None, compress: int = zipfile.ZIP_STORED,
             weights: bytes | None = None, constants: bytes | None = None):
    entries = {
        "archive_format": b"pt2", "archive_version": b"0", "byteorder": b"little", ".data/version": b"6\n",
        "models/model.json": json.dumps(graph or {"graph_module": {"graph": {"nodes": [
            {"target": "torch.ops.aten.linear.default", "inputs": []}]}}}).encode(),
        "data/weights/model_weights_config.json": weights if weights is not None else _config("weight_", 1),
        "data/weights/weight_0": b"\0" * 16,
        "data/constants/model_constants_config.json": constants if constants is not None else b'{"config": {}}',
        "data/sample_inputs/model.pt": b"PK pickle of example inputs",
        **(extra or {}),
    }
    path = tmp_path / "model.pt2"
    with zipfile.ZipFile(path, "w", compress) as z:
        for name, data in entries.items():
            z.writestr("model/" + name, data)
    return str(path)


def test_a_clean_archive_is_copied_without_its_pickled_sample_inputs(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    clean = verify_archive.sanitised_archive(_archive(tmp_path), str(work))
    with zipfile.ZipFile(clean) as z:
        assert z.read("model/data/sample_inputs/model.pt") == b""
        assert z.read("model/data/weights/weight_0") == b"\0" * 16


@pytest.mark.parametrize("case,why", [
    (dict(weights=_config("weight_", 1, use_pickle=True)), "never pickles"),
    (dict(constants=json.dumps({"config": {"obj": {"path_name": "custom_obj_0"}}}).encode(),
          extra={"data/constants/custom_obj_0": b"x"}), "never pickles"),
    (dict(extra={"data/constants/model.pt": b"legacy constants, a pickle"}), "entries torch.export does not write"),
    (dict(extra={"extra/evil.pkl": b"x"}), "entries torch.export does not write"),
    (dict(compress=zipfile.ZIP_DEFLATED), "compresses"),
    (dict(graph={"nodes": [{"target": "builtins.exec"}]}), "not a torch, operator or math function"),
    (dict(graph={"sym_int_values": {"s0": {"as_expr": {"expr_str": "__import__('os').system('id')"}}}}), "not arithmetic on shapes"),
    (dict(graph={"sym_int_values": {"s0": {"as_expr": {"expr_str": "s0.__class__"}}}}), "not arithmetic on shapes"),
    (dict(graph={"custom_obj_values": {"x": {"class_fqn": "torch.classes.x"}}}), r"custom \(pickled\) objects"),
])
def test_archives_that_would_run_code_or_hide_state_are_refused(tmp_path, case, why):
    with pytest.raises(verify_archive.Refused, match=why):
        verify_archive.sanitised_archive(_archive(tmp_path, **case), str(tmp_path))


def test_a_file_that_is_not_a_zip_or_is_a_link_is_refused(tmp_path):
    (tmp_path / "junk").write_bytes(b"\x80\x04pickle")
    with pytest.raises(verify_archive.Refused, match="not a torch.export archive"):
        verify_archive.sanitised_archive(str(tmp_path / "junk"), str(tmp_path))
    (tmp_path / "link").symlink_to(_archive(tmp_path))
    with pytest.raises(verify_archive.Refused, match="not a regular file"):
        verify_archive.sanitised_archive(str(tmp_path / "link"), str(tmp_path))


@pytest.mark.parametrize("text", ["s0", "2*s0 + 1", "Mul(Integer(64), Symbol('s24', positive=True, integer=True))",
                                  "FloorDiv(s0, 2)", "Max(1, u3)", "Eq(s0, 8)"])
def test_shape_arithmetic_is_accepted(text):
    verify_archive._check_expression(text)


@pytest.mark.parametrize("text", ["Symbol('__import__')", "lambda: 1", "s0[0]", "Symbol('s0', evil=True)",
                                  "open('/etc/passwd')", "s0 if True else 1", "(s0 for s0 in 'x')"])
def test_anything_but_shape_arithmetic_is_refused(text):
    with pytest.raises(verify_archive.Refused):
        verify_archive._check_expression(text)


# --- overfit: a val gain the held-out data does not show ------------------------------------------

class _Job:
    parent = "best"
    retry_fix = False


def _outcome(val: float, heldout: float | None) -> Outcome:
    return Outcome(STATUS_OK, "", Metrics(val_bpb=val), verdict=Verdict.OK, heldout_bpb=heldout)


def test_a_val_gain_without_a_held_out_gain_is_an_overfit_discard():
    state = RunState(best_commit="best", best_val_bpb=4.0, best_heldout_bpb=4.1)
    memorised = decide(state, _Job(), _outcome(0.5, 4.1), 0.0)   # val memorised, held-out unchanged
    assert memorised.status == "discard" and "held-out" in memorised.overfit
    honest = decide(state, _Job(), _outcome(3.8, 3.92), 0.0)     # both gain
    assert honest.status == "keep" and not honest.overfit
    # A val gain whose held-out score stands still or goes back: nothing shows it is real.
    flat = decide(state, _Job(), _outcome(3.98, 4.105), 0.0)
    assert flat.status == "discard" and "must gain" in flat.overfit
    # The held-out gain must clear half of min_delta, as noise would not.
    assert decide(state, _Job(), _outcome(3.9, 4.09), 0.04).status == "discard"
    assert decide(state, _Job(), _outcome(3.9, 4.07), 0.04).status == "keep"
    assert decide(RunState(best_commit="best", best_val_bpb=4.0), _Job(), _outcome(0.5, 4.1), 0.0).status == "keep"


def test_a_gain_no_larger_than_the_verifiers_margin_is_not_kept():
    """The verifier says what reading ahead inside its probe's tolerance could gain (margin_bpb);
    a keep must beat the best by more than that as well as min_delta."""
    from dataclasses import replace

    from runner.summary import apply_verification

    state = RunState(best_commit="best", best_val_bpb=1.9)
    run = Outcome(STATUS_OK, "", Metrics(val_bpb=1.897))
    report = VerifyReport(Verdict.OK, val_bpb=1.897, margin_bpb=0.0036)
    judged = apply_verification(run, report, 0.002)
    assert judged.verdict == "ok" and judged.margin_bpb == 0.0036
    inside = decide(state, _Job(), judged, 0.0)
    assert inside.status == "discard" and inside.within_margin
    clear = apply_verification(replace(run, metrics=Metrics(val_bpb=1.89)), replace(report, val_bpb=1.89), 0.002)
    assert decide(state, _Job(), clear, 0.0).status == "keep"
    assert decide(state, _Job(), clear, 0.008).status == "discard"  # min_delta still holds beside it
    unmargined = apply_verification(run, replace(report, margin_bpb=None), 0.002)
    assert unmargined.margin_bpb == 0.0 and decide(state, _Job(), unmargined, 0.0).status == "keep"


def test_memorised_val_rides_on_a_real_gain_only_within_the_nights_allowance():
    """From a baseline at val 7.6, held-out 7.7: a real gain of 3 bpb shows on both (the held-out
    text is another distribution: it gains a little less). With a val table worth 0.5 bpb on
    top, the night's val gain outruns its held-out gain by far more than the allowance
    (0.02 + 5% of the val gain)."""
    from runner.policy import HeldoutRule

    state = RunState(best_commit="best", best_val_bpb=7.6, best_heldout_bpb=7.7, baseline_val_bpb=7.6,
                     baseline_heldout_bpb=7.7)
    rule = HeldoutRule(tolerance=0.02, relative=0.05)
    assert decide(state, _Job(), _outcome(4.6, 4.8), 0.0, rule).status == "keep"        # 3.0 on val, 2.9 held-out
    table = decide(state, _Job(), _outcome(4.1, 4.8), 0.0, rule)                        # 3.5 on val, 2.9 held-out
    assert table.status == "discard" and "since the baseline" in table.overfit


def test_the_overfit_allowance_is_the_nights_not_granted_again_at_each_keep():
    """A ratchet: each keep gains 0.03 on val and 0.011 held-out, within a per-keep allowance of
    0.02; against the baseline the shortfall adds up, and the third keep is refused."""
    from runner.policy import HeldoutRule

    rule = HeldoutRule(tolerance=0.02, relative=0.0)
    state = RunState(best_commit="best", best_val_bpb=4.0, best_heldout_bpb=4.1, baseline_val_bpb=4.0,
                     baseline_heldout_bpb=4.1)
    statuses = []
    for step in range(1, 4):
        outcome = _outcome(4.0 - 0.03 * step, 4.1 - 0.011 * step)
        decision = decide(state, _Job(), outcome, 0.0, rule)
        statuses.append(decision.status.value)
        if decision.status == "keep":
            state.best_val_bpb, state.best_heldout_bpb = outcome.val_bpb, outcome.heldout_bpb
    assert statuses == ["keep", "discard", "discard"]


def test_runs_that_agree_far_closer_than_the_baselines_seeds_are_seed_pinned():
    """Exactly equal runs, or runs a jitter keeps 1e-7 apart, under different seeds on a repo
    whose baseline moved by 0.02 with the seed: both ignored the runner's seeds. Honest runs
    that differ as the baseline's did are not pinned, nor is anything on a repo whose baseline
    did not move."""
    from runner.policy import confirm

    baseline = [7.90, 7.91, 7.92]
    assert confirm([4.5, 4.5], baseline).seed_pinned
    assert confirm([4.5, 4.5 + 1e-7], baseline).seed_pinned
    assert not confirm([4.5, 4.51], baseline).seed_pinned
    assert not confirm([4.5, 4.5], [7.9, 7.9, 7.9]).seed_pinned
    assert not confirm([4.5], baseline).seed_pinned


def test_the_wall_limit_is_the_baselines_wall_time_and_an_allowance():
    """After the baseline, runs are stopped at its wall time plus the largest of 10% of the
    budget, 10 s and the baseline's own time outside the budget (twice that with several
    workers), or runner.yaml's overtime_s; never later than the budget's own deadline, which is
    what the run itself can read."""
    from runner.policy import experiment_wall_limit_s
    from sandbox.spec import Limits

    assert experiment_wall_limit_s(320.0, 300.0, None) == 350.0   # 10% of the budget
    assert experiment_wall_limit_s(345.0, 300.0, None) == 390.0   # the baseline's 45 s of startup and evaluation
    assert experiment_wall_limit_s(7.0, 2.0, None) == 17.0        # at least 10 s
    assert experiment_wall_limit_s(23.0, 10.0, None, workers=2) == 49.0  # shared: twice 13 s
    assert experiment_wall_limit_s(7.0, 2.0, 3.0, workers=4) == 10.0     # overtime_s as runner.yaml says
    assert experiment_wall_limit_s(None, 300.0, None) is None
    limits = Limits(time_budget_s=300, timeout_factor=2, startup_grace_s=60)
    assert limits.deadline_s == 660
    import dataclasses
    assert dataclasses.replace(limits, wall_limit_s=370.0).deadline_s == 370.0
    assert dataclasses.replace(limits, wall_limit_s=9000.0).deadline_s == 660
    assert dataclasses.replace(limits, wall_limit_s=370.0).inner_deadline_s == limits.inner_deadline_s > 660


def test_a_keep_without_a_held_out_figure_does_not_switch_the_rule_off():
    from runner.ledger import ExperimentRecord, Row

    def record(i, heldout):
        return ExperimentRecord(iteration=i, commit=f"c{i}", row=Row(f"c{i}", 4.0 - i, 0.1, "keep", "x"), outcome="ok",
                                run={"verdict": "ok", "heldout_val_bpb": heldout})

    state = RunState.recover([record(0, 4.1), record(1, None)])
    assert state.best_commit == "c1" and state.best_heldout_bpb == 4.1


def test_the_verifiers_deadline_grows_with_what_the_run_took():
    """On a loaded host the verifier slows as its run did: its deadline is the run's, plus
    VERIFY_WALL_FACTOR x the run's wall time (a fixed deadline timed out verifiers under load)."""
    from runner.verifier import VERIFY_WALL_FACTOR, verifier_limits
    from sandbox.spec import Limits

    limits = Limits(time_budget_s=3, timeout_factor=2, startup_grace_s=60)
    assert verifier_limits(limits, 0.0).deadline_s == limits.deadline_s
    assert verifier_limits(limits, 40.0).deadline_s == limits.deadline_s + VERIFY_WALL_FACTOR * 40.0
    assert verifier_limits(limits, 40.0).time_budget_s == 3  # what the experiment was given is unchanged
    # The experiments' wall limit is a training run's: the verifier keeps its own deadline.
    import dataclasses
    tight = dataclasses.replace(limits, wall_limit_s=10.0)
    assert verifier_limits(tight, 8.0).deadline_s == limits.deadline_s + VERIFY_WALL_FACTOR * 8.0
