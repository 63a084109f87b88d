"""The informers (list, then watch from the list's version) and the Lease, against clients that play the API
server's answers and record the requests. What the real server does with them is tested on the local plane
(tests/integration, tests/reliability)."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest

from llmops.handlers import informers as informers_module
from llmops.handlers.informers import Index, Informer, Informers, Watched
from llmops.handlers.leader import Leader
from llmops.kube import ApiError


def obj(name: str, version: str, uid: str | None = None, **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns", "uid": uid or f"uid-{name}", "resourceVersion": version,
                         "labels": labels}}


def test_index_reads_each_key_as_the_values_of_every_object_that_gave_it():
    index = Index()
    index.put("a", {"k": 1, "only-a": 2})
    index.put("b", {"k": 3})
    assert index["k"] == (1, 3) and index.get("only-a") == (2,) and "k" in index
    index.put("a", {"k": 4})             # an update replaces what that object gave
    assert sorted(index["k"]) == [3, 4] and index.get("only-a") is None
    index.drop("b")
    assert dict(index.items()) == {"k": (4,)}
    index.put("a", None)
    assert len(index) == 0 and index.get("k", "none") == "none"


class StreamingKube:
    """Lists and watch streams as scripted: `lists` answers the GETs in turn, `streams` the watches (a list of
    events, or, for either, an exception to raise)."""

    def __init__(self, lists: list[Any], streams: list[Any]):
        self.lists = lists
        self.streams = streams
        self.requests: list[tuple[str, dict]] = []

    async def read(self, method: str, path: str, params: dict | None = None, body: Any = None,
                   keep: bool = False) -> dict:
        self.requests.append(("list", dict(params or {})))
        answer = self.lists.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return copy.deepcopy(answer)

    async def stream(self, path: str, params: dict, read_timeout: float):
        self.requests.append(("watch", dict(params)))
        if not self.streams:
            await asyncio.Event().wait()   # an idle stream: the test cancels it
        script = self.streams.pop(0)
        if isinstance(script, Exception):
            raise script
        for event in script:
            yield copy.deepcopy(event)


def listing(version: str, *items: dict) -> dict:
    return {"metadata": {"resourceVersion": version}, "items": list(items)}


class Seen:
    def __init__(self, index: Index | None = None):
        self.events: list[tuple[str | None, str, Any]] = []
        self.index = index

    def __call__(self, type: str | None, body: dict) -> None:
        # what the trigger saw in the (other) index at that moment: a reconcile reads it
        self.events.append((type, body["metadata"]["name"], self.index and dict(self.index.items())))


def watched(trigger, selector: str = "app=x") -> Watched:
    return Watched("v1", "ConfigMap", lambda body: {body["metadata"]["name"]: body["metadata"].get(
        "resourceVersion")}, selector, trigger)


def run(coro: Any, timeout: float = 2.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def until(condition, timeout: float = 1.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "not reached"
        await asyncio.sleep(0.01)


def test_no_trigger_before_every_resource_is_listed_and_listed_objects_carry_their_kind():
    children = watched(None)
    owners_seen = Seen(children.index)
    owners = Watched("llmops.dev/v1alpha1", "FineTune", lambda b: {"owner": b["metadata"]["name"]},
                     trigger=owners_seen)
    kube = StreamingKube([listing("10", obj("ft", "9")), listing("20", obj("child", "19"))], [])

    async def go():
        informers = Informers(kube, [owners, children], None)
        task = asyncio.create_task(informers.run())
        await informers.synced.wait()
        task.cancel()
    run(go())
    # the owner's trigger ran with the child already in its index
    assert owners_seen.events == [(None, "ft", {"child": ("19",)})]
    assert [r[0] for r in kube.requests[:2]] == ["list", "list"]
    assert {"labelSelector": "app=x"} in [r[1] for r in kube.requests]


def test_watch_resumes_from_the_last_version_seen_and_applies_events_to_the_index_before_triggering():
    seen = Seen()
    w = watched(seen)
    seen.index = w.index
    kube = StreamingKube([listing("10", obj("a", "5"), obj("b", "6"))], [
        [{"type": "MODIFIED", "object": obj("a", "11")}, {"type": "ADDED", "object": obj("c", "12")},
         {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "15"}}}],
        [{"type": "DELETED", "object": obj("b", "16")}],
    ])

    async def go():
        informers = Informers(kube, [w], None)
        task = asyncio.create_task(informers.run())
        await until(lambda: len(seen.events) == 5)
        task.cancel()
    run(go())
    assert seen.events == [
        (None, "a", {"a": ("5",), "b": ("6",)}), (None, "b", {"a": ("5",), "b": ("6",)}),
        ("MODIFIED", "a", {"a": ("11",), "b": ("6",)}), ("ADDED", "c", {"a": ("11",), "b": ("6",), "c": ("12",)}),
        ("DELETED", "b", {"a": ("11",), "c": ("12",)})]
    watches = [params for what, params in kube.requests if what == "watch"]
    assert [p["resourceVersion"] for p in watches[:3]] == ["10", "15", "16"]   # a bookmark moves it on too
    assert all(p["watch"] == "true" and p["allowWatchBookmarks"] == "true" and p["labelSelector"] == "app=x"
               for p in watches)


def test_an_expired_watch_lists_again_and_what_went_meanwhile_is_deleted(monkeypatch):
    seen = Seen()
    w = watched(seen)
    gone = {"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old resource version"}}
    kube = StreamingKube([listing("10", obj("a", "5"), obj("b", "6")), listing("30", obj("a", "25"))], [[gone]])

    async def go():
        task = asyncio.create_task(Informers(kube, [w], None).run())
        await until(lambda: len(seen.events) == 4)
        await until(lambda: len(kube.requests) == 4)   # then it watches from the new list's version
        task.cancel()
    run(go())
    assert seen.events[2:] == [("DELETED", "b", None), (None, "a", None)]
    assert dict(w.index.items()) == {"a": ("25",)}
    assert kube.requests[-1][0] == "watch" and kube.requests[-1][1]["resourceVersion"] == "30"


def test_a_failed_watch_backs_off_and_resumes_where_it_was(monkeypatch):
    monkeypatch.setattr(informers_module, "ERROR_BACKOFFS", (0,))
    seen = Seen()
    kube = StreamingKube([listing("10")], [ApiError(500, "boom"), [{"type": "ADDED", "object": obj("a", "11")}]])

    async def go():
        task = asyncio.create_task(Informers(kube, [watched(seen)], None).run())
        await until(lambda: seen.events)
        task.cancel()
    run(go())
    assert [p["resourceVersion"] for what, p in kube.requests if what == "watch"][:2] == ["10", "10"]



def test_a_resource_not_served_lists_as_none_and_is_watched_for_until_it_is(monkeypatch):
    """KubeRay not installed: its kinds' listings answer 404. The operator starts anyway (its resources can say what
    is missing), and once the CRD is there the watch starts with every object that exists."""
    monkeypatch.setattr(informers_module, "ERROR_BACKOFFS", (0,))
    seen = Seen()
    w = watched(seen)
    seen.index = w.index
    not_served = ApiError(404, "the server could not find the requested resource", "NotFound")
    kube = StreamingKube([not_served], [not_served, [{"type": "ADDED", "object": obj("a", "7")}]])

    async def go():
        informers = Informers(kube, [w], None)
        task = asyncio.create_task(informers.run())
        await informers.synced.wait()
        assert len(w.index) == 0
        await until(lambda: seen.events)
        task.cancel()
    run(go())
    assert seen.events == [("ADDED", "a", {"a": ("7",)})]
    assert [(what, p.get("resourceVersion")) for what, p in kube.requests][:3] == [("list", None), ("watch", ""),
                                                                                  ("watch", "")]

def test_one_informer_per_watched_namespace_or_one_for_all():
    w = watched(None)
    assert [i.path for i in Informers(None, [w], ["a", "b"]).informers] == [
        "/api/v1/namespaces/a/configmaps", "/api/v1/namespaces/b/configmaps"]
    assert Informer(None, Watched("ray.io/v1", "RayJob", dict), None).path == "/apis/ray.io/v1/rayjobs"


# ---- the Lease ------------------------------------------------------------------------------------------------
class LeaseServer:
    """One Lease with the API server's optimistic concurrency (a PUT of a stale resourceVersion conflicts), listed
    and watched by name as the API server serves it."""

    def __init__(self) -> None:
        self.lease: dict | None = None
        self.version = 0
        self.requests: list[tuple[str, str]] = []   # (verb, who)
        self.history: list[dict] = []               # every watch event so far
        self.changed = asyncio.Condition()

    def client(self, who: str) -> "LeaseClient":
        return LeaseClient(self, who)

    def store(self, body: dict) -> dict:
        self.version += 1
        event = "ADDED" if self.lease is None else "MODIFIED"
        self.lease = copy.deepcopy(body)
        self.lease["metadata"]["resourceVersion"] = str(self.version)
        self.lease["metadata"].setdefault("uid", "lease-uid")
        self.history.append({"type": event, "object": copy.deepcopy(self.lease)})
        asyncio.get_running_loop().create_task(self._notify())
        return copy.deepcopy(self.lease)

    def delete(self) -> None:
        self.version += 1
        gone, self.lease = self.lease, None
        gone["metadata"]["resourceVersion"] = str(self.version)
        self.history.append({"type": "DELETED", "object": gone})
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()


class LeaseClient:
    def __init__(self, server: LeaseServer, who: str):
        self.server, self.who, self.down = server, who, False

    async def read(self, method: str, path: str, params: dict | None = None, body: Any = None,
                   keep: bool = False) -> dict:
        if self.down:
            raise ApiError(503, "unavailable")
        server = self.server
        if method == "GET" and path.endswith("/leases"):   # the list, by name
            assert params == {"fieldSelector": "metadata.name=llmops"}, params
            server.requests.append(("LIST", self.who))
            return {"metadata": {"resourceVersion": str(server.version)},
                    "items": [copy.deepcopy(server.lease)] if server.lease else []}
        server.requests.append((method, self.who))
        if method == "GET":
            if server.lease is None:
                raise ApiError(404, "not found")
            return copy.deepcopy(server.lease)
        if method == "POST":
            if server.lease is not None:
                raise ApiError(409, "exists", "AlreadyExists")
            return server.store(body)
        if body["metadata"].get("resourceVersion") != server.lease["metadata"]["resourceVersion"]:
            raise ApiError(409, "conflict", "Conflict")
        return server.store(body)

    async def stream(self, path: str, params: dict, read_timeout: float):
        server = self.server
        assert params["fieldSelector"] == "metadata.name=llmops", params
        server.requests.append(("WATCH", self.who))
        seen = int(params["resourceVersion"])
        while True:
            for event in server.history[seen:]:
                seen += 1
                yield copy.deepcopy(event)
            async with server.changed:
                await server.changed.wait()


def leader(server: LeaseServer, who: str, lease: float = 0.3, renew: float = 0.05) -> Leader:
    return Leader(server.client(who), "llmops", "ns", who, lease_seconds=lease, renew_seconds=renew,
                  deadline_seconds=lease * 0.75, retry_seconds=renew)


def test_one_replica_leads_and_the_other_waits_while_it_renews():
    server = LeaseServer()

    async def go():
        a, b = leader(server, "a"), leader(server, "b")
        await a.acquire()
        keeping = asyncio.create_task(a.keep())
        waiting = asyncio.create_task(b.acquire())
        await asyncio.sleep(1.0)   # over three lease durations: a renews, b never takes over
        assert not waiting.done() and a.leading and not b.leading
        keeping.cancel()
        waiting.cancel()
    run(go())
    assert server.lease["spec"]["holderIdentity"] == "a"
    # the waiting replica looked once, then watched: no request of its own while a renewed it again and again
    assert [v for v, who in server.requests if who == "b"] == ["GET", "LIST", "WATCH"]
    renewals = [v for v, who in server.requests if who == "a"]
    assert renewals[0] == "GET" and renewals[1] == "POST" and set(renewals[2:]) == {"PUT"}   # no read to renew


def test_a_crashed_leader_is_replaced_once_its_record_went_unrenewed_for_a_lease_duration():
    server = LeaseServer()

    async def go():
        a, b = leader(server, "a"), leader(server, "b")
        await a.acquire()                      # then it crashes: no renewal, no release
        started = asyncio.get_running_loop().time()
        await b.acquire()
        return asyncio.get_running_loop().time() - started
    took = run(go())
    assert 0.3 <= took < 1.0
    assert server.lease["spec"]["holderIdentity"] == "b" and server.lease["spec"]["leaseTransitions"] == 1


def test_a_graceful_stop_releases_the_lease_and_the_other_takes_over_at_once():
    server = LeaseServer()

    async def go():
        a, b = leader(server, "a"), leader(server, "b", renew=0.05, lease=30)
        await a.acquire()
        waiting = asyncio.create_task(b.acquire())
        await asyncio.sleep(0.1)
        await a.release()
        await asyncio.wait_for(waiting, 0.5)   # far sooner than the 30 s lease
        assert b.leading and not a.leading
    run(go())


def test_a_waiting_replica_whose_watch_shows_the_lease_deleted_creates_it_and_leads():
    server = LeaseServer()

    async def go():
        a, b = leader(server, "a", lease=30), leader(server, "b", lease=30)
        await a.acquire()
        waiting = asyncio.create_task(b.acquire())
        await until(lambda: ("WATCH", "b") in server.requests)
        server.delete()   # by hand, say: nobody holds it now
        await asyncio.wait_for(waiting, 0.5)   # far sooner than the 30 s lease
        assert b.leading
    run(go())
    assert server.lease["spec"]["holderIdentity"] == "b"
    assert [v for v, who in server.requests if who == "b"] == ["GET", "LIST", "WATCH", "POST"]


def test_a_waiting_replica_rides_out_an_api_server_that_does_not_answer_for_a_while():
    server = LeaseServer()

    async def go():
        a, b = leader(server, "a"), leader(server, "b")
        await a.acquire()                      # then it crashes: no renewal, no release
        b.kube.down = True
        waiting = asyncio.create_task(b.acquire())
        await asyncio.sleep(0.5)               # past the lease duration: b tries, and is not answered
        assert not waiting.done() and not b.leading
        b.kube.down = False
        await asyncio.wait_for(waiting, 1.0)
        assert b.leading
    run(go(), timeout=3.0)
    assert server.lease["spec"]["holderIdentity"] == "b"


def test_a_replica_not_allowed_to_watch_the_lease_reads_it_at_intervals_instead():
    server = LeaseServer()

    class Unwatchable(LeaseClient):   # a Role without list and watch on the Lease
        async def read(self, method: str, path: str, params: dict | None = None, body: Any = None,
                       keep: bool = False) -> dict:
            if path.endswith("/leases") and method == "GET":
                raise ApiError(403, "leases is forbidden", "Forbidden")
            return await super().read(method, path, params, body)

    async def go():
        a = leader(server, "a")
        b = Leader(Unwatchable(server, "b"), "llmops", "ns", "b", lease_seconds=0.3, renew_seconds=0.05,
                   deadline_seconds=0.2, retry_seconds=0.05)
        await a.acquire()
        await b.acquire()   # a never renews: b takes over once the record has stood for a lease duration
        assert b.leading
    run(go())
    assert len([v for v, who in server.requests if who == "b" and v == "GET"]) > 3


def test_a_leader_that_cannot_renew_until_its_deadline_stops_leading_before_anyone_takes_over():
    server = LeaseServer()

    async def go():
        a = leader(server, "a")
        await a.acquire()
        a.kube.down = True
        started = asyncio.get_running_loop().time()
        await a.keep()                          # returns: leadership lost
        return asyncio.get_running_loop().time() - started
    took = run(go())
    assert took < 0.3   # the deadline comes before the lease duration others wait out


def test_a_leader_whose_lease_was_taken_stops_leading():
    server = LeaseServer()

    async def go():
        a = leader(server, "a")
        await a.acquire()
        taken = copy.deepcopy(server.lease)
        taken["spec"]["holderIdentity"] = "intruder"
        taken["spec"]["renewTime"] = "later"
        server.store(taken)
        await a.keep()
        assert not a.leading
    run(go())


@pytest.mark.parametrize("env, expected", [({"POD_NAMESPACE": "ops"}, "ops"), ({}, "default")])
def test_the_lease_namespace_comes_from_the_flag_then_the_pod(monkeypatch, env, expected):
    from llmops.handlers import main
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(main, "SERVICE_ACCOUNT_NAMESPACE", main.Path("/nonexistent"))
    assert main.lease_namespace({"lease_namespace": "flag"}) == "flag"
    assert main.lease_namespace({}) == expected


def test_a_watch_refused_as_gone_lists_again_rather_than_retrying_the_same_version():
    class GoneKube(StreamingKube):
        async def stream(self, path, params, read_timeout):
            self.requests.append(("watch", dict(params)))
            if params["resourceVersion"] == "10":
                raise ApiError(410, "too old resource version", "Expired")
            await asyncio.Event().wait()
            yield {}

    seen = Seen()
    kube = GoneKube([listing("10", obj("a", "5")), listing("20", obj("a", "15"))], [])

    async def go():
        task = asyncio.create_task(Informers(kube, [watched(seen)], None).run())
        await until(lambda: len(kube.requests) == 4)
        task.cancel()
    run(go())
    assert [(what, p.get("resourceVersion")) for what, p in kube.requests] == [
        ("list", None), ("watch", "10"), ("list", None), ("watch", "20")]


def test_an_operator_that_loses_the_lease_stops_writing_and_exits_non_zero():
    import kopf

    from llmops.handlers import main

    class Closing:
        closed = False

        async def close(self):
            self.closed = True

    class Engine:
        kube = Closing()

    class LosingLeader:
        async def acquire(self):
            pass

        async def keep(self):   # renewing failed: leadership lost at once
            pass

    class Watching:
        cancelled = False

        async def run(self):
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                Watching.cancelled = True
                raise

    async def go():
        memo = kopf.Memo(stop=asyncio.Event(), outcome={"exit_code": 0})
        await main.operate(Engine(), Watching(), LosingLeader(), memo)
        await asyncio.sleep(0)
        return memo
    memo = run(go())
    assert memo.stop.is_set() and memo.outcome["exit_code"] == 1
    assert Engine.kube.closed and Watching.cancelled
