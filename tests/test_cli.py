"""The `runner` command as a user meets it: the example end to end, and bad input."""

from __future__ import annotations

import json
import math

import pytest
from conftest import SUMMARY, make_repo, runner_cli

pytestmark = pytest.mark.docker


def _one_error_line(r) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [line for line in r.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def test_run_json_on_the_example_reports_a_real_val_bpb(tinylm):
    repo, data = tinylm
    r = runner_cli("run", "--repo", str(repo), "--data-dir", str(data), "--budget", "4", "--json")
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout)
    for key in ("status", "reason", "val_bpb", "memory_gb", "commit", "image", "image_id", "exit_code",
                "wall_s", "overhead_s", "log"):
        assert key in record, key
    assert record["status"] == "ok" and record["reason"] == "" and record["exit_code"] == 0
    assert record["verdict"] == "ok" and record["val_bpb"] == pytest.approx(record["self_reported_val_bpb"], rel=1e-3)
    # A uniform guess over 256 byte values scores 8 bits per byte; training must beat it.
    assert 0 < record["val_bpb"] < 7.5 and math.isfinite(record["val_bpb"])
    assert record["image"] == f"autoresearch-runner/adhoc:{record['commit'][:12]}"
    assert record["memory_gb"] > 0          # measured by the host from the container's cgroup
    assert record["wall_s"] >= 4 and record["overhead_s"] >= 0
    assert "val_bpb:" in open(record["log"]).read()


def test_missing_train_py(tmp_path):
    (tmp_path / "prepare.py").write_text("TIME_BUDGET = 1\n")
    line = _one_error_line(runner_cli("run", "--repo", str(tmp_path)))
    assert "no train.py" in line


def test_dirty_work_tree_changes_nothing(tmp_path, data_dir):
    repo = make_repo(tmp_path / "r", SUMMARY)
    (repo / "train.py").write_text(SUMMARY + "# edited\n")
    line = _one_error_line(runner_cli("run", "--repo", str(repo), "--data-dir", str(data_dir)))
    assert "uncommitted changes" in line and "train.py" in line
    assert (repo / "train.py").read_text().endswith("# edited\n")


def test_unknown_commit(tmp_path, data_dir):
    repo = make_repo(tmp_path / "r", SUMMARY)
    line = _one_error_line(runner_cli("run", "--repo", str(repo), "--commit", "deadbeef", "--data-dir", str(data_dir)))
    assert "unknown commit 'deadbeef'" in line


def test_no_docker_daemon(tmp_path, data_dir):
    repo = make_repo(tmp_path / "r", SUMMARY)
    r = runner_cli("run", "--repo", str(repo), "--data-dir", str(data_dir),
                   env={"DOCKER_HOST": f"unix://{tmp_path}/no-such.sock"})
    assert "no Docker engine answers" in _one_error_line(r)


def test_missing_base_image(tmp_path, data_dir):
    repo = make_repo(tmp_path / "r", SUMMARY, extra={"runner.yaml": "base_image: autoresearch-runner/base:does-not-exist\n"})
    line = _one_error_line(runner_cli("run", "--repo", str(repo), "--data-dir", str(data_dir)))
    assert "autoresearch-runner/base:does-not-exist" in line


def test_missing_data(tmp_path):
    repo = make_repo(tmp_path / "r", SUMMARY)
    line = _one_error_line(runner_cli("run", "--repo", str(repo), "--data-dir", str(tmp_path / "empty")))
    assert "runner prepare" in line


def test_doctor_reports_each_part(tinylm):
    repo, data = tinylm
    r = runner_cli("doctor", "--repo", str(repo), "--data-dir", str(data))
    assert r.returncode == 0, r.stdout
    assert "[ok] Docker engine" in r.stdout and "[ok] base image" in r.stdout and "[ok] data cache" in r.stdout


def test_a_runner_confined_to_one_cpu_keeps_its_runs_there(tmp_path, data_dir):
    """Started under taskset (or in a Slurm cpuset), the runner's experiments run on its CPUs
    only, although the Docker daemon that starts them may use every CPU of the host."""
    import os
    import subprocess
    import sys

    from conftest import ALL_CPUS

    if len(ALL_CPUS) < 2:
        pytest.skip("needs a host with two CPUs")
    cpu = ALL_CPUS[-1]
    repo = make_repo(tmp_path / "r", "import os\nprint('CPUS', sorted(os.sched_getaffinity(0)), 'OMP', os.environ.get('OMP_NUM_THREADS'))\n" + SUMMARY)
    r = subprocess.run([sys.executable, "-m", "runner", "run", "--repo", str(repo), "--data-dir", str(data_dir), "--json"],
                       capture_output=True, text=True, timeout=300, preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout)
    assert record["limits"]["cpuset"] == str(cpu)
    assert f"CPUS [{cpu}] OMP 1" in open(record["log"]).read()
