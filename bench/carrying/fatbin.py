"""vLLM's GPU library cut to the one architecture the GPU machine has: the code of every other architecture in
its fatbin is overwritten with zeros in place (the ELF keeps its layout), which xz then squeezes away."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

from .pins import CARRY, KEEP_SM, WHEELS, mib, run

# ---------------------------------------------------------------- fatbin: keep sm_90 only

FATBIN_MAGIC = 0xBA55ED50
KIND_PTX, KIND_ELF = 1, 2


def elf_section(data: bytes | bytearray, wanted: str) -> tuple[int, int]:
    """(file offset, size) of a section of a 64-bit little-endian ELF."""
    if data[:6] != b"\x7fELF\x02\x01":
        raise ValueError("not a 64-bit little-endian ELF")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    def header(i: int) -> tuple:
        # name, type, flags, addr, offset, size
        return struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
    strtab_offset = header(shstrndx)[4]
    for i in range(shnum):
        name_at, _, _, _, offset, size = header(i)
        end = data.index(b"\0", strtab_offset + name_at)
        if data[strtab_offset + name_at:end].decode() == wanted:
            return offset, size
    raise ValueError(f"no {wanted} section")


def fatbin_entries(data: bytes | bytearray, start: int, size: int) -> list[list[dict]]:
    """The entries of each fatbin container in a .nv_fatbin section, checked to tile the section exactly.

    Container: u32 magic, u16 version, u16 header size, u64 size of the entries that follow. Entry: u16 kind
    (1 PTX, 2 ELF), u16 version, u32 header size, u64 payload size, ..., u32 sm architecture at +28; its payload
    follows its header, the next entry follows the payload."""
    containers: list[list[dict]] = []
    at, end = start, start + size
    while at < end:
        if struct.unpack_from("<I", data, at)[0] != FATBIN_MAGIC:
            if any(data[at:min(at + 16, end)]):
                raise ValueError(f"no fatbin container at {at:#x}")
            at += 8  # alignment padding between containers
            continue
        _, _, header_size, entries_size = struct.unpack_from("<IHHQ", data, at)
        entry, entries_end = at + header_size, at + header_size + entries_size
        if entries_end > end:
            raise ValueError(f"container at {at:#x} runs past the section")
        entries = []
        while entry < entries_end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
            arch, = struct.unpack_from("<I", data, entry + 28)
            if kind not in (KIND_PTX, KIND_ELF) or entry_header < 32 or not 10 <= arch <= 200:
                raise ValueError(f"unexpected fatbin entry at {entry:#x}: kind {kind} arch {arch}")
            entries.append({"kind": kind, "arch": arch, "payload": entry + entry_header, "size": payload})
            entry += entry_header + payload
        if entry != entries_end:
            raise ValueError(f"entries of the container at {at:#x} do not end at its end")
        containers.append(entries)
        at = entries_end
    return containers


def entries_to_zero(containers: list[list[dict]]) -> list[dict]:
    """Every entry but sm_90's; a container without sm_90 code keeps the PTX the driver can compile for sm_90."""
    doomed = []
    for entries in containers:
        has_sm90 = any(e["kind"] == KIND_ELF and e["arch"] == KEEP_SM for e in entries)
        for e in entries:
            keep = e["arch"] == KEEP_SM or (not has_sm90 and e["kind"] == KIND_PTX and e["arch"] <= KEEP_SM)
            if not keep:
                doomed.append(e)
    return doomed


def fatbin_summary(containers: list[list[dict]]) -> dict[str, int]:
    summary: dict[str, int] = {}
    for entries in containers:
        for e in entries:
            key = f"{'ptx' if e['kind'] == KIND_PTX else 'sm'}_{e['arch']}"
            summary[key] = summary.get(key, 0) + e["size"]
    return dict(sorted(summary.items()))


def zero_other_archs(library: Path) -> None:
    data = bytearray(library.read_bytes())
    try:
        offset, size = elf_section(data, ".nv_fatbin")
        containers = fatbin_entries(data, offset, size)
    except ValueError as error:
        # Zeroing code that was not parsed right would break kernels at run time; xz still helps without it.
        print(f"  {library.name}: fatbin not parsed ({error}); left whole")
        return
    doomed = entries_to_zero(containers)
    for e in doomed:
        data[e["payload"]:e["payload"] + e["size"]] = bytes(e["size"])
    library.write_bytes(data)
    print(f"  {library.name}: {len(containers)} fatbin containers, {mib(sum(e['size'] for e in doomed))} MiB "
          f"of other architectures zeroed; code by architecture (bytes): {fatbin_summary(containers)}")


def check_fatbin(library: Path) -> None:
    data = library.read_bytes()
    offset, size = elf_section(data, ".nv_fatbin")
    containers = fatbin_entries(data, offset, size)
    zero = {k: 0 for k in fatbin_summary(containers)}
    live = dict(zero)
    for entries in containers:
        for e in entries:
            key = f"{'ptx' if e['kind'] == KIND_PTX else 'sm'}_{e['arch']}"
            target = zero if not any(data[e["payload"]:e["payload"] + e["size"]]) else live
            target[key] += 1
    print(f"{library}: .nv_fatbin at {offset:#x}, {mib(size)} MiB, {len(containers)} containers")
    print("  entries with code:", {k: v for k, v in live.items() if v})
    print("  entries zeroed:   ", {k: v for k, v in zero.items() if v})


LOAD_OPS = r"""
import sys, torch
torch.ops.load_library(sys.argv[1])
print(sorted(op for op in torch._C._dispatch_get_all_op_names() if op.startswith("_C::")))
"""


def check_library_loads(python: str, library: Path) -> None:
    """Load the trimmed library and the wheel's own into `python`'s torch (it must be vLLM's torch 2.11 + CUDA 13) and
    compare the torch ops they register. Without a GPU driver, a stub libcuda.so.1 stands in for its three symbols
    the library binds at load time."""
    original = CARRY / "check" / "original" / library.name
    original.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(next(WHEELS.glob("vllm-*.whl"))) as wheel:
        original.write_bytes(wheel.read(f"vllm/{library.name}"))
    env = dict(os.environ)
    if not any(Path(d, "libcuda.so.1").exists() for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/local/nvidia/lib64")):
        stub = CARRY / "check" / "cudastub"
        stub.mkdir(exist_ok=True)
        (stub / "stub.c").write_text("".join(f"int {name}(void) {{ return 100; }}\n" for name in
                                             ("cuGetProcAddress_v2", "cuPointerGetAttribute", "cuTensorMapEncodeTiled")))
        run(["cc", "-shared", "-fPIC", "-o", str(stub / "libcuda.so.1"), str(stub / "stub.c")])
        env["LD_LIBRARY_PATH"] = f"{stub}:{env.get('LD_LIBRARY_PATH', '')}"
    ops = {}
    for which, path in (("wheel", original), ("trimmed", library)):
        proc = subprocess.run([python, "-c", LOAD_OPS, str(path)], capture_output=True, text=True, env=env)
        if proc.returncode:
            sys.exit(f"{path} does not load:\n{proc.stderr[-2000:]}")
        ops[which] = json.loads(proc.stdout.strip().splitlines()[-1].replace("'", '"'))
    same = "the same" if ops["wheel"] == ops["trimmed"] else "DIFFERENT"
    print(f"  loads into {python}'s torch: {len(ops['trimmed'])} _C:: ops, {same} as the wheel's library")
