"""benchmarks/duty_cycle.py: its fixed edit list (no Docker), and its smoke run (one experiment
after the baseline, 5 s budget) on the real daemon with bare runs on this host's torch."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "duty_cycle.py"
_spec = importlib.util.spec_from_file_location("duty_cycle", SCRIPT)
duty_cycle = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = duty_cycle  # its dataclasses look their module up while it loads
_spec.loader.exec_module(duty_cycle)


def test_edit_list_is_one_knob_each_and_every_train_py_its_own():
    from runner.examples import example_source
    from runner.proposers.offline import find_knobs

    baseline = (example_source() / "train.py").read_text()
    n = len(duty_cycle.EDITS) + 3  # past the list: learning rates of their own
    edits = duty_cycle.edit_list(baseline, n)
    texts = [t for t, _ in edits]
    assert len(set(texts)) == n and baseline not in texts
    before = {k.name: k.value for k in find_knobs(baseline)}
    for text, description in edits:
        after = {k.name: k.value for k in find_knobs(text)}
        changed = [name for name in before if before[name] != after[name]]
        assert len(changed) == 1 and description.startswith(f"{changed[0]} {before[changed[0]]} -> ")
    assert duty_cycle.edit_list(baseline, n) == edits  # the same list every time, on both sides


@pytest.mark.docker
def test_smoke_run_prints_both_duty_cycles_and_their_ratio(tmp_path, docker_client):
    if importlib.util.find_spec("torch") is None:
        pytest.skip(f"the bare runs need torch in {sys.executable}: pip install -e '.[bench]'")
    out = tmp_path / "figures.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--budget", "5", "--experiments", "1", "--work", str(tmp_path / "work"),
                        "--out", str(out)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    printed = re.search(r"^duty cycle \(training s / wall s\)\s+([\d.]+)\s+([\d.]+)$", r.stdout, re.M)
    assert printed, r.stdout
    assert all(0 < float(v) <= 1 for v in printed.groups())
    ratio = re.search(r"^runner / bare duty cycle: ([\d.]+) \(goal >= 0.97: (met|missed)\)", r.stdout, re.M)
    assert ratio, r.stdout
    assert float(ratio.group(1)) == pytest.approx(float(printed.group(2)) / float(printed.group(1)), abs=2e-3)

    figures = json.loads(out.read_text())
    bare, ours = figures["bare"], figures["runner"]
    assert bare["runs"] == ours["runs"] == 2 and len(bare["statuses"]) == len(ours["statuses"]) == 2
    for side in (bare, ours):
        assert 0 < side["duty_cycle"] <= 1 and side["experiments_per_hour"] > 0
        assert side["training_s"] == pytest.approx(side["phases"]["training"], abs=0.01)
        assert sum(side["phases"].values()) == pytest.approx(side["wall_s"])
        assert all(v >= -0.5 for v in side["phases"].values()), side["phases"]  # no phase counted twice
    assert ours["phases"]["image_build"] > 0 and ours["phases"]["container"] > 0
    assert figures["ratio"] == pytest.approx(ours["duty_cycle"] / bare["duty_cycle"])

    from sandbox import naming

    tag = re.search(r"runner tag (\S+)", r.stdout).group(1)
    assert not docker_client.images.list(filters={"label": f"{naming.L_TAG}={tag}"})  # its images are removed
