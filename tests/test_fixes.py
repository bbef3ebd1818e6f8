"""Bugs that ended or corrupted a night, each pinned by a test that failed before its fix.
Unit tests: no daemon needed."""

from __future__ import annotations

import pytest

from runner.config import ConfigError, load_config
from runner.repo import RepoError, read_time_budget


@pytest.mark.parametrize("line,budget", [
    ("TIME_BUDGET = 300", 300.0),
    ("TIME_BUDGET = 5 * 60", 300.0),
    ("TIME_BUDGET = 60 * 5 + 30  # seconds", 330.0),
    ('TIME_BUDGET = int(os.environ.get("AUTORESEARCH_TIME_BUDGET", "60"))', 60.0),
    ("TIME_BUDGET: float = 2.5 * 2", 5.0),
    ("OTHER = 1", None),
])
def test_time_budget_is_evaluated_as_constant_arithmetic(line, budget):
    assert read_time_budget(line + "\n") == budget


def test_a_time_budget_that_needs_running_is_one_clear_error():
    with pytest.raises(RepoError, match="TIME_BUDGET in prepare.py .* set budget_s"):
        read_time_budget("TIME_BUDGET = compute_budget()\n")
    with pytest.raises(RepoError, match="positive"):
        read_time_budget("TIME_BUDGET = 0\n")


@pytest.mark.parametrize("key", ["log_tail_mb", "log_cap_mb", "tmp_mb", "pids"])
def test_limits_that_would_break_every_run_are_refused(tmp_path, key):
    (tmp_path / "runner.yaml").write_text(f"limits:\n  {key}: 0\n")
    with pytest.raises(ConfigError, match=f"limits.{key} must be positive"):
        load_config(tmp_path)


