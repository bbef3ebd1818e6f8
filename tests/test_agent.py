"""The runner in its own container (Dockerfile.agent), driving the host's engine through the
socket: a short loop runs, and the API key given to the runner never reaches an experiment."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from conftest import REPO_ROOT, VALUE_SUMMARY, make_repo

pytestmark = pytest.mark.docker

AGENT_UID = 10002
SECRET = "sk-ant-agent-only-0123456789"
TRAIN = """import os
VALUE = 2.0
print("KEY_SEEN=" + str(any("sk-ant" in v for v in os.environ.values())), flush=True)
""" + VALUE_SUMMARY


@pytest.fixture(scope="module")
def agent_image(docker_client):
    from sandbox import images

    ca = os.environ.get("PIP_CERT")
    return images.build_agent_image(docker_client, REPO_ROOT, ca_bundle=Path(ca) if ca and Path(ca).is_file() else None)


def test_containerised_runner_runs_a_loop_and_keeps_the_key_to_itself(agent_image, docker_client):
    # Host paths the agent's user can reach (pytest's own tmp dirs are private to root).
    root = Path(tempfile.mkdtemp(prefix="ar-agent-test-"))
    try:
        os.chmod(root, 0o755)
        repo, data = make_repo(root / "repo", TRAIN), root / "data"
        data.mkdir()
        (data / "placeholder.txt").write_text("x")
        for path in [root, *root.rglob("*")]:
            os.chown(path, AGENT_UID, AGENT_UID)
        sock = "/var/run/docker.sock"
        container = docker_client.containers.run(
            agent_image.ref,
            ["start", "--repo", str(repo), "--tag", "ag", "--budget", "1", "--max-experiments", "1",
             "--proposer", "offline"],
            environment={"ANTHROPIC_API_KEY": SECRET, "AUTORESEARCH_DATA_DIR": str(data)},
            volumes={sock: {"bind": sock, "mode": "rw"}, str(root): {"bind": str(root), "mode": "rw"}},
            group_add=[str(os.stat(sock).st_gid)],
            detach=True,
        )
        try:
            status = container.wait(timeout=300)
            logs = container.logs().decode()
        finally:
            container.remove(force=True)
        assert status["StatusCode"] == 0, logs
        assert "[EXP] ag 0 |" in logs and "[EXP] ag 1 |" in logs and "=== autoresearch ag" in logs
        events = [json.loads(line) for line in (repo / ".autoresearch/ag/events.jsonl").read_text().splitlines()]
        start = next(e for e in events if e["event"] == "start")
        assert start["config"]["tag"] == "ag" and start["config"]["budget_s"] == 1.0
        runs = [e for e in events if e["event"] == "experiment"]
        assert len(runs) == 2
        for e in runs:
            log = Path(e["run"]["log"]).read_text()
            assert "KEY_SEEN=False" in log and SECRET not in log
            assert e["row"]["status"] in ("keep", "discard")
        assert all(e["run"]["image"].startswith("autoresearch-runner/ag:") for e in runs)
    finally:
        shutil.rmtree(root, ignore_errors=True)
