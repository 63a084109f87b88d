#!/usr/bin/env python3
"""Prepare what the GPU machine (no network, Python 3.12, torch 2.11.0+cu130) needs for the data-plane benchmark.

Two sets of wheels, each listed in bench/dataplane_wheels/<set>.txt:

* serve: vLLM 0.25.1, Ray 2.57.0 and what vLLM, Ray Data LLM, Ray Serve LLM, the dashboard, job submission,
  `vllm serve`, moto's S3 server, boto3 and openai import that the device's image lacks. Unpacked on the device
  into /tmp/dp/serve and put on PYTHONPATH for every process of the run.
* finetune: LLaMA-Factory 0.9.4 with the versions it pins (transformers 4.52.4 ...), unpacked into
  /tmp/dp/finetune and put in FRONT of the serve set only for the fine-tune Ray cluster, since its transformers
  would break the vLLM that the device's transformers 5.17 serves. Wheels the serve set already holds at the same
  version are not repeated.

Steps (each reuses what the previous run left under .carry/, which git ignores):

1. download the wheels (cp312, manylinux) into .carry/wheels/;
2. install each set with `pip install --no-deps --target` into .carry/build/<set>/;
3. trim what the run never loads (trim_vllm, trim_ray, trim_aws): the flash-attention and MoE libraries, sm_100
   kernels, Ray's jars, RLlib and dashboard front end, tests, moto's services but S3's, botocore's models but S3's
   and STS's, static symbol tables; in vLLM's `_C_stable_libtorch` the GPU code for every architecture but sm_90
   is overwritten with zeros in place (the ELF keeps its layout; CUDA never reads the code of another
   architecture), which xz then squeezes away;
4. pack each set as tar + xz and cut the streams into parts that fill the device calls in order, so the sets
   need as few calls as their compressed size allows; write .carry/parts/manifest.json and print, per call, the
   paths to carry and the command that unpacks them there (bench/dataplane_unpack.sh).

    python3 bench/dataplane_carry.py                  # all steps; prints the device calls
    python3 bench/dataplane_carry.py --split-only     # parts and calls again from the packed sets

Checks, run in an environment with the whole dependency tree (e.g. a venv with `ray[llm,serve,data,train]==2.57.0
torch==2.11.0 moto[server] 'openai<3'`; a Python 3.11 one does, as the checked code is pure Python or abi3):

    python3 bench/dataplane_carry.py --check-imports VENV/bin/python --finetune-python LF_VENV/bin/python
        # the distributions the run's modules load (`python -X importtime`, each module's file mapped to its
        # distribution) beyond the device's image, then the same imports with only the device's and the lists'
        # distributions visible
    python3 bench/dataplane_carry.py --check-s3 VENV/bin/python      # S3 round trip on the trimmed moto + boto3
    python3 bench/dataplane_carry.py --check-fatbin VENV/bin/python  # architectures kept; the library loads
    python3 bench/dataplane_carry.py --check-cluster PY312_VENV/bin/python
        # Ray head + dashboard, job submission, Serve REST deploy from the trimmed set (cp312 builds: a Python 3.12
        # with the device image's aiohttp, grpcio, protobuf, requests, pyyaml ...; no torch needed)

On the device, at the start of every call of the plan: `bash bench/dataplane_unpack.sh`; then
`export PYTHONPATH=/tmp/dp/serve PATH=/tmp/dp/serve/bin:$PATH` (fine-tune: PYTHONPATH=/tmp/dp/finetune:/tmp/dp/serve).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LISTS = REPO / "bench" / "dataplane_wheels"
CARRY = REPO / ".carry"
WHEELS = CARRY / "wheels"
BUILD = CARRY / "build"
PARTS = CARRY / "parts"
SETS = ("serve", "finetune")

MiB = 1 << 20
# A device call carries the checkout (tracked and untracked, not ignored files) plus the carried paths: at most
# CALL_BYTES in all (64 MiB is the hard limit) and parts of at most PART_BYTES.
CALL_BYTES = 60 * MiB
PART_BYTES = 58 * MiB
# The device's Python 3.12.3 image has glibc >= 2.35; pip does not widen a manylinux tag to older ones by itself.
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(35, 4, -1)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "any"]
PIP_TARGET = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
              "--abi", "cp312", "--abi", "abi3", "--abi", "none",
              *(arg for platform in PLATFORMS for arg in ("--platform", platform))]
KEEP_SM = 90  # the H200

# The device image's distributions (KINDS.md, "Python packages already there"). Versions there are recent.
DEVICE_HAS = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
wrapt xarray xxhash yarl zipp
""".split())


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_set(name: str) -> list[tuple[str, str]]:
    """The `name==version` lines of bench/dataplane_wheels/<name>.txt (the finetune list also takes
    bench/llamafactory_wheels.txt through an `-r` line)."""
    pins: list[tuple[str, str]] = []
    path = LISTS / f"{name}.txt"
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-r "):
            pins += read_file_pins(path.parent / line[3:].strip())
            continue
        pins.append(split_pin(line, path))
    return pins


