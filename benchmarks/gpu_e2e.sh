#!/usr/bin/env bash
# The GPU end-to-end check: the real CLI, the real Docker engine, a torch.compile'd model on the
# GPU, on a machine that has a GPU and a driver but no Docker, no toolkit and no network.
#
#   1. Where the package registries are reachable (any Debian host), make the carry-in bundle:
#        bash benchmarks/gpu_e2e.sh bundle .gpu-bundle
#      .gpu-bundle/dk.tar.xz: Debian's dockerd, containerd, runc, docker-init and their libraries;
#      .gpu-bundle/pylib: the runner's Python dependencies that a CUDA-torch python usually lacks
#      (docker, GitPython, uv, ...), for Python $PYVER (default 3.12).
#   2. On the GPU machine, from the repo root, as root, with the bundle beside it:
#        BUNDLE=.gpu-bundle OUT=/tmp/e2e-out bash benchmarks/gpu_e2e.sh run
#      It starts dockerd from the bundle, imports the machine's own userland (CUDA torch, gcc,
#      Python headers) as a base image, makes an autoresearch-style repo from tinylm whose model
#      is torch.compile'd, and runs through the real CLI: `runner run --gpus all`, the same
#      train.py as a bare process, then `runner start --max-experiments 3`. It prints, and writes
#      to $OUT/results.json: val_bpb, compile seconds, the loop's duty cycle (training s / wall s),
#      per-experiment overhead, NVML VRAM peak, and the sandbox/bare speed ratio.
#
# Knobs: BUDGET (training seconds per run, default 30), PYTHON (the machine's CUDA-torch python,
# default python3), E2E_DOCKER_HOST (use an engine already running instead of the bundle's),
# E2E_BASE (use this base image instead of importing the userland), GPUS (default all).
set -euo pipefail

mode=${1:-}
PROJ=$(cd "$(dirname "$0")/.." && pwd)

