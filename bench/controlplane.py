#!/usr/bin/env python3
"""Control-plane scale and efficiency: the llmops operator and the KubeRay operator, side by side, in one run.

    .venv/bin/python bench/controlplane.py --n 100 --n 1000 --repeat 5   # or, without the venv:
    PYTHONPATH=operator:tests python3 bench/controlplane.py --n 100 --n 1000 --repeat 5

For every N it starts a fresh LocalPlane (real etcd, kube-apiserver with an audit log, controller-manager,
scheduler, kwok, the real KubeRay binary) in a temp folder, adds a large simulated node pool so every Ray pod
can be placed (nothing stays Pending for lack of room, so the scheduler does not retry pods during the
steady-state window), and runs four phases:

1. KubeRay burst, our operator not running: N RayJobs exactly as our builder renders them for N FineTunes
   (owner references dropped; their ServiceAccounts and ConfigMaps created first, untimed) -> RayCluster.
2. llmops burst, KubeRay stopped: N FineTunes -> RayJob. Each operator is timed alone on the same plane, so
   neither competes with the other for the two cores and the ratio compares like with like.
3. Hand-off, both running: KubeRay is started and takes the N RayJobs from phase 2; we time how fast FineTune
   status follows (RayJob Running -> FineTune phase Running) and count our status writes against the status
   changes a watch saw. Then every FineTune is touched (an annotation): each touch is a reconcile that finds
   nothing to change and must write nothing.
4. Steady state, both running, everything at rest: requests and CPU of the operator over --steady seconds.
5. With --repeat K (N <= 100): K - 1 more bursts of ours, each into a fresh namespace, KubeRay stopped again; the
   N = 100 p99 target is judged on the median burst. Their namespaces are deleted before KubeRay runs again.

Times come from watches (never polling) on this side; each object's create time is the moment its create
request returned (creationTimestamp has 1 s resolution; it is kept too). API requests come from the API
server's audit log, by user agent: `llmops-operator` (our writes) plus `kopf/<version>` (kopf's lists and
watches) make the operator process; `ray-operator/...` is KubeRay. RSS and CPU come from /proc of each pid.

Prints a table and writes bench/results/controlplane.json (see --out).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "operator"), str(REPO / "tests")]

import aiohttp  # noqa: E402

from integration.harness import OperatorProcess  # noqa: E402
from llmops.builders import finetune as finetune_builder  # noqa: E402
from llmops.builders.common import BuildContext, is_shared  # noqa: E402
from llmops.dev import nodes  # noqa: E402
from llmops.dev.install import install_crds  # noqa: E402
from llmops.dev.plane import LocalPlane, _terminate  # noqa: E402
from llmops.handlers.main import load_payloads  # noqa: E402
from llmops.kube import ApiError, Credentials, Kube, with_retries  # noqa: E402
from llmops.settings import Settings  # noqa: E402
from manifests import finetune  # noqa: E402

CLK = os.sysconf("SC_CLK_TCK")
AGENTS = {"llmops-operator": "llmops", "kopf/": "kopf", "kuberay-operator": "kuberay", "ray-operator": "kuberay"}
WRITE_VERBS = ("create", "update", "patch", "delete", "deletecollection")
CREATE_CONCURRENCY = 32
REPEAT_MAX_N = 100   # --repeat applies to bursts this small: a second-long burst is what the machine's noise moves
WATCH_TIMEOUT_S = 300  # settings.watching.server_timeout in handlers/main.py: each stream is renewed this often
TARGETS = {
    "p99_rayjob_n100_s": 1.0, "all_children_ratio_n1000": 1.0, "peak_rss_mb": 250.0,
    "idle_requests_per_min_per_100": 1.0,
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- measurements from /proc ----------------------------------------------------------------------------
def proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def proc_mem_mb(pid: int) -> dict[str, float]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return {"rss_mb": out.get("VmRSS", 0.0), "peak_rss_mb": out.get("VmHWM", 0.0)}


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


class Usage:
    """CPU used between two points: the machine, each named pid, and therefore everyone else."""

    def __init__(self, pids: dict[str, int]):
        self.pids = dict(pids)
        self.t0 = time.time()
        self.machine0 = machine_cpu()
        self.cpu0 = {name: _safe_cpu(pid) for name, pid in self.pids.items()}
        self.self0 = sum(os.times()[:2])
        self.load0 = os.getloadavg()

    def done(self) -> dict[str, Any]:
        busy1, total1 = machine_cpu()
        cores = os.cpu_count() or 1
        wall = time.time() - self.t0
        machine_busy_s = (busy1 - self.machine0[0]) / CLK
        per = {name: round(_safe_cpu(pid) - self.cpu0[name], 2) for name, pid in self.pids.items()}
        per["bench"] = round(sum(os.times()[:2]) - self.self0, 2)
        ours = sum(per.values())
        return {"wall_s": round(wall, 1), "cores": cores,
                "machine_busy_pct": round(100 * machine_busy_s / max(wall * cores, 1e-9), 1),
                "others_busy_pct": round(100 * max(machine_busy_s - ours, 0) / max(wall * cores, 1e-9), 1),
                "loadavg_start": [round(x, 2) for x in self.load0],
                "loadavg_end": [round(x, 2) for x in os.getloadavg()], "cpu_s": per}


def _safe_cpu(pid: int) -> float:
    try:
        return proc_cpu_s(pid)
    except OSError:
        return 0.0


# ---- the audit log, followed as it grows ----------------------------------------------------------------
class AuditLog(threading.Thread):
    """Follows <plane>/logs/audit.log (and its rotation) and keeps one record per request of the agents we
    count: (received, agent, user agent, verb, resource, subresource, namespace, name, code)."""

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.path = path
        self.records: list[tuple] = []
        self.seen: set[str] = set()
        self.agents: set[str] = set()
        self.caught_up = 0.0
        self.stop = threading.Event()
        self.namespaces: dict[str, float] = {}   # namespace -> when a write by anyone in it was last read

    def run(self) -> None:
        while not self.path.exists() and not self.stop.is_set():
            time.sleep(0.1)
        f = open(self.path, "rb")
        pending = b""
        while not self.stop.is_set():
            chunk = f.read(1 << 20)
            if chunk:
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                for line in lines:
                    self._line(line)
                continue
            self.caught_up = time.time()
            try:
                rotated = os.stat(self.path).st_ino != os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                rotated = False
            if rotated:  # the old file is fully read: continue with the new one
                f.close()
                f, pending = open(self.path, "rb"), b""
                continue
            time.sleep(0.05)

    def _line(self, line: bytes) -> None:
        for ns in self.namespaces:
            if f'"namespace":"{ns}"'.encode() in line and any(f'"verb":"{v}"'.encode() in line for v in WRITE_VERBS):
                self.namespaces[ns] = time.time()
        if not any(a.encode() in line for a in AGENTS):
            return
        e = json.loads(line)
        ua = e.get("userAgent", "")
        agent = next((v for k, v in AGENTS.items() if ua.startswith(k)), None)
        if agent is None or e["auditID"] in self.seen:
            return
        self.seen.add(e["auditID"])
        self.agents.add(ua)
        ref = e.get("objectRef") or {}
        received = datetime.datetime.fromisoformat(e["requestReceivedTimestamp"].replace("Z", "+00:00"))
        self.records.append((received.timestamp(), agent, ua, e["verb"], ref.get("resource", ""),
                             ref.get("subresource", ""), ref.get("namespace", ""), ref.get("name", ""),
                             (e.get("responseStatus") or {}).get("code", 0)))

    def select(self, agents: tuple[str, ...], t0: float, t1: float) -> list[tuple]:
        return [r for r in list(self.records) if r[1] in agents and t0 <= r[0] < t1]

    def last(self, agents: tuple[str, ...]) -> float:
        return max((r[0] for r in reversed(self.records[-5000:]) if r[1] in agents), default=0.0)

    def wait_quiet(self, agents: tuple[str, ...], quiet_s: float, timeout: float, since: float = 0.0) -> float:
        """Wait until the agents sent nothing for quiet_s seconds; returns when their last request came."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            last = max(self.last(agents), since)
            if self.caught_up - last >= quiet_s:
                return last
            time.sleep(0.25)
        log(f"{'/'.join(agents)} not quiet for {quiet_s}s within {timeout}s")
        return max(self.last(agents), since)