def read_file_pins(path: Path) -> list[tuple[str, str]]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [split_pin(line, path) for line in lines if line]


def split_pin(line: str, path: Path) -> tuple[str, str]:
    name, sep, version = line.partition("==")
    if not sep or not version:
        sys.exit(f"{path}: {line!r} must pin one version as name==version")
    return normalize(name), version.strip()


def set_pins(name: str) -> list[tuple[str, str]]:
    """The pins a set installs: the finetune set leaves out what the serve set carries at the same version."""
    pins = read_set(name)
    if name == "finetune":
        serve = set(read_set("serve"))
        pins = [pin for pin in pins if pin not in serve]
    return pins


def wheel_key(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return normalize(name), version


def run(cmd: list[str], quiet: bool = False, **kwargs) -> subprocess.CompletedProcess:
    if not quiet:
        print("+", " ".join(str(c) for c in cmd[:8]), "..." if len(cmd) > 8 else "", flush=True)
    return subprocess.run(cmd, check=True, **kwargs)


# ---------------------------------------------------------------- 1. download

def download(pins: list[tuple[str, str]]) -> list[Path]:
    WHEELS.mkdir(parents=True, exist_ok=True)
    have = {wheel_key(p): p for p in WHEELS.glob("*.whl")}
    missing = [f"{n}=={v}" for n, v in pins if (n, v) not in have]
    if missing:
        run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(WHEELS), *PIP_TARGET, *missing])
        have = {wheel_key(p): p for p in WHEELS.glob("*.whl")}
    absent = [f"{n}=={v}" for n, v in pins if (n, v) not in have]
    if absent:
        sys.exit(f"no cp312 manylinux wheel downloaded for {absent}")
    return [have[pin] for pin in pins]


# ---------------------------------------------------------------- 2. install

def install(name: str, wheels: list[Path]) -> Path:
    target = BUILD / name
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--no-index",
         "--disable-pip-version-check", "--root-user-action=ignore", "--target", str(target), *PIP_TARGET, *map(str, wheels)])
    return target


# ---------------------------------------------------------------- 3. trim

def remove(root: Path, *patterns: str) -> None:
    for pattern in patterns:
        for path in root.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()


def trim_vllm(root: Path) -> None:
    vllm = root / "vllm"
    # FLASH_ATTN cannot fit a call; the run picks TRITON_ATTN. vllm_flash_attn is still imported at start-up, so an
    # empty module stands in for the extension.
    remove(vllm, "vllm_flash_attn/_vllm_fa*_C.abi3.so")
    (vllm / "vllm_flash_attn" / "_vllm_fa2_C.py").write_text("")
    # Fused MoE (its import failure is suppressed), FlashMLA, QuTLASS, the Rust front end, sm_100 kernels'
    # sources: a dense Qwen2 model on an H200 loads none of them.
    remove(vllm, "_moe_C*.so", "_flashmla*.so", "_qutlass_C*.so", "vllm-rs", "third_party/deep_gemm",
           "third_party/fmha_sm100", "entrypoints/serve/instrumentator/static")
    library = vllm / "_C_stable_libtorch.abi3.so"
    if library.exists():
        zero_other_archs(library)


