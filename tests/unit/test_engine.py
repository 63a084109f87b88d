"""The reconcile engine in process: the real reconcilers and builders, a client that records every request, and
watches played by the informers' own index entries (handlers/main.py, handlers/caches.py). No API server: what is checked here
is the engine's own logic (what it writes, when, in which order, and what it leaves alone)."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import functools
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmops.builders import finetune as finetune_builder
from llmops.builders.common import ROLE_LABEL, BuildContext
from llmops.handlers import main
from llmops.handlers import engine as engine_module
from llmops.handlers.engine import Engine, Outcome
from llmops.builders.common import load_payloads
from llmops.kube import ApiError, with_retries
from llmops.settings import Settings
from llmops.status import Verdict

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "viggo"
PAYLOADS = load_payloads()


class RecordingKube:
    """An object store that records every request; `fail` makes the next matching writes raise."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.requests: list[tuple[str, str, str]] = []   # (verb, kind, name)
        self.fail: dict[tuple[str, ...], list[ApiError]] = {}   # (verb, kind[, name]) -> errors to raise, in order
        self.version = 0
        self.apis: dict[str, dict[str, Any]] = {}   # group/version -> its discovery document (absent: 404)
        self.created: list[dict[str, Any]] = []   # what create() was given (Events)

    def _check(self, verb: str, kind: str, name: str) -> None:
        self.requests.append((verb, kind, name))
        errors = self.fail.get((verb, kind, name)) or self.fail.get((verb, kind))
        if errors:
            raise errors.pop(0)

    def _stamp(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        return copy.deepcopy(obj)

    def add(self, obj: dict[str, Any]) -> dict[str, Any]:
        """An object a user (or another controller) wrote."""
        obj = copy.deepcopy(obj)
        meta = obj["metadata"]
        meta.setdefault("uid", f"uid-{meta['name']}")
        meta.setdefault("generation", 1)
        self.objects[(obj["kind"], meta["namespace"], meta["name"])] = obj
        return self._stamp(obj)

    async def apply(self, obj: dict[str, Any], subresource: str = "") -> dict[str, Any]:
        meta = obj["metadata"]
        self._check("apply", obj["kind"], meta["name"])
        key = (obj["kind"], meta["namespace"], meta["name"])
        stored = copy.deepcopy(obj)
        if key in self.objects:   # server-side apply keeps what others own: here, the status
            stored["status"] = self.objects[key].get("status")
            stored["metadata"]["uid"] = self.objects[key]["metadata"]["uid"]
        else:
            stored["metadata"]["uid"] = f"uid-{obj['kind']}-{meta['name']}"
        self.objects[key] = stored
        return self._stamp(stored)

    async def apply_status(self, api_version: str, kind: str, namespace: str, name: str,
                           status: dict[str, Any]) -> dict[str, Any]:
        self._check("status", kind, name)
        stored = self.objects[(kind, namespace, name)]
        stored["status"] = copy.deepcopy(status)
        return self._stamp(stored)

    async def request(self, method: str, path: str, *_: Any, **__: Any) -> dict[str, Any]:
        """Only discovery reads come this way."""
        assert method == "GET" and path.startswith("/apis/"), (method, path)
        self.requests.append(("get", "discovery", path))
        if path[len("/apis/"):] not in self.apis:
            raise ApiError(404, "the server could not find the requested resource", "NotFound")
        return self.apis[path[len("/apis/"):]]

    async def find(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        self.requests.append(("get", kind, name))
        found = self.objects.get((kind, namespace, name))
        return copy.deepcopy(found) if found else None

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        self._check("create", obj["kind"], obj["metadata"].get("name", obj["metadata"].get("generateName", "")))
        self.created.append(obj)
        return obj

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        self._check("delete", kind, name)
        self.objects.pop((kind, namespace, name), None)

    def writes(self) -> list[tuple[str, str, str]]:
        return [r for r in self.requests if r[0] != "get"]

    def take(self) -> list[tuple[str, str, str]]:
        done, self.requests = self.writes(), []
        return done


class Watches:
    """What the informers' indexes would hold for the store's objects: the operator's own wiring (which resource
    gives which entries, handlers/main.py) applied to the store."""

    def __init__(self, kube: RecordingKube, engine: Engine):
        self.kube = kube
        self.engine = engine
        self.catch_up()

    def catch_up(self) -> None:
        """Every index rebuilt from the store."""
        watches = main.watched(self.engine)
        by_kind = {w.kind: w for w in watches}
        for (kind, _, _), obj in self.kube.objects.items():
            labels = obj["metadata"].get("labels") or {}
            if kind in by_kind and (kind != "ConfigMap" or ROLE_LABEL in labels):
                by_kind[kind].index.put(obj["metadata"]["uid"], by_kind[kind].entries(obj))


def manifest(name: str) -> dict[str, Any]:
    return yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())


def setup(*docs: dict[str, Any], kube: RecordingKube | None = None) -> tuple[Engine, RecordingKube, Watches]:
    kube = kube or RecordingKube()
    engine = Engine(kube, BuildContext(settings=Settings(), payloads=PAYLOADS))
    watches = Watches(kube, engine)
    for doc in docs:
        kube.add(doc)
    watches.catch_up()
    return engine, kube, watches


def key_of(doc: dict[str, Any]) -> tuple[str, str, str]:
    return doc["kind"], doc["metadata"]["namespace"], doc["metadata"]["name"]


@pytest.fixture(autouse=True)
def loop():
    """One event loop per test, as the operator has one for its lifetime (the engine's timers live on it)."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield loop
    loop.close()
    asyncio.set_event_loop(None)


def run(coro: Any) -> Any:
    return asyncio.get_event_loop().run_until_complete(coro)


def test_first_reconcile_writes_each_child_once_ray_object_first_marker_last_then_status():
    ft = manifest("finetune")
    engine, kube, watches = setup(ft)
    run(engine.reconcile(key_of(ft)))
    writes = kube.writes()
    applies = [w for w in writes if w[0] == "apply"]
    assert applies[0] == ("apply", "RayJob", "viggo-ft") or applies[1] == ("apply", "RayJob", "viggo-ft")
    assert applies[-1][1] == "ConfigMap" and applies[-1][2].endswith("-result"), applies   # the marker
    assert len(applies) == len(set(applies)), "a child was applied twice"
    statuses = [i for i, w in enumerate(writes) if w[0] == "status"]
    assert statuses and min(statuses) > writes.index(applies[-1]), "status went out before the children"
    assert ("create", "Event", "viggo.") in writes   # phase changed: one event


class SlowKube(RecordingKube):
    """Each apply takes a moment, as over a network: the reconciles of a burst overlap."""

    async def apply(self, obj: dict[str, Any], subresource: str = "") -> dict[str, Any]:
        await asyncio.sleep(0.02)
        return await super().apply(obj, subresource)


def finetunes(*names: str) -> list[dict[str, Any]]:
    """The example FineTune under each name."""
    out = []
    for name in names:
        ft = manifest("finetune")
        ft["metadata"]["name"] = name
        out.append(ft)
    return out


def test_in_a_burst_every_child_is_written_before_any_status():
    fts = finetunes(*(f"ft-{i}" for i in range(6)))
    engine, kube, _ = setup(*fts, kube=SlowKube())

    async def burst() -> None:
        # The first one's Ray object is created and its other children applied when the rest come: its status is
        # due while their children are being applied.
        engine.schedule(key_of(fts[0]))
        await asyncio.sleep(0.13)
        for ft in fts[1:]:
            engine.schedule(key_of(ft))
        await engine.idle()
    run(burst())
    writes = kube.writes()
    children = [i for i, w in enumerate(writes) if w[0] == "apply"]
    statuses = [i for i, w in enumerate(writes) if w[0] in ("status", "create")]
    assert len(children) == 6 * 6 + 1 and len(statuses) == 6 * 2, writes
    assert max(children) < min(statuses), writes


def test_a_status_due_during_a_creation_waits_for_the_rest_of_that_set():
    """The creations and the other children's rounds go quiet at the same moment: a status waiting on the first
    still goes out after the rounds that moment releases."""
    a, b = finetunes("ft-a", "ft-b")
    engine, kube, watches = setup(a, b, kube=SlowKube())
    run(engine.reconcile(key_of(a)))
    kube.objects[key_of(a)]["status"] = {}   # cleared by someone: a's status is due again, its children are not
    watches.catch_up()
    kube.take()

    async def burst() -> None:
        engine.schedule(key_of(b))
        await asyncio.sleep(0.005)   # b's Ray object is being created
        engine.schedule(key_of(a))
        await engine.idle()
    run(burst())
    writes = kube.writes()
    assert [w for w in writes if w[2] == "ft-a"] == [("status", "FineTune", "ft-a")], writes
    assert writes.index(("status", "FineTune", "ft-a")) > max(i for i, w in enumerate(writes) if w[0] == "apply")


def test_a_start_reconciles_what_needs_work_before_what_its_listing_brought():
    fts = finetunes(*(f"ft-{i}" for i in range(4)))
    engine, kube, _ = setup(*fts)

    async def start() -> None:
        for ft in fts[:3]:
            engine.schedule(key_of(ft), listed=True)   # at rest, as far as this test is concerned
        engine.schedule(key_of(fts[3]))
        await engine.idle()
    run(start())
    firsts = list(dict.fromkeys(w[2] for w in kube.writes() if w[0] == "apply" and w[1] == "RayJob"))
    assert firsts == ["ft-3-ft", "ft-0-ft", "ft-1-ft", "ft-2-ft"]


def test_reconcile_after_the_watch_caught_up_writes_nothing():
    ft = manifest("finetune")
    engine, kube, watches = setup(ft)
    run(engine.reconcile(key_of(ft)))
    watches.catch_up()
    kube.take()
    for _ in range(3):
        run(engine.reconcile(key_of(ft)))
    assert kube.writes() == []


def test_reconcile_before_the_watch_shows_our_writes_writes_nothing():
    """The expectations: the children and status this process wrote count as written until the watch shows them."""
    ft = manifest("finetune")
    engine, kube, watches = setup(ft)
    run(engine.reconcile(key_of(ft)))
    kube.take()
    run(engine.reconcile(key_of(ft)))   # the caches still show no RayJob and the old status
    assert kube.writes() == []


def applied_once() -> tuple[dict[str, Any], RecordingKube]:
    """A FineTune whose children and status one operator process wrote; the requests so far taken."""
    ft = manifest("finetune")
    engine, kube, _ = setup(ft)
    run(engine.reconcile(key_of(ft)))
    kube.take()
    return ft, kube


def restarted(kube: RecordingKube, monkeypatch: pytest.MonkeyPatch, built: list, fingerprint: str = "") -> Engine:
    """A new operator process on the same cluster: nothing remembered, the caches listed afresh; FineTune builds
    counted in `built`. `fingerprint`: as another version of the operator's code would have."""
    engine, _, _ = setup(kube=kube)
    if fingerprint:
        engine.ctx.__dict__["fingerprint"] = fingerprint
    real = finetune_builder.build
    monkeypatch.setattr(finetune_builder, "build", lambda *args: built.append(args) or real(*args))
    return engine


def test_a_restart_builds_nothing_the_marker_says_was_applied_as_it_would_build_it(monkeypatch):
    ft, kube = applied_once()
    built: list = []
    run(restarted(kube, monkeypatch, built).reconcile(key_of(ft)))
    assert built == [] and kube.writes() == []


def test_a_changed_operator_builds_again_and_marks_an_unchanged_set_once(monkeypatch):
    ft, kube = applied_once()
    built: list = []
    newer = restarted(kube, monkeypatch, built, fingerprint="newer")
    run(newer.reconcile(key_of(ft)))
    assert len(built) == 1 and kube.take() == [("apply", "ConfigMap", "viggo-ft-result")]
    run(newer.reconcile(key_of(ft)))
    assert len(built) == 1 and kube.writes() == [], "remembered in process"
    built = []
    run(restarted(kube, monkeypatch, built, fingerprint="newer").reconcile(key_of(ft)))
    assert built == [] and kube.writes() == [], "read from the marker after the next start"


def test_our_writes_coming_back_are_echoes_and_others_are_not():
    ft = manifest("finetune")
    engine, kube, watches = setup(ft)
    run(engine.reconcile(key_of(ft)))
    rayjob = kube.objects[("RayJob", "default", "viggo-ft")]
    assert engine.is_echo(rayjob)
    assert not engine.is_echo(rayjob), "an echo is consumed once"
    kube._stamp(rayjob)   # someone else wrote it since
    assert not engine.is_echo(rayjob)


def test_crash_between_writes_applies_the_set_again_and_marks_it_last(monkeypatch):
    monkeypatch.setattr(engine_module, "with_retries", functools.partial(with_retries, first_delay=0))
    ft = manifest("finetune")
    engine, kube, watches = setup(ft)
    config = "viggo-ft-config"
    kube.fail[("apply", "ConfigMap", config)] = [ApiError(503, "the server is unavailable")] * 10   # outlasts retries
    retry = run(engine.reconcile(key_of(ft)))
    assert retry is not None and retry > 0
    assert ("RayJob", "default", "viggo-ft") in kube.objects
    results = [k for k in kube.objects if k[0] == "ConfigMap" and k[2].endswith("-result")]
    assert results == [], "the marker must not be written when the set is incomplete"
    kube.fail.clear()
    watches.catch_up()
    kube.take()
    run(engine.reconcile(key_of(ft)))
    applies = [w for w in kube.writes() if w[0] == "apply"]
    assert applies and applies[-1][2].endswith("-result")
    watches.catch_up()
    kube.take()
    run(engine.reconcile(key_of(ft)))
    assert kube.writes() == []


@pytest.mark.parametrize("name, ray_kind, ray_name", [("finetune", "RayJob", "viggo-ft"),
                                                       ("llmservice", "RayService", "viggo-serve-llm")])
def test_refused_child_is_stalled_and_not_retried_until_the_inputs_change(name, ray_kind, ray_name):
    doc = manifest(name)
    engine, kube, watches = setup(doc)
    kube.fail[("apply", ray_kind)] = [ApiError(422, "spec: Invalid value", "Invalid")]
    assert run(engine.reconcile(key_of(doc))) is None
    status = kube.objects[key_of(doc)]["status"]
    assert status["phase"] == "Failed"
    stalled = next(c for c in status["conditions"] if c["type"] == "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "ApplyFailed"
    watches.catch_up()
    kube.take()
    run(engine.reconcile(key_of(doc)))
    assert kube.writes() == [], "the same refused request was sent again"
    changed = kube.objects[key_of(doc)]
    changed["spec"]["resources" if name == "finetune" else "engine"] = (
        {**changed["spec"]["resources"], "workers": 2} if name == "finetune" else {"maxModelLen": 4096})
    changed["metadata"]["generation"] = 2
    kube._stamp(changed)
    watches.catch_up()
    run(engine.reconcile(key_of(doc)))
    assert ("apply", ray_kind, ray_name) in kube.writes()



def outdated(api_version: str, kind: str, name: str, field: str) -> ApiError:
    """What the API server answers a server-side apply that sets a field the installed CRD lacks."""
    return ApiError(500, f"failed to create typed patch object (default/{name}; {api_version}, Kind={kind}): "
                         f"{field}: field not declared in schema")


def test_a_child_crd_older_than_the_operator_stalls_naming_it_and_is_retried():
    doc = manifest("finetune")
    engine, kube, watches = setup(doc)
    kube.fail[("apply", "RayJob")] = [outdated("ray.io/v1", "RayJob", "viggo-ft", ".spec.backoffLimit")] * 2
    assert run(engine.reconcile(key_of(doc))) is not None, "retried: a CRD upgrade fixes it with no change here"
    assert [r for r in kube.requests if r[1] == "RayJob"] == [("apply", "RayJob", "viggo-ft")], "sent once, not retried at once"
    stalled = next(c for c in kube.objects[key_of(doc)]["status"]["conditions"] if c["type"] == "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "CRDOutdated"
    assert "ray.io/v1 RayJob" in stalled["message"] and ".spec.backoffLimit" in stalled["message"]
    assert "KubeRay" in stalled["message"]
    watches.catch_up()
    assert run(engine.reconcile(key_of(doc))) is not None
    watches.catch_up()   # the CRD upgraded: the next try goes through
    assert run(engine.reconcile(key_of(doc))) is None
    assert ("apply", "RayJob", "viggo-ft") in kube.writes()
    watches.catch_up()
    run(engine.reconcile(key_of(doc)))
    stalled = next(c for c in kube.objects[key_of(doc)]["status"]["conditions"] if c["type"] == "Stalled")
    assert stalled["status"] == "False"



@pytest.mark.parametrize("message, reason, fix", [
    ('rayjobs.ray.io "viggo-ft" is forbidden: exceeded quota: jobs, requested: count/rayjobs.ray.io=1, used: '
     "count/rayjobs.ray.io=2, limited: count/rayjobs.ray.io=2", "QuotaExceeded", "free or raise the quota"),
    ('rayjobs.ray.io "viggo-ft" is forbidden: status unknown for quota: jobs, resources: count/rayjobs.ray.io',
     "QuotaExceeded", "free or raise the quota"),
    ('rayjobs.ray.io "viggo-ft" is forbidden: User "system:serviceaccount:llmops:llmops" cannot patch resource '
     '"rayjobs" in API group "ray.io" in the namespace "default"', "Forbidden", "grant its ServiceAccount"),
], ids=["over-quota", "quota-not-counted-yet", "rbac"])
def test_a_refusal_that_a_change_elsewhere_ends_stalls_and_is_retried_until_it_passes(message, reason, fix):
    """Not the ApplyFailed of a refused spec (never sent again until the spec changes): a quota frees or is raised,
    a role is granted, with no change to the resource."""
    doc = manifest("finetune")
    engine, kube, watches = setup(doc)
    kube.fail[("apply", "RayJob")] = [ApiError(403, message, "Forbidden")]
    assert run(engine.reconcile(key_of(doc))) is not None
    status = kube.objects[key_of(doc)]["status"]
    stalled = next(c for c in status["conditions"] if c["type"] == "Stalled")
    assert (status["phase"], stalled["status"], stalled["reason"]) == ("Pending", "True", reason)
    assert message in stalled["message"] and fix in stalled["message"]
    watches.catch_up()
    assert run(engine.reconcile(key_of(doc))) is None
    assert ("apply", "RayJob", "viggo-ft") in kube.writes()


def test_kuberay_not_installed_stalls_naming_it_and_is_retried():
    doc = manifest("finetune")
    engine, kube, watches = setup(doc)
    not_served = ApiError(404, "the server could not find the requested resource", "NotFound")
    not_served.missing = ("ray.io/v1", "RayJob")   # what Kube.apply adds to a 404
    kube.fail[("apply", "RayJob")] = [not_served]
    assert run(engine.reconcile(key_of(doc))) is not None
    stalled = next(c for c in kube.objects[key_of(doc)]["status"]["conditions"] if c["type"] == "Stalled")
    assert stalled["reason"] == "CRDMissing" and "does not serve ray.io/v1 RayJob: install KubeRay" in stalled["message"]
    watches.catch_up()
    assert run(engine.reconcile(key_of(doc))) is None
    assert ("apply", "RayJob", "viggo-ft") in kube.writes()


def test_errors_that_keep_coming_before_the_job_starts_are_said_in_the_status(monkeypatch):
    """A failing webhook or an overloaded API server: retried with back-off as before, and from the third failure in
    a row the status says why (before, a resource not yet started showed nothing at all)."""
    monkeypatch.setattr(engine_module, "with_retries", functools.partial(with_retries, first_delay=0))
    doc = manifest("finetune")
    engine, kube, watches = setup(doc)
    webhook = ApiError(500, 'Internal error occurred: failed calling webhook "policy.example.com": failed to call '
                            'webhook: service "policy" not found', "InternalError")
    kube.fail[("apply", "RayJob")] = [webhook] * 12   # outlasts the client's own retries, three times
    for _ in range(2):
        assert run(engine.reconcile(key_of(doc))) is not None
        watches.catch_up()
    assert "status" not in kube.objects[key_of(doc)], "one or two failures in a row are not news"
    assert run(engine.reconcile(key_of(doc))) >= 4
    status = kube.objects[key_of(doc)]["status"]
    reconciling = next(c for c in status["conditions"] if c["type"] == "Reconciling")
    assert (status["phase"], reconciling["status"], reconciling["reason"]) == ("Pending", "True", "RetryingAfterErrors")
    assert 'failed calling webhook "policy.example.com"' in reconciling["message"]
    kube.fail.clear()
    watches.catch_up()
    assert run(engine.reconcile(key_of(doc))) is None
    watches.catch_up()
    run(engine.reconcile(key_of(doc)))
    assert kube.objects[key_of(doc)]["status"]["conditions"][0]["reason"] != "RetryingAfterErrors"

def test_its_own_crd_older_than_the_operator_is_told_by_one_event():
    """The status cannot say it (the status write is what fails): an Event does, once while it lasts."""
    doc = manifest("finetune")
    engine, kube, watches = setup(doc)
    kube.fail[("status", "FineTune")] = [outdated("llmops.dev/v1alpha1", "FineTune", "viggo", ".status.newField")] * 6
    for _ in range(3):
        assert run(engine.reconcile(key_of(doc))) is not None
        watches.catch_up()
    [event] = kube.created
    assert event["type"] == "Warning" and event["reason"] == "CRDOutdated"
    assert "llmops.dev/v1alpha1 FineTune" in event["message"] and ".status.newField" in event["message"]
    assert "apply the CRDs of this operator's version" in event["message"]
    assert "status" not in kube.objects[key_of(doc)]


def test_a_burst_of_triggers_costs_at_most_two_reconciles():
    calls: list[int] = []
    gate = asyncio.Event()

    def slow_kind(observation: Any, ctx: BuildContext) -> Outcome:
        calls.append(1)
        return Outcome([], Verdict("Pending", "progressing", "Waiting", "waiting"))

    async def scenario() -> None:
        engine, kube, watches = setup({"apiVersion": "llmops.dev/v1alpha1", "kind": "FineTune",
                                       "metadata": {"name": "a", "namespace": "default"}, "spec": {}})
        original = engine.reconcile

        async def held(key):
            await gate.wait()
            return await original(key)
        engine.kinds["FineTune"] = dataclasses.replace(engine.kinds["FineTune"], decide=slow_kind)
        engine.reconcile = held
        key = ("FineTune", "default", "a")
        engine.schedule(key)
        await asyncio.sleep(0)   # the first run has started (it reads the caches after this point)
        for _ in range(50):
            engine.schedule(key)
        gate.set()
        await engine.idle()

    run(scenario())
    assert len(calls) == 2


def test_invalid_spec_is_stalled_with_the_field_named_and_creates_nothing():
    ft = manifest("finetune")
    ft["spec"]["training"]["epochs"] = -1
    engine, kube, watches = setup(ft)
    run(engine.reconcile(key_of(ft)))
    assert [w for w in kube.writes() if w[0] == "apply"] == []
    status = kube.objects[key_of(ft)]["status"]
    assert status["phase"] == "Failed" and "spec.training.epochs" in status["message"]


def test_batch_inference_waits_for_its_finetune_and_writes_no_ray_object():
    doc = manifest("batchinference")
    engine, kube, watches = setup(manifest("finetune"), doc)
    run(engine.reconcile(key_of(doc)))
    assert [w for w in kube.writes() if w[0] == "apply"] == []
    status = kube.objects[key_of(doc)]["status"]
    assert status["phase"] == "Waiting" and "FineTune viggo" in status["message"]
    assert engine.caches.refs.all(("FineTune", "default", "viggo")) == [key_of(doc)]


def test_service_serves_the_base_while_its_adapter_waits_for_the_finetune():
    doc = manifest("llmservice")
    engine, kube, watches = setup(manifest("finetune"), doc)
    run(engine.reconcile(key_of(doc)))
    service = kube.objects[("RayService", "default", "viggo-serve-llm")]
    llm_config = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]["llm_configs"][0]
    assert "lora_config" not in llm_config, "an adapter that does not exist yet was configured"
    status = kube.objects[key_of(doc)]["status"]
    assert "0/1 adapters served" in status["message"] and "WaitingForFineTune" in status["message"]
    assert engine.caches.refs.all(("FineTune", "default", "viggo")) == [key_of(doc)]


READY_CONDITION = {"type": "Ready", "status": "True", "reason": "Succeeded", "message": "done"}


@pytest.mark.parametrize("status, bi_reason, adapter_state", [
    ({"phase": "Succeeded", "conditions": [READY_CONDITION],
      "adapter": {"uri": "s3://llmops-demo/adapters/viggo", "rank": 8}}, None, "Serving"),
    ({"phase": "Succeeded", "conditions": [READY_CONDITION]}, "FineTuneFailed", "Failed"),
    ({"phase": "Failed", "message": "out of memory"}, "FineTuneFailed", "Failed"),
    ({"phase": "Running", "message": "Training: step 3/10"}, "WaitingForFineTune", "WaitingForFineTune"),
    ({"phase": "Succeeded", "conditions": [{**READY_CONDITION, "status": "False"}],
      "adapter": {"uri": "s3://llmops-demo/adapters/viggo"}}, "WaitingForFineTune", "WaitingForFineTune"),
])
def test_batch_inference_and_service_judge_a_finetune_alike(status, bi_reason, adapter_state):
    ft = {**manifest("finetune"), "status": status}
    bi, svc = manifest("batchinference"), manifest("llmservice")
    svc["spec"]["adapters"] = [{k: v for k, v in a.items() if k != "gate"} for a in svc["spec"]["adapters"]]
    engine, kube, watches = setup(ft, bi, svc)
    run(engine.reconcile(key_of(bi)))
    run(engine.reconcile(key_of(svc)))
    bi_status, svc_status = kube.objects[key_of(bi)]["status"], kube.objects[key_of(svc)]["status"]
    reasons = {c["reason"] for c in bi_status["conditions"]}
    if bi_reason is None:
        assert [k for k in kube.objects if k[0] == "RayJob"], bi_status
    else:
        assert bi_reason in reasons, bi_status
    assert svc_status["adapters"][0]["state"] == adapter_state, svc_status["adapters"]


def test_a_status_field_the_model_lacks_fails_loudly():
    """The API server would prune it from the status without a word."""
    from llmops.handlers.writes import typed_status

    assert typed_status("FineTune", {"phase": "Running", "rayJobName": "x"}) == {"phase": "Running",
                                                                                 "rayJobName": "x"}
    with pytest.raises(ValueError, match="rayjobName"):
        typed_status("FineTune", {"phase": "Running", "rayjobName": "x"})


class KueueKube(RecordingKube):
    """The store plus Kueue's Workloads, listed by their job-uid label (or 404: no Kueue installed)."""

    def __init__(self, workloads: list[dict[str, Any]] | None) -> None:
        super().__init__()
        self.workloads = workloads

    async def list(self, api_version: str, kind: str, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        self.requests.append(("get", kind, label_selector))
        if self.workloads is None:
            raise ApiError(404, "the server could not find the requested resource")
        return copy.deepcopy(self.workloads)


@pytest.mark.parametrize("workloads, says", [
    ([{"metadata": {"name": "rayjob-viggo-ft-1"}, "status": {"conditions": [
        {"type": "QuotaReserved", "status": "False", "reason": "Pending",
         "message": "couldn't assign flavors to pod set worker: insufficient unused quota for nvidia.com/gpu"}]}}],
     "Pending: couldn't assign flavors to pod set worker: insufficient unused quota for nvidia.com/gpu"),
    (None, "Kueue has made no Workload for it yet"),
], ids=["kueue-reason", "no-kueue"])
def test_a_queued_job_reads_its_workload_and_shows_kueues_reason(workloads, says):
    ft = manifest("finetune")
    ft["spec"]["queueName"] = "gpu"
    kube = KueueKube(workloads)
    engine = Engine(kube, BuildContext(settings=Settings(), payloads=PAYLOADS))
    watches = Watches(kube, engine)
    kube.add(ft)
    watches.catch_up()
    run(engine.reconcile(key_of(ft)))   # creates the RayJob
    rayjob = kube.objects[("RayJob", "default", "viggo-ft")]
    assert "suspend" not in rayjob["spec"]
    rayjob["status"] = {"jobDeploymentStatus": "Suspended"}   # Kueue suspended it; KubeRay says so
    watches.catch_up()
    kube.take()
    retry = run(engine.reconcile(key_of(ft)))
    status = kube.objects[key_of(ft)]["status"]
    assert status["phase"] == "Queued" and says in status["message"], status
    assert ("get", "Workload", f"kueue.x-k8s.io/job-uid={rayjob['metadata']['uid']}") in kube.requests
    assert retry is not None and retry > 0   # read again later: no watch tells when Kueue's reason changes
    assert not [w for w in kube.writes() if w[0] == "apply"], "a queued job's children are not applied again"


GATEWAY_API = {"gateway.networking.k8s.io/v1": {"resources": [{"name": "httproutes"}]},
               "gateway.envoyproxy.io/v1alpha1": {"resources": [{"name": "securitypolicies"}]}}


def exposed_service(api_key: bool = True) -> dict[str, Any]:
    doc = manifest("llmservice")
    doc["spec"]["expose"] = {"gateway": {"name": "gw"}}
    if api_key:
        doc["spec"]["expose"]["apiKey"] = {"secretRef": {"name": "keys"}}
    return doc


def test_exposure_writes_the_key_policy_then_the_route_then_the_marker():
    doc = exposed_service()
    engine, kube, watches = setup(doc)
    kube.apis.update(GATEWAY_API)
    run(engine.reconcile(key_of(doc)))
    applies = [w for w in kube.writes() if w[0] == "apply"]
    assert applies == [("apply", "SecurityPolicy", "viggo-serve-llm"), ("apply", "HTTPRoute", "viggo-serve-llm"),
                       ("apply", "RayService", "viggo-serve-llm")]
    status = kube.objects[key_of(doc)]["status"]
    assert (status["routeName"], status["apiKeyPolicyName"]) == ("viggo-serve-llm", "viggo-serve-llm")
    # discovery is read once, then trusted while fresh
    watches.catch_up()
    run(engine.reconcile(key_of(doc)))
    assert len([r for r in kube.requests if r[1] == "discovery"]) == 2   # one read per group version


def test_a_route_refused_as_not_found_reads_discovery_again_and_stalls():
    """Discovery said the Gateway API was there, then its CRDs went: the 404 makes the engine read again."""
    doc = exposed_service(api_key=False)
    engine, kube, watches = setup(doc)
    kube.apis.update(GATEWAY_API)
    run(engine.reconcile(key_of(doc)))   # reads discovery: served
    del kube.apis["gateway.networking.k8s.io/v1"]
    kube.fail[("apply", "HTTPRoute")] = [ApiError(404, "the server could not find the requested resource",
                                                  "NotFound")]
    changed = kube.objects[key_of(doc)]
    changed["spec"]["expose"]["hostnames"] = ["llm.example.com"]   # a change, so the route is applied again
    changed["metadata"]["generation"] = 2
    kube._stamp(changed)
    watches.catch_up()
    retry = run(engine.reconcile(key_of(doc)))
    assert retry is not None, "a 404 after a discovery reading is retried, not reported as ApplyFailed"
    run(engine.reconcile(key_of(doc)))
    status = kube.objects[key_of(doc)]["status"]
    stalled = next(c for c in status["conditions"] if c["type"] == "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", "GatewayAPIMissing")
    assert "routeName" not in status


def test_dropping_expose_deletes_the_route_and_policy_it_wrote():
    doc = exposed_service()
    engine, kube, watches = setup(doc)
    kube.apis.update(GATEWAY_API)
    run(engine.reconcile(key_of(doc)))
    changed = kube.objects[key_of(doc)]
    del changed["spec"]["expose"]
    changed["metadata"]["generation"] = 2
    kube._stamp(changed)
    watches.catch_up()
    kube.take()
    run(engine.reconcile(key_of(doc)))
    assert [w for w in kube.writes() if w[0] == "delete"] == [("delete", "HTTPRoute", "viggo-serve-llm"),
                                                             ("delete", "SecurityPolicy", "viggo-serve-llm")]
    assert "routeName" not in kube.objects[key_of(doc)]["status"]
    assert ("RayService", "default", "viggo-serve-llm") in kube.objects


def test_a_shared_child_counts_in_the_hashes_by_its_name_alone():
    """The payload sources are named by their content: a set's hash reads the name, not the sources again."""
    from llmops.builders.common import payload_config_map
    from llmops.handlers.ordering import identity

    shared = payload_config_map("ml", {"a.py": "x = 1\n"}, Settings())
    job = {"kind": "ConfigMap", "metadata": {"name": "job", "labels": {ROLE_LABEL: "config"}}, "data": {"k": "v"}}
    assert identity([job, shared]) == [job, {"shared": shared["metadata"]["name"]}]
    other = payload_config_map("ml", {"a.py": "x = 2\n"}, Settings())
    assert identity([other]) != identity([shared])   # new sources, new name, new hash