def test_report_draws_timeouts_off_the_best_line_and_descriptions_literally(tmp_path, monkeypatch):
    import matplotlib.figure

    from runner.report import ReportData, plot

    saved = []
    real_savefig = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda self, *a, **k: (saved.append(self), real_savefig(self, *a, **k))[1])
    points = [
        {"iteration": 0, "val_bpb": 3.5, "status": "keep", "description": "baseline", "commit": "a"},
        {"iteration": 1, "val_bpb": 0.0, "status": "discard", "description": "slow [timeout]", "commit": "b"},
        {"iteration": 2, "val_bpb": 3.4, "status": "keep", "description": "cost $x$ and $y", "commit": "c"},
        {"iteration": 3, "val_bpb": 0.0, "status": "crash", "description": "boom", "commit": "d"},
    ]
    plot(ReportData("night", points=points), tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0
    ax = saved[0].axes[0]
    ys = [y for coll in ax.collections for _, y in coll.get_offsets()]
    assert min(ys) > 3.0  # nothing drawn at 0, where it would look like the best result
    assert any(t.get_text() == r"cost \$x\$ and \$y" for t in ax.texts)


# --- on the real daemon ---------------------------------------------------------------------


@pytest.mark.docker
def test_prepare_leaves_no_image_that_reruns_mistake_for_an_experiment(tinylm, docker_client):
    """README path: init-example, prepare, start, then `runner rerun <baseline commit>` must not
    find the commit "in several tags" because prepare built an image for it."""
    from runner import reruns

    repo, _ = tinylm
    import git

    head = git.Repo(repo).head.commit.hexsha
    from sandbox.docker_backend import DockerExecutor, DockerImageStore

    tags = {e.tag for e in reruns.experiment_images(DockerImageStore(docker_client)) if e.commit == head}
    assert "prepare" not in tags


@pytest.mark.docker
def test_rerun_takes_the_configured_gpus_instead_of_forcing_cpu(tmp_path):
    from conftest import MINI_PREPARE, SUMMARY, make_repo, runner_cli

    repo = make_repo(tmp_path / "repo", SUMMARY, MINI_PREPARE, {"runner.yaml": "gpus: device=0\n"})
    r = runner_cli("rerun", "0000000", "--repo", str(repo))
    assert r.returncode == 2
    assert "GPU 0 does not exist on this host" in r.stderr  # the lease was asked for, as configured


@pytest.mark.docker
def test_a_run_silent_longer_than_the_client_timeout_keeps_its_output(tmp_path, docker_client):
    """The client timeout bounds API calls, not how long a run may print nothing (a compile).

    Holds with docker-py 7: its attach reader polls the socket without a timeout (suspected in
    issue 11; this pins it)."""
    import docker

    from sandbox import naming
    from sandbox.docker_backend import DockerExecutor, DockerImageStore
    from sandbox.images import CPU_BASE_ALIAS, ensure_trainer_image
    from sandbox.spec import Limits, RunSpec

    image = ensure_trainer_image(docker_client, CPU_BASE_ALIAS)
    short = docker.from_env(timeout=2)
    spec = RunSpec(image=image.ref, command=("python", "-c", "import time; print('before'); time.sleep(5); print('after the silence')"),
                   limits=Limits(time_budget_s=10), log_path=tmp_path / "log", workdir="/tmp",
                   name=naming.container_name("run", "silent", "0" * 8),
                   labels=naming.managed_labels(naming.KIND_RUN, **{naming.L_TAG: "silent", naming.L_OWNER: naming.owner()}))
    result = DockerExecutor(short).run(spec)
    assert result.exit_code == 0
    assert "after the silence" in result.output_tail


# --- the loop's decisions, without Docker ----------------------------------------------------

from dataclasses import dataclass as _dataclass  # noqa: E402

from runner.ledger import RowStatus  # noqa: E402
from runner.policy import RunState, decide  # noqa: E402
from runner.summary import Metrics, Outcome  # noqa: E402


@_dataclass
class _Job:
    parent: str
    retry_fix: bool = True


def _ok(val):
    return Outcome("ok", "", Metrics(val_bpb=val))


@pytest.mark.parametrize("parent,outcome,min_delta,retry,expected", [
    ("best", _ok(3.0), 0.0, True, (RowStatus.KEEP, False, False)),
    ("best", _ok(3.45), 0.1, True, (RowStatus.DISCARD, False, False)),         # within min_delta
    ("best", _ok(3.5), 0.0, True, (RowStatus.DISCARD, False, False)),          # a tie is no keep
    ("older", _ok(3.0), 0.0, True, (RowStatus.DISCARD, True, False)),          # the best moved: near-miss
    ("best", Outcome("timeout", "timeout", None), 0.0, True, (RowStatus.DISCARD, False, False)),
    ("best", Outcome("crash", "oom", None), 0.0, True, (RowStatus.CRASH, False, True)),
    ("best", Outcome("crash", "exit_code", None), 0.0, False, (RowStatus.CRASH, False, False)),  # fixed once
    ("best", Outcome("crash", "lost", None), 0.0, True, (RowStatus.CRASH, False, False)),  # its node died twice: no code to fix
    ("best", Outcome("crash", "unwatched", None), 0.0, True, (RowStatus.CRASH, False, False)),  # NVML gone
])
def test_decide(parent, outcome, min_delta, retry, expected):
    state = RunState(best_commit="best", best_val_bpb=3.5)
    d = decide(state, _Job(parent, retry), outcome, min_delta)
    assert (d.status, d.near_miss, d.fix) == expected


def test_state_recovers_from_the_ledger():
    from runner.ledger import ExperimentRecord, Row

    def exp(i, commit, status, val):
        return ExperimentRecord(i, commit, Row(commit[:7], val, 0.0, status, "x"), "ok")
    state = RunState.recover([exp(0, "a", "keep", 3.5), exp(1, "b", "discard", 3.6), exp(2, "c", "keep", 3.4),
                              exp(3, "d", "crash", 0.0), exp(4, "e", "discard", 3.41)])
    assert (state.iteration, state.best_commit, state.best_val_bpb, state.since_keep) == (4, "c", 3.4, 2)
    assert RunState.recover([]).best_commit is None


def test_a_tag_sees_only_its_own_rows_though_results_tsv_holds_every_tag(tmp_path):
    """results.tsv stays autoresearch's one file; a run's proposer context, dedupe and offline
    search read only its own tag's rows."""
    from runner.ledger import HEADER, ExperimentRecord, Ledger, Row
    from runner.records import RunRecord

    a, b = Ledger(tmp_path, "mar5"), Ledger(tmp_path, "mar6")
    for ledger, desc in ((a, "from mar5"), (b, "from mar6")):
        ledger.open()
        ledger.record(ExperimentRecord(0, "c" * 40, Row("ccccccc", 3.5, 0.1, "keep", desc), "ok", run={"wall_s": 1.0}))
    lines = (tmp_path / "results.tsv").read_text().splitlines()
    assert lines[0] == HEADER and len(lines) == 3
    assert b.results_text().splitlines() == [HEADER, "ccccccc\t3.500000\t0.1\tkeep\tfrom mar6"]
    [record] = b.experiments()
    assert record.row.description == "from mar6" and record.run == RunRecord(wall_s=1.0) and record.status == "keep"


@pytest.mark.docker
def test_import_names_the_engines_error_not_a_wrong_file(tmp_path):
    """An export whose image passes the runner's checks but that the engine refuses (its layer
    is missing): the engine's words, not 'not a file written by runner export' (which is for
    files of another shape)."""
    import io
    import json
    import tarfile

    from conftest import runner_cli
    from sandbox import naming

    def tar_of(entries):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for name, data in entries:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    config = {"config": {"Labels": {naming.L_KIND: naming.KIND_EXPERIMENT, naming.L_COMMIT: "e" * 40}}}
    image_tar = tar_of([("manifest.json", json.dumps([{"Config": "c.json", "RepoTags": None,
                                                        "Layers": ["missing/layer.tar"]}]).encode()),
                        ("c.json", json.dumps(config).encode())])
    bundle = tmp_path / "exp.tar"
    bundle.write_bytes(tar_of([("record.json", b'{"record": null}'), ("image.tar", image_tar)]))
    r = runner_cli("import", str(bundle))
    assert r.returncode == 2
    assert r.stderr.startswith("error: Docker engine error loading images") and "runner export" not in r.stderr
    not_an_export = tmp_path / "plain.txt"
    not_an_export.write_text("hello")
    r = runner_cli("import", str(not_an_export))
    assert r.returncode == 2 and "is not a file written by `runner export`" in r.stderr


def test_limits_label_of_another_runner_version_is_read_not_a_traceback():
    from runner.reruns import recorded_limits

    limits = recorded_limits('{"time_budget_s": 5.0, "pids_limit": 64, "a_future_limit": 1}')
    assert limits.time_budget_s == 5.0 and limits.pids_limit == 64
    assert recorded_limits("not json").time_budget_s == 300.0


def test_an_nvml_failure_while_watching_is_a_harness_error(tmp_path, monkeypatch):
    from gpuhost import FakeGpuHost

    from sandbox.backend import SandboxError
    from sandbox.gpu import RealNvml

    host = FakeGpuHost(tmp_path / "host")
    host.install(monkeypatch)
    host.machine["fail"] = {"nvmlDeviceGetComputeRunningProcesses": "GPU_IS_LOST"}
    host.write()
    with pytest.raises(SandboxError, match=f"NVML failed reading GPU {host.uuids[0]} .*GPU is lost"):
        RealNvml().process_vram_mb(host.uuids[0])


def _fake_proc(tmp_path, file_max, mem_kb):
    proc = tmp_path / "proc"
    (proc / "sys/fs").mkdir(parents=True)
    (proc / "sys/fs/file-max").write_text(f"{file_max}\n")
    (proc / "meminfo").write_text(f"MemTotal:       {mem_kb} kB\nMemFree:        1 kB\n")
    return proc


def test_default_ceilings_are_fitted_to_the_host_over_all_workers(tmp_path):
    from runner.engine import fit_to_host

    cfg = load_config(tmp_path)
    proc = _fake_proc(tmp_path, 2_000_000, 24 * 1024 * 1024)  # 24 GiB
    fitted, said = fit_to_host(cfg, 2, proc)
    assert fitted.limits.memory_gb * 2 <= 0.9 * 24 and fitted.limits.pids * fitted.limits.nofile * 2 <= 500_000
    assert "limits.nofile 1024 -> 488" in said and "limits.memory_gb 16 -> 10.8" in said
    with pytest.raises(ConfigError, match="fs.file-max"):  # 4 workers would leave under 256 files each
        fit_to_host(cfg, 4, proc)
    assert fit_to_host(cfg, 1, _fake_proc(tmp_path / "big", 10**8, 256 * 1024 * 1024)) == (cfg, None)


def test_explicit_ceilings_that_do_not_fit_are_refused(tmp_path):
    from runner.engine import fit_to_host

    (tmp_path / "runner.yaml").write_text("limits:\n  memory_gb: 12\n")
    with pytest.raises(ConfigError, match="limits.memory_gb x workers = 24.0 GiB"):
        fit_to_host(load_config(tmp_path), 2, _fake_proc(tmp_path, 10**8, 24 * 1024 * 1024))
    (tmp_path / "runner.yaml").write_text("limits:\n  nofile: 65536\n")
    with pytest.raises(ConfigError, match="fs.file-max"):
        fit_to_host(load_config(tmp_path), 1, _fake_proc(tmp_path / "p2", 2_000_000, 24 * 1024 * 1024))


def test_verification_verdicts_and_that_only_ok_can_be_kept():
    from runner.summary import apply_verification
    from sandbox.hooks.verify_protocol import Verdict, VerifyReport

    def ok(val):
        return VerifyReport(Verdict.OK, val_bpb=val)

    honest = _ok(3.0)
    assert apply_verification(honest, ok(3.001), 0.002).verdict == "ok"
    assert apply_verification(honest, ok(3.001), 0.002).val_bpb == 3.001
    forged = apply_verification(_ok(2.4), ok(3.0), 0.002)
    assert (forged.verdict, forged.val_bpb, forged.self_reported) == ("forged", 3.0, 2.4)
    noncausal = VerifyReport(Verdict.NONCAUSAL, why="outputs changed", val_bpb=3.0)
    assert apply_verification(honest, noncausal, 0.002).verdict == "noncausal"
    assert apply_verification(honest, None, 0.002).verdict == "unverified"
    refused = apply_verification(honest, VerifyReport(Verdict.REFUSED, why="the graph calls aten._print"), 0.002)
    assert refused.verdict == "refused" and refused.val_bpb == 3.0 and "aten._print" in refused.detail
    state = RunState(best_commit="best", best_val_bpb=3.5)
    for report in (ok(2.0), None, VerifyReport(Verdict.NONCAUSAL, val_bpb=2.0)):
        outcome = apply_verification(_ok(2.0 if report else 1.0), report, 0.002)
        assert decide(state, _Job("best"), outcome, 0.0).status == (RowStatus.KEEP if outcome.verdict == "ok" else RowStatus.DISCARD)


def test_report_shows_the_gap_between_val_and_held_out(tmp_path):
    """The best kept experiment's val_bpb beside the verifier's held-out figure (verify_data)."""
    from runner.ledger import ExperimentRecord, Ledger, Row
    from runner.report import collect, summary_lines

    ledger = Ledger(tmp_path, "gap")
    for i, (val, held, status) in enumerate([(1.5, 1.52, "keep"), (1.4, 1.47, "keep"), (1.3, 1.6, "discard")]):
        ledger.record(ExperimentRecord(iteration=i, commit=f"c{i}", row=Row(f"c{i}", val, 0.1, status, f"e{i}"),
                                       outcome="ok", run={"verdict": "ok", "heldout_val_bpb": held}))
    lines = summary_lines(collect(tmp_path, "gap"))
    assert "held-out: best kept c1 val_bpb 1.400000, held-out 1.470000 (gap +0.070000)" in lines
    assert "verified: 3 ok" in lines


@pytest.mark.docker
def test_a_broken_wait_is_not_an_exit(tmp_path, docker_client, monkeypatch):
    """The engine's wait connection breaks while the container still runs: the runner asks
    again and reports the real exit, never a running container's ExitCode 0."""
    import docker.models.containers
    import requests

    from sandbox import naming
    from sandbox.docker_backend import DockerExecutor, DockerImageStore
    from sandbox.images import CPU_BASE_ALIAS, ensure_trainer_image
    from sandbox.spec import Limits, RunSpec

    real_wait = docker.models.containers.Container.wait
    broken = {"n": 0}

    def flaky_wait(self, **kwargs):
        if broken["n"] < 2:
            broken["n"] += 1
            raise requests.exceptions.ConnectionError("connection reset by the engine")
        return real_wait(self, **kwargs)

    monkeypatch.setattr(docker.models.containers.Container, "wait", flaky_wait)
    spec = RunSpec(image=ensure_trainer_image(docker_client, CPU_BASE_ALIAS).ref,
                   command=("python", "-c", "import time; time.sleep(3); raise SystemExit(3)"),
                   limits=Limits(time_budget_s=30), log_path=tmp_path / "log", workdir="/tmp",
                   name=naming.container_name("run", "waittest", "0" * 8),
                   labels=naming.managed_labels(naming.KIND_RUN, **{naming.L_TAG: "waittest", naming.L_OWNER: naming.owner()}))
    result = DockerExecutor(docker_client).run(spec)
    assert broken["n"] == 2 and result.exit_code == 3 and result.reason == "exit_code" and result.wall_s >= 3