def trim_ray(root: Path) -> None:
    ray = root / "ray"
    remove(ray, "jars", "rllib", "tests", "*/tests", "*/*/tests", "*/*/*/tests", "*/*/*/*/tests",
           "dashboard/client/build", "cpp", "_private/thirdparty/pynvml/tests")
    # The dashboard head refuses to start on Linux without its front end's folder; an empty one serves the API.
    static = ray / "dashboard" / "client" / "build" / "static"
    static.mkdir(parents=True, exist_ok=True)
    (static.parent / "index.html").write_text("<html><body>Ray dashboard (no front end)</body></html>\n")


# moto's S3 server loads these of its services (seen with `--check-s3`), boto3's S3 client these models.
MOTO_KEEP = {"core", "s3", "s3bucket_path", "moto_api", "moto_server", "utilities", "iam", "sts", "cloudwatch",
             "events"}
BOTOCORE_KEEP = {"s3", "sts"}


def trim_aws(root: Path) -> None:
    moto = root / "moto"
    if moto.is_dir():
        for service in moto.iterdir():
            if service.is_dir() and service.name not in MOTO_KEEP and (service / "__init__.py").exists():
                shutil.rmtree(service)
    data = root / "botocore" / "data"
    if data.is_dir():
        for service in data.iterdir():
            if service.is_dir() and service.name not in BOTOCORE_KEEP:
                shutil.rmtree(service)


def strip_symbols(root: Path) -> None:
    """Drop the static symbol tables (a third of Ray's binaries); loading needs only the dynamic symbols."""
    if not shutil.which("strip"):
        print("  no strip command: symbol tables kept")
        return
    unstripped = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_size > 256 * 1024:
            with path.open("rb") as f:
                if f.read(4) != b"\x7fELF":
                    continue
            try:
                elf_section(path.read_bytes(), ".symtab")
            except ValueError:
                continue
            unstripped.append(path)
    before = sum(p.stat().st_size for p in unstripped)
    for path in unstripped:
        run(["strip", "--strip-all", str(path)], quiet=True)
    after = sum(p.stat().st_size for p in unstripped)
    print(f"  stripped {len(unstripped)} binaries: {mib(before)} -> {mib(after)} MiB")


def trim_common(root: Path) -> None:
    for pattern in ("**/__pycache__", "**/*.pyc"):
        remove(root, pattern)
    # Console scripts get this machine's interpreter in their first line; the device's python3 is on PATH.
    for script in (root / "bin").glob("*") if (root / "bin").is_dir() else ():
        data = script.read_bytes()
        if data.startswith(b"#!"):
            script.write_bytes(b"#!/usr/bin/env python3\n" + data.split(b"\n", 1)[1])


def trim(root: Path) -> None:
    if (root / "vllm").is_dir():
        trim_vllm(root)
    if (root / "ray").is_dir():
        trim_ray(root)
    trim_aws(root)
    strip_symbols(root)
    trim_common(root)


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


# ---------------------------------------------------------------- 4. pack and split

def mib(n: int) -> str:
    return f"{n / MiB:.1f}"


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


# ---------------------------------------------------------------- --check-imports

# What the run's processes import: vLLM's engine and OpenAI server, Ray Data LLM, Ray Serve LLM, the dashboard
# and its agents, job submission, moto's S3 server, the clients. Packages are walked whole (but tests).
SERVE_MODULES = [
    "vllm", "vllm.entrypoints.openai.api_server", "vllm.entrypoints.cli.main", "vllm.v1.engine.core",
    "vllm.v1.engine.async_llm", "vllm.v1.worker.gpu_worker", "vllm.model_executor.models.qwen2",
    "vllm.lora.request", "vllm.lora.worker_manager", "vllm.v1.attention.backends.triton_attn",
    "vllm.v1.structured_output.backend_xgrammar", "vllm.v1.structured_output.backend_guidance",
    "ray", "ray.data", "ray.data.llm", "ray.serve", "ray.serve.llm", "ray.serve._private.controller",
    "ray.serve._private.proxy", "ray.serve._private.replica", "ray.serve.scripts", "ray.job_submission",
    "ray.dashboard.dashboard", "ray.dashboard.agent", "ray.dashboard.head", "ray._private.log_monitor",
    "ray._private.runtime_env.agent.main", "ray.autoscaler._private.monitor", "ray.scripts.scripts",
    "ray._private.workers.default_worker", "ray.train", "ray.train.torch", "ray.tune",
    "moto.server", "moto.s3", "moto.s3.responses", "boto3", "openai",
]
SERVE_WALK = ["ray.dashboard.modules", "ray.llm._internal.serve", "ray.llm._internal.batch", "ray.llm._internal.common"]
FINETUNE_MODULES = [
    "llamafactory", "llamafactory.cli", "llamafactory.train.tuner", "llamafactory.train.sft.workflow",
    "llamafactory.train.trainer_utils", "ray.train", "ray.train.torch", "ray.tune",
    "transformers", "peft", "trl", "datasets", "accelerate",
]

