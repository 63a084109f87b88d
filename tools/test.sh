#!/usr/bin/env bash
# Set everything up and run every test: unit, payload (real Ray Data on CPU) and integration (real local control
# plane: kube-apiserver, etcd, controller-manager, scheduler, kwok, KubeRay). Nothing is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh

printf '\n==> generated files are current\n'
.venv/bin/llmops crds --check

printf '\n==> payload tests (Ray Data on CPU)\n'
PYTHONPATH=operator .venv-ray/bin/python -m pytest tests/unit/payloads -q -p no:cacheprovider --confcutdir=tests/unit

printf '\n==> unit, golden and integration tests\n'
.venv/bin/python -m pytest tests -q -p no:cacheprovider --ignore=tests/unit/payloads "$@"
