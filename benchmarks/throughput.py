"""Experiments per hour with 1, 2 and 4 parallel workers on CPU (one cpuset each), side by side
in one invocation, and the scaling efficiency.

Each configuration runs the real loop (offline proposer, sandboxed runs, the ledger) on the
bundled tinylm example for the same number of experiments with a short budget.

    python benchmarks/throughput.py [--experiments 6] [--budget 5] [--workers 1,2,4]

A configuration with more workers than the host has CPUs is skipped (it cannot give each
worker its own cpuset). Needs the Docker daemon and the base image.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experiments", type=int, default=6)
    ap.add_argument("--budget", type=float, default=5)
    ap.add_argument("--workers", default="1,2,4")
    args = ap.parse_args()

    from runner.config import load_config
    from runner.engine import Engine, make_slots
    from runner.examples import init_example
    from runner.loop import Loop
    from runner.proposers.offline import OfflineProposer
    from runner.repo import ResearchRepo

    work = Path(tempfile.mkdtemp(prefix="ar-throughput-"))
    repo_path = init_example(work / "tinylm")
    data = work / "data"
    cpus = sorted(os.sched_getaffinity(0))
    results = {}
    for n in (int(w) for w in args.workers.split(",")):
        if n > len(cpus):
            print(f"{n} workers: skipped, this host has {len(cpus)} CPUs (one cpuset per worker)")
            continue
        cfg = load_config(repo_path, {"tag": f"tp{n}-{int(time.time())}", "data_dir": data, "budget_s": args.budget,
                                      "max_experiments": args.experiments, "workers": n})
        repo = ResearchRepo(repo_path)
        repo.checkout("main")
        engine = Engine(cfg, repo, progress=lambda m: None)
        if not (data / "tinylm" / "manifest.json").exists():
            engine.prepare_data(work / "prepare.log")
        lines: list[str] = []
        loop = Loop(cfg, repo, engine, OfflineProposer(seed=1), out=lines.append)
        t0 = time.monotonic()
        loop.run(slots=make_slots((), n, cpus))
        wall = time.monotonic() - t0
        runs = [e for e in loop.ledger.events("experiment") if e["iteration"] > 0]
        per_hour = len(runs) / wall * 3600
        training = sum((e["metrics"] or {}).get("training_seconds") or 0 for e in runs)
        results[n] = per_hour
        print(f"{n} worker(s): {len(runs)} experiments in {wall:.1f}s (baseline included in wall) -> "
              f"{per_hour:.0f} experiments/hour, duty cycle {100 * training / (wall * n):.1f}%", flush=True)
    if 1 in results:
        print("\nscaling efficiency (rate_N / (N x rate_1)):")
        for n, rate in results.items():
            print(f"  {n} worker(s): {rate / results[1]:.2f}x throughput, efficiency {rate / (n * results[1]):.2f}")


if __name__ == "__main__":
    main()