# Imported only where present (guarded imports; the imports still pass in a view without them), so not carried:
# vLLM's audio/video, tracing and kernel packages, fastapi's and jsonschema's extras, opencensus' Google
# exporters, urllib3's brotli, LLaMA-Factory's PyAV, pandas' pytz (the device's pandas brings what it needs).
OPTIONAL_IMPORTS = frozenset("""
av brotli pytz tzdata soundfile soxr torchcodec cuda-tile humming-kernels fastsafetensors pyelftools
opentelemetry-exporter-otlp opentelemetry-exporter-otlp-common opentelemetry-exporter-otlp-proto-common
opentelemetry-exporter-otlp-proto-grpc opentelemetry-exporter-otlp-proto-http opentelemetry-exporter-http-transport
opentelemetry-semantic-conventions-ai email-validator jsonpointer rfc3339-validator google-api-core google-auth
dill pydantic-extra-types
""".split())
# Imported at run time only (inside functions), seen missing on the device [FACTS, 2026-12-03]: carried although
# an import of the modules does not load them.
RUNTIME_IMPORTS = frozenset({"blake3", "setproctitle", "jiter", "cbor2", "pybase64", "xgrammar", "llguidance"})

PROBE = r"""
import importlib, importlib.metadata as md, pkgutil, sys, json
modules, walk = json.loads(sys.argv[1]), json.loads(sys.argv[2])
failed = {}
def load(name):
    try:
        importlib.import_module(name)
    except BaseException as error:  # a module that fails here is reported, the rest still count
        failed[name] = f"{type(error).__name__}: {error}"[:300]
for name in modules:
    load(name)
for package in walk:
    load(package)
    mod = sys.modules.get(package)
    for info in pkgutil.walk_packages(getattr(mod, "__path__", []), package + "."):
        if ".tests" not in info.name and ".test_" not in info.name:
            load(info.name)
# A module belongs to the distribution whose RECORD holds its file (top-level names mislead for namespace packages
# such as cuda, google, opentelemetry).
owner = {}
for dist in md.distributions():
    for f in dist.files or ():
        if f.suffix in (".py", ".so") or f.name.endswith(".abi3.so"):
            owner[str(dist.locate_file(f).resolve())] = (dist.metadata["Name"], dist.version)
found, first = {}, {}
for name, mod in list(sys.modules.items()):
    path = getattr(mod, "__file__", None)
    if path and (dist := owner.get(str(__import__("pathlib").Path(path).resolve()))):
        found[dist[0]] = dist[1]
        first.setdefault(dist[0], name)
print(json.dumps({"found": found, "module": first, "failed": failed}))
"""


def import_chains(stderr: str) -> dict[str, str]:
    """`module <- importer <- ...` for every module in a `python -X importtime` log (children print first)."""
    entries = []
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line and "imported package" not in line:
            name = line.rsplit("|", 1)[1]
            entries.append((len(name) - len(name.lstrip()), name.strip()))
    chains = {}
    for i, (depth, name) in enumerate(entries):
        chain = [name]
        for parent_depth, parent in entries[i + 1:]:
            if parent_depth < depth:
                chain.append(parent)
                depth = parent_depth
                if len(chain) == 5:
                    break
        chains.setdefault(name, " <- ".join(chain))
    return chains


