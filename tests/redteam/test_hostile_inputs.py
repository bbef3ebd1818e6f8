"""Hostile text and malformed proposals, through the real loop (on the fake backend: what is
tested here is what the host does with the text, not the container)."""

from __future__ import annotations

import git
import pytest
from fake_backend import FakeBackend
from test_loop_decisions import TRAIN, Scripted, events, make, variant

from runner.proposers.base import Proposal

OSC52 = "\x1b]52;c;cm0gLXJmIH4K\x07"          # write "rm -rf ~" to the clipboard
FORGED = "nice\n[EXP] fake 99 | commit:0000000 | val_bpb:0.000001 | mem:0.0GB | status:keep | pwned"
HOSTILE = f"{OSC52}\x1b[2J\x1b[31mbold\u202eclaim\x9b31m {FORGED}\r\x00"


def _printable(text: str) -> bool:
    return not any(ord(c) < 32 and c not in "\n\t" or 0x7f <= ord(c) <= 0x9f or c in "\u202e\u2066" for c in text)


def test_a_hostile_description_reaches_no_terminal_tsv_or_commit_raw(tmp_path, data_dir):
    loop, path, lines = make(tmp_path, data_dir, [(variant(VALUE=1.5), HOSTILE)], max_experiments=1)
    loop.run()
    out = "\n".join(lines)
    assert _printable(out) and "\x1b" not in out
    exp_lines = [line for line in out.splitlines() if line.startswith("[EXP]")]
    assert [line.split()[2] for line in exp_lines] == ["0", "1"]  # the forged "[EXP] fake 99" is no line of its own
    tsv = (path / "results.tsv").read_text()
    assert _printable(tsv) and len(tsv.splitlines()) == 3
    message = git.Repo(path).head.commit.message
    assert _printable(message) and "\n" not in message.strip()


class Malformed(Scripted):
    """What a confused or hostile model sends: a train.py that breaks the parser, a reply the
    proposer chokes on, then a good proposal."""

    def propose(self, ctx):
        step = len(self.contexts)
        self.contexts.append(ctx)
        if step == 0:
            return Proposal("x = " + "0+" * 6000 + "0\n", "deep", "")
        if step == 1:
            raise AttributeError("'int' object has no attribute 'startswith'")  # a tool call with a non-string path
        if step == 2:
            return Proposal("x = 1\n" * 200_000, "huge", "")
        return Proposal(variant(VALUE=1.5), "good", "")


def test_malformed_proposals_are_refused_and_the_night_goes_on(tmp_path, data_dir):
    from runner.config import load_config
    from runner.engine import Engine
    from runner.loop import Loop
    from runner.repo import ResearchRepo
    from conftest import make_repo

    path = make_repo(tmp_path / "repo", TRAIN)
    cfg = load_config(path, {"tag": "fake", "data_dir": data_dir, "budget_s": 5, "max_experiments": 4, "noise_runs": 0})
    repo = ResearchRepo(path)
    Loop(cfg, repo, Engine(cfg, repo, progress=lambda m: None, backend=FakeBackend().pair()), Malformed([]),
         out=lambda line: None).run()
    refused = [e["reason"] for e in events(path) if e["event"] == "refused"]
    assert len(refused) == 3
    assert "RecursionError" in refused[0] and "AttributeError" in refused[1] and "bytes" in refused[2]
    assert [e["row"]["status"] for e in events(path) if e["event"] == "experiment"] == ["keep", "keep"]


def test_a_crashed_baselines_log_is_printed_clean(tmp_path, data_dir):
    from runner.loop import LoopError

    train = 'import sys\nprint("\\x1b]52;c;cm0gLXJmIH4K\\x07\\x1b[2Jowned")\nsys.exit(1)\n'
    loop, path, _ = make(tmp_path, data_dir, [], max_experiments=0)
    (path / "train.py").write_text(train)
    g = git.Repo(path)
    g.index.add(["train.py"])
    g.index.commit("a baseline that prints escapes and crashes")
    with pytest.raises(LoopError) as err:
        loop.run()
    assert "owned" in str(err.value) and "\x1b" not in str(err.value) and "\x07" not in str(err.value)


def test_the_data_digest_never_follows_a_fifo_or_a_link(tmp_path):
    """prepare.py runs with the cache writable: a FIFO planted there hung `runner run`, a link to
    /dev/zero would have grown the runner's memory without bound."""
    import os
    import threading

    from runner.data import data_digest

    data = tmp_path / "data"
    (data / "tinylm").mkdir(parents=True)
    (data / "tinylm" / "train.bin").write_bytes(b"\0" * 1000)
    before = data_digest(data)
    os.mkfifo(data / "tinylm" / "stall.fifo")
    (data / "zero").symlink_to("/dev/zero")
    (data / "etc").symlink_to("/etc")
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("digest", data_digest(data)), daemon=True)
    t.start()
    t.join(10)
    assert result.get("digest") == before  # finished, and only regular files counted
    (data / "manifest.json").symlink_to("/dev/zero")  # a manifest that is a link is not read either
    assert data_digest(data) == before


