"""Pieces of the cluster and verification work that need no daemon: the layer filter of image
transfers, the new settings' errors, the unnormalised verdict."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile

import pytest

from runner.config import ConfigError, load_config
from runner.summary import STATUS_OK, Metrics, Outcome, apply_verification
from sandbox.transfer import LayerNames, without_layers


def _save_archive(layers: dict[str, bytes]) -> bytes:
    """A legacy `docker save` archive: a folder per layer, a config and manifest.json last."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for folder, data in layers.items():
            add(f"{folder}/VERSION", b"1.0")
            add(f"{folder}/layer.tar", data)
        add("config.json", json.dumps({"rootfs": {"diff_ids": [_digest(d) for d in layers.values()]}}).encode())
        add("manifest.json", json.dumps([{"Config": "config.json", "Layers": [f"{f}/layer.tar" for f in layers]}]).encode())
    return out.getvalue()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _members(chunks) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(b"".join(chunks))) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def test_a_transfer_leaves_out_the_layers_the_node_holds():
    base, experiment = b"torch and friends " * 5000, b"train.py"
    archive = _save_archive({"aaa": base, "bbb": experiment})
    names = LayerNames()
    sent = _members(without_layers([archive[i:i + 4096] for i in range(0, len(archive), 4096)], {_digest(base)}, names,
                                   chunk=1024))
    assert "aaa/layer.tar" not in sent and sent["bbb/layer.tar"] == experiment
    assert "manifest.json" in sent and "config.json" in sent and "aaa/VERSION" in sent
    # names seen once are known by content afterwards (the same layer chain gives the same names)
    assert names.get("aaa/layer.tar") == _digest(base)
    everything = _members(without_layers([archive], set(), names))
    assert everything["aaa/layer.tar"] == base


def test_oci_layout_blobs_are_known_by_their_names():
    names = LayerNames()
    digest = "ab" * 32
    assert names.get(f"blobs/sha256/{digest}") == "sha256:" + digest
    assert names.get("0123/layer.tar") is None


@pytest.mark.parametrize("text, key", [
    ("cluster: 'http://head'\n", "cluster"),
    ("registry: 'registry.local'\n", "registry"),
    ("verify_args:\n  tokenizer: 'Tokenizer.from_directory('\n", "verify_args.tokenizer"),
])
def test_new_settings_name_the_key(tmp_path, text, key):
    (tmp_path / "runner.yaml").write_text(text)
    with pytest.raises(ConfigError, match=key):
        load_config(tmp_path)


def test_held_out_data_inside_the_data_cache_is_refused(tmp_path):
    (tmp_path / "runner.yaml").write_text(f"data_dir: {tmp_path / 'data'}\nverify_data: {tmp_path / 'data' / 'test'}\n")
    with pytest.raises(ConfigError, match="verify_data .* must be outside data_dir"):
        load_config(tmp_path)
    (tmp_path / "runner.yaml").write_text("cluster: ray://head:10001\nregistry: 127.0.0.1:5000\n")
    cfg = load_config(tmp_path)
    assert cfg.cluster == "ray://head:10001" and cfg.registry == "127.0.0.1:5000"


def test_losses_that_are_not_probabilities_are_unnormalised():
    from sandbox.hooks.verify_protocol import Verdict, VerifyReport

    outcome = Outcome(STATUS_OK, "", Metrics(val_bpb=0.5))
    report = VerifyReport(Verdict.UNNORMALISED, why="the probabilities sum to 4.2", val_bpb=0.5, heldout_bpb=0.6,
                          probability_mass=4.2)
    judged = apply_verification(outcome, report, 0.002)
    assert judged.verdict == "unnormalised" and "4.2" in judged.detail and judged.heldout_bpb == 0.6
    honest = apply_verification(outcome, VerifyReport(Verdict.OK, val_bpb=0.5, heldout_bpb=0.6), 0.002)
    assert honest.verdict == "ok" and honest.heldout_bpb == 0.6


def test_backend_ray_without_a_cluster_address_is_one_clear_config_error(tmp_path):
    """`backend: ray` names the executor; the address is cluster:'s. Without it: one line that
    says what to set (it was a TypeError deep in the backend)."""
    (tmp_path / "runner.yaml").write_text("backend: ray\n")
    with pytest.raises(ConfigError, match="backend: ray needs the cluster's address: set cluster: HOST:PORT"):
        load_config(tmp_path)
    (tmp_path / "runner.yaml").write_text("backend: kubernetes\n")
    with pytest.raises(ConfigError, match="backend must be one of docker, ray, got 'kubernetes'"):
        load_config(tmp_path)
    (tmp_path / "runner.yaml").write_text("backend: ray\ncluster: 127.0.0.1:6379\n")
    settings = load_config(tmp_path).backend_settings()
    assert (settings.executor, settings.address) == ("ray", "127.0.0.1:6379")
    (tmp_path / "runner.yaml").write_text("cluster: ray://10.0.0.1:10001\nworkers: 3\n")
    settings = load_config(tmp_path).backend_settings()  # cluster: alone means the Ray executor
    assert (settings.executor, settings.address, settings.workers) == ("ray", "ray://10.0.0.1:10001", 3)
    assert load_config(tmp_path / "nothing-here").backend_settings().executor == "docker"


def test_a_node_actors_scratch_folder_is_swept_once_its_process_is_gone(tmp_path):
    """A node actor killed before it could close leaves its folder; the next actor on the host
    removes it, and never one whose process still runs."""
    from sandbox.ray_backend import NODE_DIR_PREFIX, _sweep_node_dirs

    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = tmp_path / f"{NODE_DIR_PREFIX}{gone.pid}-abc"
    alive = tmp_path / f"{NODE_DIR_PREFIX}{os.getpid()}-def"
    other = tmp_path / f"{NODE_DIR_PREFIX}notapid"
    for folder in (dead, alive, other):
        (folder / "mount0").mkdir(parents=True)
    _sweep_node_dirs(tmp_path)
    assert not dead.exists() and alive.exists() and other.exists()