# File by file, so that a namespace package shared by several distributions (google, opentelemetry, nvidia)
# shows only the allowed ones' modules.
VIEW = r"""
import importlib.metadata as md, os, re, sys, json
allowed, view = set(json.loads(sys.argv[1])), sys.argv[2]
for dist in md.distributions():
    if re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower() not in allowed:
        continue
    for f in dist.files or ():
        if f.parts[0] in ("..", "bin") or "__pycache__" in f.parts:
            continue
        source, link = str(dist.locate_file(f)), os.path.join(view, *f.parts)
        if os.path.exists(source) and not os.path.lexists(link):
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink(source, link)
"""


# What this environment's own builds of the device's packages need (its pandas 2 imports pytz; pandas 3 does not).
ENVIRONMENT_ONLY = frozenset({"pytz", "tzdata"})


def device_view(python: str, allowed: set[str]) -> Path:
    """A folder that shows only the allowed distributions of `python`'s environment, as the device would."""
    view = CARRY / "check" / "view"
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir(parents=True)
    subprocess.run([python, "-c", VIEW, json.dumps(sorted(allowed)), str(view)], check=True)
    return view


def check_imports(python: str, modules: list[str], walk: list[str], view: Path | None = None) -> dict:
    """Distributions whose modules the given modules load under `python`; with a view, only what it shows is
    importable (`python -S`: no site-packages but the view)."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    flags = ["-X", "importtime"]
    if view:
        env["PYTHONPATH"] = str(view)
        flags.append("-S")
    proc = subprocess.run([python, *flags, "-c", PROBE, json.dumps(modules), json.dumps(walk)],
                          capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode:
        sys.exit(f"probe failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    chains = import_chains(proc.stderr)
    result["chain"] = {dist: chains.get(module, module) for dist, module in result["module"].items()}
    return result


def report_imports(serve_python: str, finetune_python: str) -> None:
    serve_pins = dict(read_set("serve"))
    finetune_pins = dict(read_set("finetune"))
    for name, python, modules, walk, carried in (
            ("serve", serve_python, SERVE_MODULES, SERVE_WALK, serve_pins),
            ("finetune", finetune_python, FINETUNE_MODULES, [], {**serve_pins, **finetune_pins})):
        if python_lacks(python, modules[0]):
            print(f"\n{name}: {python} has no {modules[0]}; give --{name}-python")
            continue
        result = check_imports(python, modules, walk)
        # A listed distribution the device also has is carried for its version (transformers 4.52.4 ...).
        needed = {normalize(d): v for d, v in result["found"].items()
                  if normalize(d) not in DEVICE_HAS or normalize(d) in carried}
        print(f"\n{name}: {len(result['found'])} distributions imported, {len(needed)} to carry")
        for dist, version in sorted(needed.items()):
            mark = ("carried" if dist in carried else "optional import, not carried" if dist in OPTIONAL_IMPORTS
                    else "MISSING from the list")
            pinned = carried.get(dist)
            drift = f" (list pins {pinned})" if pinned and pinned != version else ""
            chain = next(c for d, c in result["chain"].items() if normalize(d) == dist)
            print(f"  {dist}=={version}  {mark}{drift}; {chain}")
        unused = sorted(set(serve_pins if name == "serve" else finetune_pins) - set(needed) - RUNTIME_IMPORTS)
        print(f"  listed but not imported here: {' '.join(unused) or '-'}")
        for module, error in result["failed"].items():
            print(f"  import failed: {module}: {error}")
        # Again with only the device's distributions and the lists' (this environment's builds of them).
        view = device_view(python, DEVICE_HAS | set(carried) | ENVIRONMENT_ONLY)
        restricted = check_imports(python, modules, walk, view)
        print(f"  with only the device's and the listed distributions: "
              f"{len(restricted['failed'])} of the imports failed")
        for module, error in restricted["failed"].items():
            if module not in result["failed"]:
                print(f"  import failed: {module}: {error}")


S3_PROBE = r"""
import json, sys
opened = set()
sys.addaudithook(lambda event, args: opened.add(args[0]) if event == "open" and isinstance(args[0], str) else None)
import boto3
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
host, port = server.get_host_and_port()
s3 = boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1",
                  aws_access_key_id="bench", aws_secret_access_key="bench")
