"""GPU check for a machine with an NVIDIA GPU and no Docker.

Runs the bundled example's train.py as a local process under the same NVML VRAM watchdog the
sandbox uses (sandbox.gpu.vram_of), twice:

  1. no ceiling: prints the peak VRAM NVML saw, the run's own peak_vram_mb, val_bpb and the
     accelerator duty cycle (training seconds / wall seconds);
  2. a ceiling at half that peak: the watchdog must kill the run (reason vram).

    python benchmarks/gpu_check.py [--budget 45] [--device 0]

Needs torch with CUDA and nvidia-ml-py; nothing else of the runner.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sandbox.gpu import RealNvml, vram_of  # noqa: E402

POLL_S = 0.2


def in_group(pgid: int):
    """The watchdog's ownership test for a local run: the process is in the run's process group."""
    def owns(pid: int) -> bool:
        try:
            return os.getpgid(pid) == pgid
        except ProcessLookupError:
            return False
    return owns


def run_watched(example: Path, env: dict, nvml: RealNvml, uuid: str, ceiling_mb: float | None) -> dict:
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "train.py"], cwd=example, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    owns = in_group(proc.pid)
    peak, killed_at, samples = 0.0, None, 0
    out_lines: list[str] = []
    os.set_blocking(proc.stdout.fileno(), False)
    while proc.poll() is None:
        time.sleep(POLL_S)
        try:
            chunk = proc.stdout.read()
        except (TypeError, OSError):
            chunk = None
        if chunk:
            out_lines += chunk.splitlines()
        used = vram_of(nvml, [uuid], owns)
        samples += 1
        peak = max(peak, used)
        if ceiling_mb is not None and used > ceiling_mb:
            killed_at = time.monotonic() - t0
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            break
    rest = proc.stdout.read() if proc.stdout else ""
    out_lines += (rest or "").splitlines()
    wall = time.monotonic() - t0
    summary = {}
    if "---" in out_lines:
        for line in out_lines[len(out_lines) - 1 - out_lines[::-1].index("---") + 1:]:
            k, _, v = line.partition(":")
            summary[k.strip()] = v.strip()
    return {"exit_code": proc.returncode, "wall_s": round(wall, 2), "nvml_peak_vram_mb": round(peak, 1),
            "samples": samples, "killed_at_s": killed_at, "summary": summary, "tail": out_lines[-5:]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=int, default=45)
    ap.add_argument("--device", type=int, default=0)
    args = ap.parse_args()

    nvml = RealNvml()
    devices = nvml.devices()
    if not devices:
        raise SystemExit("no NVIDIA GPU visible through NVML")
    dev = devices[args.device]
    print(f"GPU {dev.index}: {dev.name}, {dev.memory_mb / 1024:.0f} GiB, {dev.uuid}")

    work = Path(tempfile.mkdtemp(prefix="ar-gpu-check-"))
    example = work / "tinylm"
    shutil.copytree(ROOT / "examples" / "tinylm", example)
    env = {**os.environ, "HOME": str(work / "home"), "AUTORESEARCH_TIME_BUDGET": str(args.budget),
           "CUDA_VISIBLE_DEVICES": str(dev.index), "PYTHONUNBUFFERED": "1"}
    subprocess.run([sys.executable, "prepare.py"], cwd=example, env=env, check=True, capture_output=True)

    free = run_watched(example, env, nvml, dev.uuid, ceiling_mb=None)
    s = free["summary"]
    training = float(s.get("training_seconds", 0) or 0)
    print("\n1) no ceiling")
    print(f"   val_bpb {s.get('val_bpb')}  steps {s.get('num_steps')}  exit {free['exit_code']}")
    print(f"   peak VRAM: NVML {free['nvml_peak_vram_mb']} MiB (process incl. CUDA context), "
          f"torch max_memory_allocated {s.get('peak_vram_mb')} MiB")
    print(f"   duty cycle: training {training:.1f}s / wall {free['wall_s']:.1f}s = {100 * training / free['wall_s']:.1f}%")

    ceiling = free["nvml_peak_vram_mb"] / 2
    capped = run_watched(example, env, nvml, dev.uuid, ceiling_mb=ceiling)
    print(f"\n2) ceiling {ceiling:.0f} MiB (half the peak)")
    print(f"   killed by the watchdog: {capped['killed_at_s'] is not None} at {capped['killed_at_s'] and round(capped['killed_at_s'], 2)}s, "
          f"NVML peak seen {capped['nvml_peak_vram_mb']} MiB, exit {capped['exit_code']} (reason vram)")
    print("\nJSON " + json.dumps({"device": dev.name, "free": free, "capped": capped, "ceiling_mb": ceiling}))


if __name__ == "__main__":
    main()
