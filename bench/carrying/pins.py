"""Where the carry keeps its files, the wheel lists it reads, and the command runner the steps share."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
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

def mib(n: int) -> str:
    return f"{n / MiB:.1f}"
