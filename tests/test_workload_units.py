"""Unit tests of the workload pieces that need no daemon: Hub repo discovery, dependency
selection, and the one-line account of a dependency that cannot be installed."""

from __future__ import annotations

import textwrap

import pytest

from runner.config import ConfigError
from runner.deps import resolve_dependencies
from runner.hub import HubRef, find_refs, missing_detail, parse_prefetch, read_fetch_report, wanted_refs
from sandbox.images import dependency_failure

# The shape of karpathy/autoresearch's train.py head: the repo id is chosen at import time.
AUTORESEARCH_HEAD = textwrap.dedent('''\
    import torch
    from kernels import get_kernel
    cap = torch.cuda.get_device_capability()
    # varunneal's FA3 is Hopper only, use kernels-community on non-Hopper GPUs
    repo = "varunneal/flash-attention-3" if cap == (9, 0) else "kernels-community/flash-attn3"
    fa3 = get_kernel(repo).flash_attn_interface
    ''')


def test_finds_both_kernel_repos_autoresearch_may_load():
    assert {r.label for r in find_refs(AUTORESEARCH_HEAD)} == {
        "kernel:varunneal/flash-attention-3", "kernel:kernels-community/flash-attn3"}


def test_finds_hub_downloads_by_literal_and_keyword():
    refs = find_refs(textwrap.dedent('''\
        from huggingface_hub import hf_hub_download, snapshot_download
        hf_hub_download("org/m", "config.json")
        hf_hub_download(repo_id="org/m", filename="model.bin")
        snapshot_download("org/ds", repo_type="dataset", revision="v2")
        AutoModel.from_pretrained("gpt2")
        AutoModel.from_pretrained("./checkpoints/local")
        get_kernel(f"org/{name}")
        '''))
    assert {(r.label, r.files) for r in refs} == {
        ("model:org/m", ("config.json", "model.bin")),
        ("dataset:org/ds@v2", ()),
        ("model:gpt2", ()),
    }


def test_unparseable_source_names_nothing():
    assert find_refs("def broken(:\n") == []


def test_prefetch_entries_and_their_errors():
    assert parse_prefetch("kernel:kernels-community/flash-attn3@v1") == HubRef("kernels-community/flash-attn3", "kernel", "v1")
    assert parse_prefetch("org/model").kind == "model"
    with pytest.raises(ConfigError, match="hf_prefetch"):
        parse_prefetch("weights:org/model")
    with pytest.raises(ConfigError, match="hf_prefetch"):
        parse_prefetch("not a repo")


def test_code_and_prefetch_merge_into_one_ref_per_repo():
    refs = wanted_refs({"train.py": 'get_kernel("a/b")', "prepare.py": 'get_kernel("a/b")'}, ("kernel:a/b", "c/d"))
    assert [r.label for r in refs] == ["kernel:a/b", "model:c/d"]


def test_missing_detail_names_only_uncached_repos(tmp_path):
    cached = tmp_path / "models--a--b" / "snapshots" / "0123abc"
    cached.mkdir(parents=True)
    (cached / "f").write_text("x")
    detail = missing_detail([HubRef("a/b", "kernel"), HubRef("c/d", "kernel")], tmp_path)
    assert "c/d" in detail and "a/b" not in detail and "hf_prefetch" in detail


def test_fetch_report_fails_prepare_only_for_explicit_repos():
    log = "HUB ok kernel:a/b /cache/x\nHUB failed kernel:c/d FileNotFoundError: no variant\nHUB failed model:e/f HTTPError: 404\n"
    report = read_fetch_report(log, {"model:e/f"})
    assert report.fetched == ["kernel:a/b"]
    assert len(report.failed) == 2 and report.fatal == ["model:e/f HTTPError: 404"]


def _reader(**files):
    """A committed-file reader over `files` (names with "." written "__")."""
    files = {name.replace("__", "."): text for name, text in files.items()}
    return lambda name: files.get(name, "")


def test_dependencies_auto_prefers_the_lock():
    deps = resolve_dependencies(_reader(pyproject__toml='[project]\nname="x"\ndependencies=["a"]\n',
                                        uv__lock="version = 1\n", requirements__txt="b\n"), "auto")
    assert deps.kind == "lock" and [n for n, _ in deps.files] == ["pyproject.toml", "uv.lock"]


def test_dependencies_auto_falls_back_in_order():
    no_deps = _reader(pyproject__toml='[project]\nname="x"\n', requirements__txt="b\n")
    assert resolve_dependencies(no_deps, "auto").kind == "requirements"  # a pyproject without deps
    with_deps = _reader(pyproject__toml='[project]\nname="x"\ndependencies=["a"]\n', requirements__txt="b\n")
    assert resolve_dependencies(with_deps, "auto").kind == "pyproject"
    assert resolve_dependencies(with_deps, "none").kind == "none"
    assert resolve_dependencies(_reader(), "auto").kind == "none"


def test_dependencies_named_explicitly_and_the_errors():
    read = _reader(**{"env/gpu__txt": "torch\n"})
    deps = resolve_dependencies(read, "env/gpu.txt")
    assert deps.kind == "requirements" and deps.files == (("requirements.txt", b"torch\n"),)
    with pytest.raises(ConfigError, match="not a file committed in the repo"):
        resolve_dependencies(read, "missing.txt")
    with pytest.raises(ConfigError, match="not a file committed in the repo"):
        resolve_dependencies(read, "../../etc/passwd")
    with pytest.raises(ConfigError, match="pyproject.toml"):
        resolve_dependencies(_reader(uv__lock="version = 1\n"), "uv.lock")
    with pytest.raises(ConfigError, match="not valid TOML"):
        resolve_dependencies(_reader(pyproject__toml="[project\n"), "auto")


UV_DOWNLOAD_FAILURE = """\
 ---> Running in 3b9e75a7442d
error: Failed to download `arfixture-gone==0.1.0`
  cause: Request failed after 3 retries in 8.4s
  cause: HTTP status client error (404 Not Found) for url (http://127.0.0.1:1/files/arfixture_gone-0.1.0-py3-none-any.whl)
hint: `arfixture-gone` (v0.1.0) was included because `gonefixture` (v0.1.0) depends on `arfixture-gone`
Removing intermediate container 3b9e75a7442d"""

UV_UNKNOWN_FAILURE = """\
  × No solution found when resolving dependencies:
  ╰─▶ Because arfixture-unknown was not found in the package registry and you require arfixture-unknown, we can conclude that your requirements are unsatisfiable."""

UV_RESOLVE_FAILURE = """\
  × No solution found when resolving dependencies:
  ╰─▶ Because there is no version of arfixture-nope==9.9 and you require arfixture-nope==9.9, we can conclude that your requirements are unsatisfiable."""


def test_dependency_failure_is_one_line_naming_the_package():
    line = dependency_failure("uv.lock", UV_DOWNLOAD_FAILURE.splitlines())
    assert "\n" not in line
    assert line.startswith("installing uv.lock into the trainer image failed at arfixture-gone==0.1.0: ")
    assert "404 Not Found" in line
    line = dependency_failure("requirements.txt", UV_RESOLVE_FAILURE.splitlines())
    assert "failed at arfixture-nope==9.9:" in line and "unsatisfiable" in line
    assert "failed at arfixture-unknown:" in dependency_failure("requirements.txt", UV_UNKNOWN_FAILURE.splitlines())