def by_verb(records: list[tuple]) -> dict[str, int]:
    out: dict[str, int] = collections.Counter()
    for r in records:
        out[f"{r[1]}: {r[3]} {r[4]}{'/' + r[5] if r[5] else ''}"] += 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def verbs_only(records: list[tuple]) -> dict[str, int]:
    return dict(sorted(collections.Counter(r[3] for r in records).items()))


# ---- watches (this side's clock) --------------------------------------------------------------------------
class Watches:
    """Kubernetes watches in their own thread and event loop; handlers get (type, object, seen_at)."""

    def __init__(self, server: str, token: str, ca: str):
        self.server, self.token, self.ca = server, token, ca
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.tasks: list[Any] = []
        self.session = asyncio.run_coroutine_threadsafe(self._session(), self.loop).result()

    async def _session(self) -> aiohttp.ClientSession:
        import ssl
        return aiohttp.ClientSession(
            base_url=self.server, headers={"Authorization": f"Bearer {self.token}", "User-Agent": "llmops-bench"},
            connector=aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=self.ca)),
            timeout=aiohttp.ClientTimeout(total=None, sock_read=None), read_bufsize=1 << 24)

    def add(self, path: str, handler: Callable[[str, dict, float], None]) -> None:
        listed = threading.Event()
        self.tasks.append(asyncio.run_coroutine_threadsafe(self._watch(path, handler, listed), self.loop))
        listed.wait(60)

    async def _watch(self, path: str, handler, listed: threading.Event) -> None:
        rv = None
        while True:
            try:
                if rv is None:
                    async with self.session.get(path) as r:
                        data = await r.json()
                    for item in data["items"]:
                        handler("LISTED", item, time.time())
                    rv = data["metadata"]["resourceVersion"]
                    listed.set()
                params = {"watch": "1", "resourceVersion": rv, "allowWatchBookmarks": "true",
                          "timeoutSeconds": "1800"}
                async with self.session.get(path, params=params) as r:
                    async for line in r.content:
                        seen = time.time()
                        event = json.loads(line)
                        obj = event["object"]
                        if event["type"] == "ERROR":  # too old: list again
                            rv = None
                            break
                        rv = obj["metadata"]["resourceVersion"]
                        if event["type"] != "BOOKMARK":
                            handler(event["type"], obj, seen)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a dropped stream: resume from the last version
                log(f"watch {path}: {e!r}; resuming")
                await asyncio.sleep(0.5)

    def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        asyncio.run_coroutine_threadsafe(self.session.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


class Track:
    """First-seen times per object key, and how often each object's status really changed."""

    def __init__(self, key: Callable[[dict], str | None]):
        self.key = key
        self.added: dict[str, float] = {}
        self.firsts: dict[str, dict[str, float]] = collections.defaultdict(dict)
        self.status_changes: collections.Counter = collections.Counter()
        self.last_status: dict[str, str] = {}
        self.predicates: dict[str, Callable[[dict], bool]] = {}
        self.deleted: set[str] = set()

    def __call__(self, type_: str, obj: dict, seen: float) -> None:
        k = self.key(obj)
        if k is None:
            return
        if type_ == "DELETED":
            self.deleted.add(k)
            return
        self.added.setdefault(k, seen)
        status = json.dumps(obj.get("status") or {}, sort_keys=True)
        if k in self.last_status and self.last_status[k] != status:
            self.status_changes[k] += 1
        elif k not in self.last_status and status != "{}":
            self.status_changes[k] += 1
        self.last_status[k] = status
        for name, pred in self.predicates.items():
            if name not in self.firsts[k] and pred(obj):
                self.firsts[k][name] = seen


def owner_name(kind: str) -> Callable[[dict], str | None]:
    def key(obj: dict) -> str | None:
        for ref in obj["metadata"].get("ownerReferences") or []:
            if ref.get("kind") == kind:
                return ref["name"]
        return None
    return key


def rayjob_finished(obj: dict) -> bool:
    return (obj.get("status") or {}).get("jobDeploymentStatus") in ("Complete", "Failed")


def own_name(obj: dict) -> str:
    return obj["metadata"]["name"]


# ---- statistics ---------------------------------------------------------------------------------------------
def quantiles(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"count": 0, "p50": None, "p99": None, "max": None}
    v = sorted(values)
    pick = lambda q: v[min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))]  # noqa: E731 (nearest rank)
    return {"count": len(v), "p50": round(pick(0.5), 3), "p99": round(pick(0.99), 3), "max": round(v[-1], 3)}


def latencies(start: dict[str, float], end: dict[str, float]) -> list[float]:
    return [end[k] - start[k] for k in start if k in end]


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return True
        time.sleep(0.1)
    log(f"timed out after {timeout:.0f}s waiting for {what}")
    return False


# ---- the plane and the client --------------------------------------------------------------------------
def bench_pools(n: int) -> list[dict]:
    """Simulated nodes with room for every Ray pod of two bursts of n: no pod waits for space."""
    per_cpu_node, per_gpu_node = 1000, 500
    cpu_nodes = math.ceil(2 * 2 * n / per_cpu_node)     # heads + submitter pods
    gpu_nodes = math.ceil(2 * 2 * n / per_gpu_node)     # 2 L4 workers per RayJob
    items = []
    for i in range(cpu_nodes):
        node = nodes.node(nodes.Pool("bench-cpu", 1, cpu="4000", memory="16000Gi"), i)
        node["status"]["allocatable"] = node["status"]["capacity"] = {
            "cpu": "4000", "memory": "16000Gi", "pods": str(per_cpu_node + 50)}
        items.append(node)
    for i in range(gpu_nodes):
        node = nodes.node(nodes.Pool("bench-l4", 1, cpu="4000", memory="16000Gi", gpus=per_gpu_node,
                                     gpu_product="NVIDIA-L4"), i)
        node["status"]["allocatable"] = node["status"]["capacity"] = {
            "cpu": "4000", "memory": "16000Gi", "pods": str(per_gpu_node + 50), "nvidia.com/gpu": str(per_gpu_node)}
        items.append(node)
    return items


