"""Steps 1-3 of the carry: download the wheels, install each set into a folder, trim what the run never loads."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from .fatbin import elf_section, zero_other_archs
from .pins import BUILD, PIP_TARGET, WHEELS, mib, run, wheel_key

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
