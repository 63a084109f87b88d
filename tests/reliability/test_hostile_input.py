"""Hostile input against the REAL API server and a running operator.

* Generated manifests (hypothesis, from the CRDs' own schemas; see schema_fuzz.py), created with
  fieldValidation=Strict: each is rejected at admission with a message naming the field, or accepted and then
  settles (support.settled); the operator logs no unhandled exception and retries nothing in a loop.
* Names: unicode and malformed names are refused by the API server with a metadata.name message; odd but legal
  names (dots, 253 characters, a leading digit) are admitted, get their children and settle.
* Delete and re-create with the same name: the new resource never adopts the old one's children.
* Huge specs near the size limits: refused cleanly, or accepted and then settled without a retry loop.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from kubernetes.client.rest import ApiException

from integration.harness import GROUP, PLURALS, VERSION, condition, phase, wait_for
from manifests import batchinference, finetune, llmservice
from reliability.control import paused, simulator_running, unhandled_errors
from reliability.schema_fuzz import MUTATION_KINDS, PRESENT, Case, cases, dotted, names_field
from reliability.support import eventually_quiet, inventory, metric, ray_children, settled, wait_until

pytestmark = pytest.mark.integration

QUIET_SECONDS = 6
RETRY_BUDGET = 5  # transient API errors (conflicts, throttling) are retried; nothing else should be


def create_strict(cluster, doc: dict, ns: str) -> dict:
    return cluster.custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURALS[doc["kind"]], doc,
                                                          field_validation="Strict")


def message_of(e: ApiException) -> str:
    try:
        return json.loads(e.body).get("message", e.body)
    except (TypeError, ValueError):
        return str(e.body)


def list_all(cluster, ns: str) -> dict[tuple[str, str], dict]:
    out = {}
    for kind, plural in PLURALS.items():
        for obj in cluster.custom.list_namespaced_custom_object(GROUP, VERSION, ns, plural)["items"]:
            out[(kind, obj["metadata"]["name"])] = obj
    return out


def start_with_references(cluster, operators, ns):
    """The operator, and the FineTune and BatchInference that generated references may point at (suspended)."""
    ft = finetune(PRESENT["FineTune"])
    ft["spec"]["suspend"] = True
    bi = batchinference(PRESENT["BatchInference"])
    bi["spec"]["suspend"] = True
    cluster.create(ft, ns)
    cluster.create(bi, ns)
    return operators.start(ns, name="operator")


@dataclass
class Tally:
    """What happened to every manifest tried."""

    accepted: dict[tuple[str, str], Case] = field(default_factory=dict)
    rejected: int = 0
    named_exactly: int = 0            # certainly invalid mutations whose refusal names the mutated field itself
    by_mutation: Counter = field(default_factory=Counter)
    rejected_by_mutation: Counter = field(default_factory=Counter)
    gaps: list[str] = field(default_factory=list)   # certainly invalid by the schema, yet admitted
    n: int = 0

    def name(self) -> str:
        """Mostly short names; every 10th has dots, every 25th is 253 characters (both legal)."""
        self.n += 1
        if self.n % 25 == 0:
            stem = f"h{self.n}-"
            return stem + "a" * (253 - len(stem))
        return f"h.{self.n}.x" if self.n % 10 == 0 else f"h{self.n}"

    def attempt(self, cluster, ns: str, case: Case) -> None:
        doc = copy.deepcopy(case.doc)
        doc["metadata"] = {"name": self.name()}
        label = case.mutation.name if case.mutation else "none"
        self.by_mutation[label] += 1
        try:
            create_strict(cluster, doc, ns)
        except ApiException as e:
            message = message_of(e)
            self.rejected += 1
            self.rejected_by_mutation[label] += 1
            assert e.status in (400, 422), f"{case.label}: HTTP {e.status}: {message}\n{json.dumps(doc)[:2000]}"
            assert "spec." in message, f"{case.label}: the refusal names no spec field: {message}"
            if case.mutation and case.mutation.must_reject:  # (else an edit may be what was refused)
                named = names_field(message, case.mutation.path)
                assert named, f"{case.label}: the refusal does not name {dotted(case.mutation.path)}: {message}"
                self.named_exactly += named == dotted(case.mutation.path)
            return
        self.accepted[(case.kind, doc["metadata"]["name"])] = case
        if case.mutation and case.mutation.must_reject:
            self.gaps.append(f"{case.label} ({doc['metadata']['name']}): value {json.dumps(case.mutation.value)[:80]}")


def wait_settled(cluster, ns: str, keys, timeout: float) -> dict[tuple[str, str], dict]:
    """Every resource in `keys` settled; returns them (fails naming those that are not)."""
    objs: dict = {}

    def check():
        nonlocal objs
        objs = list_all(cluster, ns)
        return not [k for k in keys if settled(objs.get(k)) is None]
    ok, _ = wait_until(check, timeout=timeout, interval=2)
    pending = {k: (objs.get(k) or {}).get("status") for k in keys if settled(objs.get(k)) is None}
    assert ok, f"{len(pending)} accepted resources never settled, e.g. {list(pending.items())[:5]}"
    return objs


def quiet_check(cluster, ns: str, op, keys, timeout: float = 90) -> dict:
    """Wait for a quiet window: QUIET_SECONDS without retries, without stalled reconciles and without any rewrite
    of a Stalled or Suspended status. Late but legitimate transitions (a big child seen late) only delay the
    window; a retry loop never lets it come, and the last window's findings are returned."""
    deadline = time.monotonic() + timeout
    while True:
        before = list_all(cluster, ns)
        metrics_before = op.metrics()
        time.sleep(QUIET_SECONDS)
        after = list_all(cluster, ns)
        metrics_after = op.metrics()
        resting = [k for k in keys if (settled(before.get(k)) or "").split(":")[0] in ("Stalled", "Suspended")]
        found = {
            "retries_total": metric(metrics_after, "llmops_reconciles_total", result="retry"),
            "retries_in_window": metric(metrics_after, "llmops_reconciles_total", result="retry")
            - metric(metrics_before, "llmops_reconciles_total", result="retry"),
            "stalled_reconciles_in_window": metric(metrics_after, "llmops_reconciles_total", result="stalled")
            - metric(metrics_before, "llmops_reconciles_total", result="stalled"),
            "resting": len(resting),
            "rewritten": [k for k in resting
                          if before[k]["metadata"]["resourceVersion"] != after[k]["metadata"]["resourceVersion"]],
        }
        quiet = not found["retries_in_window"] and not found["stalled_reconciles_in_window"] and not found["rewritten"]
        if quiet or time.monotonic() > deadline:
            return found