def start_plane(n: int, root: Path) -> LocalPlane:
    plane = LocalPlane(root)
    plane.start(with_kuberay=True)
    install_crds(plane)
    items = bench_pools(n)
    plane.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}),
                  quiet=True)
    plane.kubectl("wait", "--for=condition=Ready", "--timeout=120s",
                  *(f"node/{i['metadata']['name']}" for i in items), quiet=True)
    return plane


def client_for(plane: LocalPlane) -> tuple[Kube, Credentials]:
    config = json.loads(plane.kubeconfig.read_text())
    credentials = Credentials(server=config["clusters"][0]["cluster"]["server"], token=plane.admin_token,
                              ca_path=config["clusters"][0]["cluster"]["certificate-authority"])
    return Kube(credentials, "llmops-bench", user_agent="llmops-bench"), credentials


def pid_of(plane: LocalPlane, name: str) -> int:
    return next(p.pid for p in reversed(plane.processes) if p.name == name)


def stop_kuberay(plane: LocalPlane) -> None:
    proc = next(p for p in reversed(plane.processes) if p.name == "kuberay-operator")
    _terminate(proc.pid)
    plane.processes.remove(proc)


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
        for child in finetune_builder.build(body, ctx):
            if is_shared(child):   # the payload sources: one per namespace
                if child["metadata"]["name"] in seen:
                    continue
                seen.add(child["metadata"]["name"])
            child["metadata"].pop("ownerReferences", None)
            (jobs if child["kind"] == "RayJob" else others).append(child)
    return others, jobs


def expected_child_writes(n: int) -> int:
    """One write per child: each FineTune's own children, plus the shared payload ConfigMap once."""
    body = fine_tunes(1, "x")[0]
    body["metadata"]["uid"] = "u"
    children = finetune_builder.build(body, BuildContext(settings=Settings.load(), payloads=load_payloads()))
    return n * sum(1 for c in children if not is_shared(c)) + sum(1 for c in children if is_shared(c))


def collection_path(obj: dict) -> str:
    from llmops.kube import path_of
    return path_of(obj["apiVersion"], obj["kind"], obj["metadata"]["namespace"])


# ---- one size ----------------------------------------------------------------------------------------------
def run_size(n: int, args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix=f"llmops-bench-{n}-"))
    log(f"N={n}: starting a fresh plane in {root}")
    plane = start_plane(n, root)
    audit = AuditLog(plane.logs / "audit.log")
    audit.start()
    kube, cred = client_for(plane)
    watches = Watches(cred.server, cred.token, cred.ca_path)
    plane_pids = {p.name: p.pid for p in plane.processes if p.name in ("kube-apiserver", "etcd")}
    result: dict[str, Any] = {"n": n, "plane_root": str(root)}
    try:
        # Our operator starts on the empty plane, as after an install: see restart_check for why it must.
        stop_kuberay(plane)
        result.update(llmops_phases(n, plane, kube, watches, audit, plane_pids, args))
        if n not in args.ours_only:
            stop_kuberay(plane)      # a fresh KubeRay process for its own burst (RSS and CPU from zero)
            plane.start_kuberay()
            plane.save_state()
            result["kuberay_burst"] = kuberay_burst(n, plane, kube, watches, audit, plane_pids, args)
    finally:
        watches.close()
        audit.stop.set()
        if args.keep:
            log(f"kept: plane in {root}, KUBECONFIG={plane.kubeconfig}")
        else:
            plane.stop()
            shutil.rmtree(root, ignore_errors=True)
    return result


def kuberay_burst(n, plane, kube, watches, audit, plane_pids, args) -> dict[str, Any]:
    ns = f"kuberay-{n}"
    run_async(ensure_namespace(kube, ns))
    others, jobs = kuberay_inputs(n, ns)
    log(f"N={n}: creating the {len(others)} non-Ray children KubeRay's pods refer to (untimed)")
    run_async(create_all(kube, others, collection_path))
    jobs_seen = Track(own_name)
    jobs_seen.predicates["running"] = lambda o: (o.get("status") or {}).get("jobDeploymentStatus") == "Running"
    jobs_seen.predicates["terminal"] = rayjob_finished
    clusters = Track(owner_name("RayJob"))
    watches.add(f"/apis/ray.io/v1/namespaces/{ns}/rayjobs", jobs_seen)
    watches.add(f"/apis/ray.io/v1/namespaces/{ns}/rayclusters", clusters)
    audit.wait_quiet(("kuberay",), 3, 60)
    kuberay = pid_of(plane, "kuberay-operator")
    usage = Usage({"kuberay": kuberay, **plane_pids})
    cpu0 = proc_cpu_s(kuberay)
    log(f"N={n}: KubeRay burst: {n} RayJobs (our operator is not running)")
    t0 = time.time()
    created = run_async(create_all(kube, jobs, collection_path))
    wait_until(lambda: len(clusters.added) >= n, args.timeout, f"{n} RayClusters")
    t_all = max(clusters.added.values(), default=t0)
    cpu_all = proc_cpu_s(kuberay)
    wait_until(lambda: sum("terminal" in jobs_seen.firsts[k] for k in created) >= n, args.timeout,
               f"{n} RayJobs to finish")
    t_end = audit.wait_quiet(("kuberay",), args.quiet, args.timeout, since=t_all)
    use = usage.done()
    done = {k: v[1] for k, v in created.items()}
    life = audit.select(("kuberay",), t0, t_end + 0.001)
    to_cluster = audit.select(("kuberay",), t0, t_all + 0.001)
    first = first_requests(to_cluster, r"^(ft-\d{5}-ft)$", ("update", "rayjobs"))
    running = {k: f["running"] for k, f in jobs_seen.firsts.items() if "running" in f}
    return {
        "namespace": ns,
        "create_s": round(max(v[1] for v in created.values()) - t0, 2),
        "creation_to_raycluster_s": quantiles(latencies(done, clusters.added)),
        "creation_to_rayjob_running_s": quantiles(latencies(done, running)),
        "creation_to_first_request_s": quantiles(latencies(done, first)),
        "first_request_to_raycluster_s": quantiles(latencies(first, clusters.added)),
        "all_rayclusters_after_s": round(t_all - t0, 2),
        "all_rayjobs_running_after_s": round(max(running.values(), default=t0) - t0, 2),
        "requests_until_all_clusters": {"total": len(to_cluster), "per_rayjob": round(len(to_cluster) / n, 2),
                                        "by_verb": verbs_only(to_cluster), "by_resource": by_verb(to_cluster)},
        "requests_lifecycle": {"total": len(life), "per_rayjob": round(len(life) / n, 2),
                               "window_s": round(t_end - t0, 1), "by_verb": verbs_only(life),
                               "by_resource": by_verb(life)},
        "cpu_s_until_all_clusters": round(cpu_all - cpu0, 2),
        "cpu_s_lifecycle": use["cpu_s"]["kuberay"],
        **{f"kuberay_{k}": v for k, v in proc_mem_mb(kuberay).items()},
        "user_agents": sorted(a for a in audit.agents if a.startswith(("kuberay", "ray-operator"))),
        "machine": use,
    }


