#!/usr/bin/env bash
# On the GPU machine, after `bash bench/dataplane_unpack.sh plane` (see bench/controlplane_carry.py): a venv over
# the image's Python with the carried wheels, then bench/controlplane.py with the carried plane. Arguments go to
# the bench; its result goes to $OUT/controlplane.json unless --out is given.
set -euo pipefail
cd "$(dirname "$0")/.."
plane=${DP_ROOT:-/tmp/dp}/plane
venv=${DP_ROOT:-/tmp/dp}/venv
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv --system-site-packages "$venv"
    "$venv/bin/pip" install -q --no-index --no-deps "$plane"/wheels/*.whl
fi
chmod +x "$plane"/cache/bin/*
out=()
[[ " $* " == *" --out "* ]] || out=(--out "${OUT:-/tmp}/controlplane.json")
LLMOPS_CACHE="$plane/cache" PYTHONPATH=operator:tests exec "$venv/bin/python" bench/controlplane.py "$@" "${out[@]}"