# ---- generated manifests ------------------------------------------------------------------------------------------
def test_generated_manifests_rejected_naming_the_field_or_settle(plane, cluster, ns, operators, capacity, long_run,
                                                               record):
    per_kind = 200 if long_run else 30   # 18 mutation kinds: CI tries 540 manifests, long 3600
    op = start_with_references(cluster, operators, ns)
    tally = Tally()
    run_seed = int(os.environ.get("LLMOPS_SEED", int(time.time())))
    print(f"hostile-input seed {run_seed} (LLMOPS_SEED={run_seed} repeats the examples)")
    started = time.monotonic()
    for mutation in MUTATION_KINDS:
        @seed(run_seed)
        @settings(max_examples=per_kind, deadline=None, database=None, phases=(Phase.generate, Phase.shrink),
                  suppress_health_check=list(HealthCheck))
        @given(case=cases(mutation))
        def attempt(case: Case) -> None:
            tally.attempt(cluster, ns, case)
        attempt()
    created_seconds = time.monotonic() - started

    keys = list(tally.accepted)
    objs = wait_settled(cluster, ns, keys, timeout=600 if long_run else 240)
    states = Counter(settled(objs[k]) for k in keys)
    # What admission missed (gaps) the operator must stop itself, naming the field.
    unstopped = [f"{tally.accepted[k].label} {k[1]}: {settled(objs[k])}" for k in keys
                 if tally.accepted[k].mutation and tally.accepted[k].mutation.must_reject
                 and not settled(objs[k]).startswith("Stalled")]
    invalid_unnamed = [k for k in keys if settled(objs[k]) == "Stalled:InvalidSpec"
                       and "spec." not in condition(objs[k], "Stalled")["message"]]
    quiet = quiet_check(cluster, ns, op, keys)
    errors = unhandled_errors(operators.logs())
    unsuspended = sum(1 for k in keys if tally.accepted[k].doc["spec"].get("suspend") is False)

    record(manifests_tried=sum(tally.by_mutation.values()), accepted=len(keys), rejected=tally.rejected,
           rejected_naming_exact_field=tally.named_exactly, accepted_unsuspended=unsuspended,
           schema_gaps=len(tally.gaps), settled_states=dict(states), retries_total=quiet["retries_total"],
           retries_in_quiet_window=quiet["retries_in_window"], rewritten_when_quiet=len(quiet["rewritten"]),
           unhandled_exceptions=len(errors), create_seconds=round(created_seconds), seed=run_seed)
    print("tried by mutation:", dict(tally.by_mutation), "\nrejected by mutation:", dict(tally.rejected_by_mutation))
    if tally.gaps:
        print("admitted although invalid by the schema:\n  " + "\n  ".join(tally.gaps[:30]))

    assert sum(tally.by_mutation.values()) >= (500 if not long_run else 3000)
    assert not unstopped, f"admitted invalid manifests the operator did not stall: {unstopped[:10]}"
    assert not invalid_unnamed, f"InvalidSpec without a spec path: {invalid_unnamed[:10]}"
    assert not errors, "unhandled exceptions in the operator log:\n" + "\n".join(errors[:20])
    assert quiet["retries_in_window"] == 0 and quiet["stalled_reconciles_in_window"] == 0, quiet
    assert quiet["retries_total"] <= RETRY_BUDGET, quiet
    assert not quiet["rewritten"], f"statuses rewritten while nothing changed: {quiet['rewritten'][:10]}"