def llmops_phases(n, plane, kube, watches, audit, plane_pids, args) -> dict[str, Any]:
    ns = f"llmops-{n}"
    audit.namespaces[ns] = 0.0
    run_async(ensure_namespace(kube, ns))
    fts = Track(own_name)
    fts.predicates["left_pending"] = lambda o: (o.get("status") or {}).get("phase") not in (None, "Pending")
    fts.predicates["has_status"] = lambda o: bool((o.get("status") or {}).get("phase"))
    jobs = Track(owner_name("FineTune"))
    jobs.predicates["running"] = lambda o: (o.get("status") or {}).get("jobDeploymentStatus") == "Running"
    jobs.predicates["terminal"] = rayjob_finished
    fts.predicates["terminal"] = lambda o: (o.get("status") or {}).get("phase") in ("Succeeded", "Failed")
    clusters = Track(owner_name("RayJob"))
    watches.add(f"/apis/llmops.dev/v1alpha1/namespaces/{ns}/finetunes", fts)
    watches.add(f"/apis/ray.io/v1/namespaces/{ns}/rayjobs", jobs)
    watches.add(f"/apis/ray.io/v1/namespaces/{ns}/rayclusters", clusters)

    operator = start_operator(plane, args)
    op = operator.popen.pid
    out: dict[str, Any] = {}
    try:
        t_up = time.time()
        # /healthz answers before kopf's watchers start: wait for them, then for quiet
        wait_until(lambda: any(r[1] == "kopf" and r[3] == "watch" for r in list(audit.records)), 120,
                   "kopf's watch requests")
        audit.wait_quiet(("llmops", "kopf"), 3, 60, since=time.time())
        startup = audit.select(("llmops", "kopf"), 0, time.time())
        streams = sum(1 for r in startup if r[3] == "watch")
        out["operator_startup"] = {"requests": len(startup), "by_verb": verbs_only(startup),
                                   "watch_streams": streams, "by_resource": by_verb(startup),
                                   **proc_mem_mb(op), "cpu_s": round(proc_cpu_s(op), 2)}
        profiler = start_profile(op, args, f"burst-{n}")

        # phase 2: our burst, KubeRay stopped
        log(f"N={n}: llmops burst: {n} FineTunes (KubeRay stopped)")
        usage = Usage({"llmops": op, **plane_pids})
        cpu0 = proc_cpu_s(op)
        t0 = time.time()
        created = run_async(create_all(kube, fine_tunes(n, ns), collection_path))
        wait_until(lambda: len(jobs.added) >= n, args.timeout, f"{n} RayJobs")
        t_all = max(jobs.added.values(), default=t0)
        wait_until(lambda: sum("has_status" in fts.firsts[k] for k in created) >= n, args.timeout, "every status")
        t_end = audit.wait_quiet(("llmops", "kopf"), args.quiet, args.timeout, since=t_all)
        stop_profile(profiler)
        use = usage.done()
        done = {k: v[1] for k, v in created.items()}
        burst = audit.select(("llmops", "kopf"), t0, t_end + 0.001)
        ours = [r for r in burst if r[1] == "llmops"]
        first = first_requests(ours, r"^(ft-\d{5})")
        applied = first_requests(ours, r"^(ft-\d{5})", ("patch", "rayjobs"))
        out["llmops_burst"] = {
            "namespace": ns,
            "create_s": round(max(v[1] for v in created.values()) - t0, 2),
            "creation_to_rayjob_s": quantiles(latencies(done, jobs.added)),
            "creation_to_first_status_s": quantiles(latencies(done, {k: f["has_status"] for k, f in
                                                                      fts.firsts.items() if "has_status" in f})),
            # where the time goes: waiting for a reconcile to start, then the reconcile's own requests
            "creation_to_first_request_s": quantiles(latencies(done, first)),
            "first_request_to_rayjob_apply_s": quantiles(latencies(first, applied)),
            "all_rayjobs_after_s": round(t_all - t0, 2),
            "requests": {"total": len(burst), "per_finetune": round(len(burst) / n, 2),
                         "window_s": round(t_end - t0, 1), "by_verb": verbs_only(burst),
                         "by_resource": by_verb(burst)},
            "writes": writes_per_object(burst, n),
            "status_changes_seen_per_finetune": round(sum(fts.status_changes[k] for k in created) / n, 2),
            "cpu_s": round(proc_cpu_s(op) - cpu0, 2),
            **proc_mem_mb(op),
            "machine": use,
            "reconciles": operator_metrics(operator),
        }
        changes_before = sum(fts.status_changes[k] for k in created)

        out["handoff"] = None
        if n not in args.ours_only:
            # phase 3: KubeRay takes over the RayJobs; our status follows
            log(f"N={n}: hand-off: starting KubeRay with {n} llmops RayJobs waiting")
            profiler = start_profile(op, args, f"handoff-{n}")
            usage = Usage({"llmops": op, **plane_pids})
            cpu0 = proc_cpu_s(op)
            t_kr = time.time()
            plane.start_kuberay()
            plane.save_state()
            usage.pids["kuberay"] = pid_of(plane, "kuberay-operator")
            usage.cpu0["kuberay"] = _safe_cpu(usage.pids["kuberay"])
            wait_until(lambda: sum("left_pending" in fts.firsts[k] for k in created) >= n, args.timeout,
                       f"{n} FineTunes to leave Pending")
            wait_until(lambda: sum("terminal" in fts.firsts[k] for k in created) >= n, args.timeout,
                       f"{n} FineTunes to finish")
            wait_until(lambda: len(clusters.deleted) >= n, args.timeout, f"KubeRay to delete {n} finished RayClusters")
            t_last = max((fts.firsts[k].get("terminal", 0) for k in created), default=t_kr)
            t_end2 = audit.wait_quiet(("llmops", "kopf", "kuberay"), args.quiet, args.timeout, since=t_last)
            stop_profile(profiler)
            use = usage.done()
            handoff = audit.select(("llmops", "kopf"), t_kr, t_end2 + 0.001)
            left = {k: fts.firsts[k]["left_pending"] for k in created if "left_pending" in fts.firsts[k]}
            running = {k: f["running"] for k, f in jobs.firsts.items() if "running" in f}
            finished = {k: f["terminal"] for k, f in jobs.firsts.items() if "terminal" in f}
            ours_finished = {k: fts.firsts[k]["terminal"] for k in created if "terminal" in fts.firsts[k]}
            status_writes = [r for r in handoff if r[1] == "llmops" and r[5] == "status"]
            changes = sum(fts.status_changes[k] for k in created) - changes_before
            out["handoff"] = {
                "creation_to_phase_left_pending_s": quantiles(latencies(done, left)),
                "kuberay_start_to_phase_left_pending_s": quantiles([t - t_kr for t in left.values()]),
                "rayjob_running_to_phase_left_pending_s": quantiles(latencies(running, left)),
                "rayjob_finished_to_phase_finished_s": quantiles(latencies(finished, ours_finished)),
                "kuberay_start_to_raycluster_s": quantiles([t - t_kr for t in clusters.added.values()]),
                "phases": dict(collections.Counter(json.loads(fts.last_status[k]).get("phase") for k in created)),
                "requests": {"total": len(handoff), "per_finetune": round(len(handoff) / n, 2),
                             "window_s": round(t_end2 - t_kr, 1), "by_verb": verbs_only(handoff),
                             "by_resource": by_verb(handoff)},
                "writes": writes_per_object(handoff, n),
                "status_writes": len(status_writes), "status_changes_seen": changes,
                "cpu_s": round(proc_cpu_s(op) - cpu0, 2), **proc_mem_mb(op), "machine": use,
                "reconciles": operator_metrics(operator),
            }

        # a reconcile that finds nothing to change writes nothing
        wait_at_rest(audit, ns, args)
        log(f"N={n}: no-op reconciles: touching {n} FineTunes")
        before = operator_metrics(operator)
        t_touch = time.time()
        run_async(touch_all(kube, ns, list(created)))
        t_end3 = audit.wait_quiet(("llmops", "kopf"), args.quiet, 120, since=time.time())
        touch = audit.select(("llmops", "kopf"), t_touch, max(t_end3, time.time()))
        after = operator_metrics(operator)
        out["noop"] = {"touched": n, "reconciles": after["total"] - before["total"],
                       "writes": len([r for r in touch if r[3] in WRITE_VERBS]), "requests": len(touch),
                       "by_resource": by_verb(touch)}

        # phase 4: steady state
        wait_at_rest(audit, ns, args)
        log(f"N={n}: steady state: {args.steady:.0f}s with {n} FineTunes at rest")
        kuberay = {} if n in args.ours_only else {"kuberay": pid_of(plane, "kuberay-operator")}
        usage = Usage({"llmops": op, **kuberay, **plane_pids})
        cpu0 = proc_cpu_s(op)
        profiler = start_profile(op, args, f"steady-{n}")
        t_s = time.time()
        time.sleep(args.steady)
        t_s1 = time.time()
        stop_profile(profiler)
        time.sleep(1.0)  # let the audit log catch up
        idle = audit.select(("llmops", "kopf"), t_s, t_s1)
        idle_kr = audit.select(("kuberay",), t_s, t_s1)
        minutes = (t_s1 - t_s) / 60
        out["steady"] = {
            "window_s": round(t_s1 - t_s, 1), "requests": len(idle),
            "requests_per_min": round(len(idle) / minutes, 2),
            "requests_per_min_per_100": round(len(idle) / minutes / (n / 100), 3),
            "by_resource": by_verb(idle),
            "cpu_s_per_min": round((proc_cpu_s(op) - cpu0) / minutes, 3),
            "kuberay_requests_per_min": round(len(idle_kr) / minutes, 2),
            "kuberay_by_resource": by_verb(idle_kr),
            "kuberay_cpu_s_per_min": round(usage.done()["cpu_s"]["kuberay"] / minutes, 3) if kuberay else None,
            "watch_renewals_per_min": round(streams * 60 / WATCH_TIMEOUT_S, 2),
            "watch_renewals_per_min_per_100": round(streams * 60 / WATCH_TIMEOUT_S / (n / 100), 3),
            **proc_mem_mb(op), "machine": usage.done(),
        }
        if args.repeat > 1 and n <= REPEAT_MAX_N:   # as the first burst: KubeRay stopped (running since the hand-off)
            running = any(p.name == "kuberay-operator" for p in plane.processes)
            if running:
                stop_kuberay(plane)
            out["repeats"] = [repeat_burst(n, i, kube, watches, audit, args) for i in range(1, args.repeat)]
            # gone before KubeRay runs again: its own burst must not take over these RayJobs too
            run_async(delete_namespaces(kube, [r["namespace"] for r in out["repeats"]], args.timeout))
            if running:
                plane.start_kuberay()
        out["operator"] = {**proc_mem_mb(op), "cpu_s_total": round(proc_cpu_s(op), 2),
                           "user_agents": sorted(a for a in audit.agents if a.startswith(("llmops", "kopf"))),
                           "up_s": round(time.time() - t_up, 1)}
    finally:
        operator.stop()
    out["restart"] = restart_check(n, plane, kube, ns, jobs, audit, args)
    return out


