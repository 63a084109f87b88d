#!/usr/bin/env bash
# Set everything up and run every test: unit, payload (real Ray Data on CPU) and integration (real local control
# plane: kube-apiserver, etcd, controller-manager, scheduler, kwok, KubeRay). Nothing is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh

printf '\n==> generated files are current\n'
.venv/bin/llmops crds --check

export PYTHONPATH=operator:tests
printf '\n==> payload tests: batch, serve config and fine-tune driver (Ray 2.60 on CPU)\n'
.venv-ray/bin/python -m pytest tests/unit/payloads -q -p no:cacheprovider -p noskip -m "not llamafactory"

printf '\n==> fine-tune payload, shared-prefix packing and compiled layers against the real LLaMA-Factory 0.9.4 (CPU)\n'
.venv-lf/bin/python -m pytest tests/unit/payloads/test_finetune_payload.py tests/unit/payloads/test_shared_prefix.py tests/unit/payloads/test_compile_layers.py -q -p no:cacheprovider -p noskip -m llamafactory

printf '\n==> unit, golden and integration tests\n'
.venv/bin/python -m pytest tests -q -p no:cacheprovider -p noskip --ignore=tests/unit/payloads "$@"
