"""Per-experiment overhead of the sandbox, measured side by side in one invocation.

The same tinylm train.py and data run (a) as a bare process on the host and (b) through
`runner run` (a new commit each time, so each run builds its experiment image). Prints the
wall time of each, the overhead in seconds and the ratio. Then the runner's own memory while an
experiment floods its log with 1 GiB.

    python benchmarks/overhead.py [--reps 3] [--budget 5]

Needs the Docker daemon, the base image (`runner base-image build`) and torch on the host
(`pip install -e '.[bench]'`) for the bare runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--budget", type=float, default=5)
    args = ap.parse_args()

    import git

    from runner.examples import init_example

    work = Path(tempfile.mkdtemp(prefix="ar-bench-"))
    repo_path = init_example(work / "tinylm")
    data = work / "data"
    env = {**os.environ, "AUTORESEARCH_DATA_DIR": str(data)}
    run_cli = [sys.executable, "-m", "runner"]
    subprocess.run([*run_cli, "prepare", "--repo", str(repo_path)], env=env, check=True, capture_output=True)

    # The bare process sees the same data where prepare.py looks for it: ~/.cache/autoresearch.
    home = work / "home"
    (home / ".cache").mkdir(parents=True)
    os.symlink(data, home / ".cache" / "autoresearch")
    bare_env = {**os.environ, "HOME": str(home), "AUTORESEARCH_TIME_BUDGET": str(int(args.budget)),
                "PYTHONDONTWRITEBYTECODE": "1"}

    repo = git.Repo(repo_path)
    bare, sandboxed, overheads, builds = [], [], [], []
    for i in range(args.reps):
        t0 = time.monotonic()
        subprocess.run([sys.executable, "train.py"], cwd=repo_path, env=bare_env, check=True, capture_output=True)
        bare.append(time.monotonic() - t0)

        train = repo_path / "train.py"
        train.write_text(train.read_text() + f"# benchmark rep {i} {time.time()}\n")
        repo.index.add(["train.py"])
        repo.index.commit(f"bench rep {i}")
        t0 = time.monotonic()
        out = subprocess.run([*run_cli, "run", "--repo", str(repo_path), "--budget", str(args.budget), "--json"],
                             env=env, check=True, capture_output=True, text=True)
        sandboxed.append(time.monotonic() - t0)
        record = json.loads(out.stdout)
        assert record["status"] == "ok", record
        overheads.append(record["overhead_s"])
        builds.append(record["image_reused"])
        print(f"rep {i}: bare {bare[-1]:.2f}s  runner run {sandboxed[-1]:.2f}s  "
              f"(container {record['wall_s']:.2f}s, runner-side overhead {record['overhead_s']:.2f}s)", flush=True)

    b, s = statistics.median(bare), statistics.median(sandboxed)
    print(f"\nmedian over {args.reps} reps, budget {args.budget:.0f}s:")
    print(f"  bare process          {b:7.2f} s")
    print(f"  runner run (CLI)      {s:7.2f} s   ratio {s / b:.3f}")
    print(f"  end-to-end overhead   {s - b:7.2f} s per experiment (CLI start, image build, container lifecycle)")
    print(f"  runner-side overhead  {statistics.median(overheads):7.2f} s (image build + create/remove + judging)")
    print(f"  image builds          {sum(not r for r in builds)}/{len(builds)} (a new commit each rep)")

    flood_memory(work)


def flood_memory(work: Path) -> None:
    """The runner's RSS while an experiment prints 1 GiB: it must stay flat."""
    from runner.config import load_config
    from runner.engine import Engine
    from runner.repo import ResearchRepo

    import git

    repo_path = work / "flood"
    repo_path.mkdir()
    (repo_path / "prepare.py").write_text("TIME_BUDGET = 60\n")
    (repo_path / "train.py").write_text(
        "import sys\nchunk = (('x' * 1023 + '\\n') * 1024).encode()\n"
        "for _ in range(1024):\n    sys.stdout.buffer.write(chunk)\nprint('---')\nprint('val_bpb: 1.0')\n")
    g = git.Repo.init(repo_path)
    g.index.add(["prepare.py", "train.py"])
    g.index.commit("flood")
    data = work / "flood-data"
    data.mkdir()
    (data / "x").write_text("x")
    engine = Engine(load_config(repo_path, {"data_dir": data}), ResearchRepo(repo_path), progress=lambda m: None)
    samples: list[float] = []
    done = threading.Event()

    def sample():
        while not done.wait(0.1):
            samples.append(rss_mb())

    before = rss_mb()
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.monotonic()
    run = engine.run_commit(engine.repo.head().sha, "bench", work / "flood.log")
    done.set()
    t.join()
    wall = time.monotonic() - t0
    print(f"\nlog flood: {run.result.log_bytes / 2**30:.2f} GiB printed in {wall:.1f}s "
          f"({run.result.log_bytes / 2**20 / wall:.0f} MiB/s), host log {run.result.log_path.stat().st_size / 2**20:.1f} MiB, "
          f"status {run.outcome.status}")
    print(f"  runner RSS: before {before:.0f} MiB, peak during {max(samples or [before]):.0f} MiB, "
          f"growth {max(samples or [before]) - before:.0f} MiB")


if __name__ == "__main__":
    main()
