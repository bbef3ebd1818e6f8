"""Held-out data no experiment can read (runner/heldout.py, docs/heldout.md): tinylm's held-out
text ships with the runner and reaches only verify_data; autoresearch's recipe (`heldout:` in
runner.yaml) fills verify_data with a download and a copy of the tokenizer, prepare.py untouched."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import SUMMARY, make_repo, run_json, runner_cli
from servers import _Handler, serving

from runner.config import ConfigError, RunConfig, load_config
from runner.examples import example_source, init_example
from runner.heldout import HeldoutError, fill, parse

HELDOUT_TEXT = example_source().parent / "heldout" / "cpython-3.11-tools-scripts.txt"
# Lines of the held-out text found nowhere in the CPU base image (checked when it was chosen)
DISTINCTIVE = (
    "# This script converts a C file to use the PEP 384 type definition API",
    "# Perform massive identifier substitution on C source files.",
    "# Make a copy of a directory tree with symbolic links to all files in the",
    "# Make a reST file compliant to our pre-commit hook.",
    "Utility for parsing HTML5 entity definitions available from:",
)
# A line of tinylm's validation split (Lib/__future__.py): an experiment does find this one
VAL_LINE = '"""Record of phased-in incompatible language changes.'
ARLIKE = Path(__file__).resolve().parent / "fixtures" / "arlike"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _files_server(files: dict[str, bytes], hits: list[str]):
    """A handler class serving `files` by URL path, recording each GET in `hits`."""

    class Handler(_Handler):
        def serve(self, head: bool):
            body = files.get(self.path)
            if body is None:
                return self.send(404, b"not found\n", {}, head)
            if not head:
                hits.append(self.path)
            self.send(200, body, {"Content-Type": "application/octet-stream"}, head)

    return Handler


def _cfg(tmp_path: Path, heldout: dict[str, str]) -> RunConfig:
    (tmp_path / "repo").mkdir(exist_ok=True)
    return RunConfig(repo=tmp_path / "repo", data_dir=tmp_path / "data", verify_data=tmp_path / "heldout", heldout=heldout)


# --- no daemon -------------------------------------------------------------------------------


def test_the_tinylm_heldout_text_is_pinned_and_never_copied_into_the_example(tmp_path):
    text = HELDOUT_TEXT.read_text()
    assert all(line in text for line in DISTINCTIVE) and VAL_LINE not in text
    spec = yaml.safe_load((example_source() / "runner.yaml").read_text())["heldout"]["tinylm/val.bin"]
    assert spec.endswith("#sha256=" + _sha(HELDOUT_TEXT.read_bytes()) + "&scramble=python")
    repo = init_example(tmp_path / "tinylm")
    tracked = subprocess.run(["git", "-C", str(repo), "ls-files"], capture_output=True, text=True, check=True).stdout.split()
    assert "runner.yaml" in tracked
    for name in tracked:
        data = (repo / name).read_bytes()
        assert not any(line.encode() in data for line in DISTINCTIVE), name


def test_heldout_entries_are_checked_when_the_config_loads(tmp_path):
    assert parse("data/a.parquet", "https://h/x.parquet#sha256=" + "a" * 64).sha256 == "a" * 64
    assert parse("tokenizer/t.pkl", "data_dir:tokenizer/t.pkl").kind == "data_dir"
    assert parse("x/val.bin", "package:autoresearch_examples/heldout/x.txt").location == "autoresearch_examples/heldout/x.txt"
    assert parse("x/val.bin", "/srv/held/x.bin").kind == "path"
    for target, source in [("../up", "/x"), ("/abs", "/x"), ("a/./b", "/x"), ("ok", "ftp://h/x"), ("ok", "relative/x"),
                           ("ok", "data_dir:../x"), ("ok", "https://h/x#md5=00"), ("ok", "https://h/x#sha256=ABC")]:
        with pytest.raises(ConfigError, match="heldout"):
            parse(target, source)
    (tmp_path / "runner.yaml").write_text("verify_data: null\nheldout:\n  x/val.bin: /srv/x\n")
    with pytest.raises(ConfigError, match="verify_data"):
        load_config(tmp_path)


