"""The mechanics apart from the decisions: the Scheduler's tickets, stop and failure report
(runner/scheduler.py), the RunSpecs as plain data (runner/specs.py), and the trusted runs'
choice of the run that tells (runner/trusted.py). No Docker."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from runner.scheduler import Scheduler
from sandbox import naming
from sandbox.spec import REASON_EXIT, GpuAccess, Limits, Mount, RunResult

# --- the scheduler ---------------------------------------------------------------------------


def test_every_proposed_job_runs_once_and_a_refused_proposal_counts_as_proposed():
    scheduler = Scheduler()
    proposed = iter([1, None, 2, 3])
    executed, lock = [], threading.Lock()

    def execute(job, slot):
        with lock:
            executed.append((job, slot))

    failure = scheduler.run(["a", "b"], 0, propose=lambda: next(proposed), execute=execute,
                            capped=lambda n: n >= 4, on_failure=lambda who, exc: None)
    assert failure is None
    assert sorted(job for job, _ in executed) == [1, 2, 3] and {slot for _, slot in executed} <= {"a", "b"}


def test_without_prefetch_nothing_is_proposed_while_the_one_worker_runs():
    """One slot, prefetch 0: one ticket, so the next proposal waits for the running job (it
    would be proposed on a best the running experiment may still change)."""
    scheduler = Scheduler()
    timeline, counter = [], iter(range(1, 100))

    def propose():
        n = next(counter)
        timeline.append(("propose", n))
        return n

    def execute(job, slot):
        timeline.append(("start", job))
        time.sleep(0.05)
        timeline.append(("end", job))

    scheduler.run([None], 0, propose=propose, execute=execute, capped=lambda n: n >= 3, on_failure=lambda *a: None)
    assert timeline == [("propose", 1), ("start", 1), ("end", 1), ("propose", 2), ("start", 2), ("end", 2),
                        ("propose", 3), ("start", 3), ("end", 3)]


def test_prefetch_proposes_one_ahead_of_the_worker():
    scheduler = Scheduler()
    timeline, counter = [], iter(range(1, 100))

    def propose():
        n = next(counter)
        timeline.append(("propose", n))
        return n

    def execute(job, slot):
        timeline.append(("start", job))
        if job == 1:
            deadline = time.monotonic() + 5
            while ("propose", 2) not in timeline and time.monotonic() < deadline:
                time.sleep(0.01)
        timeline.append(("end", job))

    scheduler.run([None], 1, propose=propose, execute=execute, capped=lambda n: n >= 2, on_failure=lambda *a: None)
    assert timeline.index(("propose", 2)) < timeline.index(("end", 1))


def test_the_first_failure_stops_every_thread_and_is_reported_once():
    scheduler = Scheduler()
    reported = []

    def execute(job, slot):
        if job == 2:
            raise RuntimeError("worker broke")
        scheduler.stop.wait(5)  # the others run until the failure stops them

    counter = iter(range(1, 100))
    failure = scheduler.run(["a", "b", "c"], 0, propose=lambda: next(counter), execute=execute,
                            capped=lambda n: False, on_failure=lambda who, exc: reported.append((who, str(exc),
                                                                                               scheduler.stop.is_set())))
    assert failure is not None and failure[0].startswith("worker ") and str(failure[1]) == "worker broke"
    assert reported == [(failure[0], "worker broke", True)]  # told once, after the stop is set


def test_a_proposer_that_raises_is_named():
    scheduler = Scheduler()

    def propose():
        raise ValueError("no more ideas")

    failure = scheduler.run([None], 0, propose=propose, execute=lambda job, slot: None, capped=lambda n: False,
                            on_failure=lambda *a: None)
    assert failure[0] == "proposer" and isinstance(failure[1], ValueError)


def test_a_stop_ends_the_night_with_no_failure():
    scheduler = Scheduler()
    counter = iter(range(1, 100))

    def execute(job, slot):
        if job == 2:
            scheduler.stop.set()

    assert scheduler.run([None], 0, propose=lambda: next(counter), execute=execute, capped=lambda n: False,
                         on_failure=lambda *a: pytest.fail("no failure")) is None
    assert scheduler.stop.is_set()


def test_signal_handlers_are_not_installed_off_the_main_thread():
    out = []
    t = threading.Thread(target=lambda: out.append(Scheduler().install_signal_handlers(lambda name: None)()))
    t.start()
    t.join()
    assert out == [None]


def test_a_first_signal_names_the_reason_and_stops_a_second_forces(monkeypatch):
    import os
    import signal

    scheduler = Scheduler()
    names, written = [], []
    monkeypatch.setattr(os, "write", lambda fd, data: written.append((fd, data)))
    restore = scheduler.install_signal_handlers(names.append)
    try:
        handler = signal.getsignal(signal.SIGTERM)
        handler(signal.SIGTERM, None)
        assert names == ["SIGTERM"] and scheduler.stop.is_set()
        assert written == [(2, b"\nSIGTERM: stopping after the current run is cleaned up (again to force)\n")]
        with pytest.raises(KeyboardInterrupt):
            handler(signal.SIGINT, None)
    finally:
        restore()
    assert signal.getsignal(signal.SIGTERM) is not handler


# --- the RunSpecs ----------------------------------------------------------------------------


def factory(tmp_path, **overrides):
    from runner.config import RunConfig
    from runner.specs import SpecFactory

    cfg = RunConfig(data_dir=str(tmp_path / "data"), hf_cache=str(tmp_path / "hf"), verify_data=tmp_path / "heldout",
                    **overrides)
    return SpecFactory(cfg, tmp_path / "repo", "owner:1")


def test_an_experiments_spec_is_made_from_what_it_is_handed(tmp_path):
    from runner.config import DATA_MOUNT

    specs = factory(tmp_path, env={"EXTRA": "1"})
    limits = Limits(time_budget_s=5, cpuset="0-2,5")
    spec = specs.run("img:1", ("python", "train.py"), "night", "c" * 40, 3, ("GPU-a",), limits, tmp_path / "x.log",
                     uid=200_123, gpu_access=GpuAccess("toolkit"), env={"AUTORESEARCH_SEED": "2"})
    assert spec.user == "200123:200123" and spec.gpu_access == GpuAccess("toolkit") and spec.gpus == ("GPU-a",)
    assert spec.labels[naming.L_UID] == "200123" and spec.labels[naming.L_OWNER] == "owner:1"
    assert spec.labels[naming.L_ITERATION] == "3" and spec.labels[naming.L_REPO] == str(tmp_path / "repo")
    assert spec.env["AUTORESEARCH_SEED"] == "2" and spec.env["EXTRA"] == "1" and spec.env["OMP_NUM_THREADS"] == "4"
    assert "AUTORESEARCH_VERIFY_TARGET" not in spec.env and not spec.network
    assert spec.mounts == (Mount(tmp_path / "data", DATA_MOUNT, read_only=True),)  # no hub cache yet: not mounted
    assert spec.log_root == tmp_path / "repo"


def test_a_trusted_spec_has_the_network_writable_caches_and_the_heldout_folder(tmp_path):
    from runner.config import HELDOUT_ENV, HELDOUT_MOUNT, HF_MOUNT
    from runner.specs import TRUSTED_TIME_BUDGET_S

    (tmp_path / "hf").mkdir()
    (tmp_path / "heldout").mkdir()
    specs = factory(tmp_path)
    limits = Limits(time_budget_s=5, mem_limit_bytes=2**30)
    spec = specs.trusted("img:p", ("python", "prepare.py"), "h" * 40, limits, tmp_path / "p.log", user="1000:1000",
                         hf_endpoint="https://mirror.example", heldout=True)
    assert spec.network and spec.user == "1000:1000" and spec.limits.time_budget_s == TRUSTED_TIME_BUDGET_S
    assert spec.limits.mem_limit_bytes == 2**30 and spec.labels[naming.L_OWNER] == "owner:1"
    assert spec.env["HF_ENDPOINT"] == "https://mirror.example" and spec.env[HELDOUT_ENV] == HELDOUT_MOUNT
    assert all(not m.read_only for m in spec.mounts) and HF_MOUNT in {m.target for m in spec.mounts}
    no_heldout = specs.trusted("img:p", ("python", "-c", "x"), "h" * 40, limits, tmp_path / "f.log", user="1:1")
    assert HELDOUT_ENV not in no_heldout.env and "HF_ENDPOINT" not in no_heldout.env


def test_the_verifier_gets_the_heldout_data_only_once_it_holds_something(tmp_path):
    specs = factory(tmp_path)
    assert specs.heldout(writable=False) == ((), {})              # no folder
    (tmp_path / "heldout").mkdir()
    assert specs.heldout(writable=False) == ((), {})              # empty: nothing to score on
    assert specs.heldout(writable=True)[0][0].read_only is False  # prepare fills it
    (tmp_path / "heldout" / "part.bin").write_bytes(b"x")
    mounts, env = specs.heldout(writable=False)
    assert mounts[0].read_only and env


def test_uids_in_use_reads_the_uid_labels():
    from runner.specs import uids_in_use
    from sandbox.backend import RunningRun

    assert uids_in_use([RunningRun({naming.L_UID: "200001"}), RunningRun({}), RunningRun({naming.L_UID: ""})]) == {200001, 0}


def test_the_trusted_run_that_tells_is_the_first_that_failed():
    from runner.trusted import first_failure

    def result(name, exit_code=0, reason=""):
        return RunResult(exit_code=exit_code, reason=reason, wall_s=1.0, log_path=Path(name), output_tail="",
                         log_bytes=0, log_truncated=False, peak_mem_bytes=None, peak_vram_mb=None, image_id="",
                         container_name=name)

    fine, broken = result("a"), result("b", 1, REASON_EXIT)
    assert first_failure([fine, broken]) is broken and first_failure([fine, result("c")]) is fine
