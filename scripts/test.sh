#!/usr/bin/env bash
# The README's test command: install the runner into .venv, make the registry-less base image
# (reused when present), and run the whole suite against the Docker daemon.
set -euo pipefail
cd "$(dirname "$0")/.."
# The cluster tests start Debian's docker-registry themselves (on 127.0.0.1); RUNLEVEL=1 keeps
# the package from starting its own service on install.
if ! command -v docker-registry >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -q && DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -q docker-registry) >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
# uv (a dependency of the runner: it installs research repos' locks in trainer images) resolves and
# installs the suite's packages in ~18 s where pip takes ~50 s (measured here, cold caches); pip,
# which reads pip.conf's indexes, where uv cannot. Byte-compiled at install, as pip does: where
# PYTHONDONTWRITEBYTECODE is set (CI), every runner command and Ray worker would otherwise compile
# its imports again (~1 s a command; a suite run measured 1430 s instead of ~1300 s).
if ! { .venv/bin/pip install -q uv && .venv/bin/uv pip install -q --compile-bytecode --python .venv/bin/python -e '.[test]'; }; then
  .venv/bin/pip install -q -e '.[test]'
fi
.venv/bin/runner base-image build
# Two pytest-xdist workers (RUNNER_TEST_WORKERS=1: serial), each on its share of the CPUs; the
# Ray and fake-GPU-host tests, and the tests of one module-scoped fixture, stay together on one
# worker (tests/conftest.py). Measured on this project's 2-core host, fresh clones: 2647 s serial,
# 1674 s on two workers (2026-12-01); 1127 s on two (2026-12-02, README: "Run the tests").
workers=${RUNNER_TEST_WORKERS:-$(( $(nproc) >= 2 ? 2 : 1 ))}
parallel=()
if [ "$workers" -gt 1 ]; then parallel=(-n "$workers" --dist loadscope); fi
exec .venv/bin/python -m pytest -q --durations=30 "${parallel[@]}" "$@"