def test_fill_copies_pins_and_downloads(tmp_path):
    (tmp_path / "data" / "tok").mkdir(parents=True)
    (tmp_path / "data" / "tok" / "tokenizer.json").write_text('{"bytes": 256}')
    shard = b"held-out shard\n" * 1000
    hits: list[str] = []
    with serving(_files_server({"/shard_00007.bin": shard}, hits), "127.0.0.1") as url:
        cfg = _cfg(tmp_path, {
            "data/shard_00099.bin": f"{url}/shard_00007.bin#sha256={_sha(shard)}",
            "tok/tokenizer.json": "data_dir:tok/tokenizer.json",
            "tinylm/val.bin": "package:autoresearch_examples/heldout/cpython-3.11-tools-scripts.txt",
        })
        lines: list[str] = []
        written = fill(cfg, lines.append)
        held = tmp_path / "heldout"
        assert written == [held / "data/shard_00099.bin", held / "tok/tokenizer.json", held / "tinylm/val.bin"]
        assert (held / "data/shard_00099.bin").read_bytes() == shard and hits == ["/shard_00007.bin"]
        assert (held / "tok/tokenizer.json").read_text() == '{"bytes": 256}'
        assert (held / "tinylm/val.bin").read_bytes() == HELDOUT_TEXT.read_bytes()
        assert "downloaded" in lines[0] and "pinned" in lines[0]
        assert f"pin it with #sha256={_sha(HELDOUT_TEXT.read_bytes())}" in lines[2]
        fill(cfg, lines.append)  # a pinned download in place is not fetched again
        assert hits == ["/shard_00007.bin"] and "kept" in lines[3]
        assert not list(held.rglob(".*.part"))


def test_fill_refuses_a_pin_mismatch_a_failed_download_and_data_experiments_read(tmp_path):
    (tmp_path / "data" / "arlike").mkdir(parents=True)
    val = b'["the model reads a byte"]'
    (tmp_path / "data" / "arlike" / "val.json").write_bytes(val)
    hits: list[str] = []
    with serving(_files_server({"/val.json": val, "/other.json": b"[]"}, hits), "127.0.0.1") as url:
        held = tmp_path / "heldout" / "arlike" / "val.json"
        with pytest.raises(HeldoutError, match="not the pinned"):
            fill(_cfg(tmp_path, {"arlike/val.json": f"{url}/other.json#sha256={'0' * 64}"}), lambda m: None)
        assert not held.exists() and not list((tmp_path / "heldout").rglob(".*.part"))
        with pytest.raises(HeldoutError, match="HTTP 404"):
            fill(_cfg(tmp_path, {"arlike/val.json": f"{url}/missing.json"}), lambda m: None)
        # the validation split itself, served back: it would hold nothing out
        with pytest.raises(HeldoutError, match="byte for byte .*data/arlike/val.json"):
            fill(_cfg(tmp_path, {"arlike/val.json": f"{url}/val.json"}), lambda m: None)
        assert not held.exists()
    with pytest.raises(HeldoutError, match="did prepare.py make it"):
        fill(_cfg(tmp_path, {"arlike/tokenizer.json": "data_dir:arlike/tokenizer.json"}), lambda m: None)


# --- the real daemon -------------------------------------------------------------------------


@pytest.mark.docker
def test_runner_prepare_writes_the_tinylm_heldout_text_into_verify_data(tinylm, heldout_dir):
    repo, data = tinylm
    from runner.scramble import SECRET_NAME, scramble_python

    # The public text, scrambled with this host's secret (kept in verify_data, readable by its owner only).
    written = (heldout_dir / "tinylm" / "val.bin").read_bytes()
    secret = heldout_dir / SECRET_NAME
    assert written == scramble_python(HELDOUT_TEXT.read_bytes(), secret.read_bytes()) != HELDOUT_TEXT.read_bytes()
    assert secret.stat().st_mode & 0o777 == 0o600
    for folder in (repo, data):
        for path in folder.rglob("*"):
            if path.is_file() and ".git" not in path.parts:
                assert not any(line.encode() in path.read_bytes() for line in DISTINCTIVE), path


