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
from pathlib import Path

from carrying.build import download, install, trim
from carrying.checks import check_cluster, check_s3, report_imports
from carrying.fatbin import check_fatbin, check_library_loads
from carrying.pack import pack, print_plan, split
from carrying.pins import BUILD, CARRY, SETS, mib, set_pins

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
