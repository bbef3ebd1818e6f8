"""One research loop across a real Ray cluster on this machine (tests/cluster.py): a head on the
tests' Docker engine and a second node with an engine of its own, so images really move
between engines. The second node sees other data at one path (its own mount namespace), for the
data check. The last test kills the second node's raylet."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import docker
import pytest
from cluster import DRIVER_ENV, RayCluster, provision, python_only_image, registry, second_engine
from conftest import MINI_PREPARE, VALUE_SUMMARY, make_repo, runner_cli

from runner.ledger import Ledger
from runner.records import Lost
from sandbox import naming
from sandbox.images import CPU_BASE_ALIAS

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def cluster(tinylm, docker_client):
    """(RayCluster, the second node's process, its DOCKER_HOST, a data dir the second node sees
    differently). The second engine starts with the CPU base image and nothing else, as a
    provisioned node would (tests/cluster.py: provision)."""
    _, data = tinylm
    root = Path(tempfile.mkdtemp(prefix="ar-cluster-", dir="/tmp"))  # Ray's socket paths must stay short
    skewed, other = root / "skewed-data", root / "other-data"
    shutil.copytree(data, skewed)
    shutil.copytree(data, other)
    (other / "tinylm" / "val.bin").write_bytes(b"not the same validation split\n" * 100)
    (other / "tinylm" / "manifest.json").write_text('{"another": "prepare"}')
    try:
        with second_engine(root / "engine") as host2:
            provision(docker.DockerClient(base_url=host2), docker_client, CPU_BASE_ALIAS)
            ray = RayCluster(root / "ray")
            try:
                ray.start_head()
                node2 = ray.add_node(host2, overlay=(other, skewed))
                yield ray, node2, host2, skewed
            finally:
                ray.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _clone(tinylm, path: Path) -> Path:
    """The prepared example, without baseline reruns for the noise band and with no confirmation
    runs (what these tests check is where runs go, not how keeps are confirmed)."""
    repo, _ = tinylm
    shutil.copytree(repo, path, ignore=shutil.ignore_patterns(".autoresearch", "results.tsv"))
    with open(path / "runner.yaml", "a") as f:
        f.write("noise_runs: 0\nconfirm: off\n")
    subprocess.run(["git", "-C", str(path), "commit", "-qam", "no noise runs, no confirmation"], check=True)
    return path


# The tests of where runs go (not of what they train) run this: train.py sleeps its budget and
# reports VALUE, a knob the offline proposer tunes, on a base of python alone (tests/cluster.py),
# so what moves to the second node is ~270 MB, not torch's 1.3 GB.
SLEEPER = """import os, time
VALUE = 2.0       # the val_bpb this script reports
time.sleep(float(os.environ["AUTORESEARCH_TIME_BUDGET"]))
""" + VALUE_SUMMARY


def _sleeper(path: Path, config: str = "") -> Path:
    config = f"noise_runs: 0\nconfirm: off\nbase_image: {python_only_image(docker.from_env())}\n" + config
    return make_repo(path, SLEEPER, MINI_PREPARE, extra={"runner.yaml": config})


def _start(repo: Path, data: Path, address: str, tag: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "runner", "start", "--tag", tag, "--repo", str(repo), "--data-dir", str(data),
            "--cluster", address, "--proposer", "offline", "--workers", "2", *extra]


def test_images_reach_a_node_through_a_registry_by_digest(cluster, data_dir, tmp_path):
    """With `registry:` an image is pushed once and pulled by digest on the node: the same image
    id there, named by the registry digest, nothing through the object store."""
    ray, _, host2, _ = cluster
    with registry(tmp_path / "registry") as address:
        repo = _sleeper(tmp_path / "repo", f"registry: {address}\n")
        r = runner_cli(*_start(repo, data_dir, ray.address, "reg", "--budget", "2", "--max-experiments", "3")[3:],
                       env=DRIVER_ENV, timeout=1200)
        assert r.returncode == 0, r.stdout + r.stderr
    engine2 = docker.DockerClient(base_url=host2)
    pulled = {i.id for i in engine2.images.list(filters={"label": f"{naming.L_TAG}=reg"})
              if any(d.startswith(address + "/") for d in i.attrs.get("RepoDigests") or [])}
    experiments = Ledger(repo, "reg").experiments()
    on_node2 = [e for e in experiments if e.run.image_id in pulled]
    assert on_node2, "no experiment ran on the second node from the registry"
    assert all(e.run.image_transfer_bytes == 0 for e in experiments)


def test_a_loop_spreads_over_two_nodes_with_one_ledger(cluster, tinylm, tmp_path):
    ray, _, host2, _ = cluster
    _, data = tinylm
    repo = _clone(tinylm, tmp_path / "repo")
    # through the Ray Client (ray://), as from a laptop; the other tests join as a driver
    r = runner_cli("prepare", "--repo", str(repo), "--data-dir", str(data), "--cluster", ray.client_address,
                   timeout=1200)
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(list((repo / ".autoresearch").glob("prepare.*.log"))) == 2  # prepare.py ran on each node

    r = runner_cli(*_start(repo, data, ray.client_address, "spread", "--budget", "2", "--max-experiments", "2")[3:],
                   timeout=1200)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "cluster ray://127.0.0.1" in r.stdout and "2 worker(s)" in r.stdout

    experiments = Ledger(repo, "spread").experiments()
    # each once (two workers finish in either order; a near-miss re-applied on a new best is one more);
    # the two experiments after the baseline start together, one on each node
    assert sorted(e.iteration for e in experiments) == list(range(len(experiments))) and len(experiments) >= 3
    # every keep verified, on the nodes too (a discard decides nothing and is not verified)
    assert all(e.run.verdict == "ok" for e in experiments if e.row.status == "keep")
    nodes = {e.run.node for e in experiments}
    assert len(nodes) == 2, nodes  # both nodes ran experiments
    rows = (repo / "results.tsv").read_text().splitlines()[1:]
    assert len(rows) == len(experiments) == len({row.split("\t")[0] for row in rows})

    # The experiment images are on the second engine by content (the same ids), and once the
    # trainer and sources layers are there an experiment adds only its own few KiB.
    engine2 = docker.DockerClient(base_url=host2)
    there = {i.id for i in engine2.images.list(filters={"label": f"{naming.L_TAG}=spread"})}
    assert any(e.run.image_id in there for e in experiments)
    moved = sorted(e.run.image_transfer_bytes for e in experiments if e.run.image_transfer_bytes)
    assert moved and moved[0] < 1 << 20, moved
    # Past the first (which carries the shared sources layer), an experiment reaches the node as
    # its own archive: train.py's layer and a config, a few KiB, never the engine's save of the chain.
    assert all(m < 64 << 10 for m in moved[:-1]), moved
    # the node actors' scratch folders went with them
    assert not [f for f in Path(tempfile.gettempdir()).glob("autoresearch-node-[0-9]*-*") if not _alive(f)]

    _commands_reach_every_node(repo, ray.client_address, engine2, experiments)


def _alive(folder: Path) -> bool:
    try:
        os.kill(int(folder.name.split("-")[2]), 0)
        return True
    except ProcessLookupError:
        return False


def _commands_reach_every_node(repo: Path, address: str, engine2, experiments) -> None:
    """With `cluster:` in runner.yaml, status, clean and images gc act on the second node's
    engine too: what runs there is listed, a dead runner's leftovers there are removed, and the
    copies of collected images shipped there go with them."""
    with open(repo / "runner.yaml", "a") as f:
        f.write(f"cluster: {address}\n")
    image = experiments[0].run.image_id
    host = naming.owner().rsplit(":", 1)[0]

    def there(name: str, owner: str):
        labels = naming.managed_labels(naming.KIND_RUN, **{naming.L_TAG: "spread", naming.L_OWNER: owner,
                                                           naming.L_COMMIT: "c" * 40, naming.L_ITERATION: "7"})
        return engine2.containers.create(image, ["sleep", "120"], name=naming.container_name("run", "spread", name),
                                         labels=labels)

    live, dead = there("live0000", naming.owner()), there("dead0000", f"{host}:999999999")
    live.start()
    try:
        r = runner_cli("status", "--repo", str(repo), env=DRIVER_ENV, timeout=300)
        assert r.returncode == 0 and any(line.startswith("spread ") and " 7 " in line for line in r.stdout.splitlines()), r.stdout + r.stderr
        r = runner_cli("clean", "--repo", str(repo), env=DRIVER_ENV, timeout=300)
        assert r.returncode == 0 and dead.name in r.stdout and live.name not in r.stdout, r.stdout + r.stderr
        assert {c.name for c in engine2.containers.list(all=True)} >= {live.name}
        assert dead.name not in {c.name for c in engine2.containers.list(all=True)}
    finally:
        live.remove(force=True)

    discarded = {e.run.image_id for e in experiments if e.row.status != "keep"} - {e.run.image_id for e in experiments if e.row.status == "keep"}
    shipped = discarded & {i.id for i in engine2.images.list(filters={"label": f"{naming.L_TAG}=spread"})}
    assert shipped, "no discarded experiment's image reached the second node"
    r = runner_cli("images", "gc", "--repo", str(repo), env=DRIVER_ENV, timeout=300)
    assert r.returncode == 0 and "on cluster nodes" in r.stdout, r.stdout + r.stderr
    left = {i.id for i in engine2.images.list(filters={"label": f"{naming.L_TAG}=spread"})}
    assert not shipped & left


def test_a_node_with_other_data_is_one_clear_error(cluster, tmp_path):
    """The second node sees other files at the data path: a run there stops the loop with one
    line naming the node, and nothing is recorded as an experiment result of it."""
    ray, _, _, skewed = cluster
    repo = _sleeper(tmp_path / "repo")
    r = runner_cli(*_start(repo, skewed, ray.address, "skew", "--budget", "2", "--max-experiments", "4")[3:],
                   env=DRIVER_ENV, timeout=1200)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "holds other data in " + str(skewed) in r.stderr and "runner prepare --cluster" in r.stderr
    assert "node 127.0.0.1" in r.stderr


def test_a_node_lost_mid_run_is_retried_once_and_the_night_goes_on(cluster, data_dir, tmp_path):
    ray, node2, host2, _ = cluster
    repo = _sleeper(tmp_path / "repo")
    loop = subprocess.Popen(_start(repo, data_dir, ray.address, "lost", "--budget", "5", "--max-experiments", "3"),
                            env={**os.environ, **DRIVER_ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        engine2 = docker.DockerClient(base_url=host2)
        deadline = time.monotonic() + 900
        def training_there():  # an experiment training on the second node (not a verifier)
            return [c for c in engine2.containers.list(filters={"label": f"{naming.L_TAG}=lost"})
                    if "train.py" in (c.attrs["Config"]["Cmd"] or [])]

        while not training_there():
            assert loop.poll() is None and time.monotonic() < deadline, "no experiment reached the second node"
            time.sleep(0.5)
        ray.kill_raylet(node2)
        out, err = loop.communicate(timeout=1200)
    finally:
        if loop.poll() is None:
            loop.kill()
    assert loop.returncode == 0, out + err
    assert "lost with its node: running it once more" in err

    ledger = Ledger(repo, "lost")
    lost = ledger.events(Lost)
    assert len(lost) == 1 and lost[0].run.reason == "lost"
    experiments = ledger.experiments()
    assert sorted(e.iteration for e in experiments) == list(range(len(experiments)))  # each counted once
    retried = [e for e in experiments if e.iteration == lost[0].iteration]
    assert len(retried) == 1 and retried[0].outcome == "ok" and retried[0].run.node != lost[0].run.node
    rows = (repo / "results.tsv").read_text().splitlines()[1:]
    assert len(rows) == len(experiments)
