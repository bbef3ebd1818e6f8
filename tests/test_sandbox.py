"""The sandbox contract, seen from inside a container on the real Docker daemon."""

from __future__ import annotations

import os

import pytest
from probes import probe_train_py, read_probe

pytestmark = pytest.mark.docker

SECRET = "sk-ant-planted-0123456789"


@pytest.fixture(scope="module")
def probe(tmp_path_factory, docker_client):
    """One probe run shared by the assertions below (each reads a different fact)."""
    from conftest import make_repo
    from runner.config import load_config
    from runner.engine import Engine
    from runner.repo import ResearchRepo

    root = tmp_path_factory.mktemp("probe")
    data = root / "data"
    data.mkdir()
    (data / "f").write_text("x")
    # Plant secrets where a careless runner would leak them: its environment and its home.
    os.environ["ANTHROPIC_API_KEY"] = SECRET
    os.environ["AWS_SECRET_ACCESS_KEY"] = SECRET
    # docker-py copies a client config's proxies (credentials and all) into containers by default
    docker_config = root / "docker-config"
    docker_config.mkdir()
    (docker_config / "config.json").write_text(
        '{"proxies": {"default": {"httpProxy": "http://user:%s@127.0.0.1:3128", "noProxy": "localhost"}}}' % SECRET)
    os.environ["DOCKER_CONFIG"] = str(docker_config)
    try:
        repo = make_repo(root / "repo", probe_train_py())
        engine = Engine(load_config(repo, {"budget_s": 2, "data_dir": data}), ResearchRepo(repo), progress=lambda m: None)
        run = engine.run_commit(engine.repo.head().sha, "probe", root / "run.log")
    finally:
        del os.environ["ANTHROPIC_API_KEY"], os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["DOCKER_CONFIG"]
    return run, read_probe(run.result.log_path.read_text())


def test_probe_run_is_judged_ok(probe):
    run, _ = probe
    assert run.outcome.status == "ok", run.result.tail_lines()
    assert run.outcome.val_bpb == pytest.approx(1.234567)


def test_no_network_only_loopback_no_route_no_resolver(probe):
    _, facts = probe
    assert facts["interfaces"] == ["lo"]
    assert facts["routes"] == []
    assert "nameserver" not in facts["resolv_conf"]


def test_non_root_without_capabilities(probe):
    _, facts = probe
    from sandbox.naming import RUN_UID_BASE, RUN_UID_COUNT

    assert RUN_UID_BASE <= facts["uid"] < RUN_UID_BASE + RUN_UID_COUNT and facts["gid"] == facts["uid"]
    assert int(facts["cap_eff"], 16) == 0 and int(facts["cap_prm"], 16) == 0
    assert facts["no_new_privs"] == "1"


def test_host_secrets_never_enter(probe):
    _, facts = probe
    assert "ANTHROPIC_API_KEY" not in facts["env"] and "AWS_SECRET_ACCESS_KEY" not in facts["env"]
    assert not any("proxy" in name.lower() for name in facts["env"])  # nor the client config's proxies
    assert SECRET not in facts["environ_raw"]
    assert facts["env"]["AUTORESEARCH_TIME_BUDGET"] == "2"


def test_evaluation_code_and_image_are_read_only(probe):
    _, facts = probe
    assert facts["write_prepare"].startswith(("OSError", "PermissionError"))
    assert facts["chmod_prepare"].startswith(("OSError", "PermissionError"))
    assert facts["write_root"].startswith(("OSError", "PermissionError"))
    assert facts["write_repo_new"].startswith(("OSError", "PermissionError"))
    assert facts["prepare_owner"] == 0 and facts["prepare_stat"].endswith("444")


def test_scratch_space_is_writable(probe):
    _, facts = probe
    assert facts["write_tmp"] == "ok" and facts["write_out"] == "ok"


def test_tmp_is_executable_out_is_not(probe):
    """Compiled kernels load from /tmp (inductor, Triton); nothing gains privileges there."""
    _, facts = probe
    tmp, out = facts["mounts"]["/tmp"], facts["mounts"]["/out"]
    assert "noexec" not in tmp and {"nosuid", "nodev"} <= set(tmp)
    assert {"noexec", "nosuid", "nodev"} <= set(out)


def test_no_docker_socket_no_git_no_runner_files(probe):
    _, facts = probe
    assert facts["docker_sock"] is False
    assert facts["git_dir"] is False
    assert ".autoresearch" not in facts["repo_files"] and "results.tsv" not in facts["repo_files"]
    assert facts["repo_files"] == ["prepare.py", "program.md", "train.py"]


def test_container_is_removed_and_labelled(probe, docker_client):
    from sandbox import naming

    run, _ = probe
    names = [c.name for c in docker_client.containers.list(all=True)]
    assert run.result.container_name not in names
    image = docker_client.images.get(run.image.ref)
    assert image.labels[naming.L_COMMIT] == run.commit
    assert image.labels[naming.L_MANAGED] == "true"
    assert image.labels[naming.OCI_REVISION] == run.commit


def test_open_files_are_bounded_and_core_dumps_are_off(probe):
    """nofile bounds the run's share of the host's file table; core 0 keeps a host core_pattern
    pipe (apport, systemd-coredump: a root handler) from running on a crash."""
    _, facts = probe
    assert facts["rlimit_nofile"] == [1024, 1024]
    assert facts["rlimit_core"] == [0, 0]


def test_the_deadline_holds_without_the_runner(docker_client, tmp_path):
    """No watchdog at all (the runner SIGKILLed): the container ends itself at its inner deadline."""
    import time

    from sandbox import naming
    from sandbox.docker_backend import hardened_create_kwargs
    from sandbox.images import CPU_BASE_ALIAS, ensure_trainer_image
    from sandbox.spec import Limits, RunSpec

    image = ensure_trainer_image(docker_client, CPU_BASE_ALIAS)
    limits = Limits(time_budget_s=1, timeout_factor=1, startup_grace_s=1, kill_grace_s=1)
    spec = RunSpec(image=image.ref, workdir="/tmp", limits=limits, log_path=tmp_path / "log",
                   command=("sh", "-c", "trap '' TERM; sleep 300 & sleep 300"),
                   name=naming.container_name("run", "nodeadline", "0" * 8),
                   labels=naming.managed_labels(naming.KIND_RUN, **{naming.L_TAG: "nodeadline", naming.L_OWNER: naming.owner()}))
    container = docker_client.containers.create(**hardened_create_kwargs(spec))
    try:
        t0 = time.monotonic()
        container.start()
        status = container.wait(timeout=limits.inner_deadline_s + 30)
        took = time.monotonic() - t0
    finally:
        container.remove(force=True)
    assert status["StatusCode"] in (124, 137)  # timeout's TERM, then KILL for what ignores TERM
    assert limits.inner_deadline_s <= took < limits.inner_deadline_s + 10


def test_each_run_has_its_own_host_uid(run_train):
    """Per-uid kernel limits are not shared between runs: each run is its own uid of the reserved range."""
    from probes import probe_train_py, read_probe

    from sandbox.naming import RUN_UID_BASE, RUN_UID_COUNT

    uids = [read_probe(run_train(probe_train_py()).result.log_path.read_text())["uid"] for _ in range(2)]
    assert all(RUN_UID_BASE <= u < RUN_UID_BASE + RUN_UID_COUNT for u in uids) and uids[0] != uids[1]
