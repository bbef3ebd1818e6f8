"""benchmarks/gpu_e2e.sh without a GPU, a daemon or torch: the bundle's size check, the staged
results, the deadline's bookkeeping and the GPU-use evidence. The stages themselves are run by
hand (`STANDIN=cpu ... gpu_e2e.sh run`, see its header), not here."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "benchmarks" / "gpu_e2e.sh"

_spec = importlib.util.spec_from_file_location("gpu_e2e", REPO_ROOT / "benchmarks" / "gpu_e2e.py")
e2e = importlib.util.module_from_spec(_spec)
sys.modules["gpu_e2e"] = e2e  # its dataclasses look their module up as they are made
_spec.loader.exec_module(e2e)


def _bundle(tmp_path: Path, size_bytes: int) -> Path:
    folder = tmp_path / "bundle"
    folder.mkdir()
    with open(folder / e2e.BUNDLE_FILE, "wb") as f:
        f.truncate(size_bytes)  # sparse: its apparent size is what travels
    return folder


def _script(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": sys.executable, **env})


def test_check_refuses_a_bundle_over_the_limit_in_one_line(tmp_path):
    folder = _bundle(tmp_path, e2e.BUNDLE_LIMIT_BYTES + 2**20)
    proc = _script("check", str(folder))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "over the 60 MiB" in lines[0] and lines[0].startswith("error:")


def test_check_accepts_a_bundle_within_the_limit_and_prints_its_size(tmp_path):
    folder = _bundle(tmp_path, 3 * 2**20)
    proc = _script("check", str(folder))
    assert proc.returncode == 0, proc.stderr
    assert "3.0 MiB of 60 MiB" in proc.stdout


def test_run_refuses_an_oversized_bundle_before_any_stage(tmp_path):
    folder = _bundle(tmp_path, e2e.BUNDLE_LIMIT_BYTES + 1)
    out = tmp_path / "out"
    proc = _script("run", BUNDLE=str(folder), OUT=str(out))
    assert proc.returncode == 1 and "over the 60 MiB" in proc.stderr
    assert not out.exists()


def test_run_refuses_a_knob_it_cannot_take(tmp_path):
    proc = _script("run", OUT=str(tmp_path / "out"), STANDIN="gpu")
    assert proc.returncode == 2 and proc.stderr.strip() == "error: STANDIN must be one of '', 'cpu', got 'gpu'"
    with pytest.raises(e2e.Refused, match="DEADLINE_S"):
        e2e.Settings.from_env({"OUT": str(tmp_path), "DEADLINE_S": "900"})


def test_results_are_written_as_each_stage_ends(tmp_path):
    clock = iter([0.0, 1.5, 4.0, 9.0, 9.5])
    results = e2e.Results(tmp_path, {"mode": "cpu-standin"}, clock=lambda: next(clock))
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "running"
    results.record("machine", "ok", torch="2.13.0")
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["stages"]["machine"] == {"stage": "machine", "status": "ok", "t_s": 1.5, "torch": "2.13.0"}
    results.record("loop", "timeout", experiments=1)
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(line["stage"], line["status"]) for line in lines] == [("machine", "ok"), ("loop", "timeout")]
    results.finish("incomplete")
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["status"] == "incomplete" and doc["elapsed_s"] == 9.0 and set(doc["stages"]) == {"machine", "loop"}
    assert not list(tmp_path.glob("*.tmp"))


def _fake_run(tmp_path: Path, left_s: float, stage=None):
    results = e2e.Results(tmp_path, {})
    run = SimpleNamespace(results=results, left_s=lambda: left_s, s=SimpleNamespace(deadline_s=450), say=lambda _t: None)
    if stage is not None:
        run.stage_loop = stage
    return run


def test_a_stage_the_deadline_leaves_too_little_for_is_skipped_not_started(tmp_path):
    started = []
    run = _fake_run(tmp_path, e2e.RESERVE_S + e2e.MIN_STAGE_S - 1, stage=lambda end: started.append(end) or {})
    e2e.run_stage(run, "loop", ())
    line = run.results.figures("loop")
    assert line["status"] == "skipped" and line["why"].startswith("deadline:") and not started


def test_a_stage_that_needs_a_failed_one_is_skipped(tmp_path):
    run = _fake_run(tmp_path, 400)
    run.results.record("base_image", "failed", why="no dockerd")
    e2e.run_stage(run, "loop", ("base_image", "repo"))
    assert run.results.figures("loop")["why"] == "needs base_image, repo"


def test_a_stage_cut_by_its_limit_keeps_the_figures_it_had(tmp_path):
    def loop(end):
        raise e2e.StageTimeout("still running", experiments=1, outcomes=["ok"])

    run = _fake_run(tmp_path, 400, stage=loop)
    e2e.run_stage(run, "loop", ())
    line = run.results.figures("loop")
    assert (line["status"], line["experiments"], line["why"]) == ("timeout", 1, "still running")


def test_gpu_use_needs_a_vram_peak_and_a_cuda_device_in_the_log():
    h200 = "e2e_device: NVIDIA H200\nstep 1\n"
    assert e2e.gpu_evidence(17386.0, h200) == {"gpu_used": True, "peak_vram_mb": 17386.0, "device": "NVIDIA H200"}
    assert not e2e.gpu_evidence(0.0, h200)["gpu_used"]
    assert not e2e.gpu_evidence(None, h200)["gpu_used"]
    assert not e2e.gpu_evidence(512.0, "e2e_device: cpu\n")["gpu_used"]
    assert not e2e.gpu_evidence(512.0, "no device line\n")["gpu_used"]


def test_the_compile_patch_still_fits_tinylm(tmp_path):
    train = tmp_path / "train.py"
    train.write_text((REPO_ROOT / "examples" / "tinylm" / "train.py").read_text())
    e2e.patch_train(train)
    src = train.read_text()
    assert "torch.compile(model" in src and f"{e2e.DEVICE_LINE}:" in src and f"{e2e.COMPILE_LINE}:" in src
    compile(src, str(train), "exec")
