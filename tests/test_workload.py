"""What karpathy/autoresearch needs of the sandbox, on the real daemon: the repo's uv.lock is
installed exactly, and a Hub kernel fetched by `runner prepare` loads offline. (Its compiled
model trains and verifies: tests/redteam/test_forged_metric.py.)

The package index and the Hub are servers this module starts on the daemon's bridge address
(tests/servers.py); the lock's other packages come from the package registry the host uses.
"""

from __future__ import annotations

import json
import subprocess
import textwrap

import git
import pytest
from conftest import MINI_PREPARE, SUMMARY, make_repo, run_json, runner_cli
from servers import FakeHub, PackageIndex, bridge_address, serving

pytestmark = pytest.mark.docker

# --- a research repo with its own uv.lock and a Hub kernel ------------------------------------

KERNEL_REPO = "arfix/tiny-kernel"
KERNEL_FILES = {
    # the variant every torch loads: pure Python
    "build/torch-universal/tiny_kernel/__init__.py": b"def triple(x):\n    return 3 * x\n",
    # a variant this CPU image never loads: prefetch must not download it
    "build/torch29-cxx11-cu128-x86_64-linux/tiny_kernel/__init__.py": b"raise ImportError('wrong variant')\n",
}

LOCKED_TRAIN = textwrap.dedent(f'''\
    import arfixture_dep
    from kernels import get_kernel

    tiny = get_kernel("{KERNEL_REPO}")
    import os
    print("TOKEN_VISIBLE", os.path.exists(os.path.expanduser("~/.cache/huggingface/token")))
    print("DEP_VERSION", arfixture_dep.__version__)
    print("KERNEL_RESULT", tiny.triple(14))
    ''') + SUMMARY

UNCACHED_TRAIN = textwrap.dedent('''\
    from kernels import get_kernel

    get_kernel("arfix/never-fetched")
    ''') + SUMMARY


WRITING_PREPARE = MINI_PREPARE + textwrap.dedent('''\
    if __name__ == "__main__":
        import pathlib
        (pathlib.Path.home() / ".cache" / "autoresearch" / "ready").write_text("prepared\\n")
    ''')


def _pyproject(name: str, deps: list[str], index_url: str) -> str:
    return textwrap.dedent(f'''\
        [project]
        name = "{name}"
        version = "0.1.0"
        requires-python = ">=3.11"
        dependencies = {json.dumps(deps)}

        [tool.uv.sources]
        {deps[0].split("=")[0]} = {{ index = "fixture" }}

        [[tool.uv.index]]
        name = "fixture"
        url = "{index_url}/simple"
        explicit = true
        ''')


