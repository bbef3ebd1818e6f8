"""Forged metrics, through `runner run` on the bundled example: the number that counts is the one
trusted code computes from the exported model in a second sandbox, not what train.py prints."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import SUMMARY, loop_night, make_repo, run_json, runner_cli


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


# An honest run verifies ok: tests/test_heldout.py (and, through the CLI, tests/test_cli.py).


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
    """Through the loop with verify on: an untrained model (far worse than the baseline) could not
    be kept and is not verified; the forgery reports a far better val_bpb than the baseline's: the
    verified figure is what was recorded, the row says [forged], the branch stays at the baseline."""
    repo, data = tinylm
    text = (repo / "train.py").read_text()
    worse = text.replace("LEARNING_RATE = 0.003", "LEARNING_RATE = 1e-9")
    forged = text.replace(HONEST, FORGERIES["forged"].replace("0.8 *", "0.5 *"))
    loop, research = loop_night(repo, data, tmp_path, [(worse, "no learning"), (forged, "report half the loss")], "forge")
    rows = loop.ledger.rows()
    assert [r.status for r in rows] == ["keep", "discard", "discard"]
    baseline, discard, forgery = loop.ledger.experiments()
    # verification where it decides: the baseline always, a result that could not be kept not at all
    assert baseline.run.verdict == "ok" and baseline.run.verify_s > 0
    assert discard.run.verdict is None and discard.run.verify_s == 0
    assert rows[2].description == "report half the loss [forged]"
    assert forgery.run.verdict == "forged"
    assert forgery.run.self_reported_val_bpb == pytest.approx(0.5 * rows[2].val_bpb, rel=1e-3)
    assert research.head().sha[:7] == rows[0].commit


@pytest.mark.whole_host  # inductor's compile on one CPU outlasts the run's deadline
def test_a_torch_compiled_model_trains_and_verifies(tinylm, tmp_path):
    """autoresearch compiles its model: inductor's kernels build and load in the sandbox (its
    cache on /tmp), and the verifier exports what the compiled wrapper wraps."""
    import shutil

    repo, data = tinylm
    clone = tmp_path / "repo"
    shutil.copytree(repo, clone, ignore=shutil.ignore_patterns(".autoresearch", "results.tsv"))
    # inductor's C++ compile on a busy 2-core host outlasts the default minute of start-up: a
    # repo that compiles on a slow host says so in its runner.yaml, as this one does
    with open(clone / "runner.yaml", "a") as f:
        f.write("limits:\n  startup_grace_s: 300\n")
    text = (clone / "train.py").read_text()
    anchor = "model = GPT().to(device)\n"
    assert anchor in text
    compiled = text.replace(anchor, anchor + "model = torch.compile(model, dynamic=False)\n") + (
        # inductor built and loaded its shared objects from its cache on the sandbox's /tmp
        'import glob\nprint("COMPILED_SO", len(glob.glob("/tmp/torchinductor/**/*.so", recursive=True)))\n')
    record = _run(clone, data, compiled)
    assert record["status"] == "ok" and record["verdict"] == "ok", record
    assert record["val_bpb"] == pytest.approx(record["self_reported_val_bpb"], rel=2e-3)
    log = Path(record["log"]).read_text(errors="replace")
    shared_objects = [line for line in log.splitlines() if line.startswith("COMPILED_SO ")]
    assert shared_objects and int(shared_objects[0].split()[1]) >= 1, log[-3000:]


HONEST_VARIANTS = {
    # tinylm's evaluate_bpb puts the model back in training mode on its way out: the export is made
    # in the mode the evaluation ran it, so a dropout does not make the verifier's outputs random
    "dropout": ("DROPOUT = 0.0 ", "DROPOUT = 0.2 "),
    # a token masked to -inf (byte 0 never occurs in text): equal infinities compare equal
    "masked_logit": ("        return self.head(self.ln_f(x))\n",
                     "        logits = self.head(self.ln_f(x))\n"
                     "        return logits.masked_fill(torch.arange(VOCAB_SIZE, device=idx.device) == 0, float('-inf'))\n"),
}


@pytest.mark.parametrize("variant", sorted(HONEST_VARIANTS))
def test_honest_variants_verify(tinylm, tmp_path, variant):
    import shutil

    repo, data = tinylm
    clone = tmp_path / "repo"
    shutil.copytree(repo, clone, ignore=shutil.ignore_patterns(".autoresearch", "results.tsv"))
    text = (clone / "train.py").read_text()
    old, new = HONEST_VARIANTS[variant]
    assert old in text
    record = _run(clone, data, text.replace(old, new))
    assert record["status"] == "ok" and record["verdict"] == "ok", record


# --- autoresearch's shape: a tokenizer argument, a model that returns per-token losses ----------

ARLIKE = Path(__file__).resolve().parent.parent / "fixtures" / "arlike"


@pytest.fixture(scope="module")
def arlike(tmp_path_factory, docker_client):
    """tests/fixtures/arlike as a prepared repo, with held-out data of its own: (repo, data)."""
    root = tmp_path_factory.mktemp("arlike")
    repo = make_repo(root / "repo", (ARLIKE / "train.py").read_text(), (ARLIKE / "prepare.py").read_text(),
                     extra={"runner.yaml": f"verify_data: {root / 'heldout'}\n"})
    r = runner_cli("prepare", "--repo", str(repo), "--data-dir", str(root / "data"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert (root / "heldout" / "arlike" / "val.json").is_file()
    return repo, root / "data"


def _variant(repo, tmp_path, **replace: str):
    """A copy of `repo` with text replaced in its files ({file: (old, new)} as file=(old, new))."""
    import shutil

    clone = tmp_path / "variant"
    shutil.copytree(repo, clone, ignore=shutil.ignore_patterns(".autoresearch", "results.tsv"))
    for name, (old, new) in replace.items():
        path = clone / name.replace("_", ".")
        text = path.read_text()
        assert old in text, (name, old)
        path.write_text(text.replace(old, new))
    subprocess.run(["git", "-C", str(clone), "commit", "-qam", "variant"], check=True)
    return clone


# autoresearch's evaluation, inside its bf16 autocast: torch.export does not record an ambient
# autocast, so the verifier must replay it (a float32 input into a bf16 graph fails to run).
ARLIKE_EVAL = "val_bpb = evaluate_bpb(model, tokenizer, BATCH)\n"
AUTOCAST = 'with torch.autocast("cpu", dtype=torch.bfloat16):\n    ' + ARLIKE_EVAL


def test_autoresearch_evaluation_signature_is_verified_with_a_rebuilt_tokenizer(arlike, tmp_path):
    """evaluate_bpb(model, tokenizer, batch_size) inside a bf16 autocast: the verifier makes its own
    tokenizer with Tokenizer.from_directory() (never train.py's object), replays the autocast,
    evaluates model(x, y, reduction='none'), finds the implied probabilities normalised, and
    scores the held-out split too."""
    repo, data = arlike
    record = _run(_variant(repo, tmp_path, train_py=(ARLIKE_EVAL, AUTOCAST)), data)
    assert record["status"] == "ok" and record["verdict"] == "ok", record
    assert record["val_bpb"] == pytest.approx(record["self_reported_val_bpb"], rel=1e-3)
    assert record["heldout_val_bpb"] is not None and record["heldout_val_bpb"] != record["val_bpb"]
    assert 0 < record["heldout_val_bpb"] < 8


def test_a_loss_model_is_scored_by_its_logits_never_by_the_losses_it_states(arlike, tmp_path):
    """Halving every per-token loss the model states halves the run's own val_bpb; the verifier
    computes each loss from the model's logits (model(x)) with its own cross-entropy, so the
    verified number is the honest one, twice the run's: forged."""
    repo, data = arlike
    clone = _variant(repo, tmp_path, train_py=("        return loss\n", '        return loss * 0.5 if reduction == "none" else loss\n'))
    record = _run(clone, data)
    assert record["status"] == "ok" and record["verdict"] == "forged", record
    assert record["val_bpb"] == pytest.approx(2 * record["self_reported_val_bpb"], rel=1e-3)
    assert record["heldout_val_bpb"] is not None


def test_a_loss_model_without_logits_is_unverified_and_told_why(arlike, tmp_path):
    """A model that can only state losses (model(x) alone fails) has nothing the verifier can
    trust: unverified, and the detail says what the model must do."""
    repo, data = arlike
    clone = _variant(repo, tmp_path, train_py=("        if targets is None:\n            return logits\n", ""))
    record = _run(clone, data)
    assert record["status"] == "ok" and record["verdict"] == "unverified", record
    assert "must return logits" in record["detail"] and "model(x)" in record["detail"], record


def test_a_loss_model_that_reads_the_future_is_noncausal(arlike, tmp_path):
    repo, data = arlike
    clone = _variant(repo, tmp_path, train_py=("is_causal=True", "is_causal=False"))
    record = _run(clone, data)
    assert record["status"] == "ok" and record["verdict"] == "noncausal", record


def test_an_argument_the_verifier_cannot_rebuild_needs_verify_args(arlike, tmp_path):
    """A tokenizer class with no argument-free way to make it: unverified, with the hint; told
    how in runner.yaml (verify_args), the same run verifies."""
    repo, data = arlike
    heldout = (repo / "runner.yaml").read_text()
    clone = _variant(repo, tmp_path, prepare_py=("    @classmethod\n    def from_directory(cls, tokenizer_dir=TOKENIZER_DIR):",
                                                 "    @classmethod\n    def from_directory(cls, tokenizer_dir):"))
    (clone / "train.py").write_text((clone / "train.py").read_text().replace("Tokenizer.from_directory()", "Tokenizer.from_directory(TOKENIZER_DIR)")
                                    .replace("from prepare import MAX_SEQ_LEN", "from prepare import TOKENIZER_DIR, MAX_SEQ_LEN"))
    subprocess.run(["git", "-C", str(clone), "commit", "-qam", "no argument-free tokenizer"], check=True)
    record = _run(clone, data)
    assert record["verdict"] == "unverified", record
    assert "verify_args" in record["detail"] and "prepare.Tokenizer" in record["detail"]

    (clone / "runner.yaml").write_text(heldout + "verify_args:\n  tokenizer: Tokenizer.from_directory(TOKENIZER_DIR)\n")
    subprocess.run(["git", "-C", str(clone), "commit", "-qam", "say how to make the tokenizer"], check=True)
    record = _run(clone, data)
    assert record["verdict"] == "ok", record
    assert record["heldout_val_bpb"] is not None  # TOKENIZER_DIR is the held-out copy's there


def test_experiments_never_see_the_held_out_data(run_train, tmp_path):
    heldout = tmp_path / "heldout"
    (heldout / "x").mkdir(parents=True)
    (heldout / "x" / "secret.txt").write_text("test split\n")
    run = run_train("import os\nprint('SEEN', os.path.exists('/home/heldout'), os.environ.get('AUTORESEARCH_HELDOUT_DIR'))\n"
                    + SUMMARY, verify_data=heldout)
    assert "SEEN False None" in run.result.log_path.read_text()


def test_every_result_is_verified_in_an_audit(tinylm, tmp_path):
    """`verify: all`: a result that could not be kept (an untrained model, far worse than the
    baseline) is verified too (under `on` it is not: test_the_loop_never_keeps_a_forged_number)."""
    repo, data = tinylm
    worse = (repo / "train.py").read_text().replace("LEARNING_RATE = 0.003", "LEARNING_RATE = 1e-9")
    loop, _ = loop_night(repo, data, tmp_path, [(worse, "no learning")], "audit", verify="all")
    baseline, discard = loop.ledger.experiments()
    assert baseline.run.verdict == "ok" and baseline.run.verify_s > 0
    assert discard.row.status == "discard"
    assert discard.run.verdict == "ok" and discard.run.verify_s > 0
