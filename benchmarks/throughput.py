"""Experiments per hour with 1, 2 and 4 parallel workers on CPU (one cpuset each), side by side
in one invocation, and the scaling efficiency.

Each configuration runs the real loop (offline proposer, sandboxed runs, the ledger) on the
bundled tinylm example for the same number of experiments with a short budget.

    python benchmarks/throughput.py [--experiments 6] [--budget 5] [--workers 1,2,4]
    python benchmarks/throughput.py --cluster HOST:PORT --node-cpus K [--experiments 6] [--budget 5]
    python benchmarks/throughput.py --cluster local [--experiments 6] [--budget 5]

A configuration with more workers than the host has CPUs is skipped (it cannot give each
worker its own cpuset). Needs the Docker daemon and the base image.

Cluster mode compares one node with two: one worker that reserves a whole node's CPUs
(`--node-cpus`), then two such workers, so Ray puts them on two nodes. `--cluster local`
starts a head and a second node with a Docker engine of its own on this machine
(tests/cluster.py); their images move between the engines as on real hosts, but both share
this machine's CPUs, so its efficiency shows the runner's overhead, not two hosts' compute.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experiments", type=int, default=6)
    ap.add_argument("--budget", type=float, default=5)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--cluster", help="a Ray cluster's address, or 'local' to start a two-node one here")
    ap.add_argument("--node-cpus", type=float, default=2, help="CPUs of each cluster node (one worker per node)")
    args = ap.parse_args()
    if args.cluster:
        return cluster_mode(args)

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


def cluster_mode(args) -> None:
    import contextlib
    import subprocess
    import sys

    from runner.examples import init_example

    work = Path(tempfile.mkdtemp(prefix="ar-throughput-", dir="/tmp"))
    repo = init_example(work / "tinylm")
    data = work / "data"
    with contextlib.ExitStack() as stack:
        address, env = args.cluster, {}
        if address == "local":
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
            from cluster import DRIVER_ENV, RayCluster, second_engine

            host2 = stack.enter_context(second_engine(work / "engine"))
            cluster = RayCluster(work / "ray")
            stack.callback(cluster.stop)
            cluster.start_head()
            cluster.add_node(host2)
            address, env = cluster.address, DRIVER_ENV
        env = {**os.environ, **env}
        subprocess.run([sys.executable, "-m", "runner", "prepare", "--repo", str(repo), "--data-dir", str(data),
                        "--cluster", address], env=env, check=True, capture_output=True)
        # each worker reserves a whole node: two workers are two nodes
        (repo / "runner.yaml").write_text(f"cluster_worker_cpus: {args.node_cpus}\n")
        subprocess.run(["git", "-C", str(repo), "add", "runner.yaml"], check=True)
        subprocess.run(["git", "-C", str(repo), "commit", "-qm", "one worker per node"], check=True)
        rates = {}
        for n in (1, 2):
            tag = f"cl{n}-{int(time.time())}"
            subprocess.run(["git", "-C", str(repo), "checkout", "-q", "main"], check=True)
            t0 = time.monotonic()
            r = subprocess.run([sys.executable, "-m", "runner", "start", "--tag", tag, "--repo", str(repo), "--data-dir",
                                str(data), "--cluster", address, "--workers", str(n), "--proposer", "offline",
                                "--budget", str(args.budget), "--max-experiments", str(args.experiments)],
                               env=env, capture_output=True, text=True)
            wall = time.monotonic() - t0
            if r.returncode != 0:
                raise SystemExit(f"{n} node(s): the loop failed:\n{r.stderr[-2000:]}")
            from runner.ledger import Ledger

            runs = [e for e in Ledger(repo, tag).experiments() if e.iteration > 0]
            nodes = {e.run.node for e in runs}
            moved = sum(e.run.image_transfer_bytes or 0 for e in runs)
            rates[n] = len(runs) / wall * 3600
            print(f"{n} node(s): {len(runs)} experiments in {wall:.1f}s (baseline and image transfers included) -> "
                  f"{rates[n]:.0f} experiments/hour on {len(nodes)} node(s), {moved / 2**20:.1f} MiB of images moved",
                  flush=True)
            # What each node costs an experiment beyond its container's own wall time: shipping
            # its image there, the actor's calls, collecting its log and export.
            for node in sorted(nodes, key=str):
                here = [e.run for e in runs if e.run.node == node]
                print(f"  on {node}: {len(here)} experiment(s), overhead per experiment "
                      f"{sum(r.overhead_s for r in here) / len(here):.2f}s "
                      f"(median {statistics.median(r.overhead_s for r in here):.2f}s), "
                      f"{sum(r.image_transfer_bytes or 0 for r in here) / len(here) / 1024:.1f} KiB of image moved", flush=True)
        print(f"\nparallel efficiency, two nodes vs one: {rates[2] / (2 * rates[1]):.2f} "
              f"({rates[2] / rates[1]:.2f}x throughput)")


if __name__ == "__main__":
    main()
