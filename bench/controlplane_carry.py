#!/usr/bin/env python3
"""Carry the control-plane benchmark to the GPU machine, to run it where the API server has cores to spare.

On this 2-core machine a burst of 100 FineTunes fills both cores (docs/benchmarks.md), so its latencies are this
machine's throughput. The GPU machine has 16 cores and no network: this packs what `bench/controlplane.py` needs
there as one set, "plane", in the data-plane carry's format (bench/carrying/pack.py), so that
bench/dataplane_unpack.sh unpacks it:

* the local plane's binaries, as built here by `python3 tools/controlplane/build.py` (etcd, kube-apiserver,
  controller-manager, scheduler, kubectl, kwok, the KubeRay operator) and the files of the cache they read
  (KubeRay's CRDs, kwok's stages), under cache/ (the bench reads it through LLMOPS_CACHE);
* the wheels, for the device's Python 3.12, of what the operator and the bench import beyond the device's image
  (kopf, pydantic, the kubernetes client the harness reads the plane with), under wheels/.

    python3 bench/controlplane_carry.py       # packs, splits into device calls, prints them

Each call of the plan carries `.carry/parts/manifest.json` and its parts; the last one runs, for example:

    bash bench/dataplane_unpack.sh plane && bash bench/controlplane_device.sh --n 100 --repeat 5
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))

from carrying.pack import checkout_bytes, pack, split  # noqa: E402
from carrying.pins import BUILD, CARRY, DEVICE_HAS, PIP_TARGET, REPO, mib, normalize  # noqa: E402
from llmops.dev.plane import BINARIES  # noqa: E402
from llmops.dev.processes import cache_dir  # noqa: E402

# Distributions the operator, the bench and its harness import that the device's image lacks, at the versions of
# this checkout's .venv (read from it, so the two sides run the same code).
NEEDED = ("kopf", "jsonpatch", "jsonpointer", "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
          "python-json-logger", "iso8601", "kubernetes", "durationpy", "google-auth", "cachetools", "pyasn1",
          "pyasn1-modules", "rsa", "websocket-client", "requests-oauthlib", "oauthlib")
# every CRD folder the plane installs at start, and kwok's stages
SHARE = ("kuberay-crds", "gateway-api-crds", "envoy-gateway-crds", "kueue-crds", "kwok-stages")


def venv_versions() -> dict[str, str]:
    python = REPO / ".venv" / "bin" / "python"
    if not python.exists():
        sys.exit(f"{python} is missing: set up the checkout first (bash tools/setup.sh or .ci/run)")
    out = subprocess.run([str(python), "-c", "import importlib.metadata as m\n"
                          "for d in m.distributions(): print(d.metadata['Name'], d.version)"],
                         capture_output=True, text=True, check=True).stdout
    return {normalize(name): version for name, version in (line.split() for line in out.splitlines())}


def gather(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
    (root / "cache" / "bin").mkdir(parents=True)
    for name in BINARIES:
        for file in (cache_dir() / "bin" / name, cache_dir() / "bin" / f".{name}.version"):
            if not file.is_file():
                sys.exit(f"{file} is missing: build the plane first (python3 tools/controlplane/build.py)")
            shutil.copy2(file, root / "cache" / "bin" / file.name)
    for name in SHARE:
        if not (cache_dir() / "share" / name).is_dir():
            sys.exit(f"{cache_dir() / 'share' / name} is missing: build the plane first "
                     "(python3 tools/controlplane/build.py)")
        shutil.copytree(cache_dir() / "share" / name, root / "cache" / "share" / name)
    versions = venv_versions()
    pins = [f"{name}=={versions[normalize(name)]}" for name in NEEDED
            if normalize(name) in versions and normalize(name) not in DEVICE_HAS]
    (root / "wheels").mkdir()
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--dest", str(root / "wheels"),
                    *PIP_TARGET, *pins], check=True)


def main() -> None:
    root = BUILD / "plane"
    gather(root)
    print(f"plane: {mib(sum(p.stat().st_size for p in root.rglob('*') if p.is_file()))} MiB before packing")
    manifest = split({"plane": pack("plane", root)})
    print(f"plane: {mib(manifest['sets']['plane']['bytes'])} MiB packed; the checkout adds "
          f"{mib(checkout_bytes())} MiB to every call")
    for i, call in enumerate(manifest["calls"]):
        carry = [".carry/parts/manifest.json"] + [f".carry/parts/{part}" for part in call]
        last = i == len(manifest["calls"]) - 1
        print(f"call {i + 1}, carry={carry}:\n  bash bench/dataplane_unpack.sh"
              + (" plane && bash bench/controlplane_device.sh ARGS" if last else "   (keeps the parts in /tmp/dp)"))
    print(f"(calls back to back: the machine keeps /tmp only while warm; {CARRY} holds the parts)")


if __name__ == "__main__":
    main()
