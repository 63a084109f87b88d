#!/usr/bin/env bash
# Set everything up and run the local demo: the real operator and KubeRay reconcile the ViGGO workflow
# (FineTune -> BatchInference -> LLMService) on the local control plane with a simulated GPU pool.
set -euo pipefail
cd "$(dirname "$0")/.."
LLMOPS_SKIP_RAY_VENV=1 tools/setup.sh
exec .venv/bin/llmops demo "$@"