if [ "$mode" = bundle ]; then
  out=$(mkdir -p "${2:?usage: gpu_e2e.sh bundle DIR}" && cd "$2" && pwd)
  work=$(mktemp -d)
  (cd "$work" && apt-get download docker.io containerd runc tini >/dev/null)
  mkdir -p "$work/x" "$work/dk/bin" "$work/dk/lib"
  for f in "$work"/*.deb; do dpkg -x "$f" "$work/x"; done
  cp "$work"/x/usr/sbin/dockerd "$work"/x/usr/bin/containerd "$work"/x/usr/bin/containerd-shim-runc-v2 \
     "$work"/x/usr/sbin/runc "$work/dk/bin/"
  cp -L "$work"/x/usr/bin/tini-static "$work/dk/bin/docker-init"
  for l in libdevmapper.so.1.02.1 libseccomp.so.2 libsystemd.so.0 libudev.so.1 libgcrypt.so.20 libgpg-error.so.0 \
           liblz4.so.1 libcap.so.2 libselinux.so.1 libpcre2-8.so.0; do
    p=$(ldconfig -p | grep -m1 "$l (" | awk '{print $NF}') && [ -n "$p" ] && cp -L "$p" "$work/dk/lib/"
  done
  tar -C "$work/dk" -cf - bin lib | xz -T2 -6 > "$out/dk.tar.xz"
  rm -rf "$work" "$out/pylib"
  python3 -m pip install -q --no-deps --target "$out/pylib" --only-binary=:all: --implementation cp \
    --python-version "${PYVER:-3.12}" --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    docker==7.1.0 requests urllib3 certifi idna charset-normalizer gitpython gitdb smmap "uv==$(python3 -m uv --version 2>/dev/null | awk '{print $2}' || echo 0.13.9)"
  ls -la "$out" && du -sh "$out/pylib"
  exit 0
fi
[ "$mode" = run ] || { echo "usage: gpu_e2e.sh bundle DIR | run" >&2; exit 2; }

: "${OUT:?set OUT to a folder for the results}"
BUNDLE=$(cd "${BUNDLE:-.gpu-bundle}" 2>/dev/null && pwd || true)
BUDGET=${BUDGET:-30}
PY=${PYTHON:-python3}
GPUS=${GPUS:-all}
W=$(mktemp -d /tmp/gpu-e2e.XXXX)
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
T0=$(date +%s)
t() { echo "[t=$(( $(date +%s) - T0 ))s] $*"; }
export PYTHONPATH="${BUNDLE:+$BUNDLE/pylib:}$PROJ" PYTHONUNBUFFERED=1
runner() { "$PY" -m runner "$@"; }

t "== machine"
nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
"$PY" -c "import sys, torch; print(sys.version.split()[0], torch.__version__, 'cuda', torch.cuda.is_available())"

if [ -n "${E2E_DOCKER_HOST:-}" ]; then
  export DOCKER_HOST=$E2E_DOCKER_HOST
else
  t "== dockerd from the bundle"
  mkdir -p /opt/dk && tar -C /opt/dk -xJf "$BUNDLE/dk.tar.xz"
  export PATH=/opt/dk/bin:$PATH
  mount | grep -q " /sys/fs/cgroup " || mount -t cgroup2 none /sys/fs/cgroup
  mkdir -p /var/lib/dk /run/dk
  # No bridge and no iptables: experiments have network "none", and this machine has no network.
  LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:/opt/dk/lib" setsid dockerd --data-root /var/lib/dk --exec-root /run/dk \
    -H unix:///run/dk/docker.sock --iptables=false --ip-masq=false --bridge=none >"$OUT/dockerd.log" 2>&1 &
  export DOCKER_HOST=unix:///run/dk/docker.sock
  for _ in $(seq 60); do "$PY" -c "import docker; docker.from_env().ping()" 2>/dev/null && break; sleep 0.5; done
fi
"$PY" -c "import docker; i = docker.from_env().info(); print('engine', i['ServerVersion'], i['Driver'], 'cgroup', i.get('CgroupVersion'), 'runtimes', sorted(i.get('Runtimes') or {}))"

BASE=${E2E_BASE:-}
if [ -z "$BASE" ]; then
  t "== base image from this machine's userland (CUDA torch, gcc, Python headers)"
  BASE=gpu-e2e/hostbase:1
  pybin=$(dirname "$("$PY" -c 'import sys; print(sys.executable)')")
  dirs=(usr etc bin lib lib64 sbin); [ -d /opt ] && dirs+=(opt)
  "$PY" - "$BASE" "$pybin" "${dirs[@]}" <<'PY'
import subprocess, sys, time, docker
ref, pybin, dirs = sys.argv[1], sys.argv[2], sys.argv[3:]
c = docker.from_env(timeout=1800)
t0 = time.time()
tar = subprocess.Popen(["tar", "-C", "/", "--numeric-owner", "--exclude=usr/local/nvidia", "--exclude=usr/share/doc",
                        "--exclude=usr/share/man", "--exclude=opt/dk", "-cf", "-", *dirs],
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
repo, tag = ref.rsplit(":", 1)
c.api.import_image(src=tar.stdout, stream_src=True, repository=repo, tag=tag,
                   changes=[f"ENV PATH={pybin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "ENV LANG=C.UTF-8"])
tar.wait()
print(f"imported {ref} in {time.time() - t0:.0f}s, {c.images.get(ref).attrs['Size'] / 2**30:.1f} GiB")
PY
fi

t "== an autoresearch-style repo: tinylm with a torch.compile'd model"
cp -r "$PROJ/examples/tinylm" "$W/repo"
git -C "$W/repo" init -q -b main
"$PY" - "$W/repo/train.py" <<'PY'
import sys
path = sys.argv[1]
src = open(path).read()
anchor = "model = GPT().to(device)\n"
assert anchor in src, "tinylm's train.py changed: update the compile patch in gpu_e2e.sh"
src = src.replace(anchor, anchor + (
    "_t_compile = time.time()\n"
    "model = torch.compile(model, dynamic=False)\n"
    "with autocast:\n"
    "    model(torch.zeros(BATCH_SIZE, SEQ_LEN, dtype=torch.long, device=device)).float().sum().backward()\n"
    "model.zero_grad(set_to_none=True)\n"
    "print(f\"compile_s: {time.time() - _t_compile:.1f}\", flush=True)\n"))
open(path, "w").write(src)
PY
cat > "$W/repo/runner.yaml" <<EOF
base_image: $BASE
dependencies: none
EOF
git -C "$W/repo" add -A && git -C "$W/repo" -c user.name=e2e -c user.email=e2e@localhost commit -qm "torch.compile the model"
mkdir -p "$W/home/.cache/autoresearch"
(cd "$W/repo" && HOME="$W/home" "$PY" prepare.py | tail -1)
DATA="$W/home/.cache/autoresearch"

t "== runner run --gpus $GPUS (sandbox)"
runner run --repo "$W/repo" --data-dir "$DATA" --gpus "$GPUS" --budget "$BUDGET" --json | tail -1 > "$W/run.json"
cat "$W/run.json"

t "== the same train.py as a bare process"
b0=$(date +%s.%N)
(cd "$W/repo" && HOME="$W/home" AUTORESEARCH_TIME_BUDGET="$BUDGET" "$PY" train.py > "$W/bare.log" 2>&1) || tail -20 "$W/bare.log"
b1=$(date +%s.%N)
grep -E "^(val_bpb|num_steps|compile_s):" "$W/bare.log" || tail -20 "$W/bare.log"

t "== runner start --max-experiments 3"
runner start --repo "$W/repo" --data-dir "$DATA" --gpus "$GPUS" --budget "$BUDGET" --tag e2e --max-experiments 3 \
  --proposer offline 2>&1 | tail -12 || true

t "== figures"
"$PY" - "$W" "$b0" "$b1" "$OUT/results.json" <<'PY'
import json, re, sys, time
from pathlib import Path
w, b0, b1, out = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]

def field(text, key):
    m = re.findall(rf"^{key}:\s*([0-9.]+)", text, re.M)
    return float(m[-1]) if m else None

run = json.loads((w / "run.json").read_text())
run_log = Path(run["log"]).read_text(errors="replace")
bare_log = (w / "bare.log").read_text(errors="replace")
events = [json.loads(l) for l in (w / "repo/.autoresearch/e2e/events.jsonl").read_text().splitlines() if l.strip()]
exps = [e["run"] for e in events if e.get("event") == "experiment"]
loop_train = sum(r.get("training_seconds") or 0 for r in exps)
loop_wall = sum(r.get("total_s") or 0 for r in exps)
res = {
    "date": time.strftime("%Y-%m-%d"),
    "sandbox": {k: run.get(k) for k in ("status", "reason", "val_bpb", "wall_s", "overhead_s", "peak_vram_mb", "training_seconds",
                                         "verdict", "self_reported_val_bpb", "verify_s")},
    "sandbox_compile_s": field(run_log, "compile_s"),
    "sandbox_steps": field(run_log, "num_steps"),
    "bare": {"val_bpb": field(bare_log, "val_bpb"), "wall_s": round(b1 - b0, 2), "compile_s": field(bare_log, "compile_s"),
             "steps": field(bare_log, "num_steps"), "peak_vram_mb_torch": field(bare_log, "peak_vram_mb")},
    "loop": {"experiments": len(exps), "statuses": [e.get("outcome") for e in events if e.get("event") == "experiment"],
             "duty_cycle": round(loop_train / loop_wall, 4) if loop_wall else None,
             "overhead_s": [r.get("overhead_s") for r in exps], "peak_vram_mb": [r.get("peak_vram_mb") for r in exps]},
}
if res["sandbox_steps"] and res["bare"]["steps"]:
    res["speed_ratio_sandbox_over_bare_steps"] = round(res["sandbox_steps"] / res["bare"]["steps"], 3)
print(json.dumps(res, indent=2))
Path(out).write_text(json.dumps(res, indent=2))
PY
t "== done"
