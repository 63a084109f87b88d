"""What the bench measures: CPU and memory from /proc, the API server's audit log, watches on this side's clock,
statistics."""

from __future__ import annotations

import asyncio
import collections
import datetime
import json
import math
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import aiohttp

CLK = os.sysconf("SC_CLK_TCK")
AGENTS = {"llmops-operator": "llmops", "kopf/": "kopf", "kuberay-operator": "kuberay", "ray-operator": "kuberay"}
# Every request our operator process makes, whatever its user agent: it runs as its own ServiceAccount
# (plane.operator_kubeconfig), and a request of that user with neither of our two agents is "operator-other".
OPERATOR = ("llmops", "kopf", "operator-other")
SYNC_PREFIX = "llmops-bench-sync-"   # a name the bench GETs to know the audit log holds everything before it
WRITE_VERBS = ("create", "update", "patch", "delete", "deletecollection")
CREATE_CONCURRENCY = 32
REPEAT_MAX_N = 100   # --repeat applies to bursts this small: a second-long burst is what the machine's noise moves
# Issue targets; the verdicts (report.py) name each by the key its value is written under.
TARGETS = {
    "p99_rayjob_n100_s": 1.0,                 # creation -> RayJob, median p99 of the N=100 bursts
    "all_children_p99_s_n100": 1.0,           # creation -> every child, median p99 of the N=100 bursts
    "ratio_all_children_n1000": 0.5,          # ours every child of every FineTune / KubeRay every RayCluster
    "idle_requests_per_min_n1000": 1.0,       # every request of the operator process, in total
    "idle_window_min_s": 600.0,               # ... judged over at least this long
    "restart_new_rayjob_s_n5000": 3.0,
    "rss_ratio_n5000": 1.0,                   # our peak RSS / KubeRay's, same run
    "peak_rss_mb": 250.0,
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

    def __init__(self, path: Path, operator_user: str = ""):
        super().__init__(daemon=True)
        self.path = path
        self.operator_user = operator_user
        self.synced: set[str] = set()
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
        if SYNC_PREFIX.encode() in line:
            self.synced.add(json.loads(line).get("objectRef", {}).get("name", ""))
            return
        if not any(a.encode() in line for a in AGENTS) and \
                not (self.operator_user and self.operator_user.encode() in line):
            return
        e = json.loads(line)
        agent = classify(e.get("userAgent", ""), (e.get("user") or {}).get("username", ""), self.operator_user)
        if agent is None or e["auditID"] in self.seen:
            return
        ua = e.get("userAgent", "")
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

    def sync(self, get: Callable[[str], Any], timeout: float = 60.0) -> None:
        """GET a unique name (`get(name)`, a 404 is fine) and wait until its audit record is read: every request
        that was answered before it is then in self.records."""
        name = f"{SYNC_PREFIX}{time.time_ns()}"
        get(name)
        wait_until(lambda: name in self.synced, timeout, "the audit log to catch up")

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


def classify(user_agent: str, username: str, operator_user: str) -> str | None:
    """Which counted agent made a request: by user agent, and every request of the operator's user as ours."""
    agent = next((v for k, v in AGENTS.items() if user_agent.startswith(k)), None)
    if operator_user and username == operator_user:
        return agent if agent in OPERATOR else "operator-other"
    return agent


def by_verb(records: list[tuple]) -> dict[str, int]:
    out: dict[str, int] = collections.Counter()
    for r in records:
        out[f"{r[1]}: {r[3]} {r[4]}{'/' + r[5] if r[5] else ''}"] += 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def first_requests(records: list[tuple], pattern: str, verb_resource: tuple[str, str] | None = None
                   ) -> dict[str, float]:
    """Owner name -> when the first request about it (or the first `verb resource` about it) arrived."""
    name_of = re.compile(pattern)
    out: dict[str, float] = {}
    for r in records:
        m = name_of.match(r[7])
        if m and (verb_resource is None or (r[3], r[4]) == verb_resource):
            out.setdefault(m.group(1), r[0])
    return out


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


class FirstSeen:
    """(kind, name) -> when a watch first brought the object: one instance takes the events of every child kind."""

    def __init__(self):
        self.at: dict[tuple[str, str], float] = {}

    def handler(self, kind: str) -> Callable[[str, dict, float], None]:
        def seen(type_: str, obj: dict, at: float) -> None:
            if type_ != "DELETED":
                self.at.setdefault((kind, obj["metadata"]["name"]), at)
        return seen


# ---- statistics ---------------------------------------------------------------------------------------------
def quantiles(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"count": 0, "p50": None, "p99": None, "max": None}
    v = sorted(values)
    pick = lambda q: v[min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))]  # noqa: E731 (nearest rank)
    return {"count": len(v), "p50": round(pick(0.5), 3), "p99": round(pick(0.99), 3), "max": round(v[-1], 3)}


def complete_at(expected: dict[str, list[tuple[str, str]]], seen: dict[tuple[str, str], float]
                ) -> dict[str, float]:
    """Owner -> when the last of its expected children was first seen, for owners whose children all were."""
    out = {}
    for owner, children in expected.items():
        times = [seen.get(child) for child in children]
        if children and all(t is not None for t in times):
            out[owner] = max(times)
    return out


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
