#!/usr/bin/env bash
# Make a fresh Debian or Ubuntu host ready for the runner, as root: Docker (Debian's docker.io),
# debootstrap and python3-venv installed, and a Docker daemon answering on /var/run/docker.sock.
# Idempotent: on a ready host it changes nothing. The README's main command and .ci/run use it.
set -euo pipefail

daemon_answers() {
  python3 - <<'PY' 2>/dev/null
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(2)
try:
    s.connect("/var/run/docker.sock")
    s.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
    sys.exit(0 if b"OK" in s.recv(4096) else 1)
except OSError:
    sys.exit(1)
PY
}

missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
python3 -c "import ensurepip" 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { echo "bootstrap: run as root (needs apt-get for: ${missing[*]})" >&2; exit 1; }
  echo "bootstrap: installing ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
fi

if ! daemon_answers; then
  if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    echo "bootstrap: starting docker (systemd)"
    systemctl start docker || true
  fi
  if ! daemon_answers; then
    echo "bootstrap: starting dockerd (log: /var/log/dockerd-bootstrap.log)"
    nohup dockerd >/var/log/dockerd-bootstrap.log 2>&1 &
  fi
  for _ in $(seq 60); do daemon_answers && break; sleep 1; done
  daemon_answers || { echo "bootstrap: dockerd did not start; see /var/log/dockerd-bootstrap.log" >&2;
                      tail -20 /var/log/dockerd-bootstrap.log >&2; exit 1; }
fi
echo "bootstrap: Docker answers; debootstrap and python3-venv present"
