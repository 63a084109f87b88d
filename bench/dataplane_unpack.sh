#!/usr/bin/env bash
# On the GPU machine, at the start of every call of the plan that bench/dataplane_carry.py prints: keeps the parts
# this call carried (.carry/parts/) in /tmp/dp/incoming, since /tmp outlives a call and the checkout does not, and
# unpacks each set whose parts have all arrived into /tmp/dp/<set> (marker /tmp/dp/<set>/.complete holds the
# stream's sha256). Idempotent. Named sets (e.g. `bash bench/dataplane_unpack.sh serve`) must end complete, else
# the exit status is 1.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 - "${DP_ROOT:-/tmp/dp}" "$@" <<'EOF'
import hashlib, json, shutil, subprocess, sys, tarfile
from pathlib import Path

root, required = Path(sys.argv[1]), sys.argv[2:]
carried, incoming = Path(".carry/parts"), root / "incoming"
incoming.mkdir(parents=True, exist_ok=True)
if (carried / "manifest.json").is_file():
    shutil.copyfile(carried / "manifest.json", incoming / "manifest.json")
if not (incoming / "manifest.json").is_file():
    sys.exit("no .carry/parts/manifest.json in this call nor in /tmp/dp/incoming: carry the manifest with the parts")
manifest = json.loads((incoming / "manifest.json").read_text())


def sha256(path):
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def marker(name):
    path = root / name / ".complete"
    return path.read_text().strip() if path.is_file() else None


def extract(name, parts):
    staging, final = root / f"{name}.unpacking", root / name
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if shutil.which("tar") and shutil.which("xz"):
        tar = subprocess.Popen(["tar", "-x", "-J", "-f", "-", "-C", str(staging)], stdin=subprocess.PIPE)
        for part in parts:
            with part.open("rb") as f:
                shutil.copyfileobj(f, tar.stdin, 1 << 20)
        tar.stdin.close()
        if tar.wait():
            sys.exit(f"unpacking {name} failed")
    else:  # no tar or xz command: Python's own, through one joined file
        joined = staging.with_suffix(".tar.xz")
        with joined.open("wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        with tarfile.open(joined, "r:xz") as archive:
            archive.extractall(staging, filter="tar")
        joined.unlink()
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)


verified = {}
for name, info in manifest["sets"].items():
    if marker(name) == info["sha256"]:
        continue  # unpacked by an earlier call
    for part in info["parts"]:
        here, kept = carried / part["file"], incoming / part["file"]
        if here.is_file() and not (kept.is_file() and kept.stat().st_size == part["bytes"]
                                   and sha256(kept) == part["sha256"]):
            if sha256(here) != part["sha256"]:
                sys.exit(f"{here}: sha256 differs from the manifest; carry the parts of one build")
            shutil.copyfile(here, kept)
        verified[part["file"]] = kept.is_file() and sha256(kept) == part["sha256"]

incomplete = []
for name, info in manifest["sets"].items():
    if marker(name) == info["sha256"]:
        print(f"{name}: complete in {root / name}")
        continue
    missing = [part["file"] for part in info["parts"] if not verified.get(part["file"])]
    if missing:
        print(f"{name}: waiting for {' '.join(missing)}")
        incomplete.append(name)
        continue
    parts = [incoming / part["file"] for part in info["parts"]]
    extract(name, parts)
    (root / name / ".complete").write_text(info["sha256"] + "\n")
    for part in parts:
        part.unlink()
    print(f"{name}: unpacked into {root / name}")

if missing_required := [name for name in required if name in incomplete or name not in manifest["sets"]]:
    sys.exit(f"not complete: {' '.join(missing_required)}")
EOF
