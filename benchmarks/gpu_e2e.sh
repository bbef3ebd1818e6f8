#!/usr/bin/env bash
# The GPU end-to-end check: the real CLI, the real Docker engine, a torch.compile'd model on the
# GPU, on a machine that has a GPU, a driver and a CUDA-torch python but no Docker, no toolkit,
# no network and perhaps no git. The stages themselves are in benchmarks/gpu_e2e.py.
#
#   1. Where the package registries are reachable (a Debian host whose glibc is no newer than the
#      GPU machine's: bookworm's 2.36 runs on Ubuntu 24.04's 2.39), make the carry-in bundle,
#      at most 60 MiB:
#        bash benchmarks/gpu_e2e.sh bundle .gpu-bundle
#      .gpu-bundle/bundle.tar.xz holds bin/ (Debian's dockerd, containerd, its runc shim, runc,
#      docker-init, git), lib/ (the libraries they link, glibc excepted) and pylib/ (what the
#      machine's python lacks of the runner's dependencies: docker, GitPython, gitdb, smmap, uv;
#      uv's binary goes into trainer images). manifest.json beside it says what is inside.
#   2. On the GPU machine, from the repo root, as root, with the bundle carried in (.gpu-bundle is
#      ignored by git: the device harness takes it when `carry` names it):
#        OUT=/tmp/e2e-out bash benchmarks/gpu_e2e.sh run
#      It unpacks the bundle with Python's own lzma, starts dockerd from it on its own roots and
#      socket, imports the machine's userland as the base image (only what torch needs: the
#      python, the closure of torch's distributions, the Debian packages for the compiler,
#      headers and useradd, /etc), makes a tinylm repo whose model is torch.compile'd, and runs
#      `runner run --gpus all`, the same train.py bare, and `runner start --max-experiments 1`.
#      Each stage appends its figures to $OUT/results.jsonl as it ends and rewrites
#      $OUT/results.json, so a run cut short keeps what finished; the last stage checks that the
#      runs used the GPU (peak_vram_mb > 0 and the CUDA device named in each run's log).
#      Also in $OUT: log.txt, dockerd.log, sandbox_run.log, bare_run.log, loop_events.jsonl.
#   3. Rehearsal on a host without a GPU (the same stages; the GPU check is recorded as skipped):
#        python3 -m venv /opt/torch-cpu && /opt/torch-cpu/bin/pip install torch==2.13.0+cpu numpy \
#          pyyaml typer rich requests nvidia-ml-py packaging \
#          --extra-index-url https://download.pytorch.org/whl/cpu   # what the GPU machine's python has
#        STANDIN=cpu PYTHON=/opt/torch-cpu/bin/python3 OUT=/tmp/e2e-out bash benchmarks/gpu_e2e.sh run
#
#   bash benchmarks/gpu_e2e.sh check DIR    the bundle's size; refuses one over 60 MiB
#
# Knobs: PYTHON (the machine's CUDA-torch python, default python3), BUNDLE (default .gpu-bundle),
# BUDGET (training seconds per run, default 10), DEADLINE_S (the whole run, default 450; stages
# that would start too late are recorded as skipped), GPUS (default all; none with STANDIN=cpu),
# E2E_DOCKER_HOST (an engine already running, instead of the bundle's dockerd), E2E_BASE (a base
# image already there, instead of importing the userland), E2E_BASE_SELECT (torch, the default,
# or broad: /usr and /etc whole but docs and the CUDA toolkit; torch falls back to broad if its
# image fails the check), E2E_BASE_DISTS (whose requirement closure the base takes of python's
# packages, default "torch numpy"), E2E_GIT (auto: the machine's git, else the bundle's; machine; bundle),
# E2E_WORK (parent of the work folder, default /var/tmp), E2E_KEEP=1 (keep the work folder).
# On the machine it needs only bash, coreutils, tar and (if cgroup2 is not mounted) mount, which
# every Debian or Ubuntu system has; not git, xz, curl or Docker.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
PROJ=$(dirname "$HERE")
PY=${PYTHON:-python3}
mode=${1:-}