s3.create_bucket(Bucket="bench-adapters")
s3.put_object(Bucket="bench-adapters", Key="lora/a/adapter_config.json", Body=b"{}")
s3.upload_file(sys.argv[0] if sys.argv[0] != "-c" else __import__("os").__file__, "bench-adapters", "lora/a/big")
assert s3.get_object(Bucket="bench-adapters", Key="lora/a/adapter_config.json")["Body"].read() == b"{}"
pages = s3.get_paginator("list_objects_v2").paginate(Bucket="bench-adapters", Prefix="lora/")
assert sum(len(page.get("Contents", [])) for page in pages) == 2
s3.download_file("bench-adapters", "lora/a/big", "/tmp/dataplane-carry-s3-probe")
server.stop()
print(json.dumps({
    "moto": sorted({m.split(".")[1] for m in sys.modules if m.startswith("moto.")}),
    "moto_file": sys.modules["moto"].__file__,
    "botocore_data": sorted({f.split("botocore/data/")[1].split("/")[0] for f in opened if "botocore/data/" in f}),
}))
"""


def check_s3(python: str) -> None:
    """moto's S3 server and boto3's S3 client from the trimmed serve set (pure Python, so any Python 3 runs them)."""
    view = CARRY / "check" / "aws"
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir(parents=True)
    for package in ("moto", "botocore", "boto3", "s3transfer", "jmespath", "xmltodict", "responses", "flask",
                    "flask_cors", "blinker", "itsdangerous"):
        if (BUILD / "serve" / package).is_dir():
            (view / package).symlink_to(BUILD / "serve" / package)
    # Everything else only as the device would have it: its image's distributions and the serve list's.
    rest = device_view(python, DEVICE_HAS | {name for name, _ in read_set("serve")} | ENVIRONMENT_ONLY)
    proc = subprocess.run([python, "-S", "-c", S3_PROBE], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": f"{view}:{rest}",
                               "PYTHONPYCACHEPREFIX": str(CARRY / "check" / "pycache")})
    if proc.returncode:
        sys.exit(f"S3 round trip through the trimmed moto and boto3 failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"S3 round trip passed with {result['moto_file']}")
    print(f"  moto modules loaded: {' '.join(result['moto'])}")
    print(f"  botocore models read: {' '.join(result['botocore_data'])}")


CLUSTER_APP = """
from ray import serve


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Hello:
    async def __call__(self, request) -> str:
        return "hello from the serve set"


app = Hello.bind()
"""

CLUSTER_PROBE = r"""
import json, socket, time, urllib.request
import ray
from ray.job_submission import JobStatus, JobSubmissionClient


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


dashboard, http = free_port(), free_port()
ray.init(include_dashboard=True, dashboard_port=dashboard, num_cpus=2, _temp_dir=__import__("sys").argv[1])
url = f"http://127.0.0.1:{dashboard}"
client = JobSubmissionClient(url)
job = client.submit_job(entrypoint="python -c 'import ray; ray.init(); print(ray.cluster_resources())'")
for _ in range(300):
    if (status := client.get_job_status(job)) in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        break
    time.sleep(1)
assert status == JobStatus.SUCCEEDED, (status, client.get_job_logs(job)[-2000:])
print("job submission: SUCCEEDED,", client.get_job_logs(job).strip().splitlines()[-1])
config = {"http_options": {"host": "127.0.0.1", "port": http},
          "applications": [{"name": "hello", "route_prefix": "/", "import_path": "dataplane_carry_app:app"}]}
request = urllib.request.Request(f"{url}/api/serve/applications/", data=json.dumps(config).encode(), method="PUT",
                                 headers={"Content-Type": "application/json"})
assert urllib.request.urlopen(request, timeout=600).status == 200
for _ in range(300):
    try:
        print("Serve REST API deploy: the app answered", repr(urllib.request.urlopen(f"http://127.0.0.1:{http}/", timeout=5).read().decode()))
        break
    except OSError:
        time.sleep(1)
