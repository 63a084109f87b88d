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
# The test environments pull PyTorch's CUDA wheels (hundreds of MB each); an interrupted download is resumed
# this many times instead of failing the setup (pip versions without the option ignore the variable).
export PIP_RESUME_RETRIES=${PIP_RESUME_RETRIES:-50}
if [ ! -x .venv/bin/python ]; then
  step "creating .venv (operator + test tools)"
  "$PYTHON" -m venv .venv
fi
step "installing the operator and its test tools into .venv"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test,dev]'

# The payload suites run where their code runs: Ray 2.60 (batch and serve payloads, plus peft for the adapter
# check) and LLaMA-Factory 0.9.4's own stack (the training payload against the real CLI on CPU). pip's cache makes
# later runs quick; the first one downloads a few GB (PyTorch).
make_venv() {  # name, check, packages...
  local name=$1 check=$2; shift 2
  if [ ! -x "$name/bin/python" ] || ! "$name/bin/python" -c "$check" 2>/dev/null; then
    step "creating $name"
    "$PYTHON" -m venv "$name"
    "$name/bin/python" -m pip install -q --upgrade pip
    "$name/bin/python" -m pip install -q "$@"
  fi
}
if [ "${LLMOPS_SKIP_RAY_VENV:-0}" != 1 ]; then
  # torch pinned to .venv-lf's: one download of PyTorch's CUDA wheels serves both environments from pip's cache.
  make_venv .venv-ray 'import ray.data.llm, ray.serve, transformers, peft, pytest, yaml' \
    'ray[data,serve]==2.60.0' 'torch==2.11.0' transformers peft pytest pyyaml
  # The model cache's download is tested against a local S3 server.
  .venv-ray/bin/python -c 'import moto.server' 2>/dev/null || .venv-ray/bin/python -m pip install -q 'moto[server]==5.2.6'
  # The FineTune image's pins (Settings.finetune_pip): transformers 4.52.4 is what lets 0.9.4 use neat packing.
  make_venv .venv-lf 'import importlib.metadata as m, ray.train, pytest
assert (m.version("llamafactory"), m.version("transformers")) == ("0.9.4", "4.52.4")' \
    'llamafactory==0.9.4' 'transformers==4.52.4' 'ray[data,train]==2.60.0' 'torch==2.11.0' 'torchaudio==2.11.0' \
    'torchvision==0.26.0' pytest pyyaml
fi

# Kueue is the largest cold build after Kubernetes: its manager links every job integration it ships.
step "building the local control plane from source (cold: ~15 min on 2 cores; warm: seconds)"
.venv/bin/python tools/controlplane/build.py