def repeat_burst(n, i, kube, watches, audit, args) -> dict[str, Any]:
    """Another burst of N FineTunes into a fresh namespace, the earlier ones at rest: one burst's p99 moves by
    about 30% on a shared 2-core machine, so the target is judged on the median burst."""
    ns = f"llmops-{n}-r{i}"
    run_async(ensure_namespace(kube, ns))
    jobs = Track(owner_name("FineTune"))
    watches.add(f"/apis/ray.io/v1/namespaces/{ns}/rayjobs", jobs)
    log(f"N={n}: repeat burst {i}: {n} FineTunes in {ns}")
    t0 = time.time()
    created = run_async(create_all(kube, fine_tunes(n, ns), collection_path))
    wait_until(lambda: len(jobs.added) >= n, args.timeout, f"{n} RayJobs")
    t_all = max(jobs.added.values(), default=t0)
    audit.wait_quiet(("llmops", "kopf"), args.quiet, args.timeout, since=t_all)
    return {"namespace": ns, "creation_to_rayjob_s": quantiles(latencies({k: v[1] for k, v in created.items()},
                                                                           jobs.added)),
            "all_rayjobs_after_s": round(t_all - t0, 2)}


def burst_p99s(result: dict[str, Any]) -> list[float]:
    """p99 creation -> RayJob of every burst of this size: the first, then the repeats."""
    return [b["creation_to_rayjob_s"]["p99"] for b in [result["llmops_burst"], *result.get("repeats", [])]]


def start_operator(plane: LocalPlane, args) -> OperatorProcess:
    env = {"PYTHONPATH": str(Path(args.operator_src).resolve())} if args.operator_src else None
    return OperatorProcess(plane, plane.logs / "operator.log", env_extra=env).start()