def _locked_repo(path, pyproject: str, train_py: str, extra: dict | None = None):
    """A committed research repo whose uv.lock is made by `uv lock` against the servers above."""
    from sandbox.images import uv_binary

    lockdir = path.parent / f"{path.name}-lock"
    lockdir.mkdir()
    (lockdir / "pyproject.toml").write_text(pyproject)
    r = subprocess.run([str(uv_binary()), "lock", "--project", str(lockdir)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    files = {"pyproject.toml": pyproject, "uv.lock": (lockdir / "uv.lock").read_text(), **(extra or {})}
    return make_repo(path, train_py, WRITING_PREPARE, files)


@pytest.fixture(scope="module")
def servers(docker_client):
    index, hub = PackageIndex(), FakeHub({KERNEL_REPO: KERNEL_FILES})
    host = bridge_address(docker_client)
    with serving(index.handler(), host) as index_url, serving(hub.handler(), host) as hub_url:
        yield index, index_url, hub, hub_url


@pytest.fixture(scope="module")
def locked(tmp_path_factory, servers):
    """The repo locked to arfixture-dep 1.0.0 (2.0.0 published after the lock), prepared."""
    index, index_url, hub, hub_url = servers
    root = tmp_path_factory.mktemp("locked")
    index.add("arfixture-dep", "1.0.0", '__version__ = "1.0.0"\n')
    pyproject = _pyproject("lockfixture", ["arfixture-dep", "kernels==0.12.1", "huggingface-hub==1.5.0"], index_url)
    (root / "token").write_text("hf_planted_token\n")  # HF_HOME's token file, beside the hub cache
    repo = _locked_repo(root / "repo", pyproject, LOCKED_TRAIN,
                        {"runner.yaml": f"hf_cache: {root / 'hub'}\n"})
    index.add("arfixture-dep", "2.0.0", '__version__ = "2.0.0"\n')  # a plain resolve would take this one
    data = root / "data"
    prep = runner_cli("prepare", "--repo", str(repo), "--data-dir", str(data), env={"HF_ENDPOINT": hub_url})
    return repo, data, root / "hub", prep


def test_prepare_fetches_the_kernel_named_in_train_py(locked, servers):
    repo, _, hub_cache, prep = locked
    assert prep.returncode == 0, prep.stdout + prep.stderr
    assert f"hub: fetched kernel:{KERNEL_REPO}" in prep.stdout
    snapshots = list((hub_cache / "models--arfix--tiny-kernel" / "snapshots").iterdir())
    fetched = {str(p.relative_to(snapshots[0])) for p in snapshots[0].rglob("*") if p.is_file()}
    # kernels' own variant choice, made in the trainer image: only what this torch loads
    assert fetched == {"build/torch-universal/tiny_kernel/__init__.py"}


def test_experiment_sees_the_locked_version_and_loads_the_kernel_offline(locked):
    repo, data, _, prep = locked
    assert prep.returncode == 0, prep.stdout + prep.stderr
    record, log = run_json(repo, data)
    assert record["status"] == "ok", log[-3000:]
    assert "DEP_VERSION 1.0.0" in log
    assert "KERNEL_RESULT 42" in log
    assert "TOKEN_VISIBLE False" in log  # the hub cache is mounted, never HF_HOME and its token


def test_uncached_hub_repo_is_a_crash_that_names_it(locked):
    repo, data, _, prep = locked
    assert prep.returncode == 0, prep.stdout + prep.stderr
    (repo / "train.py").write_text(UNCACHED_TRAIN)
    g = git.Repo(repo)
    g.index.add(["train.py"])
    g.index.commit("ask for a kernel nobody fetched")
    record, _ = run_json(repo, data)
    assert record["status"] == "crash"
    assert record["reason"] == "hub_offline"
    assert "arfix/never-fetched" in record["detail"] and "hf_prefetch" in record["detail"]


def test_a_lock_that_cannot_be_installed_is_one_error_naming_the_package(tmp_path, servers, data_dir):
    index, index_url, _, _ = servers
    index.add("arfixture-gone", "0.1.0", '__version__ = "0.1.0"\n')
    repo = _locked_repo(tmp_path / "repo", _pyproject("gonefixture", ["arfixture-gone"], index_url), SUMMARY)
    index.remove("arfixture-gone", "0.1.0")
    r = runner_cli("run", "--repo", str(repo), "--data-dir", str(data_dir), "--json")
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and r.stderr.rstrip().endswith(errors[0]), r.stderr
    assert "arfixture-gone" in errors[0] and "uv.lock" in errors[0]



def test_requirements_keep_the_bases_torch_and_add_what_is_missing(tmp_path, servers, data_dir):
    """A requirements.txt naming torch (most research repos do) must not pull a CUDA torch over
    the base's: it is satisfied as it is; the rest is installed."""
    from conftest import make_repo

    index, index_url, _, _ = servers
    index.add("arfixture-req", "3.0.0", '__version__ = "3.0.0"\n')
    train = textwrap.dedent('''\
        import arfixture_req, torch
        print("REQ", arfixture_req.__version__, "TORCH", torch.__version__)
        ''') + SUMMARY
    repo = make_repo(tmp_path / "repo", train, MINI_PREPARE, {
        "requirements.txt": f"--extra-index-url {index_url}/simple\ntorch\narfixture-req==3.0.0\n"})
    record, log = run_json(repo, data_dir)
    assert record["status"] == "ok", log[-2000:]
    assert "REQ 3.0.0 TORCH 2.13.0+cpu" in log
