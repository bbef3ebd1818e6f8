"""What verifying a result costs: the same tinylm commit through `runner run` with verify off
and on, side by side in one invocation. Prints the wall time of each, the verifier's own
container time, the ratio, and the verifier's phases (load, evaluation, held-out, probes).

    python benchmarks/verify_cost.py [--reps 2] [--budget 5]

Needs the Docker daemon and the base image (`runner base-image build`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def runner(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runner", *args], capture_output=True, text=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--budget", type=float, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repo, data = Path(tmp) / "tinylm", Path(tmp) / "data"
        for cmd in (("init-example", str(repo)), ("prepare", "--repo", str(repo), "--data-dir", str(data))):
            r = runner(*cmd)
            if r.returncode:
                sys.exit(r.stderr)
        times: dict[str, list[float]] = {"off": [], "on": []}
        verify_s, verdicts, phases = [], [], []
        for rep in range(args.reps):
            for mode in ("off", "on"):
                (repo / "runner.yaml").write_text(f'verify: "{mode}"\n')
                subprocess.run(["git", "-C", str(repo), "add", "runner.yaml"], check=True)
                subprocess.run(["git", "-C", str(repo), "commit", "-qm", f"verify {mode} {rep}"], check=True)
                t0 = time.monotonic()
                r = runner("run", "--repo", str(repo), "--data-dir", str(data), "--budget", str(args.budget), "--json")
                if r.returncode:
                    sys.exit(r.stderr)
                times[mode].append(time.monotonic() - t0)
                record = json.loads(r.stdout.strip().splitlines()[-1])
                if mode == "on":
                    verify_s.append(record["verify_s"])
                    verdicts.append(record["verdict"])
                    phases.append(record.get("verify_phases") or {})
                print(f"rep {rep + 1} verify {mode}: {times[mode][-1]:.2f}s"
                      + (f" (verifier {record['verify_s']:.2f}s, verdict {record['verdict']})" if mode == "on" else ""))
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    print(f"\nmedian over {args.reps} reps, budget {args.budget:g}s:")
    print(f"  runner run, verify off   {off:6.2f} s")
    print(f"  runner run, verify on    {on:6.2f} s   ratio {on / off:.3f}")
    print(f"  the verifier's container {statistics.median(verify_s):6.2f} s per experiment; verdicts {verdicts}")
    names = [name for name in (phases[0] if phases else {})]
    if names:  # inside the verifier, as it reported (start = python and torch start-up)
        print("  inside it: " + ", ".join(f"{n} {statistics.median(p.get(n, 0.0) for p in phases):.2f} s" for n in names))


if __name__ == "__main__":
    main()