def restart_check(n, plane, kube, ns, jobs, audit, args) -> dict[str, Any]:
    """Restart the operator with the N FineTunes (and their children) in place, then create one more.

    kopf runs no handler until every watched kind's initial listing is indexed, and spawns at most
    settings.queueing.worker_limit object workers per watched kind; each listed object's worker waits for
    that readiness. With more objects of one kind than the limit (pods or ConfigMaps count cluster-wide:
    kopf filters labels on the client side) the workers that could start wait for the ones that cannot.
    This check measures whether the operator comes back and what it writes when it does."""
    log(f"N={n}: restart with {n} FineTunes at rest, then one new FineTune")
    t_start = time.time()
    operator = start_operator(plane, args)
    try:
        body = finetune("ft-after-restart")
        body["metadata"]["namespace"] = ns
        run_async(create_all(kube, [body], collection_path))
        t_created = time.time()
        ok = wait_until(lambda: "ft-after-restart" in jobs.added, args.restart_timeout,
                        "the RayJob of a FineTune created after the restart")
        time.sleep(2)
        t_end = audit.wait_quiet(("llmops", "kopf"), args.quiet, 120, since=time.time())
        after = operator_metrics(operator)
        records = audit.select(("llmops", "kopf"), t_start, t_end + 0.001)
        # Events are created with generateName (no name in the audit record): counted on their own.
        writes = [r for r in records if r[1] == "llmops" and r[3] in WRITE_VERBS and r[4] != "events"]
        new = [r for r in writes if r[7].startswith("ft-after-restart")]
        return {"handled": ok,
                "creation_to_rayjob_s": round(jobs.added["ft-after-restart"] - t_created, 2) if ok else None,
                "waited_s": round(time.time() - t_created, 1),
                "reconciles": after["total"],
                "writes_for_existing": len(writes) - len(new), "writes_for_new": len(new),
                "events": sum(1 for r in records if r[1] == "llmops" and r[4] == "events"),
                "requests": len(records), "by_resource": by_verb(records)}
    finally:
        operator.stop()


def wait_at_rest(audit: AuditLog, ns: str, args) -> None:
    """Until nobody (operators, garbage collector, scheduler, kwok) has written in the namespace for a while."""
    audit.wait_quiet(("llmops", "kopf", "kuberay"), args.quiet, args.timeout, since=time.time())
    wait_until(lambda: audit.caught_up - audit.namespaces.get(ns, 0) >= 2 * args.quiet, args.timeout,
               f"no writes in {ns} for {2 * args.quiet:.0f}s")


def first_requests(records: list[tuple], pattern: str, verb_resource: tuple[str, str] | None = None
                   ) -> dict[str, float]:
    """FineTune name -> when the first request about it (or the first `verb resource` about it) arrived."""
    import re
    name_of = re.compile(pattern)
    out: dict[str, float] = {}
    for r in records:
        m = name_of.match(r[7])
        if m and (verb_resource is None or (r[3], r[4]) == verb_resource):
            out.setdefault(m.group(1), r[0])
    return out


def writes_per_object(records: list[tuple], n: int) -> dict[str, Any]:
    """Our writes, per object: each child written once (expected_child_writes)."""
    ours = [r for r in records if r[1] == "llmops" and r[3] in WRITE_VERBS]
    child = [r for r in ours if not r[5] and r[4] != "events"]
    per_object = collections.Counter((r[4], r[7]) for r in child)
    return {
        "child_applies": len(child), "child_applies_per_finetune": round(len(child) / n, 2),
        "children_written": len(per_object),
        "children_written_more_than_once": sum(1 for c in per_object.values() if c > 1),
        "max_writes_one_child": max(per_object.values(), default=0),
        "status_writes": sum(1 for r in ours if r[5] == "status"),
        "status_writes_per_finetune": round(sum(1 for r in ours if r[5] == "status") / n, 2),
        "events": sum(1 for r in ours if r[4] == "events"),
        "errors": dict(collections.Counter(r[8] for r in ours if r[8] >= 400)),
    }


def operator_metrics(operator: OperatorProcess) -> dict[str, Any]:
    text = operator.metrics()
    out: dict[str, Any] = {"total": 0}
    for line in text.splitlines():
        if line.startswith("llmops_reconciles_total{"):
            labels, value = line.rsplit(" ", 1)
            out[labels[len("llmops_reconciles_total"):]] = int(float(value))
            out["total"] += int(float(value))
    return out


def start_profile(pid: int, args, tag: str):
    if not args.profile:
        return None
    Path(args.profile).mkdir(parents=True, exist_ok=True)
    out = Path(args.profile) / f"{tag}.txt"
    return subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--rate", "50", "--nonblocking",
                             "--format", "raw", "-o", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def stop_profile(proc) -> None:
    if proc is not None:
        import signal
        proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)


# ---- report ------------------------------------------------------------------------------------------------
def verdicts(results: list[dict]) -> list[dict[str, Any]]:
    by_n = {r["n"]: r for r in results}
    out = []
    if 100 in by_n:
        p99s = burst_p99s(by_n[100])
        p99 = statistics.median(p99s)
        out.append({"target": "p99 creation -> RayJob <= 1 s at N=100"
                              + (f" (median of {len(p99s)} bursts: {', '.join(f'{v:.2f}' for v in p99s)})"
                                 if len(p99s) > 1 else ""),
                    "value": p99, "pass": p99 is not None and p99 <= TARGETS["p99_rayjob_n100_s"]})
    if 1000 in by_n and by_n[1000].get("kuberay_burst"):
        r = by_n[1000]
        ratio = r["llmops_burst"]["all_rayjobs_after_s"] / max(r["kuberay_burst"]["all_rayclusters_after_s"], 1e-9)
        out.append({"target": "N=1000: every RayJob exists <= KubeRay's every RayCluster exists (ratio <= 1)",
                    "value": round(ratio, 2), "pass": ratio <= TARGETS["all_children_ratio_n1000"]})
    for r in results:
        w = r["llmops_burst"]["writes"]
        h = r["handoff"] or {"writes": {"child_applies": 0}, "status_writes": 0, "status_changes_seen": 0}
        expected = expected_child_writes(r["n"])
        once = w["children_written_more_than_once"] == 0 and w["child_applies"] == expected \
            and h["writes"]["child_applies"] == 0
        out.append({"target": f"N={r['n']}: one write per child ({expected} for {r['n']} FineTunes: "
                              f"{(expected - 1) // r['n']} each + the shared payload ConfigMap)",
                    "value": f"{(w['child_applies'] + h['writes']['child_applies']) / r['n']:.2f}/FineTune, "
                             f"{w['children_written_more_than_once']} children written twice+",
                    "pass": once})
        burst_status = w["status_writes"]
        seen = r["llmops_burst"]["status_changes_seen_per_finetune"] * r["n"]
        out.append({"target": f"N={r['n']}: status writes only on real changes",
                    "value": f"burst {burst_status} writes / {seen:.0f} changes; hand-off {h['status_writes']} "
                             f"writes / {h['status_changes_seen']} changes",
                    "pass": burst_status <= seen and h["status_writes"] <= h["status_changes_seen"]})
        out.append({"target": f"N={r['n']}: zero writes for a reconcile that changes nothing",
                    "value": f"{r['noop']['writes']} writes in {r['noop']['reconciles']} reconciles",
                    "pass": r["noop"]["writes"] == 0 and r["noop"]["reconciles"] >= r["n"]})
        out.append({"target": f"N={r['n']}: idle API traffic <= 1 request/min per 100 resources",
                    "value": r["steady"]["requests_per_min_per_100"],
                    "pass": r["steady"]["requests_per_min_per_100"] <= TARGETS["idle_requests_per_min_per_100"]})
        rs = r["restart"]
        out.append({"target": f"N={r['n']}: restart with N at rest: handles a new FineTune, writes nothing for "
                              "the others",
                    "value": (f"RayJob after {rs['creation_to_rayjob_s']} s, {rs['reconciles']} reconciles, "
                              f"{rs['writes_for_existing']} writes for existing" if rs["handled"] else
                              f"not handled after {rs['waited_s']} s ({rs['reconciles']} reconciles)"),
                    "pass": rs["handled"] and rs["writes_for_existing"] == 0})
    largest = max(results, key=lambda r: r["n"])
    out.append({"target": f"peak RSS <= 250 MB at the largest N ({largest['n']})",
                "value": round(largest["operator"]["peak_rss_mb"], 1),
                "pass": largest["operator"]["peak_rss_mb"] <= TARGETS["peak_rss_mb"]})
    return out