@pytest.mark.docker
def test_no_experiment_can_read_the_tinylm_heldout_text(tinylm, tmp_path, docker_client):
    """From inside an experiment (its image, the data cache and every other mount) grep finds a
    line of the validation split and none of the held-out text; nor does root in the image."""
    import shutil

    repo, data = tinylm
    clone = tmp_path / "repo"
    shutil.copytree(repo, clone, ignore=shutil.ignore_patterns(".autoresearch", "results.tsv"))
    patterns = [a for line in DISTINCTIVE for a in ("-e", line)]
    grep = ["grep", "-rlsF", "--exclude-dir=proc", "--exclude-dir=sys", "--exclude-dir=dev"]
    # the lines travel hex-encoded, so that train.py itself (in the image) does not hold them
    hexed = [line.encode().hex() for line in DISTINCTIVE]
    (clone / "train.py").write_text(
        "import subprocess\n"
        f"patterns = [a for h in {hexed!r} for a in ('-e', bytes.fromhex(h).decode())]\n"
        f"held = subprocess.run({grep!r} + patterns + ['/'], capture_output=True, text=True)\n"
        f"val = subprocess.run({grep + ['-e', VAL_LINE, '/home/runner/.cache']!r}, capture_output=True, text=True)\n"
        "print('HELD', repr(held.stdout.split()), held.returncode)\n"
        "print('VAL', repr(val.stdout.split()))\n" + SUMMARY)
    subprocess.run(["git", "-C", str(clone), "commit", "-qam", "look for the held-out text"], check=True)
    record, log = run_json(clone, data, "--budget", "3")
    assert "HELD [] " in log, log[-2000:]
    assert "VAL ['/home/runner/.cache/autoresearch/tinylm/val.bin']" in log, log[-2000:]

    container = docker_client.containers.create(record["image"], command=grep + patterns + ["/"], user="0",
                                                network_disabled=True)
    try:
        container.start()
        status = container.wait(timeout=300)
        found = container.logs(stdout=True, stderr=False).decode()
    finally:
        container.remove(force=True)
    assert found == "" and status["StatusCode"] in (1, 2), found


@pytest.mark.docker
def test_an_honest_tinylm_run_is_verified_and_scored_on_the_heldout_text(tinylm, tmp_path, heldout_dir):
    """An honest run verifies ok with the verifier's own val_bpb and a held-out figure of its own.
    Verified again against held-out data its evaluation cannot read, it is not ok: a verification
    without a held-out figure, where there is held-out data, never is."""
    import shutil

    from runner.engine import Engine
    from runner.repo import ResearchRepo

    repo, data = tinylm
    research = ResearchRepo(repo)
    engine = Engine(load_config(repo, {"data_dir": data, "budget_s": 3}), research, progress=lambda m: None)
    finished = engine.run_commit(research.head().sha, "heldout", tmp_path / "run.log")
    run = engine.verify(finished, "heldout")
    record = run.record()
    assert record.status == "ok" and record.verdict == "ok", record
    assert record.val_bpb == pytest.approx(record.self_reported_val_bpb, rel=1e-3) and 0 < record.val_bpb < 8
    assert record.heldout_val_bpb is not None and 0 < record.heldout_val_bpb < 8
    assert record.heldout_val_bpb != record.val_bpb

    broken = tmp_path / "broken-heldout"
    shutil.copytree(heldout_dir, broken)
    (broken / "tinylm" / "val.bin").unlink()
    (broken / "tinylm" / "val.bin").mkdir()  # what the evaluation opens is not a file
    cfg = load_config(repo, {"data_dir": data, "budget_s": 3, "verify_data": broken})
    again = Engine(cfg, research, progress=lambda m: None).verify(finished, "heldout")
    record = again.record()
    assert record.status == "ok" and record.verdict == "unverified" and record.heldout_val_bpb is None, record
    assert "held-out evaluation failed" in again.outcome.detail and "IsADirectoryError" in again.outcome.detail, record


