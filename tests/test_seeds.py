"""Seeds the runner controls (sandbox/hooks/seeds.py): an unchanged train.py, offset by the runner."""

from __future__ import annotations

import pytest
from conftest import VALUE_SUMMARY, make_repo, run_json

pytestmark = pytest.mark.docker

# Seeds torch and random itself, as autoresearch's train.py does; its number depends on both.
SEEDED = """import random
import torch
torch.manual_seed(42)
random.seed(42)
VALUE = 2.0 + torch.rand(1).item() + random.random()
""" + VALUE_SUMMARY


def test_the_seed_offset_changes_an_unchanged_train_py_and_zero_reproduces_it(tmp_path, data_dir):
    repo = make_repo(tmp_path / "repo", SEEDED, extra={"runner.yaml": "verify: off\n"})
    plain, _ = run_json(repo, data_dir, "--budget", "5")
    again, _ = run_json(repo, data_dir, "--budget", "5", "--seed-offset", "0")
    other, _ = run_json(repo, data_dir, "--budget", "5", "--seed-offset", "7")
    same, _ = run_json(repo, data_dir, "--budget", "5", "--seed-offset", "7")
    assert plain["val_bpb"] == again["val_bpb"] and plain["seed"] == 0
    assert other["val_bpb"] != plain["val_bpb"] and other["seed"] == 7
    assert same["val_bpb"] == other["val_bpb"]  # an offset is a seed: reproducible