def fmt_q(q: dict) -> str:
    if not q or q.get("p50") is None:
        return "n/a"
    return f"{q['p50']:.2f} / {q['p99']:.2f} / {q['max']:.2f}"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "n/a"


def size_table(r: dict[str, Any]) -> list[str]:
    b, s = r["llmops_burst"], r["steady"]
    if not r.get("kuberay_burst") or not r.get("handoff"):
        return ours_only_table(r)
    k, h = r["kuberay_burst"], r["handoff"]
    lines: list[str] = []
    life_requests = b["requests"]["total"] + h["requests"]["total"]
    life_cpu = b["cpu_s"] + h["cpu_s"]
    rows = [
        ("", "llmops: FineTune->RayJob", "KubeRay: RayJob->RayCluster", "ours/KubeRay"),
        ("creation -> child p50/p99/max s", fmt_q(b["creation_to_rayjob_s"]), fmt_q(k["creation_to_raycluster_s"]),
         ratio(b["creation_to_rayjob_s"]["p99"], k["creation_to_raycluster_s"]["p99"]) + " (p99)"),
        ("every child exists after s", f"{b['all_rayjobs_after_s']:.1f}", f"{k['all_rayclusters_after_s']:.1f}",
         ratio(b["all_rayjobs_after_s"], k["all_rayclusters_after_s"])),
        ("API requests/resource, first step", f"{b['requests']['per_finetune']:.2f}",
         f"{k['requests_until_all_clusters']['per_rayjob']:.2f}",
         ratio(b["requests"]["per_finetune"], k["requests_until_all_clusters"]["per_rayjob"])),
        ("API requests/resource, whole life", f"{life_requests / r['n']:.2f}",
         f"{k['requests_lifecycle']['per_rayjob']:.2f}", ratio(life_requests / r["n"],
                                                               k["requests_lifecycle"]["per_rayjob"])),
        ("CPU ms/resource, first step", f"{1000 * b['cpu_s'] / r['n']:.1f}",
         f"{1000 * k['cpu_s_until_all_clusters'] / r['n']:.1f}", ratio(b["cpu_s"], k["cpu_s_until_all_clusters"])),
        ("CPU ms/resource, whole life", f"{1000 * life_cpu / r['n']:.1f}",
         f"{1000 * k['cpu_s_lifecycle'] / r['n']:.1f}", ratio(life_cpu, k["cpu_s_lifecycle"])),
        ("peak RSS MB", f"{r['operator']['peak_rss_mb']:.0f}", f"{k['kuberay_peak_rss_mb']:.0f}",
         ratio(r["operator"]["peak_rss_mb"], k["kuberay_peak_rss_mb"])),
        ("machine busy / others' share", f"{b['machine']['machine_busy_pct']:.0f}% / "
         f"{b['machine']['others_busy_pct']:.0f}%", f"{k['machine']['machine_busy_pct']:.0f}% / "
         f"{k['machine']['others_busy_pct']:.0f}%", ""),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines.append(f"N = {r['n']}")
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    w = b["writes"]
    lines += [
        f"  where the time goes: ours creation -> first request {fmt_q(b['creation_to_first_request_s'])} s, "
        f"first request -> RayJob applied {fmt_q(b['first_request_to_rayjob_apply_s'])} s; KubeRay creation -> "
        f"first request {fmt_q(k['creation_to_first_request_s'])} s, first request -> RayCluster seen "
        f"{fmt_q(k['first_request_to_raycluster_s'])} s",
        f"  requests by verb, first step: ours {b['requests']['by_verb']}; KubeRay's "
        f"{k['requests_until_all_clusters']['by_verb']}",
        f"  requests by verb, whole life: ours (hand-off) {h['requests']['by_verb']}; KubeRay's "
        f"{k['requests_lifecycle']['by_verb']}",
        f"  our writes per FineTune (burst): {w['child_applies_per_finetune']:.2f} child applies "
        f"({w['children_written_more_than_once']} of {w['children_written']} children written more than once, "
        f"max {w['max_writes_one_child']}), {w['status_writes_per_finetune']:.2f} status writes "
        f"for {b['status_changes_seen_per_finetune']:.2f} status changes seen, "
        f"{w['events'] / r['n']:.2f} events",
        f"  hand-off (KubeRay started after our burst): KubeRay start -> phase leaves Pending "
        f"{fmt_q(h['kuberay_start_to_phase_left_pending_s'])} s; RayJob Running -> FineTune Running "
        f"{fmt_q(h['rayjob_running_to_phase_left_pending_s'])} s; RayJob Failed -> FineTune Failed "
        f"{fmt_q(h['rayjob_finished_to_phase_finished_s'])} s; {h['status_writes']} status writes for "
        f"{h['status_changes_seen']} status changes; {h['writes']['child_applies']} child re-applies; "
        f"final phases {h['phases']}",
        *repeat_lines(r),
        f"  no-op: {r['noop']['touched']} touches -> {r['noop']['reconciles']} reconciles, "
        f"{r['noop']['writes']} writes, {r['noop']['requests']} requests",
        f"  restart with {r['n']} at rest: " + (
            f"new FineTune's RayJob after {r['restart']['creation_to_rayjob_s']} s; "
            f"{r['restart']['reconciles']} reconciles, {r['restart']['writes_for_existing']} writes for the "
            f"existing ones" if r["restart"]["handled"] else
            f"NOT HANDLED: no RayJob {r['restart']['waited_s']} s after creating a FineTune; "
            f"{r['restart']['reconciles']} reconciles ran"),
        f"  steady {s['window_s']:.0f}s: {s['requests_per_min']:.2f} requests/min "
        f"({s['requests_per_min_per_100']:.3f} per 100 resources) {s['by_resource']}, "
        f"{s['cpu_s_per_min']:.3f} CPU s/min, RSS {s['rss_mb']:.0f} MB; watch renewals add "
        f"{s['watch_renewals_per_min']:.2f}/min on average ({s['watch_renewals_per_min_per_100']:.3f} per 100); KubeRay "
        f"{s['kuberay_requests_per_min']:.2f} requests/min, {s['kuberay_cpu_s_per_min']:.3f} CPU s/min",
        "",
    ]
    return lines


def repeat_lines(r: dict[str, Any]) -> list[str]:
    if not r.get("repeats"):
        return []
    bursts = "; ".join(f"{fmt_q(b['creation_to_rayjob_s'])} s, all after {b['all_rayjobs_after_s']:.1f} s"
                       for b in r["repeats"])
    p99s = burst_p99s(r)
    return [f"  repeat bursts (fresh namespaces, earlier ones at rest), creation -> RayJob p50/p99/max: {bursts}; "
            f"median p99 of all {len(p99s)} bursts {statistics.median(p99s):.2f} s"]


def ours_only_table(r: dict[str, Any]) -> list[str]:
    """A size run without KubeRay (--ours-only): our operator's figures alone."""
    b, s, w, rs = r["llmops_burst"], r["steady"], r["llmops_burst"]["writes"], r["restart"]
    return [
        f"N = {r['n']} (our operator only: no KubeRay burst, no hand-off)",
        f"  creation -> RayJob p50/p99/max {fmt_q(b['creation_to_rayjob_s'])} s; every RayJob after "
        f"{b['all_rayjobs_after_s']:.1f} s; {b['requests']['per_finetune']:.2f} API requests and "
        f"{1000 * b['cpu_s'] / r['n']:.1f} CPU ms per FineTune",
        f"  our writes per FineTune (burst): {w['child_applies_per_finetune']:.2f} child applies "
        f"({w['children_written_more_than_once']} children written more than once), "
        f"{w['status_writes_per_finetune']:.2f} status writes for {b['status_changes_seen_per_finetune']:.2f} "
        f"status changes seen",
        *repeat_lines(r),
        f"  no-op: {r['noop']['touched']} touches -> {r['noop']['reconciles']} reconciles, "
        f"{r['noop']['writes']} writes",
        f"  restart with {r['n']} at rest: new FineTune's RayJob after {rs['creation_to_rayjob_s']} s, "
        f"{rs['writes_for_existing']} writes for the existing ones" if rs["handled"] else
        f"  restart with {r['n']} at rest: NOT HANDLED after {rs['waited_s']} s",
        f"  steady {s['window_s']:.0f}s: {s['requests_per_min']:.2f} requests/min, {s['cpu_s_per_min']:.3f} CPU "
        f"s/min; peak RSS {r['operator']['peak_rss_mb']:.0f} MB",
        "",
    ]


def table(report: dict[str, Any]) -> str:
    lines = [f"llmops control plane vs KubeRay — {report['when']} — {report['machine']['summary']}",
             f"KubeRay {report['versions']['kuberay']} (plane defaults: reconcile-concurrency 1, qps 100), "
             f"Kubernetes {report['versions']['kubernetes']}, kopf {report['versions']['kopf']}, "
             f"Python {report['versions']['python']}", ""]
    for r in report["results"]:
        lines += size_table(r)
    lines.append("Targets")
    for v in report["verdicts"]:
        lines.append(f"  {'PASS' if v['pass'] else 'MISS'}  {v['target']}: {v['value']}")
    return "\n".join(lines)


def machine_summary() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": model, "cores": os.cpu_count(), "memory_gib": round(mem_gb, 1),
            "kernel": platform.release(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
            "summary": f"{model}, {os.cpu_count()} cores, {mem_gb:.0f} GiB, shared (load avg at start "
                       f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())})"}