make_bundle() {
  local out pins
  [ -n "${1:-}" ] || { echo "usage: gpu_e2e.sh bundle DIR" >&2; exit 2; }
  for tool in apt-get dpkg ldd xz "$PY"; do
    command -v "$tool" >/dev/null || { echo "error: $tool is missing: make the bundle on a Debian host with python3" >&2; exit 2; }
  done
  out=$(mkdir -p "$1" && cd "$1" && pwd)
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && apt-get download docker.io containerd runc tini git >/dev/null 2>&1) ||
    { echo "error: apt-get download docker.io containerd runc tini git failed: run apt-get update first" >&2; exit 1; }
  mkdir -p "$work/x" "$work/b/bin" "$work/b/lib"
  for f in "$work"/*.deb; do dpkg -x "$f" "$work/x"; done
  cp "$work"/x/usr/sbin/dockerd "$work"/x/usr/bin/containerd "$work"/x/usr/bin/containerd-shim-runc-v2 \
     "$work"/x/usr/sbin/runc "$work"/x/usr/bin/git "$work/b/bin/"
  cp -L "$work"/x/usr/bin/tini-static "$work/b/bin/docker-init"
  # The libraries they link, as this host resolves them; glibc is the machine's own.
  ldd "$work"/b/bin/dockerd "$work"/b/bin/containerd "$work"/b/bin/containerd-shim-runc-v2 "$work"/b/bin/runc "$work"/b/bin/git |
    awk '/=> \// {print $3}' | sort -u |
    grep -Ev '/(linux-vdso|libc|libm|libpthread|libdl|librt|libresolv|ld-linux[^/]*)\.so' |
    while read -r lib; do cp -L "$lib" "$work/b/lib/"; done
  # The versions the runner is tested with here, when its venv is present.
  pins=$("$PROJ/.venv/bin/python" - 2>/dev/null <<'PY' || echo "docker==7.1.0 gitpython gitdb smmap uv"
from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in ("docker", "gitpython", "gitdb", "smmap", "uv")))
PY
)
  # shellcheck disable=SC2086  # one argument per pin
  "$PY" -m pip install -q --no-deps --no-compile --target "$work/b/pylib" --only-binary=:all: --implementation cp \
    --python-version "${PYVER:-3.12}" --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 $pins
  LD_LIBRARY_PATH="$work/b/lib" "$PY" - "$work/b" "$pins" <<'PY'
import json, subprocess, sys, time
b, pins = sys.argv[1], sys.argv[2]
def version(*cmd):
    return subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()[0]
json.dump({"made": time.strftime("%Y-%m-%d"), "dockerd": version(f"{b}/bin/dockerd", "--version"),
           "git": version(f"{b}/bin/git", "--version"), "python_packages": pins.split()},
          open(f"{b}/manifest.json", "w"), indent=2)
PY
  rm -rf "$out/pylib" "$out/dk.tar.xz" "$out/bundle.tar.xz"   # an older layout's files, and the last bundle
  tar -C "$work/b" -cf - bin lib pylib manifest.json | xz -T0 -9 > "$out/bundle.tar.xz"
  cp "$work/b/manifest.json" "$out/manifest.json"
  "$PY" "$HERE/gpu_e2e.py" check-bundle "$out"
}

case "$mode" in
  bundle) make_bundle "${2:-}" ;;
  check) exec "$PY" "$HERE/gpu_e2e.py" check-bundle "${2:-${BUNDLE:-$PROJ/.gpu-bundle}}" ;;
  run) exec "$PY" "$HERE/gpu_e2e.py" run ;;
  *) echo "usage: gpu_e2e.sh bundle DIR | check [DIR] | run   (knobs: see the header of benchmarks/gpu_e2e.sh)" >&2; exit 2 ;;
esac