def test_gitattributes_filters_never_run_on_the_host_and_the_image_holds_the_committed_blobs(tmp_path):
    """A repo whose .gitattributes names a filter driver and export-subst / export-ignore: the
    snapshot is the committed blobs; no driver runs (it would run host code), nothing is dropped."""
    import io
    import tarfile

    from conftest import make_repo
    from runner.repo import ResearchRepo

    witness = tmp_path / "driver-ran"
    repo = make_repo(tmp_path / "repo", TRAIN, extra={
        ".gitattributes": "*.py filter=evil\nprogram.md export-subst\nsecret.txt export-ignore\n",
        "program.md": "$Format:%H$\n", "secret.txt": "kept\n"})
    g = git.Repo(repo)
    with g.config_writer() as cw:  # what a hostile clone or a careless global config would carry
        cw.set_value('filter "evil"', "smudge", f"touch {witness}; cat")
        cw.set_value('filter "evil"', "clean", "cat")
    fixed, editable = ResearchRepo(repo).snapshot_tars(g.head.commit.hexsha)
    with tarfile.open(fileobj=io.BytesIO(fixed)) as tar:
        names = tar.getnames()
        program = tar.extractfile("repo/program.md").read()
    assert not witness.exists()
    assert "repo/secret.txt" in names and program == b"$Format:%H$\n"
    with tarfile.open(fileobj=io.BytesIO(editable)) as tar:
        assert tar.extractfile("repo/train.py").read() == TRAIN.encode()


@pytest.mark.parametrize("linked", ["program.md", "README.md", "requirements.txt"])
def test_in_scope_and_dependency_files_tracked_as_links_are_refused(tmp_path, data_dir, linked):
    """A repo tracking program.md (or README, or a dependency file) as a link to a host file:
    its target would have gone to the API, or into the image. Refused, nothing read."""
    import os

    from runner.repo import RepoError

    secret = tmp_path / "host-secret"
    secret.write_text("AKIA-planted-secret\n")
    loop, path, lines = make(tmp_path, data_dir, [(variant(VALUE=1.5), "x")], max_experiments=1)
    (path / linked).unlink(missing_ok=True)
    os.symlink(secret, path / linked)
    g = git.Repo(path)
    g.index.add([linked])
    g.index.commit("link a host file")
    with pytest.raises(RepoError, match=f"{linked} is tracked as a symlink"):
        loop.run()
    assert "AKIA" not in "\n".join(lines) and not any(c.train_py for c in loop.proposer.contexts)


@pytest.mark.parametrize("planted,tracked", [
    (".autoresearch/fake/events.jsonl", True),   # a repo that tracks the runner's events file as a link
    ("results.tsv", True),
    ("results.tsv", False),                      # or has one lying in the work tree
    (".autoresearch", False),
])
def test_runner_files_that_are_links_are_refused_and_their_targets_untouched(tmp_path, data_dir, planted, tracked):
    import os

    from runner.repo import RepoError

    rc = tmp_path / "bashrc"
    rc.write_text("# the user's shell rc\n")
    target = rc if planted != ".autoresearch" else tmp_path
    loop, path, _ = make(tmp_path, data_dir, [(variant(VALUE=1.5), "x")], max_experiments=1)
    (path / planted).parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, path / planted)
    if tracked:
        g = git.Repo(path)
        g.git.add("-f", planted)
        g.index.commit("track a runner path")
    with pytest.raises(RepoError, match="tracks|symlink"):
        from runner.repo import ResearchRepo

        ResearchRepo(path)
    assert rc.read_text() == "# the user's shell rc\n"


def test_a_link_planted_in_the_runs_folder_mid_run_is_not_written_through(tmp_path):
    """The repo check ran at start; a link appearing later under .autoresearch is still refused
    at the write (each component opened O_NOFOLLOW from the repo root)."""
    import os

    from runner.ledger import Ledger, Row
    from runner.records import Swept
    from sandbox.fsafe import UnsafePathError
    from sandbox.logcap import CappedLog

    rc = tmp_path / "bashrc"
    rc.write_text("safe\n")
    repo = tmp_path / "repo"
    ledger = Ledger(repo, "t")
    ledger.open()
    os.symlink(rc, ledger.runs_dir / "1-abcdef0.log")
    with pytest.raises(UnsafePathError):
        CappedLog(ledger.runs_dir / "1-abcdef0.log", 1024, 1024, root=repo)
    os.rename(ledger.dir, tmp_path / "moved")
    os.symlink(tmp_path / "moved", ledger.dir)  # the tag folder itself swapped for a link
    with pytest.raises(UnsafePathError):
        ledger.event(Swept())
    os.symlink(rc, repo / "new-results.tsv")
    ledger.results_path = repo / "new-results.tsv"
    with pytest.raises(UnsafePathError):
        ledger.append_row(Row("abcdef0", 1.0, 0.1, "keep", "x"))
    assert rc.read_text() == "safe\n"
