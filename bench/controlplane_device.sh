#!/usr/bin/env bash
# On the GPU machine, after `bash bench/dataplane_unpack.sh plane` (see bench/controlplane_carry.py): the carried
# wheels installed into the image's Python (itself a venv, whose packages a venv made from it would not see; the
# machine is fresh at every start), then bench/controlplane.py with the carried plane. Arguments go to the bench;
# its result goes to $OUT/controlplane.json unless --out is given.
set -euo pipefail
cd "$(dirname "$0")/.."
plane=${DP_ROOT:-/tmp/dp}/plane
python3 -m pip install -q --no-index --no-deps "$plane"/wheels/*.whl
chmod +x "$plane"/cache/bin/*
out=()
[[ " $* " == *" --out "* ]] || out=(--out "${OUT:-/tmp}/controlplane.json")
LLMOPS_CACHE="$plane/cache" PYTHONPATH=operator:tests exec python3 bench/controlplane.py "$@" "${out[@]}"