# ---- names --------------------------------------------------------------------------------------------------------
ILLEGAL_NAMES = ["näme", "名前", "model-🙂", "UPPER", "under_score", "-lead", "trail-", "a..b", "space name",
                 "a" * 254, "\u202eevil", "tab\tname", "semi;colon", "slash/name", "percent%20"]
LEGAL_ODD_NAMES = ["a", "0", "a.b.c", "x" * 253, "dots.and-dashes.9"]


def test_names_illegal_rejected_legal_odd_ones_settle(cluster, ns, operators, record):
    op = operators.start(ns, name="operator")
    rejected = 0
    for make in (finetune, batchinference, llmservice):
        for name in ILLEGAL_NAMES:
            doc = make()
            doc["metadata"]["name"] = name
            with pytest.raises(ApiException) as info:
                create_strict(cluster, doc, ns)
            message = message_of(info.value)
            assert info.value.status == 422, message   # Invalid, not a missing namespace or a bad request
            assert "metadata.name" in message, message   # the refusal names the field, not just any "name"
            rejected += 1
    accepted = []
    for make in (finetune, batchinference, llmservice):
        for name in LEGAL_ODD_NAMES:
            doc = make()
            doc["metadata"]["name"] = name
            doc["spec"]["suspend"] = True
            create_strict(cluster, doc, ns)
            accepted.append((doc["kind"], name))
    wait_settled(cluster, ns, accepted, timeout=120)
    # KubeRay validates a (suspended) RayJob a moment after it is applied: let statuses come to rest.
    eventually_quiet(lambda: {f"{k}": (o["metadata"]["resourceVersion"]) for k, o in list_all(cluster, ns).items()},
                     seconds=4, timeout=40)
    objs = list_all(cluster, ns)
    inv = inventory(cluster, ns)
    children = ray_children(inv)
    jobs_without_child = [k for k in accepted if k[0] != "LLMService"
                          and not children.get(objs[k]["metadata"]["uid"])]
    stalled = {f"{k[0]}/{k[1][:20]}": condition(objs[k], "Stalled").get("message", "")[:160] for k in accepted
               if (settled(objs[k]) or "").startswith("Stalled")}
    record(illegal_names_rejected=rejected, odd_legal_names_accepted=len(accepted),
           states=dict(Counter(settled(objs[k]) for k in accepted)), stalled=stalled)
    assert not jobs_without_child, f"suspended jobs without their RayJob: {jobs_without_child}"
    # KubeRay takes only DNS-1035 labels: a Ray object named after `0` or `a.b.c` would stall the resource.
    assert not [m for m in stalled.values() if "DNS1035" in m], stalled
    assert not unhandled_errors(op.log())


# ---- delete and re-create -----------------------------------------------------------------------------------------
def _children_uids(cluster, ns: str, owner_uid: str) -> dict[str, tuple[str, str]]:
    """'Kind/name' -> (its uid, its controller owner's uid) for every llmops child labelled with that owner."""
    inv = inventory(cluster, ns)
    out = {}
    for kind, obj in inv.all_children():
        labels = obj["metadata"].get("labels") or {}
        ref = next((r for r in obj["metadata"].get("ownerReferences") or [] if r.get("controller")), {})
        if labels.get("llmops.dev/owner-uid") == owner_uid or ref.get("uid") == owner_uid:
            out[f"{kind}/{obj['metadata']['name']}"] = (obj["metadata"]["uid"], ref.get("uid"))
    return out


