"""Every row can be run again from its image: rerun, noise, images on disk, export and import."""

from __future__ import annotations

import json
import secrets

import pytest
from cluster import python_only_image
from conftest import make_repo, runner_cli
from test_loop import MINI_TRAIN, Scripted, make_loop, variant

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, docker_client):
    """A short loop with a keep and a discard: (repo path, data dir, rows)."""
    root = tmp_path_factory.mktemp("reruns")
    data = root / "data"
    data.mkdir()
    (data / "manifest.json").write_text('{"files": {"train.bin": "abc"}}')
    # train.py needs python alone: on the python-only base an exported experiment is ~270 MB, not 1.3 GB
    path = make_repo(root / "r", MINI_TRAIN, extra={"runner.yaml": f"base_image: {python_only_image(docker_client)}\n"})
    tag = f"rr{secrets.token_hex(3)}"  # images of earlier sessions must not mix in
    loop, _, _ = make_loop(path, lambda repo: Scripted(repo, [(variant(VALUE=1.5), "better"), (variant(VALUE=1.9), "worse")]),
                           data, max_experiments=2, tag=tag)
    loop.run()
    return path, data, loop.ledger.rows(), tag


def _rerun(path, data, what, *extra):
    r = runner_cli("rerun", what, "--repo", str(path), "--data-dir", str(data), "--json", *extra)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_rerun_of_a_kept_and_a_discarded_commit(finished_run):
    path, data, rows, tag = finished_run
    kept, discarded = rows[1], rows[2]
    assert (kept.status, discarded.status) == ("keep", "discard")
    out = _rerun(path, data, kept.commit, "--n", "2", "--tag", tag)
    assert out["recorded_val_bpb"] == 1.5 and out["new_val_bpb"] == [1.5, 1.5] and out["diff"] == [0.0, 0.0]
    out = _rerun(path, data, discarded.commit, "--tag", tag)
    assert out["recorded_status"] == "discard" and out["new_val_bpb"] == [1.9] and out["diff"] == [0.0]


def test_rerun_refuses_other_data(finished_run, tmp_path):
    path, _, rows, tag = finished_run
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text('{"files": {"train.bin": "different"}}')
    r = runner_cli("rerun", rows[1].commit, "--repo", str(path), "--data-dir", str(other), "--tag", tag)
    assert r.returncode == 2 and "is not what" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_same_commit_reuses_its_image(finished_run, engine_for):
    path, data, rows, tag = finished_run
    engine = engine_for(path, data_dir=data, budget_s=1)
    sha = engine.repo.resolve(rows[1].commit).sha
    first = engine.experiment_image(sha, tag, engine.limits(), "x")
    again = engine.experiment_image(sha, tag, engine.limits(), "x")
    assert first.reused and again.reused and first.id == again.id


def test_images_list_and_disk_per_experiment(finished_run):
    path, _, rows, tag = finished_run
    r = runner_cli("images", "--tag", tag, "--repo", str(path))
    assert r.returncode == 0, r.stderr
    assert f"autoresearch-runner/{tag}:" in r.stdout and "keep" in r.stdout and "discard" in r.stdout
    per = float(r.stdout.strip().splitlines()[-1].split("images, ")[1].split(" KiB")[0])
    assert 0 < per < 100  # only train.py's layer is new per experiment


def test_gc_never_removes_the_kept_chain(finished_run, docker_client):
    from runner.reruns import experiment_images

    path, _, rows, tag = finished_run
    r = runner_cli("images", "gc", "--tag", tag, "--repo", str(path))
    assert r.returncode == 0, r.stderr
    from sandbox.docker_backend import DockerImageStore

    left = {i.commit[:7] for i in experiment_images(DockerImageStore(docker_client), tag)}
    assert rows[0].commit in left and rows[1].commit in left   # baseline and the keep
    assert rows[2].commit not in left                            # the discard


