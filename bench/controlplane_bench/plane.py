"""The local control plane for a run, a client for it, and the inputs of a burst (FineTunes, or KubeRay's own
RayJobs)."""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from pathlib import Path
from typing import Callable

from llmops.builders import finetune as finetune_builder
from llmops.builders.common import BuildContext, is_shared
from llmops.dev import nodes
from llmops.dev.install import install_crds
from llmops.dev.plane import LocalPlane
from llmops.dev.processes import terminate
from llmops.handlers.main import load_payloads
from llmops.kube import ApiError, Credentials, Kube, with_retries
from llmops.settings import Settings
from manifests import finetune

from .measure import CREATE_CONCURRENCY


# ---- the plane and the client --------------------------------------------------------------------------
def bench_pools(n: int) -> tuple[nodes.Pool, ...]:
    """Simulated nodes with room for every Ray pod of two bursts of n: no pod waits for space (the workers ask
    for local disk too). Finished RayJobs' clusters are deleted, so one burst's pods are gone before the next's."""
    per_cpu_node, per_gpu_node = 1000, 500
    cpu_nodes = math.ceil(2 * 2 * n / per_cpu_node)     # heads + submitter pods
    gpu_nodes = math.ceil(2 * 2 * n / per_gpu_node)     # 2 L4 workers per RayJob
    room = {"cpu": "4000", "memory": "16000Gi", "disk": "100Ti"}
    return (nodes.Pool("bench-cpu", cpu_nodes, **room, pods=per_cpu_node + 50),
            nodes.Pool("bench-l4", gpu_nodes, **room, gpus=per_gpu_node, gpu_product="NVIDIA-L4",
                       pods=per_gpu_node + 50))


def start_plane(n: int, root: Path) -> LocalPlane:
    plane = LocalPlane(root)
    plane.start(with_kuberay=True)
    install_crds(plane)
    nodes.register_pools(plane, bench_pools(n))
    return plane


def client_for(plane: LocalPlane) -> tuple[Kube, Credentials]:
    config = json.loads(plane.kubeconfig.read_text())
    credentials = Credentials(server=config["clusters"][0]["cluster"]["server"], token=plane.admin_token,
                              ca_path=config["clusters"][0]["cluster"]["certificate-authority"])
    return Kube(credentials, "llmops-bench", user_agent="llmops-bench"), credentials


# The operator runs as its own ServiceAccount: the audit log then attributes every request it makes to it
# (a user agent only names the requests of the clients we know about).
OPERATOR_NAMESPACE, OPERATOR_ACCOUNT = "llmops-bench-system", "llmops-operator"
OPERATOR_USER = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_ACCOUNT}"


def operator_kubeconfig(plane: LocalPlane) -> Path:
    """A kubeconfig for OPERATOR_USER (cluster-admin: the bench measures traffic, not least rights)."""
    plane.kubectl("create", "namespace", OPERATOR_NAMESPACE, quiet=True)
    plane.kubectl("create", "serviceaccount", OPERATOR_ACCOUNT, "-n", OPERATOR_NAMESPACE, quiet=True)
    plane.kubectl("create", "clusterrolebinding", "llmops-bench-operator", "--clusterrole=cluster-admin",
                  f"--serviceaccount={OPERATOR_NAMESPACE}:{OPERATOR_ACCOUNT}", quiet=True)
    token = plane.kubectl("create", "token", OPERATOR_ACCOUNT, "-n", OPERATOR_NAMESPACE, "--duration=48h",
                          quiet=True).stdout.strip()
    config = json.loads(plane.kubeconfig.read_text())
    config["users"] = [{"name": "admin", "user": {"token": token}}]
    path = plane.root / "operator.kubeconfig"
    path.write_text(json.dumps(config))
    return path


def pid_of(plane: LocalPlane, name: str) -> int:
    return next(p.pid for p in reversed(plane.processes) if p.name == name)


def kuberay_running(plane: LocalPlane) -> bool:
    return any(p.name == "kuberay-operator" for p in plane.processes)


def stop_kuberay(plane: LocalPlane) -> None:
    """Stop the KubeRay operator if it runs."""
    for proc in [p for p in plane.processes if p.name == "kuberay-operator"]:
        terminate(proc.pid)
        plane.processes.remove(proc)


def start_kuberay(plane: LocalPlane, flags: tuple[str, ...] = ()) -> None:
    plane.start_kuberay(*flags)
    plane.save_state()


