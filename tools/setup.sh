#!/usr/bin/env bash
# Set up everything the demo and the tests need, on a fresh machine: Python environments and the local control
# plane built from Go source (cached under ${LLMOPS_CACHE:-~/.cache/llmops}; a warm run takes seconds).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

need() {
  if ! command -v "$1" >/dev/null 2>&1; then
    step "installing $2 (apt)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
  fi
}
need openssl openssl
if ! command -v go >/dev/null 2>&1; then
  echo "Go 1.24 or newer is needed to build the control plane (kube-apiserver & co. need it); install it and rerun" >&2
  exit 1
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  step "creating .venv (operator + test tools)"
  "$PYTHON" -m venv .venv
fi
step "installing the operator and its test tools into .venv"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'

if [ "${LLMOPS_SKIP_RAY_VENV:-0}" != 1 ]; then
  if [ ! -x .venv-ray/bin/python ] || ! .venv-ray/bin/python -c 'import ray, transformers, pytest' 2>/dev/null; then
    step "creating .venv-ray (Ray 2.60 on CPU, for the payload tests; about 1 GB, cached by pip)"
    "$PYTHON" -m venv .venv-ray
    .venv-ray/bin/python -m pip install -q --upgrade pip
    .venv-ray/bin/python -m pip install -q 'ray[data,serve]==2.60.0' transformers pytest pyyaml
  fi
fi

step "building the local control plane from source (cold: ~10 min on 2 cores; warm: seconds)"
.venv/bin/python tools/controlplane/build.py
