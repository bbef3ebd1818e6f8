#!/usr/bin/env bash
# The README's test command: install the runner into .venv, make the registry-less base image
# (reused when present), and run the whole suite against the Docker daemon.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -e '.[test]'
.venv/bin/runner base-image build
exec .venv/bin/python -m pytest -q "$@"
