"""The carry's checks (--check-imports, --check-s3, --check-cluster): what the run imports beyond the device's
image, and that the trimmed sets still work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .pins import BUILD, CARRY, DEVICE_HAS, normalize, read_set

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
