"""Forged metrics, through `runner run` on the bundled example: the number that counts is the one
trusted code computes from the exported model in a second sandbox, not what train.py prints."""

from __future__ import annotations

import subprocess

import pytest
from conftest import run_json

pytestmark = pytest.mark.docker

HONEST = "    val_bpb = evaluate_bpb(model, device)\n"
FORGERIES = {
    # train.py replaces the evaluation function with its own: nothing is exported
    "unverified": HONEST.replace("evaluate_bpb(model, device)", "(lambda m, d: 0.5)(model, device)"),
    # train.py evaluates honestly and prints 80% of it
    "forged": HONEST.replace("evaluate_bpb(model, device)", "0.8 * evaluate_bpb(model, device)"),
}


def _run(repo, data, train_py: str | None = None) -> dict:
    if train_py is not None:
        (repo / "train.py").write_text(train_py)
        subprocess.run(["git", "-C", str(repo), "commit", "-qam", "edit"], check=True)
    return run_json(repo, data, "--budget", "3")[0]


def test_an_honest_run_is_verified(tinylm):
    repo, data = tinylm
    record = _run(repo, data)
    assert record["status"] == "ok" and record["verdict"] == "ok"
    assert record["val_bpb"] == pytest.approx(record["self_reported_val_bpb"], rel=1e-3)
    assert 0 < record["val_bpb"] < 8


@pytest.mark.parametrize("verdict", ["unverified", "forged", "noncausal"])
def test_a_forged_metric_gets_its_verdict(tinylm, tmp_path, verdict):
    import shutil

    repo, data = tinylm
    clone = tmp_path / "repo"
    shutil.copytree(repo, clone, ignore=shutil.ignore_patterns(".autoresearch", "results.tsv"))
    text = (clone / "train.py").read_text()
    assert HONEST in text and "is_causal=True" in text
    if verdict == "noncausal":  # attention that reads the next bytes: a lower loss, measured consistently
        text = text.replace("is_causal=True", "is_causal=False")
    else:
        text = text.replace(HONEST, FORGERIES[verdict])
    record = _run(clone, data, text)
    assert record["status"] == "ok" and record["verdict"] == verdict, record
    if verdict == "forged":
        assert record["self_reported_val_bpb"] == pytest.approx(0.8 * record["val_bpb"], rel=1e-3)


def test_the_loop_never_keeps_a_forged_number(tinylm, tmp_path):
    """Through the loop: the forgery reports a far better val_bpb than the baseline's; the
    verified figure is what was recorded, the row says [forged], the branch stays at the baseline."""
    import shutil

    from runner.config import load_config
    from runner.engine import Engine
    from runner.loop import Loop
    from runner.proposers.base import Proposal, Proposer, Summary
    from runner.repo import ResearchRepo

    repo, data = tinylm
    clone = tmp_path / "repo"
    shutil.copytree(repo, clone, ignore=shutil.ignore_patterns(".autoresearch", "results.tsv"))
    forged = (clone / "train.py").read_text().replace(HONEST, FORGERIES["forged"].replace("0.8 *", "0.5 *"))

    class Forger(Proposer):
        name = "forger"

        def propose(self, ctx):
            return Proposal(forged, "report half the loss", "")

        def summarize(self, ctx, rows):
            return Summary([], [])

    cfg = load_config(clone, {"tag": "forge", "data_dir": data, "budget_s": 3, "max_experiments": 1, "verify": "on"})
    research = ResearchRepo(clone)
    loop = Loop(cfg, research, Engine(cfg, research, progress=lambda m: None), Forger(), out=lambda line: None)
    loop.run()
    rows = loop.ledger.rows()
    assert [r.status for r in rows] == ["keep", "discard"]
    assert rows[1].description == "report half the loss [forged]"
    experiments = loop.ledger.experiments()
    assert experiments[1].run["verdict"] == "forged"
    assert experiments[1].run["self_reported_val_bpb"] == pytest.approx(0.5 * rows[1].val_bpb, rel=1e-3)
    assert research.head().sha[:7] == rows[0].commit


def test_a_torch_compiled_model_verifies_too(tinylm, tmp_path):
    import shutil

    repo, data = tinylm
    clone = tmp_path / "repo"
    shutil.copytree(repo, clone, ignore=shutil.ignore_patterns(".autoresearch", "results.tsv"))
    text = (clone / "train.py").read_text()
    anchor = "model = GPT().to(device)\n"
    assert anchor in text
    record = _run(clone, data, text.replace(anchor, anchor + "model = torch.compile(model, dynamic=False)\n"))
    assert record["status"] == "ok" and record["verdict"] == "ok", record
    assert record["val_bpb"] == pytest.approx(record["self_reported_val_bpb"], rel=2e-3)