async def create_all(kube: Kube, objects: list[dict], path: Callable[[dict], str]) -> dict[str, tuple]:
    """Create every object, CREATE_CONCURRENCY at a time; name -> (sent, returned, creationTimestamp)."""
    gate = asyncio.Semaphore(CREATE_CONCURRENCY)
    out: dict[str, tuple] = {}

    async def one(obj: dict) -> None:
        async with gate:
            sent = time.time()
            made = await with_retries(lambda: kube.request("POST", path(obj), obj), attempts=8)
            out[obj["metadata"]["name"]] = (sent, time.time(), made["metadata"].get("creationTimestamp"))
    try:
        await asyncio.gather(*(one(o) for o in objects))
    finally:
        await kube.close()
    return out


def run_async(coro):
    return asyncio.run(coro)


async def ensure_namespace(kube: Kube, name: str) -> None:
    try:
        await kube.request("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                          "metadata": {"name": name}})
    finally:
        await kube.close()


async def delete_namespaces(kube: Kube, names: list[str], timeout: float) -> None:
    """Delete the namespaces and wait until the namespace controller has removed them and all they held."""
    try:
        for name in names:
            await kube.request("DELETE", f"/api/v1/namespaces/{name}")
        deadline = time.time() + timeout
        for name in names:
            while True:
                try:
                    await kube.request("GET", f"/api/v1/namespaces/{name}")
                except ApiError as e:
                    if e.status == 404:
                        break
                    raise
                if time.time() > deadline:
                    raise TimeoutError(f"namespace {name} still there after {timeout:.0f}s")
                await asyncio.sleep(1.0)
    finally:
        await kube.close()


async def touch_all(kube: Kube, namespace: str, names: list[str]) -> None:
    gate = asyncio.Semaphore(CREATE_CONCURRENCY)

    async def one(name: str) -> None:
        async with gate:
            await with_retries(lambda: kube.request(
                "PATCH", f"/apis/llmops.dev/v1alpha1/namespaces/{namespace}/finetunes/{name}",
                {"metadata": {"annotations": {"bench.llmops.dev/touched": str(time.time())}}},
                "application/merge-patch+json"))
    try:
        await asyncio.gather(*(one(n) for n in names))
    finally:
        await kube.close()


def fine_tunes(n: int, namespace: str) -> list[dict]:
    out = []
    for i in range(n):
        body = finetune(f"ft-{i:05d}")
        body["metadata"]["namespace"] = namespace
        out.append(body)
    return out


def kuberay_inputs(n: int, namespace: str) -> tuple[list[dict], list[dict]]:
    """What our operator would hand KubeRay for n FineTunes: (other children, RayJobs), owner refs dropped."""
    ctx = BuildContext(settings=Settings.load(), payloads=load_payloads())
    others, jobs, seen = [], [], set()
    for body in fine_tunes(n, namespace):
        body["metadata"]["uid"] = str(uuid.uuid4())
        for child in finetune_builder.build_manifest(body, ctx):
            if is_shared(child):   # the payload sources: one per namespace
                if child["metadata"]["name"] in seen:
                    continue
                seen.add(child["metadata"]["name"])
            child["metadata"].pop("ownerReferences", None)
            (jobs if child["kind"] == "RayJob" else others).append(child)
    return others, jobs


def expected_children(bodies: list[dict]) -> dict[str, list[tuple[str, str]]]:
    """FineTune name -> the (kind, name) of every child the operator creates for it, from the builder itself
    (the shared payload ConfigMap included: a job's pods mount it)."""
    ctx = BuildContext(settings=Settings.load(), payloads=load_payloads())
    out = {}
    for body in bodies:
        body = {**body, "metadata": {**body["metadata"], "uid": "bench"}}
        out[body["metadata"]["name"]] = [(c["kind"], c["metadata"]["name"]) for c in finetune_builder.build_manifest(body, ctx)]
    return out


def child_collections(namespace: str) -> dict[str, str]:
    """Kind -> the collection path of every kind of child a FineTune has, in `namespace`."""
    from llmops.kube import path_of
    body = fine_tunes(1, namespace)[0]
    body["metadata"]["uid"] = "bench"
    children = finetune_builder.build_manifest(body, BuildContext(settings=Settings.load(), payloads=load_payloads()))
    return {c["kind"]: path_of(c["apiVersion"], c["kind"], namespace) for c in children}


def expected_child_writes(n: int) -> int:
    """One write per child: each FineTune's own children, plus the shared payload ConfigMap once."""
    body = fine_tunes(1, "x")[0]
    body["metadata"]["uid"] = "u"
    children = finetune_builder.build_manifest(body, BuildContext(settings=Settings.load(), payloads=load_payloads()))
    return n * sum(1 for c in children if not is_shared(c)) + sum(1 for c in children if is_shared(c))


def collection_path(obj: dict) -> str:
    from llmops.kube import path_of
    return path_of(obj["apiVersion"], obj["kind"], obj["metadata"]["namespace"])