def test_export_then_import_on_a_clean_engine_reruns(finished_run, tmp_path, docker_client, monkeypatch):
    path, data, rows, tag = finished_run
    bundle = tmp_path / "exp.tar"
    r = runner_cli("export", rows[1].commit, "-o", str(bundle), "--tag", tag, "--repo", str(path))
    assert r.returncode == 0, r.stderr
    ref = r.stdout.strip().split(": ")[-1]
    docker_client.images.remove(ref)  # this engine no longer has it
    home = tmp_path / "home"        # nor the ledger: another host
    env = {"HOME": str(home)}
    r = runner_cli("import", str(bundle), env=env)
    assert r.returncode == 0, r.stderr
    r = runner_cli("rerun", ref, "--data-dir", str(data), "--json", "--repo", str(tmp_path), env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["recorded_val_bpb"] == 1.5 and out["new_val_bpb"] == [1.5]


def test_noise_floor_and_min_delta_auto(tmp_path, data_dir):
    path = make_repo(tmp_path / "r", MINI_TRAIN)
    loop, _, lines = make_loop(path, lambda repo: Scripted(repo, [(variant(VALUE=1.9999999), "tiny gain")]),
                               data_dir, max_experiments=1, min_delta="auto", noise_runs=2, tag="nz")
    loop.run()
    from runner.records import Noise

    noise = loop.ledger.events(Noise)
    assert noise and noise[0].n == 3 and noise[0].spread == 0.0
    r = runner_cli("noise", "--tag", "nz", "--n", "2", "--repo", str(path), "--data-dir", str(data_dir))
    assert r.returncode == 0, r.stderr
    assert "spread 0.000000" in r.stdout


@pytest.mark.docker
def test_an_experiment_image_is_its_archive_on_any_engine_and_a_build_where_loading_fails(tmp_path, engine_for,
                                                                                        docker_client, monkeypatch):
    """An experiment image is loaded from a few-KiB archive whose config hash is its id (what a
    cluster node is sent); an engine that refuses the archive gets the same image by a build."""
    import hashlib
    import io
    import tarfile

    from conftest import MINI_PREPARE

    from sandbox import images

    # a commit of its own (the same files committed in the same second are finished_run's commit)
    engine = engine_for(make_repo(tmp_path / "repo", MINI_TRAIN + "# arch\n", MINI_PREPARE), budget_s=1)
    sha = engine.repo.head().sha
    built = engine.experiment_image(sha, "arch", engine.limits(), "x")
    assert not built.reused and built.parent_id and 0 < len(built.archive) < 64 << 10
    with tarfile.open(fileobj=io.BytesIO(built.archive)) as tar:
        config = tar.extractfile(f"{built.id.split(':')[1]}.json").read()
    assert "sha256:" + hashlib.sha256(config).hexdigest() == built.id == docker_client.images.get(built.ref).id
    image = docker_client.images.get(built.ref)
    assert image.labels["io.autoresearch-runner.commit"] == sha and image.attrs["Config"]["User"] == f"{images.RUNNER_UID}:{images.RUNNER_UID}"
    assert engine.store.added_bytes(built.id, built.parent_id) < 64 << 10

    docker_client.images.remove(built.ref, force=True)

    def refused(client, archive, image_id):
        raise images.ImageBuildError("this engine loads no archive without its layers")

    monkeypatch.setattr(images, "load_archive", refused)
    again = engine.experiment_image(sha, "arch", engine.limits(), "x")
    assert not again.reused and again.archive == b"" and docker_client.images.get(again.ref).labels[
        "io.autoresearch-runner.commit"] == sha
    docker_client.images.remove(again.ref, force=True)


def test_the_image_list_says_what_looking_each_image_up_says(finished_run, docker_client):
    """The store lists images in one request (the engine's list) rather than inspecting each:
    every listed record is the record of that image looked up alone, name, labels, creation
    time and size included, and the experiments' sizes are what they add above the sources."""
    from runner.reruns import experiment_images
    from sandbox import naming
    from sandbox.docker_backend import DockerImageStore

    _, _, rows, tag = finished_run
    store = DockerImageStore(docker_client)
    listed = store.images(naming.KIND_EXPERIMENT, **{naming.L_TAG: tag})
    # (the module's gc test may have removed the discarded one's)
    assert listed and {r.labels[naming.L_COMMIT][:7] for r in listed} <= {r.commit for r in rows}
    for record in listed:
        assert store.image(record.id) == record
        assert record.size and record.created.endswith("Z")
    whole = {r.id: r.size for r in listed}  # what an experiment adds is a sliver of its image
    assert all(0 < e.size_added_bytes < whole[e.id] / 100 for e in experiment_images(store, tag))


def test_an_image_removed_while_it_is_listed_is_left_out(finished_run, docker_client):
    """Another runner's gc (another user's, on a shared engine) may remove an image between the
    listing and the reading of its size: `runner images` and rerun go on without it."""
    from runner.reruns import experiment_images
    from sandbox import naming
    from sandbox.backend import ImageRecord
    from sandbox.docker_backend import DockerImageStore

    _, _, _, tag = finished_run
    gone = ImageRecord(f"autoresearch-runner/{tag}:gone", "sha256:" + "0" * 64,
                       naming.managed_labels(naming.KIND_EXPERIMENT, **{naming.L_TAG: tag, naming.L_COMMIT: "0" * 40}))

    class ListedBeforeTheRemoval(DockerImageStore):
        def images(self, kind, **labels):
            return [*super().images(kind, **labels), gone]

    listed = experiment_images(ListedBeforeTheRemoval(docker_client), tag)
    assert listed and listed == experiment_images(DockerImageStore(docker_client), tag)