def versions() -> dict[str, str]:
    import importlib.metadata as md
    pinned = dict(line.split("=", 1) for line in (REPO / "tools/controlplane/versions.env").read_text().splitlines()
                  if "=" in line and not line.startswith("#"))
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    return {"kubernetes": pinned.get("KUBERNETES_VERSION", "?"), "kuberay": pinned.get("KUBERAY_VERSION", "?"),
            "kopf": md.version("kopf"), "python": platform.python_version(), "commit": commit}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, action="append", help="burst size (repeatable; default 100 and 1000)")
    p.add_argument("--steady", type=float, default=60.0, help="steady-state window, seconds")
    p.add_argument("--quiet", type=float, default=5.0, help="seconds without requests that end a phase")
    p.add_argument("--timeout", type=float, default=900.0, help="limit for each wait, seconds")
    p.add_argument("--out", default=str(REPO / "bench/results/controlplane.json"))
    p.add_argument("--profile", default="", help="folder for py-spy profiles of the operator (burst, hand-off)")
    p.add_argument("--keep", action="store_true", help="leave each plane running (debugging)")
    p.add_argument("--restart-timeout", type=float, default=120.0,
                   help="how long a restarted operator may take to handle a new FineTune")
    p.add_argument("--operator-src", default="",
                   help="run the operator from this source root instead of ./operator (a scratch copy with a fix)")
    p.add_argument("--ours-only", type=int, action="append", default=[],
                   help="for this N run only our operator's phases (no KubeRay burst, no hand-off): for sizes "
                        "where KubeRay's burst would not finish in reasonable time on this machine")
    p.add_argument("--repeat", type=int, default=1,
                   help=f"bursts of each size up to {REPEAT_MAX_N} (each in a fresh namespace, after the steady "
                        "state); the N=100 p99 target is judged on their median")
    p.add_argument("--append", action="store_true",
                   help="add these sizes to the results already in --out (same N replaced)")
    args = p.parse_args(argv)
    sizes = args.n or ([] if args.ours_only else [100, 1000])
    args.ours_only = set(args.ours_only)
    sizes += sorted(args.ours_only - set(sizes))
    report: dict[str, Any] = {"when": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
                              "machine": machine_summary(), "versions": versions(),
                              "command": " ".join(["bench/controlplane.py", *(argv or sys.argv[1:])]),
                              "profiled": bool(args.profile), "targets": TARGETS,
                              "operator_src": args.operator_src or "operator",
                              "fairness": "each operator's burst runs alone on the same plane (the other operator "
                                          "stopped), so neither takes CPU from the other on a 2-core machine; both "
                                          "run for the hand-off, the no-op check and the steady state. Ours runs "
                                          "first, on the empty plane (it cannot start once a watched kind has more "
                                          "than 200 objects: see restart); KubeRay's burst runs last, in its own "
                                          "namespace, from a freshly started KubeRay process, with ours stopped",
                              "results": []}
    if args.append and Path(args.out).exists():
        earlier = json.loads(Path(args.out).read_text())
        report["results"] = [r for r in earlier["results"] if r["n"] not in sizes]
        report["earlier_runs"] = [{k: earlier.get(k) for k in ("when", "machine", "versions", "command")},
                                  *earlier.get("earlier_runs", [])]
    for n in sizes:
        report["results"].append(run_size(n, args))
        report["results"].sort(key=lambda r: r["n"])
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        report["verdicts"] = verdicts(report["results"])
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