else:
    raise SystemExit("the Serve app never answered")
ray.shutdown()
"""


def check_cluster(python: str) -> None:
    """A Ray cluster from the trimmed serve set: head with dashboard, `ray job submit`'s API, a Serve app deployed
    through the REST API. `python` must be a Python 3.12 (the set holds cp312 builds) with the device image's
    packages that Ray needs (aiohttp, grpcio, protobuf, requests, pyyaml, ...); no GPU or torch needed."""
    work = CARRY / "check" / "cluster"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "dataplane_carry_app.py").write_text(CLUSTER_APP)
    serve = BUILD / "serve"
    env = {**os.environ, "PYTHONPATH": f"{work}:{serve}", "PATH": f"{serve / 'bin'}:{Path(python).parent}:"
           f"{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPYCACHEPREFIX": str(CARRY / "check" / "pycache"),  # bytecode outside the tree being packed
           "RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT": "300"}  # 30 s is short on a busy machine
    # A temp dir of its own: the cluster ends with this process and leaves other clusters on the machine alone.
    proc = subprocess.run([python, "-c", CLUSTER_PROBE, "/tmp/dataplane-carry-ray"], env=env, cwd=work, timeout=900,
                          capture_output=True, text=True)
    print("\n".join(line for line in proc.stdout.splitlines() if not line.startswith(("20", "\x1b"))))
    if proc.returncode:
        sys.exit(f"the Ray cluster check failed:\n{proc.stderr[-3000:]}")
    logs = Path("/tmp/dataplane-carry-ray/session_latest/logs")
    errors = sorted({line.strip() for log in logs.glob("*") if log.is_file()
                     for line in log.read_text(errors="replace").splitlines()
                     if "No module named" in line or "ImportError" in line})
    print(f"import errors in the cluster's logs: {len(errors)}")
    for line in errors:
        print(" ", line[:300])


def python_lacks(python: str, module: str) -> bool:
    probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([python, "-c", probe]).returncode != 0


# ---------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check-imports", metavar="PYTHON",
                        help="report the distributions the run imports, measured under this interpreter")
    parser.add_argument("--finetune-python", metavar="PYTHON",
                        help="interpreter with LLaMA-Factory for the finetune half of --check-imports")
    parser.add_argument("--check-s3", metavar="PYTHON",
                        help="S3 round trip through moto's server and boto3 from the trimmed serve set")
    parser.add_argument("--check-cluster", metavar="PYTHON312",
                        help="Ray head + dashboard, job submission and a Serve REST deploy from the trimmed serve set")
    parser.add_argument("--check-fatbin", nargs="?", const="", metavar="PYTHON",
                        help="list the architectures in the trimmed library; with PYTHON (vLLM's torch), load it")
    parser.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS))
    parser.add_argument("--split-only", action="store_true",
                        help="cut the packed sets into parts again (e.g. after the checkout grew) and print the calls")
    args = parser.parse_args()

    if args.check_imports:
        report_imports(args.check_imports, args.finetune_python or args.check_imports)
        return
    if args.check_cluster:
        check_cluster(args.check_cluster)
        return
    if args.check_s3:
        check_s3(args.check_s3)
        return
    if args.check_fatbin is not None:
        library = BUILD / "serve" / "vllm" / "_C_stable_libtorch.abi3.so"
        check_fatbin(library)
        if args.check_fatbin:
            check_library_loads(args.check_fatbin, library)
        return
    if args.split_only:
        print_plan(split({name: CARRY / f"{name}.tar.xz" for name in SETS}))
        return

    streams = {}
    for name in args.sets:
        pins = set_pins(name)
        print(f"{name}: {len(pins)} wheels")
        root = install(name, download(pins))
        trim(root)
        streams[name] = pack(name, root)
        print(f"{name}: {mib(du(root))} MiB unpacked, {mib(streams[name].stat().st_size)} MiB under xz")
    print_plan(split({name: CARRY / f"{name}.tar.xz" for name in SETS}))


def du(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


if __name__ == "__main__":
    main()