@pytest.mark.parametrize("how", ["immediately", "while-gc-is-behind", "after-orphaning-delete"])
def test_recreate_same_name_never_adopts_old_children(plane, cluster, ns, operators, long_run, record, how):
    """Run a FineTune to the end (its RayJob Complete, its result ConfigMap full), delete it and create it again
    with the same name: the new one must get new children and start from nothing, never take over the old RayJob
    or the old result (which would make it 'Succeeded' with the previous run's adapter).

    immediately: a plain delete (background propagation) and an immediate re-create, racing the garbage collector.
    while-gc-is-behind: the same with the controller-manager paused meanwhile, as when its garbage collector lags.
    after-orphaning-delete: `kubectl delete --cascade=orphan`; the old children stay, without an owner."""
    cycles = (8 if long_run else 3) if how == "immediately" else (3 if long_run else 1)
    op = operators.start(ns, name="operator")
    stale: list[str] = []
    for cycle in range(cycles):
        with simulator_running(plane, ns):
            doc = finetune("again")
            doc["spec"]["method"] = {"rank": 8 + cycle}
            first = create_strict(cluster, doc, ns)
            wait_for(lambda: phase(cluster.get("FineTune", ns, "again")) == "Succeeded", timeout=120,
                     what="the first run to succeed")
        old = _children_uids(cluster, ns, first["metadata"]["uid"])
        doc["spec"]["method"] = {"rank": 9 + cycle}
        if how == "while-gc-is-behind":
            with paused(plane, "kube-controller-manager"):
                cluster.delete("FineTune", ns, "again")
                second = _create_when_name_is_free(cluster, doc, ns)
                wait_for(lambda: settled(cluster.get("FineTune", ns, "again")), timeout=90,
                         what="the new FineTune to settle")
        else:
            cluster.custom.delete_namespaced_custom_object(
                GROUP, VERSION, ns, "finetunes", "again",
                propagation_policy="Orphan" if how == "after-orphaning-delete" else "Background")
            second = _create_when_name_is_free(cluster, doc, ns)
        new_uid = second["metadata"]["uid"]
        wait_for(lambda: settled(cluster.get("FineTune", ns, "again")), timeout=90, what="the new FineTune to settle")
        if how != "after-orphaning-delete":  # let the garbage collector finish with the old children
            wait_until(lambda: not _children_uids(cluster, ns, first["metadata"]["uid"]), timeout=30)
        ft = cluster.get("FineTune", ns, "again")
        new = _children_uids(cluster, ns, new_uid)
        reused = sorted(k for k, (uid, _) in new.items() if uid in {u for u, _ in old.values()})
        if reused:
            stale.append(f"cycle {cycle}: {reused} kept from the deleted FineTune {first['metadata']['uid']}")
        if phase(ft) == "Succeeded":
            stale.append(f"cycle {cycle}: the new FineTune is Succeeded at once, with {ft['status'].get('adapter')}"
                         f" / {ft['status'].get('metrics')} from the old run")
        wrong_owner = sorted(k for k, (_, owner) in new.items() if owner != new_uid)
        if wrong_owner:
            stale.append(f"cycle {cycle}: {wrong_owner} not owned by the new uid {new_uid}")
        cluster.delete("FineTune", ns, "again")
        wait_for(lambda: cluster.get("FineTune", ns, "again") is None, timeout=60, what="deletion")
        wait_for(lambda: not _children_uids(cluster, ns, new_uid), timeout=90, what="garbage collection")
        for kind_name in _children_uids(cluster, ns, first["metadata"]["uid"]):  # orphans of the first run
            _delete_child(cluster, ns, kind_name)
    record(how=how, recreate_cycles=cycles, stale_children_adopted=len(stale))
    assert not stale, "the re-created FineTune took over the old one's children:\n" + "\n".join(stale)
    assert not unhandled_errors(op.log())


