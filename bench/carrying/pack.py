"""Step 4 of the carry: each set packed as tar + xz and cut into parts that fill the device calls in order."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

from .pins import CALL_BYTES, CARRY, MiB, PARTS, PART_BYTES, REPO, mib

# ---------------------------------------------------------------- 4. pack and split



def member_order(root: Path) -> list[str]:
    """Every path, sorted, but the large binaries last and side by side: Ray's raylet, GCS server and _raylet.so
    share most of their code, which xz finds only within its window (64 MiB at -9)."""
    paths = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    def large_binary(name: str) -> bool:
        path = root / name
        if path.is_symlink() or not path.is_file() or path.stat().st_size < 4 * MiB:
            return False
        with path.open("rb") as f:
            return f.read(4) == b"\x7fELF"
    large = sorted((p for p in paths if large_binary(p)), key=lambda p: (p.startswith("ray/"), p))
    return [p for p in paths if p not in set(large)] + large


def pack(name: str, root: Path) -> Path:
    """tar + xz of one set, reproducible (no owners, fixed times). One xz block (one thread): a second block would
    not see the first, and the binaries that repeat each other are far apart in a tar of 300 MB."""
    out = CARRY / f"{name}.tar.xz"
    members = CARRY / f"{name}.members"
    members.write_text("\n".join(member_order(root)) + "\n")
    with out.open("wb") as sink:
        tar = subprocess.Popen(["tar", "-C", str(root), "--owner=0", "--group=0", "--numeric-owner", "--mtime=@0",
                                "--no-recursion", "-T", str(members), "-cf", "-"], stdout=subprocess.PIPE)
        subprocess.run(["xz", "-9e", "-T1", "-c"], stdin=tar.stdout, stdout=sink, check=True)
        if tar.wait():
            sys.exit(f"tar of {root} failed")
    return out


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            digest.update(block)
    return digest.hexdigest()


def split(streams: dict[str, Path]) -> dict:
    """Cut the streams, in order, at the device calls' boundaries: every call but the last is full.

    A part never spans two sets; a set whose stream ends in a call shares that call with the next set's first part."""
    shutil.rmtree(PARTS, ignore_errors=True)
    PARTS.mkdir(parents=True)
    manifest: dict = {"sets": {}, "calls": [[]]}
    per_call = min(PART_BYTES, CALL_BYTES - checkout_bytes() - 64 * 1024)  # the manifest travels too
    room = per_call
    for name, stream in streams.items():
        parts = []
        with stream.open("rb") as source:
            while chunk := source.read(room):
                part = PARTS / f"{name}.tar.xz.part{len(parts):02d}"
                part.write_bytes(chunk)
                parts.append({"file": part.name, "bytes": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
                manifest["calls"][-1].append(part.name)
                room -= len(chunk)
                if not room:
                    manifest["calls"].append([])
                    room = per_call
        manifest["sets"][name] = {"parts": parts, "sha256": sha256(stream), "bytes": stream.stat().st_size}
    if not manifest["calls"][-1]:
        manifest["calls"].pop()
    (PARTS / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def checkout_bytes() -> int:
    """What every device call carries besides the parts: the checkout's files that git does not ignore."""
    names = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "-co", "--exclude-standard"],
                           capture_output=True, check=True).stdout.split(b"\0")
    return sum(path.stat().st_size for name in names if name and (path := REPO / name.decode()).is_file())


def print_plan(manifest: dict) -> None:
    last_call = {name: max(i for i, call in enumerate(manifest["calls"]) for part in call
                           if part.startswith(name + "."))
                 for name in manifest["sets"]}
    for name, info in manifest["sets"].items():
        print(f"{name}: {mib(info['bytes'])} MiB in {len(info['parts'])} part(s)")
    print(f"\n{len(manifest['calls'])} device call(s), back to back (the machine keeps /tmp for 30 s after a call):")
    for i, call in enumerate(manifest["calls"]):
        carry = [".carry/parts/manifest.json"] + [f".carry/parts/{p}" for p in call]
        size = sum(p["bytes"] for info in manifest["sets"].values() for p in info["parts"] if p["file"] in call)
        ready = [name for name, at in last_call.items() if at <= i]
        print(f"call {i + 1}: {mib(size)} MiB of parts + {mib(checkout_bytes())} MiB of checkout; "
              f"carry={json.dumps(carry)}")
        print(f"  command starts: bash bench/dataplane_unpack.sh {' '.join(ready)} && ..."
              f"{'' if ready else '  (keeps the parts in /tmp/dp/incoming)'}")
    print("\nthen: export PYTHONPATH=/tmp/dp/serve PATH=/tmp/dp/serve/bin:$PATH; for the fine-tune Ray cluster "
          "PYTHONPATH=/tmp/dp/finetune:/tmp/dp/serve")