@pytest.mark.docker
def test_the_autoresearch_recipe_fills_verify_data_without_changing_prepare_py(tmp_path, docker_client):
    """An autoresearch-shaped repo whose prepare.py, like autoresearch's, writes no held-out
    data: runner.yaml's `heldout:` downloads a shard train.py never reads to the validation
    shard's name and copies the tokenizer, and the verifier scores the model on it."""
    source = (ARLIKE / "prepare.py").read_text()
    unaware = source.replace('HELDOUT_DIR = os.environ.get("AUTORESEARCH_HELDOUT_DIR")', "HELDOUT_DIR = None")
    assert unaware != source
    held, data = tmp_path / "heldout", tmp_path / "data"
    repo = make_repo(tmp_path / "repo", (ARLIKE / "train.py").read_text(), unaware,
                     extra={"runner.yaml": f"verify_data: {held}\n"})
    r = runner_cli("prepare", "--repo", str(repo), "--data-dir", str(data))
    assert r.returncode == 0, r.stdout + r.stderr
    assert not [p for p in held.rglob("*") if p.is_file()]  # prepare.py held nothing out

    spec = importlib.util.spec_from_file_location("arlike_prepare", ARLIKE / "prepare.py")
    arlike = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(arlike)
    shard = json.dumps(arlike._text(7, 400)).encode()  # the same kind of text, a seed train.py never sees
    hits: list[str] = []
    with serving(_files_server({"/shards/shard_00007.json": shard}, hits), "127.0.0.1") as url:
        (repo / "runner.yaml").write_text(
            f"verify_data: {held}\n"
            "heldout:\n"
            f"  arlike/val.json: {url}/shards/shard_00007.json#sha256={_sha(shard)}\n"
            "  arlike/tokenizer.json: data_dir:arlike/tokenizer.json\n")
        subprocess.run(["git", "-C", str(repo), "commit", "-qam", "held-out recipe"], check=True)
        r = runner_cli("prepare", "--repo", str(repo), "--data-dir", str(data))
        assert r.returncode == 0, r.stdout + r.stderr
    assert hits == ["/shards/shard_00007.json"]
    assert "held-out arlike/val.json: downloaded" in r.stdout
    assert (held / "arlike" / "val.json").read_bytes() == shard
    assert (held / "arlike" / "tokenizer.json").read_bytes() == (data / "arlike" / "tokenizer.json").read_bytes()

    record, _ = run_json(repo, data, "--budget", "3")
    assert record["status"] == "ok" and record["verdict"] == "ok", record
    assert record["heldout_val_bpb"] is not None and 0 < record["heldout_val_bpb"] < 8
    assert record["heldout_val_bpb"] != record["val_bpb"]


# --- the scramble: a held-out text that exists nowhere else ------------------------------------


def test_a_scrambled_heldout_text_is_the_hosts_own_and_the_same_at_each_prepare(tmp_path):
    """`#scramble=python` writes the pinned public text scrambled with a secret made once in
    verify_data: prepare again, the same bytes (scores stay comparable); another host (another
    secret), other bytes. A model that memorised the public text finds few of its contexts."""
    source = tmp_path / "public.txt"
    source.write_bytes(HELDOUT_TEXT.read_bytes())
    pin = _sha(HELDOUT_TEXT.read_bytes())
    entry = {"tinylm/val.bin": f"{source}#sha256={pin}&scramble=python"}
    said = []
    fill(_cfg(tmp_path, entry), said.append)
    first = (tmp_path / "heldout" / "tinylm" / "val.bin").read_bytes()
    assert "scrambled (python) with this host's secret" in said[0] and f"#sha256={pin}" not in said[0]
    fill(_cfg(tmp_path, entry), lambda m: None)
    assert (tmp_path / "heldout" / "tinylm" / "val.bin").read_bytes() == first

    other = tmp_path / "other-host"
    other.mkdir()
    fill(_cfg(other, entry), lambda m: None)
    assert (other / "heldout" / "tinylm" / "val.bin").read_bytes() != first

    # The files are all there, in another order, each with its own words (each as often as
    # before) and the keywords and builtins as they were; few 24-byte contexts of the public
    # text are left (a table of it finds little to look up).
    import re
    from collections import Counter
    public = HELDOUT_TEXT.read_bytes()
    assert first.count(b"# ===== file: ") == public.count(b"# ===== file: ")
    word = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*")

    def shapes(text):  # each file's word counts, the files in no order
        return sorted(tuple(sorted(Counter(word.findall(f)).values())) for f in text.split(b"# ===== file: "))

    assert shapes(first) == shapes(public)
    for kept_as_is in (rb"\bdef\b", rb"\breturn\b", rb"\bself\b", rb"\bprint\b"):
        assert len(re.findall(kept_as_is, first)) == len(re.findall(kept_as_is, public)), kept_as_is
    assert first[:200] != public[:200]
    contexts = {public[i:i + 24] for i in range(0, len(public) - 24)}
    kept = sum(first[i:i + 24] in contexts for i in range(0, len(first) - 24, 7)) / len(range(0, len(first) - 24, 7))
    assert kept < 0.1, kept


def test_scramble_options_are_checked_where_runner_yaml_is_read(tmp_path):
    from runner.heldout import parse

    assert parse("a.bin", "/x.txt#scramble=python").scramble == "python"
    for bad in ("/x.txt#scramble=rot13", "/x.txt#colour=blue", f"/x.txt#sha256={'0' * 64}&sha256={'0' * 64}"):
        with pytest.raises(ConfigError, match="heldout.a.bin"):
            parse("a.bin", bad)