def _create_when_name_is_free(cluster, doc: dict, ns: str) -> dict:
    """Create as soon as the old object is gone (at once, or once the orphan finalizer has run)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return create_strict(cluster, doc, ns)
        except ApiException as e:
            if e.status != 409 or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _delete_child(cluster, ns: str, kind_name: str) -> None:
    kind, name = kind_name.split("/", 1)
    calls = {"RayJob": lambda: cluster.custom.delete_namespaced_custom_object("ray.io", "v1", ns, "rayjobs", name),
             "RayService": lambda: cluster.custom.delete_namespaced_custom_object("ray.io", "v1", ns, "rayservices",
                                                                                 name),
             "ConfigMap": lambda: cluster.core.delete_namespaced_config_map(name, ns),
             "ServiceAccount": lambda: cluster.core.delete_namespaced_service_account(name, ns),
             "Role": lambda: cluster.rbac.delete_namespaced_role(name, ns),
             "RoleBinding": lambda: cluster.rbac.delete_namespaced_role_binding(name, ns)}
    try:
        calls[kind]()
    except ApiException as e:
        if e.status != 404:
            raise


# ---- huge specs ---------------------------------------------------------------------------------------------------
def test_huge_specs_refused_cleanly_or_stalled_without_retry_loop(cluster, ns, operators, record):
    """A system prompt at maxLength in 4-byte characters, 64 pip entries and 64 environment variables of 16 KB, an
    extraArgs blob of 1.4 MB (admitted, but its job ConfigMap would pass the 1 MiB limit: the FineTune stalls), and
    specs past etcd's and the API server's request limits (refused whole)."""
    op = operators.start(ns, name="operator")
    accepted, refused = [], []

    def attempt(doc: dict) -> None:
        doc["spec"]["suspend"] = True
        try:
            create_strict(cluster, doc, ns)
            accepted.append((doc["kind"], doc["metadata"]["name"]))
        except ApiException as e:
            message = message_of(e)
            # Past the request limit (3 MiB) or etcd's (1.5 MiB): refused whole, before any field is looked at.
            assert e.status in (413, 500) and ("too large" in message or "larger than max" in message), \
                f"HTTP {e.status}: {message}"
            refused.append((doc["metadata"]["name"], e.status))

    bi = batchinference("prompt-at-limit")
    bi["spec"]["prompt"]["systemPrompt"] = "🙂" * 32768          # maxLength, in 4-byte characters (128 KiB)
    attempt(bi)
    ft = finetune("pip-1mib")
    ft["spec"]["runtimeEnv"] = {"pip": [f"pkg{i}==" + "1" * 16000 for i in range(64)]}   # ~1 MiB, 64 items
    attempt(ft)
    ft = finetune("extra-1400k")
    ft["spec"]["extraArgs"] = {"seed": 7, "note": "x" * (1400 * 1024)}       # under etcd's limit, over a ConfigMap's
    attempt(ft)
    svc = llmservice("envvars-64")
    svc["spec"]["runtimeEnv"] = {"envVars": {f"K{i}": "v" * 16000 for i in range(64)}}
    attempt(svc)
    ft = finetune("extra-2m")
    ft["spec"]["extraArgs"] = {"note": "x" * (2 * 1024 * 1024)}
    attempt(ft)
    ft = finetune("extra-4m")
    ft["spec"]["extraArgs"] = {"note": "x" * (4 * 1024 * 1024)}
    attempt(ft)

    objs = wait_settled(cluster, ns, accepted, timeout=120)
    quiet = quiet_check(cluster, ns, op, accepted)
    states = {k[1]: settled(objs[k]) for k in accepted}
    record(huge_manifests=len(accepted) + len(refused), accepted=len(accepted), refused=len(refused), states=states,
           retries_in_quiet_window=quiet["retries_in_window"])
    assert sorted(name for name, _ in refused) == ["extra-2m", "extra-4m"], refused
    assert ("FineTune", "extra-1400k") in accepted
    assert quiet["retries_in_window"] == 0 and not quiet["rewritten"], quiet
    # The 1.4 MB blob as docs/reliability.md tells it: the API server refuses the job ConfigMap, the FineTune
    # stalls (Failed, ApplyFailed, naming the ConfigMap and the limit) in one reconcile and is not retried.
    big = cluster.get("FineTune", ns, "extra-1400k")
    stalled = condition(big, "Stalled")
    assert (phase(big), settled(big)) == ("Failed", "Stalled:ApplyFailed"), big.get("status")
    assert 'ConfigMap "extra-1400k-ft-config"' in stalled["message"] and "1048576 bytes" in stalled["message"], \
        stalled
    assert cluster.config_map(ns, "extra-1400k-ft-config") is None
    assert metric(op.metrics(), "llmops_reconciles_total", kind="FineTune", result="stalled") == 1, \
        "the refused child was tried more than once"
    assert not unhandled_errors(op.log()), unhandled_errors(op.log())[:10]
